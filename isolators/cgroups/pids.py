"""cgroups/pids: caps how many processes and threads a container may have.

pids.max (same file on v1 and v2) = the `cgroups_pids_limit` flag, or "max" when it is
unset; a fork past it fails with EAGAIN. Usage: `processes` (members of the cgroup) and
`threads` (pids.current, which counts every task).
"""

from __future__ import annotations

from isolators.cgroups.isolator import CgroupIsolator
from isolators.flags import flag_count


class PidsIsolator(CgroupIsolator):
    name = "cgroups/pids"
    controllers = ("pids",)

    def __init__(self, settings, hierarchies=None):
        super().__init__(settings, hierarchies)
        self.limit = flag_count(settings.flags or {}, "cgroups_pids_limit")

    def _configure(self, container_id, resources, initial):
        if initial:
            self.cgroup("pids", container_id).write(
                "pids.max", "max" if self.limit is None else self.limit)

    def usage(self, container_id):
        cg = self.cgroup("pids", container_id)
        try:
            return {"processes": len(cg.members()), "threads": int(cg.read("pids.current"))}
        except OSError:
            return {}
