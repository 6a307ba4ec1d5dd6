"""What the cgroups isolators share: one cgroup per container in each hierarchy they use.

    prepare(config) ── create <mount>/<cgroups_root>/<container_id> in each of `controllers`'
                       hierarchies (v2: one directory for all, controllers enabled from the
                       root down), `_configure` the limits, return LaunchInfo(cgroups=dirs)
    update          ── `_configure` again with the new resources
    recover(states) ── keep the cgroups of `states`; destroy every other one under
                       cgroups_root in those hierarchies (orphans: killed, removed)
    cleanup(cid)    ── kill what is left in the container's cgroups and remove them

Killing and removing wait for the kernel, so with a reactor they run in its thread pool and
the hooks return Deferreds. The flags read: `cgroups_root` (default "agora"),
`cgroups_hierarchy` (default /sys/fs/cgroup), `cgroups_destroy_timeout` (seconds, 60).
"""

from __future__ import annotations

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from isolators.cgroups.hierarchy import (
    DEFAULT_TIMEOUT, Cgroup, CgroupError, Hierarchies, configured,
)
from isolators.flags import flag_float
from isolators.interface import ContainerConfig, Isolator, LaunchInfo, Settings

log = Logger()


class CgroupIsolator(Isolator):
    """Base of the cgroups isolators; a subclass names its `controllers` and `_configure`s."""

    #: The controllers whose hierarchies hold this isolator's cgroups.
    controllers: tuple[str, ...] = ()

    def __init__(self, settings: Settings, hierarchies: Hierarchies | None = None):
        flags = settings.flags or {}
        self.settings = settings
        self.reactor = settings.reactor
        found, self.root = configured(flags)
        self.hierarchies = hierarchies or found
        self.timeout = flag_float(flags, "cgroups_destroy_timeout", DEFAULT_TIMEOUT)
        for controller in self.controllers:
            self.hierarchies.mount(controller)  # unavailable: the agent refuses to start

    # --- where ----------------------------------------------------------------------

    def cgroup(self, controller: str, container_id: str) -> Cgroup:
        """The container's cgroup in `controller`'s hierarchy."""
        return self.hierarchies.container(controller, self.root, container_id)

    def cgroups(self, container_id: str) -> list[Cgroup]:
        """The container's cgroups, one per distinct directory (co-mounted or v2: shared)."""
        out: list[Cgroup] = []
        for controller in self.controllers:
            cg = self.cgroup(controller, container_id)
            if cg not in out:
                out.append(cg)
        return out

    def _v2_controllers(self, cgroup: Cgroup) -> tuple[str, ...]:
        return tuple(c for c in self.controllers if self.hierarchies.version(c) == 2
                     and self.hierarchies.mount(c) == cgroup.mount) if cgroup.version == 2 else ()

    # --- hooks ----------------------------------------------------------------------

    def prepare(self, config: ContainerConfig) -> LaunchInfo:
        cgroups = self.cgroups(config.container_id)
        try:
            for cg in cgroups:
                cg.create(self._v2_controllers(cg))
            self._configure(config.container_id, config.resources, initial=True)
        except BaseException:
            for cg in cgroups:  # nothing runs in them yet
                try:
                    cg.remove(1.0)
                except CgroupError:
                    pass
            raise
        return LaunchInfo(cgroups=tuple(cg.path for cg in cgroups))

    def update(self, container_id: str, resources) -> None:
        if all(cg.exists() for cg in self.cgroups(container_id)):
            self._configure(container_id, resources, initial=False)

    def recover(self, states: list):
        keep = {state.container_id for state in states}
        return self._blocking(self._destroy_orphans, keep)

    def cleanup(self, container_id: str):
        return self._blocking(self._destroy, self.cgroups(container_id))

    # --- for subclasses -------------------------------------------------------------

    def _configure(self, container_id: str, resources, initial: bool) -> None:
        """Write the limits for `resources` into the container's (existing) cgroups."""

    # --- internals ------------------------------------------------------------------

    def _parents(self) -> list[Cgroup]:
        out: list[Cgroup] = []
        for controller in self.controllers:
            parent = self.hierarchies.cgroup(controller, self.root)
            if parent not in out:
                out.append(parent)
        return out

    def _destroy_orphans(self, keep: set) -> list[str]:
        destroyed = []
        for parent in self._parents():
            destroyed += parent.destroy_children(keep, self.timeout)
        if destroyed:
            log.info("Destroyed orphan cgroups {names} under {root}", names=destroyed,
                     root=self.root)
        return destroyed

    def _destroy(self, cgroups: list[Cgroup]) -> None:
        errors = []
        for cg in cgroups:
            try:
                cg.destroy(self.timeout)
            except (CgroupError, OSError) as e:
                errors.append(str(e))
        if errors:
            raise CgroupError("; ".join(errors))

    def _blocking(self, fn, *args):
        """`fn(*args)` in the reactor's thread pool (a Deferred), or here without a reactor."""
        if self.reactor is not None and hasattr(self.reactor, "getThreadPool"):
            return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)
        return fn(*args)
