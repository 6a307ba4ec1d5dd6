"""Marathon's names: path ids of apps and groups, instance and task ids, version timestamps.

Pure: no I/O. The rules follow Marathon 1.11 (specs/marathon-api.md §1.3, §2.1, §4.6):

    /shop/web                     an app (or group) path id; segments are DNS-like labels
    shop_web.instance-<uuid>      an instance of it (the safe path joins segments with `_`)
    shop_web.instance-<uuid>._app.3   the instance's third task (its incarnation)
    2024-05-01T12:00:00.123Z      a version: a UTC timestamp with three-digit millis
"""

from __future__ import annotations

import datetime
import re

ROOT = "/"
SEGMENT = re.compile(r"^(([a-z0-9]|[a-z0-9][a-z0-9\-]*[a-z0-9])\.)*([a-z0-9]|[a-z0-9][a-z0-9\-]*[a-z0-9])$")
#: An app id may not end in one of these: they name the sub-resources of /v2/apps/{id}.
RESERVED = frozenset({"restart", "tasks", "versions"})
SEGMENT_RULE = ("a path segment is lowercase letters, digits, hyphens and dots, starting and "
                "ending with a letter or digit (e.g. /shop/web-1)")


class InvalidId(ValueError):
    """A path id that Marathon would not accept; the message says why."""


def canonical(path: str, base: str = ROOT) -> str:
    """`path` made absolute against the group `base`, with `.` and `..` resolved.

    `canonical("web", "/shop")` is `/shop/web`; `canonical("../db", "/shop/web")` is
    `/shop/db`. InvalidId for a segment outside the rule or a `..` above the root.
    """
    if not isinstance(path, str):
        raise InvalidId(f"expected a path id string, got {type(path).__name__}")
    parts = [] if path.startswith("/") else [p for p in base.split("/") if p]
    for seg in path.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if not parts:
                raise InvalidId(f"{path!r} goes above the root group")
            parts.pop()
            continue
        if not SEGMENT.match(seg):
            raise InvalidId(f"invalid path segment {seg!r} in {path!r}: {SEGMENT_RULE}")
        parts.append(seg)
    return "/" + "/".join(parts)


def parent(path: str) -> str:
    """The group holding `path` (`/` for top-level ids and for the root itself)."""
    i = path.rstrip("/").rfind("/")
    return path[:i] if i > 0 else ROOT


def ancestors(path: str) -> list[str]:
    """Every group above `path`, root first (`/a/b/c` -> `/`, `/a`, `/a/b`)."""
    out, p = [], parent(path)
    while True:
        out.append(p)
        if p == ROOT:
            break
        p = parent(p)
    return out[::-1]


def is_within(path: str, group: str) -> bool:
    """Whether `path` is `group` itself or anything below it."""
    return group == ROOT or path == group or path.startswith(group + "/")


def safe_path(app_id: str) -> str:
    """`/shop/web` -> `shop_web`, the prefix of the app's instance and task ids."""
    return "_".join(p for p in app_id.split("/") if p)


def app_id_of_safe(safe: str) -> str:
    """The inverse of `safe_path` (segments never hold `_`, so it is unambiguous)."""
    return "/" + safe.replace("_", "/")


def instance_id(app_id: str, uuid: str) -> str:
    return f"{safe_path(app_id)}.instance-{uuid}"


def task_id(instance: str, incarnation: int) -> str:
    return f"{instance}._app.{incarnation}"


_TASK_PATTERNS = (
    re.compile(r"^(.+)\.(instance-|marathon-)([^_.]+)[._]([^.]+)\.(\d+)$"),
    re.compile(r"^(.+)\.(instance-|marathon-)([^_.]+)[._]([^.]+)$"),
    re.compile(r"^(.+)([._])([^_.]+)\.(\d+)$"),
    re.compile(r"^(.+)([._])([^_.]+)$"),
)


def parse_task_id(text: str) -> tuple[str, str]:
    """(app id, instance id) of a task id in any of Marathon's forms; InvalidId if none."""
    m = _TASK_PATTERNS[0].match(text) or _TASK_PATTERNS[1].match(text)
    if m:
        safe = m.group(1)
        return app_id_of_safe(safe), f"{safe}.{m.group(2)}{m.group(3)}"
    m = _TASK_PATTERNS[2].match(text) or _TASK_PATTERNS[3].match(text)
    if m:
        return app_id_of_safe(m.group(1)), text
    raise InvalidId(f"{text!r} is not a Marathon task id (expected e.g. "
                    "web.instance-<uuid>._app.1)")


# --- versions ---------------------------------------------------------------------------

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def format_timestamp(seconds: float) -> str:
    """`YYYY-MM-DDTHH:MM:SS.sssZ` in UTC: the only form the marathon client parses."""
    millis = int(round(seconds * 1000))
    t = _EPOCH + datetime.timedelta(milliseconds=millis)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{millis % 1000:03d}Z"


def parse_timestamp(text: str) -> float:
    """Seconds since the epoch of a Marathon timestamp (`...Z`, `...+00:00`); ValueError."""
    if not isinstance(text, str):
        raise ValueError(f"expected a timestamp string, got {text!r}")
    s = text.strip()
    if s.endswith("Z"):
        s = s[:-1] + "+00:00"
    try:
        t = datetime.datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(f"not a timestamp: {text!r} (expected e.g. "
                         "2024-05-01T12:00:00.000Z)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    return (t - _EPOCH).total_seconds()


def next_version(now: float, last: str | None = None) -> str:
    """A version for a change made at `now`, strictly after `last` (versions are the keys of
    stored app versions, so two changes in one millisecond must not share one)."""
    version = format_timestamp(now)
    if last is not None and version <= last:
        version = format_timestamp(parse_timestamp(last) + 0.001)
    return version
