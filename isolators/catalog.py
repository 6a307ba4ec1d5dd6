"""Isolators by name: the built-in ones and those of the `agora.isolators` entry-point group.

`load("cgroups/cpu,namespaces/pid", settings)` returns the isolators in that order, or
raises ValueError naming what is unknown and what is known.
"""

from __future__ import annotations

import importlib
from importlib import metadata

from isolators.interface import Isolator, Settings

ENTRY_POINT_GROUP = "agora.isolators"

#: name -> "module:factory"; a factory takes a Settings and returns an Isolator.
BUILTIN = {
    "cgroups/cpu": "isolators.cgroups.cpu:CpuIsolator",
    "cgroups/mem": "isolators.cgroups.memory:MemoryIsolator",
    "cgroups/pids": "isolators.cgroups.pids:PidsIsolator",
    "cgroups/devices": "isolators.cgroups.devices:DevicesIsolator",
    "namespaces/pid": "isolators.namespaces:PidNamespaceIsolator",
    "namespaces/ipc": "isolators.namespaces:IpcNamespaceIsolator",
    "namespaces/uts": "isolators.namespaces:UtsNamespaceIsolator",
    "filesystem/linux": "isolators.filesystem:LinuxFilesystemIsolator",
    "network/cni": "isolators.network_cni:CniIsolator",
    "posix/rlimits": "isolators.rlimits:RlimitsIsolator",
    "disk/du": "isolators.disk:DiskIsolator",
}

#: Accepted for Mesos compatibility: usage comes from /proc without them.
POSIX_NAMES = frozenset({"posix/cpu", "posix/mem", "posix/disk", "filesystem/posix"})


def _factory(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def known() -> dict[str, object]:
    """Every isolator name, built-in and installed, with where it comes from."""
    names: dict[str, object] = dict(BUILTIN)
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        names.setdefault(ep.name, ep)
    return names


def parse(text: str | None) -> list[str]:
    """The names in an `--isolation` value, in order, without duplicates or posix names."""
    out: list[str] = []
    for name in (text or "").split(","):
        name = name.strip()
        if name and name not in POSIX_NAMES and name not in out:
            out.append(name)
    return out


def load(text: str | None, settings: Settings) -> list[Isolator]:
    """The isolators `text` names, made with `settings`; ValueError for an unknown name."""
    names = parse(text)
    catalog = known()
    unknown = [n for n in names if n not in catalog]
    if unknown:
        raise ValueError(f"unknown isolator(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(set(catalog) | POSIX_NAMES))}")
    isolators = []
    for name in names:
        source = catalog[name]
        factory = source.load() if isinstance(source, metadata.EntryPoint) else _factory(source)
        isolator = factory(settings)
        if not isinstance(isolator, Isolator):
            raise ValueError(f"isolator {name!r} ({source}) did not make an Isolator")
        isolator.name = name
        isolators.append(isolator)
    return isolators
