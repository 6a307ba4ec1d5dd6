"""Processes as /proc/<pid>/stat shows them: the one parser the agent uses.

The fields returned are those after the command name (which is in parentheses and may
itself hold spaces and parentheses): state ppid pgrp session tty tpgid flags minflt cminflt
majflt cmajflt utime stime cutime cstime priority nice threads itrealvalue starttime vsize
rss ... (indexes 0..). Zombies count as gone.
"""

from __future__ import annotations

import os


def _fields(stat: bytes) -> list[bytes] | None:
    fields = stat[stat.rfind(b")") + 2:].split()
    return fields if len(fields) > 21 and fields[0] not in (b"Z", b"X") else None


def stat_fields(pid: int) -> list[bytes] | None:
    """The stat fields of live process `pid`; None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return _fields(f.read())
    except OSError:
        return None


def proc_stats() -> list[tuple[int, list[bytes]]] | None:
    """(pid, stat fields) of every live process; None if /proc is unusable."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return None
    out = []
    for name in names:
        if name.isdigit():
            fields = stat_fields(int(name))  # None: it ended while we looked
            if fields is not None:
                out.append((int(name), fields))
    return out
