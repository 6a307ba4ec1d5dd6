"""cgroups/mem: a hard memory limit per container; an OOM kill becomes a Limitation.

    v1  memory.limit_in_bytes and memory.soft_limit_in_bytes = max(32 MB, mem); with
        --cgroups_limit_swap also memory.memsw.limit_in_bytes. OOM: an eventfd registered
        for memory.oom_control through cgroup.event_control, read by the reactor.
    v2  memory.max = the limit, memory.high = max (no throttling below it); with
        --cgroups_limit_swap memory.swap.max = 0. OOM: inotify on memory.events, whose
        `oom_kill` counter then rises.

As in Mesos, a hard limit is only ever raised by `update` (lowering it under a running
container would OOM-kill it); the soft limit follows every update. `watch` fires with
REASON_CONTAINER_LIMITATION_MEMORY and a message like Mesos's ("Memory limit exceeded:
Requested: 64MB Maximum Used: 64MB\\n\\nMEMORY STATISTICS: \\n..."); `check` answers at once
from the oom_kill counter (a task's failure can be reported before the notification).

Usage: mem_total_bytes, mem_limit_bytes, mem_soft_limit_bytes (v1), mem_rss_bytes,
mem_anon_bytes, mem_cache_bytes, mem_file_bytes, mem_mapped_file_bytes, mem_swap_bytes,
mem_unevictable_bytes, mem_total_memsw_bytes (v1 with swap limited). Flag:
`cgroups_limit_swap` (default false).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from agora.resources import Resources
from isolators.cgroups import limits, stats
from isolators.cgroups.hierarchy import Cgroup, CgroupError
from isolators.cgroups.isolator import CgroupIsolator
from isolators.cgroups.notify import FileWatch, OomEventfd
from isolators.flags import flag_bool
from isolators.interface import Limitation

log = Logger()

REASON = "REASON_CONTAINER_LIMITATION_MEMORY"


class _OomWatch:
    """One container's OOM notification and whoever waits for it."""

    def __init__(self):
        self.kernel = None  # OomEventfd or FileWatch
        self.waiters: list[Deferred] = []
        self.limitation: Limitation | None = None


def _v2_number(text: str) -> int | None:
    text = text.strip()
    return None if text == "max" else int(text)


