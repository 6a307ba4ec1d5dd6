"""posix/rlimits: `ContainerInfo.rlimit_info` applied to the container's first process.

    {"rlimit_info": {"rlimits": [{"type": "RLMT_NOFILE", "soft": 1024, "hard": 4096},
                                 {"type": "RLMT_CORE"}]}}        # no soft/hard: unlimited

As in Mesos, soft and hard are given together or not at all, and soft <= hard; a bad
value fails the launch with a message that says which.
"""

from __future__ import annotations

import resource

from isolators.interface import ContainerConfig, Isolator, LaunchInfo, Settings

PREFIX = "RLMT_"


def parse_rlimits(container_info: dict | None) -> tuple:
    """(name, soft, hard) for each rlimit of a ContainerInfo (None = unlimited); ValueError."""
    info = (container_info or {}).get("rlimit_info") or {}
    out = []
    seen = set()
    for item in info.get("rlimits") or ():
        kind = item.get("type") if isinstance(item, dict) else None
        if not isinstance(kind, str) or not kind.startswith(PREFIX):
            raise ValueError(f"rlimit type must be one of RLMT_*: {item!r}")
        name = kind[len(PREFIX):]
        if not hasattr(resource, f"RLIMIT_{name}"):
            raise ValueError(f"unknown rlimit type {kind}")
        if name in seen:
            raise ValueError(f"rlimit {kind} is given twice")
        seen.add(name)
        soft, hard = item.get("soft"), item.get("hard")
        if (soft is None) != (hard is None):
            raise ValueError(f"rlimit {kind}: give both soft and hard, or neither (unlimited)")
        if soft is not None:
            if not all(isinstance(v, int) and v >= 0 for v in (soft, hard)):
                raise ValueError(f"rlimit {kind}: soft and hard must be non-negative integers")
            if soft > hard:
                raise ValueError(f"rlimit {kind}: soft limit {soft} exceeds hard limit {hard}")
        out.append((name, soft, hard))
    return tuple(out)


class RlimitsIsolator(Isolator):
    def __init__(self, settings: Settings):
        self.settings = settings

    def prepare(self, config: ContainerConfig) -> LaunchInfo | None:
        rlimits = parse_rlimits(config.container_info)
        return LaunchInfo(rlimits=rlimits) if rlimits else None
