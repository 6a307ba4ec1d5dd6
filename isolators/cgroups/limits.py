"""Container allotments turned into cgroup control values (pure: numbers in, values out).

Mesos's rules: cpu.shares = max(2, 1024 * cpus); a CFS quota of cpus * 100 ms per 100 ms
period, at least 1 ms; memory at least 32 MB. v2 values are derived the way runc and
systemd do (cpu.weight from shares, "quota period" in cpu.max).
"""

from __future__ import annotations

MB = 1024 * 1024

CPU_SHARES_PER_CPU = 1024
MIN_CPU_SHARES = 2
MAX_CPU_SHARES = 262144
CFS_PERIOD_US = 100_000
MIN_CFS_QUOTA_US = 1_000
MIN_MEMORY_BYTES = 32 * MB


def cpu_shares(cpus: float) -> int:
    """v1 cpu.shares for `cpus`."""
    return min(MAX_CPU_SHARES, max(MIN_CPU_SHARES, int(CPU_SHARES_PER_CPU * cpus)))


def cpu_weight(shares: int) -> int:
    """v2 cpu.weight (1..10000) for v1 `shares` (2..262144), as runc converts them."""
    shares = min(MAX_CPU_SHARES, max(MIN_CPU_SHARES, shares))
    return 1 + ((shares - 2) * 9999) // 262142


def cfs_quota_us(cpus: float) -> int:
    """CFS quota (µs per CFS_PERIOD_US) for `cpus`."""
    return max(MIN_CFS_QUOTA_US, int(cpus * CFS_PERIOD_US))


def cpu_max(cpus: float, enable_cfs: bool) -> str:
    """v2 cpu.max: 'quota period', or 'max period' without a hard cap."""
    return f"{cfs_quota_us(cpus) if enable_cfs else 'max'} {CFS_PERIOD_US}"


def memory_limit_bytes(mem_mb: float) -> int:
    """The memory limit in bytes for `mem_mb` megabytes (at least 32 MB)."""
    return max(MIN_MEMORY_BYTES, int(mem_mb * MB))


def format_bytes(n: int) -> str:
    """Bytes as Mesos prints them: the largest unit that loses nothing ('64MB', '1536KB')."""
    for unit, size in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}B"


def megabytes(n: int) -> str:
    """`n` bytes as a Resources scalar text in MB ('64', '64.5')."""
    return f"{round(n / MB, 3):g}"
