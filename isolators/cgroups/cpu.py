"""cgroups/cpu: CPU shares for every container, a CFS quota with --cgroups_enable_cfs.

    v1  cpu.shares = max(2, 1024 * cpus); with CFS: cpu.cfs_period_us = 100000,
        cpu.cfs_quota_us = cpus * 100000 (at least 1000). Times from cpuacct.stat (the
        cpuacct hierarchy: co-mounted with cpu or on its own).
    v2  cpu.weight (converted from the shares as runc does), cpu.max "quota 100000" or
        "max 100000". Times from cpu.stat.

Usage: cpus_user_time_secs, cpus_system_time_secs, cpus_nr_periods, cpus_nr_throttled,
cpus_throttled_time_secs, cpus_limit. Flag: `cgroups_enable_cfs` (default false).
"""

from __future__ import annotations

import os

from isolators.cgroups import limits, stats
from isolators.cgroups.isolator import CgroupIsolator
from isolators.flags import flag_bool

_TICKS = os.sysconf("SC_CLK_TCK")


class CpuIsolator(CgroupIsolator):
    name = "cgroups/cpu"
    controllers = ("cpu",)

    def __init__(self, settings, hierarchies=None):
        super().__init__(settings, hierarchies)
        # cpuacct only exists as a v1 controller; v2's cpu.stat has the times.
        if self.hierarchies.version("cpu") == 1 and self.hierarchies.version("cpuacct") == 1:
            self.controllers = ("cpu", "cpuacct")
        self.enable_cfs = flag_bool(settings.flags or {}, "cgroups_enable_cfs", False)
        self._cpus: dict[str, float] = {}

    def _configure(self, container_id, resources, initial):
        cpus = resources.scalar("cpus")
        cg = self.cgroup("cpu", container_id)
        shares = limits.cpu_shares(cpus)
        if cg.version == 1:
            cg.write("cpu.shares", shares)
            if self.enable_cfs:
                cg.write("cpu.cfs_period_us", limits.CFS_PERIOD_US)
                cg.write("cpu.cfs_quota_us", limits.cfs_quota_us(cpus))
        else:
            cg.write("cpu.weight", limits.cpu_weight(shares))
            cg.write("cpu.max", limits.cpu_max(cpus, self.enable_cfs))
        self._cpus[container_id] = cpus

    def usage(self, container_id):
        cg = self.cgroup("cpu", container_id)
        if not cg.exists():
            return {}
        if cg.version == 1:
            acct = self.cgroup("cpuacct", container_id) if "cpuacct" in self.controllers else None
            out = stats.cpu_v1(acct.read_keyed("cpuacct.stat") if acct else None,
                               cg.read_keyed("cpu.stat"), _TICKS)
        else:
            out = stats.cpu_v2(cg.read_keyed("cpu.stat"))
        cpus = self._cpus.get(container_id)
        if cpus is None and cg.version == 1:  # recovered: the limit is in the files
            quota = int(cg.read("cpu.cfs_quota_us")) if self.enable_cfs else -1
            cpus = (quota / int(cg.read("cpu.cfs_period_us")) if quota > 0
                    else int(cg.read("cpu.shares")) / limits.CPU_SHARES_PER_CPU)
        if cpus is not None:
            out["cpus_limit"] = round(cpus, 6)
        return out

    def cleanup(self, container_id):
        self._cpus.pop(container_id, None)
        return super().cleanup(container_id)