class MemoryIsolator(CgroupIsolator):
    name = "cgroups/mem"
    controllers = ("memory",)

    def __init__(self, settings, hierarchies=None):
        super().__init__(settings, hierarchies)
        self.limit_swap = flag_bool(settings.flags or {}, "cgroups_limit_swap", False)
        mount = Cgroup(self.hierarchies.mount("memory"), "", self.hierarchies.version("memory"))
        if self.limit_swap and mount.version == 1 and not mount.has("memory.memsw.limit_in_bytes"):
            raise CgroupError("cgroups_limit_swap needs swap accounting, which this kernel "
                              "lacks (no memory.memsw.limit_in_bytes; boot with swapaccount=1)")
        self._watches: dict[str, _OomWatch] = {}

    # --- limits ---------------------------------------------------------------------

    def _configure(self, container_id, resources, initial):
        limit = limits.memory_limit_bytes(resources.scalar("mem"))
        cg = self.cgroup("memory", container_id)
        if cg.version == 1:
            cg.write("memory.soft_limit_in_bytes", limit)
            current = int(cg.read("memory.limit_in_bytes"))
            if initial or limit > current:
                names = ["memory.limit_in_bytes"]
                if self.limit_swap:
                    # memsw must never be below the memory limit: raise it first, lower it last.
                    names = (["memory.memsw.limit_in_bytes"] + names if limit > current
                             else names + ["memory.memsw.limit_in_bytes"])
                for name in names:
                    cg.write(name, limit)
            elif limit < current:
                log.info("Container {cid}: memory limit kept at {old} bytes (not lowered to "
                         "{new})", cid=container_id, old=current, new=limit)
            return
        if initial:
            cg.write("memory.high", "max")
        current = _v2_number(cg.read("memory.max"))
        if initial or (current is not None and limit > current):
            cg.write("memory.max", limit)
        if self.limit_swap and cg.has("memory.swap.max"):
            cg.write("memory.swap.max", 0)

    # --- limitations ----------------------------------------------------------------

    def check(self, container_id):
        cg = self.cgroup("memory", container_id)
        try:
            events = cg.read_keyed("memory.oom_control" if cg.version == 1 else "memory.events")
        except OSError:
            return None
        return self._limitation(cg) if events.get("oom_kill", 0) > 0 else None

    def watch(self, container_id):
        if self.reactor is None:
            return None
        watch = self._watches.get(container_id)
        if watch is None:
            cg = self.cgroup("memory", container_id)
            if not cg.exists():
                return None
            watch = _OomWatch()
            woken = lambda: self._woken(container_id)  # noqa: E731
            try:
                watch.kernel = (OomEventfd(self.reactor, cg, woken) if cg.version == 1
                                else FileWatch(self.reactor, cg.file("memory.events"), woken))
            except OSError as e:  # e.g. the cgroup went meanwhile; check() still answers
                log.warn("Container {cid}: cannot watch for OOM: {e}", cid=container_id, e=e)
                return None
            self._watches[container_id] = watch
            reached = self.check(container_id)  # an OOM before we were watching
            if reached is not None:
                self._fire(watch, reached)
        waiter = Deferred()
        if watch.limitation is not None:
            waiter.callback(watch.limitation)
        else:
            watch.waiters.append(waiter)
        return waiter

    def _woken(self, container_id: str) -> None:
        watch = self._watches.get(container_id)
        if watch is None or watch.limitation is not None:
            return
        cg = self.cgroup("memory", container_id)
        if not cg.exists():  # v1 also signals the eventfd when the cgroup goes
            watch.kernel.close()
            return
        # v1's eventfd only signals OOM; v2's memory.events also changes for other counters.
        reached = self._limitation(cg) if cg.version == 1 else self.check(container_id)
        if reached is not None:
            self._fire(watch, reached)

    def _fire(self, watch: _OomWatch, limitation: Limitation) -> None:
        watch.limitation = limitation
        watch.kernel.close()
        waiters, watch.waiters = watch.waiters, []
        for waiter in waiters:
            waiter.callback(limitation)

    def _limitation(self, cg: Cgroup) -> Limitation:
        def number(*names):
            for name in names:
                try:
                    return _v2_number(cg.read(name))
                except (OSError, ValueError):
                    continue
            return None
        if cg.version == 1:
            swap = "memsw." if self.limit_swap else ""
            limit = number(f"memory.{swap}limit_in_bytes")
            used = number(f"memory.{swap}max_usage_in_bytes")
        else:
            limit = number("memory.max")
            used = number("memory.peak", "memory.current")
        try:
            statistics = cg.read("memory.stat")
        except OSError:
            statistics = ""
        message = "Memory limit exceeded: "
        if limit is not None:
            message += f"Requested: {limits.format_bytes(limit)} "
        if used is not None:
            message += f"Maximum Used: {limits.format_bytes(used)}\n"
        message += f"\nMEMORY STATISTICS: \n{statistics}"
        resources = Resources.parse(f"mem:{limits.megabytes(limit)}") if limit else Resources()
        return Limitation(resources, REASON, message)

    # --- usage and cleanup ----------------------------------------------------------

    def usage(self, container_id):
        cg = self.cgroup("memory", container_id)
        try:
            memory_stat = cg.read_keyed("memory.stat")
        except OSError:
            return {}
        out = stats.memory(cg.version, memory_stat)
        if cg.version == 1:
            out["mem_total_bytes"] = int(cg.read("memory.usage_in_bytes"))
            out["mem_limit_bytes"] = int(cg.read("memory.limit_in_bytes"))
            out["mem_soft_limit_bytes"] = int(cg.read("memory.soft_limit_in_bytes"))
            if self.limit_swap:
                out["mem_total_memsw_bytes"] = int(cg.read("memory.memsw.usage_in_bytes"))
        else:
            out["mem_total_bytes"] = int(cg.read("memory.current"))
            limit = _v2_number(cg.read("memory.max"))
            if limit is not None:
                out["mem_limit_bytes"] = limit
            if cg.has("memory.swap.current"):
                out["mem_swap_bytes"] = int(cg.read("memory.swap.current"))
        return out

    def cleanup(self, container_id):
        watch = self._watches.pop(container_id, None)
        if watch is not None and watch.kernel is not None:
            watch.kernel.close()
        return super().cleanup(container_id)
