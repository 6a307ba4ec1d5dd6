"""Resource usage of containers, for `/monitor/statistics` (Mesos's ResourceStatistics names).

    usage(containers) ──> {container_id: {"processes", "threads", "cpus_user_time_secs",
                                          "cpus_system_time_secs", "mem_rss_bytes"}}

`containers` are launcher Containers (`container_id`, `pid`). A posix container is a session,
so `posix_usage`, the default *usage function*, sums over the session's live processes, read
from `/proc/<pid>/stat` in one pass over `/proc` for all containers at once. CPU times include
each member's reaped children (`cutime`/`cstime`), so a task that already ended still counts
in its executor's total. A containerizer that knows better (cgroups: cpu.stat, memory.stat)
passes its own function to the Agent (`usage=`). A usage function may block: the agent calls
it in a thread, and only reads `container_id` and `pid` there.

`limits` and `entry` build the rest of a `/monitor/statistics` element from the agent's
records; they are pure.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

from agent.procfs import proc_stats, stat_fields

#: (containers) -> {container_id: statistics fields}; a container with no live process may
#: be absent.
UsageFunction = Callable[[list], dict]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MB = 1024 * 1024


def proc_usage(sessions: Iterable[int]) -> dict[int, dict]:
    """Usage of each session in `sessions`, summed over its live processes (from /proc)."""
    wanted = set(sessions)
    totals = {sid: {"processes": 0, "threads": 0, "cpus_user_time_secs": 0.0,
                    "cpus_system_time_secs": 0.0, "mem_rss_bytes": 0} for sid in wanted}
    for _, fields in proc_stats() or ():
        try:
            sid = int(fields[3])
            if sid not in wanted:
                continue
            utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
            threads, rss = int(fields[17]), int(fields[21])
        except (IndexError, ValueError):
            continue
        total = totals[sid]
        total["processes"] += 1
        total["threads"] += threads
        total["cpus_user_time_secs"] += (utime + cutime) / _TICKS
        total["cpus_system_time_secs"] += (stime + cstime) / _TICKS
        total["mem_rss_bytes"] += rss * _PAGE
    return {sid: t for sid, t in totals.items() if t["processes"]}


def posix_usage(containers: list) -> dict[str, dict]:
    """The default usage function: each container's session, from /proc."""
    by_session = {c.pid: c.container_id for c in containers}
    return {by_session[sid]: stats for sid, stats in proc_usage(by_session).items()}


def member_usage(containers: list) -> dict[str, dict]:
    """Each container's members (`container.members()`, e.g. its cgroup's), from /proc."""
    out = {}
    for container in containers:
        total = {"processes": 0, "threads": 0, "cpus_user_time_secs": 0.0,
                 "cpus_system_time_secs": 0.0, "mem_rss_bytes": 0}
        for pid in container.members() or ():
            fields = stat_fields(pid)
            if fields is None:
                continue
            total["processes"] += 1
            total["threads"] += int(fields[17])
            total["cpus_user_time_secs"] += (int(fields[11]) + int(fields[13])) / _TICKS
            total["cpus_system_time_secs"] += (int(fields[12]) + int(fields[14])) / _TICKS
            total["mem_rss_bytes"] += int(fields[21]) * _PAGE
        if total["processes"]:
            out[container.container_id] = total
    return out


def limits(resource_lists: Iterable[list]) -> dict:
    """`cpus_limit` and `mem_limit_bytes` from lists of Mesos Resource JSON (summed)."""
    cpus = mem = 0.0
    for resources in resource_lists:
        for r in resources or []:
            if not isinstance(r, dict) or r.get("type", "SCALAR") != "SCALAR":
                continue
            value = (r.get("scalar") or {}).get("value")
            if not isinstance(value, (int, float)):
                continue
            if r.get("name") == "cpus":
                cpus += value
            elif r.get("name") == "mem":
                mem += value
    out = {}
    if cpus:
        out["cpus_limit"] = round(cpus, 6)
    if mem:
        out["mem_limit_bytes"] = int(mem * MB)
    return out


def entry(executor_id: str, executor_name: str, framework_id: str, source: str,
          statistics: dict) -> dict:
    """One element of /monitor/statistics, as Mesos's `ResourceUsage.Executor` JSON."""
    return {"executor_id": executor_id, "executor_name": executor_name,
            "framework_id": framework_id, "source": source, "statistics": statistics}
