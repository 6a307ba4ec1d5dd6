"""ResourceStatistics fields (Mesos names) from cgroup control files (pure: text in, dict out).

    v1: cpuacct.stat (USER_HZ ticks), cpu.stat (throttled_time in ns), memory.stat (total_*)
    v2: cpu.stat (µs), memory.stat (anon, file, file_mapped, ...), memory.current
"""

from __future__ import annotations


def parse_keyed(text: str) -> dict[str, int]:
    """A flat keyed file ('key value' lines: cpu.stat, memory.stat, cgroup.events, ...)."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            out[key] = int(value)
        except ValueError:
            continue
    return out


def cpu_v1(cpuacct_stat: dict | None, cpu_stat: dict | None, ticks_per_second: int) -> dict:
    """From v1 cpuacct.stat (user/system ticks) and cpu.stat (CFS periods)."""
    out = {}
    if cpuacct_stat:
        out["cpus_user_time_secs"] = cpuacct_stat.get("user", 0) / ticks_per_second
        out["cpus_system_time_secs"] = cpuacct_stat.get("system", 0) / ticks_per_second
    if cpu_stat:
        out["cpus_nr_periods"] = cpu_stat.get("nr_periods", 0)
        out["cpus_nr_throttled"] = cpu_stat.get("nr_throttled", 0)
        out["cpus_throttled_time_secs"] = cpu_stat.get("throttled_time", 0) / 1e9
    return out


def cpu_v2(cpu_stat: dict) -> dict:
    """From v2 cpu.stat (µs counters)."""
    return {
        "cpus_user_time_secs": cpu_stat.get("user_usec", 0) / 1e6,
        "cpus_system_time_secs": cpu_stat.get("system_usec", 0) / 1e6,
        "cpus_nr_periods": cpu_stat.get("nr_periods", 0),
        "cpus_nr_throttled": cpu_stat.get("nr_throttled", 0),
        "cpus_throttled_time_secs": cpu_stat.get("throttled_usec", 0) / 1e6,
    }


#: memory.stat key -> ResourceStatistics fields, for v1 (hierarchical totals) and v2.
_MEMORY_V1 = {
    "total_rss": ("mem_rss_bytes", "mem_anon_bytes"),
    "total_cache": ("mem_cache_bytes", "mem_file_bytes"),
    "total_mapped_file": ("mem_mapped_file_bytes",),
    "total_swap": ("mem_swap_bytes",),
    "total_unevictable": ("mem_unevictable_bytes",),
}
_MEMORY_V2 = {
    "anon": ("mem_rss_bytes", "mem_anon_bytes"),
    "file": ("mem_cache_bytes", "mem_file_bytes"),
    "file_mapped": ("mem_mapped_file_bytes",),
    "unevictable": ("mem_unevictable_bytes",),
}


def memory(version: int, memory_stat: dict) -> dict:
    """The memory.stat part of the statistics (v1 falls back to the non-total keys)."""
    out = {}
    for key, fields in (_MEMORY_V1 if version == 1 else _MEMORY_V2).items():
        value = memory_stat.get(key)
        if value is None and version == 1:
            value = memory_stat.get(key[len("total_"):])
        if value is not None:
            for field in fields:
                out[field] = value
    return out
