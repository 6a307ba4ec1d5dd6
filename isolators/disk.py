"""disk/du: measure each container's disk use with `du`, and enforce its `disk` resource.

Every `container_disk_watch_interval` seconds (default 15, as Mesos) the container's sandbox
(`config.directory`) and its `scratch_dirs` (overlay upper dirs: what it writes into its
image) are measured with `du -k -s`, run from the reactor's thread pool (never blocking the
reactor; one run at a time per container). `usage` reports `disk_used_bytes` (the last
measurement) and `disk_limit_bytes` (the container's `disk`). With
`enforce_container_disk_quota` true, a measurement above the limit fires `watch` (and
`check` then answers) with REASON_CONTAINER_LIMITATION_DISK and Mesos's message
"Disk usage (12MB) exceeds quota (10MB)". A container without a `disk` resource has no quota.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from agora.resources import Resources
from isolators.cgroups.limits import MB, format_bytes, megabytes
from isolators.flags import flag_bool, flag_float
from isolators.interface import ContainerConfig, Isolator, Limitation, Settings

log = Logger()

REASON = "REASON_CONTAINER_LIMITATION_DISK"


def parse_du(output: bytes) -> int:
    """Bytes in all of `du -k -s`'s output lines ('<KiB>\\t<path>')."""
    total = 0
    for line in output.decode(errors="replace").splitlines():
        size = line.split("\t", 1)[0].strip()
        if size.isdigit():
            total += int(size) * 1024
    return total


class _Disk:
    """One container's paths, quota, last measurement and waiters."""

    def __init__(self, paths: tuple, limit: int | None):
        self.paths = paths
        self.limit = limit
        self.used: int | None = None
        self.call = None  # the next measurement (IDelayedCall)
        self.running = False
        self.waiters: list[defer.Deferred] = []
        self.limitation: Limitation | None = None


def _limit(resources: Resources) -> int | None:
    disk = resources.scalar("disk")
    return int(disk * MB) if disk > 0 else None


class DiskIsolator(Isolator):
    name = "disk/du"

    def __init__(self, settings: Settings, measure=None):
        """`measure(paths)` -> Deferred of bytes: `du` by default (tests may pass their own)."""
        flags = settings.flags or {}
        self.reactor = settings.reactor
        self.interval = flag_float(flags, "container_disk_watch_interval", 15.0)
        self.enforce = flag_bool(flags, "enforce_container_disk_quota", False)
        if measure is None:
            self._du_path = shutil.which("du")
            if self._du_path is None:
                raise ValueError("disk/du needs the du command (coreutils) on the PATH")
            measure = self._du
        self.measure = measure
        self._containers: dict[str, _Disk] = {}

    # --- hooks ----------------------------------------------------------------------

    def prepare(self, config: ContainerConfig):
        self._track(config.container_id, (config.directory, *config.scratch_dirs),
                    _limit(config.resources))
        return None

    def recover(self, states: list):
        for state in states:  # the limit comes back with the containerizer's update()
            if state.container_id not in self._containers and state.directory:
                self._track(state.container_id, (state.directory,), None)

    def update(self, container_id: str, resources: Resources):
        disk = self._containers.get(container_id)
        if disk is not None:
            disk.limit = _limit(resources)

    def watch(self, container_id: str):
        disk = self._containers.get(container_id)
        if disk is None:
            return None
        waiter = defer.Deferred()
        if disk.limitation is not None:
            waiter.callback(disk.limitation)
        else:
            disk.waiters.append(waiter)
        return waiter

    def check(self, container_id: str):
        disk = self._containers.get(container_id)
        return self._exceeded(disk) if disk is not None else None

    def usage(self, container_id: str) -> dict:
        disk = self._containers.get(container_id)
        out = {}
        if disk is not None:
            if disk.used is not None:
                out["disk_used_bytes"] = disk.used
            if disk.limit is not None:
                out["disk_limit_bytes"] = disk.limit
        return out

    def cleanup(self, container_id: str):
        disk = self._containers.pop(container_id, None)
        if disk is not None and disk.call is not None and disk.call.active():
            disk.call.cancel()

    # --- measuring ------------------------------------------------------------------

    def _track(self, container_id: str, paths: tuple, limit: int | None) -> None:
        disk = self._containers[container_id] = _Disk(paths, limit)
        if self.reactor is not None:
            disk.call = self.reactor.callLater(self.interval, self._tick, container_id, disk)

    def _tick(self, container_id: str, disk: _Disk) -> None:
        disk.call = None
        if self._containers.get(container_id) is not disk:
            return  # cleaned up meanwhile
        disk.running = True
        d = defer.maybeDeferred(self.measure, disk.paths)
        d.addCallbacks(lambda used: self._measured(container_id, disk, used),
                       lambda failure: log.warn("Container {cid}: measuring {paths} failed: "
                                                "{error}", cid=container_id, paths=disk.paths,
                                                error=failure.getErrorMessage()))
        d.addBoth(lambda _: self._next(container_id, disk))

    def _next(self, container_id: str, disk: _Disk) -> None:
        disk.running = False
        if self._containers.get(container_id) is disk and disk.limitation is None:
            disk.call = self.reactor.callLater(self.interval, self._tick, container_id, disk)

    def _measured(self, container_id: str, disk: _Disk, used: int) -> None:
        disk.used = used
        reached = self._exceeded(disk)
        if reached is not None and disk.limitation is None:
            log.info("Container {cid}: {message}", cid=container_id, message=reached.message)
            disk.limitation = reached
            waiters, disk.waiters = disk.waiters, []
            for waiter in waiters:
                waiter.callback(reached)

    def _exceeded(self, disk: _Disk) -> Limitation | None:
        if not self.enforce or disk.limit is None or disk.used is None or disk.used <= disk.limit:
            return None
        return Limitation(Resources.parse(f"disk:{megabytes(disk.limit)}"), REASON,
                          f"Disk usage ({format_bytes(disk.used)}) exceeds quota "
                          f"({format_bytes(disk.limit)})")

    def _du(self, paths: tuple):
        # In a thread rather than as a reactor process: a reactor that runs without signal
        # handlers (in a thread, as in tests) never reaps its children.
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._du_blocking,
                                 paths)

    def _du_blocking(self, paths: tuple) -> int:
        present = [p for p in paths if os.path.exists(p)]
        if not present:
            return 0
        done = subprocess.run([self._du_path, "-k", "-s", *present], capture_output=True,
                              env={"LC_ALL": "C"}, stdin=subprocess.DEVNULL)
        # du exits 1 when a file vanished while it walked; its totals still stand.
        if done.returncode != 0 and not done.stdout:
            raise RuntimeError(f"du exited {done.returncode}: "
                               f"{done.stderr.decode(errors='replace').strip()}")
        return parse_du(done.stdout)
