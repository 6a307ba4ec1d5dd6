"""The isolator interface: the hooks the containerizer calls around each container's life.

    recover(states)  ── once, after an agent restart, before any launch
    prepare(config)  ── in order, before the container's first process exists  ──> LaunchInfo
    isolate(cid, pid) ─ in order, once that process exists (only if an isolator overrides it:
                        the process then waits for every isolate() before it execs)
    watch(cid)       ── a Deferred that fires with a Limitation if the container breaks one
    check(cid)       ── a Limitation already reached, looked up now (a task just failed)
    update(cid, resources) ── the container's allotment changed
    usage(cid)       ── ResourceStatistics fields (blocking allowed: called in a thread)
    status(cid)      ── ContainerStatus fields (e.g. network_infos)
    cleanup(cid)     ── in reverse order once the container is gone; failures are logged and
                        the next isolator is still cleaned up

Every hook has a no-op default, so an isolator overrides only what it needs. A hook may
return its result or a Deferred of it. Hook arguments are attrs objects, so fields can be
added later without breaking third-party isolators. `cleanup` must be idempotent and must
work for a container it never prepared (after a failed launch, or for an orphan found by
`recover`).

Isolators are chosen by name with the agent's `--isolation` flag (e.g.
`cgroups/cpu,cgroups/mem,namespaces/pid,filesystem/linux`); third parties add theirs
through the `agora.isolators` entry-point group: the entry point's name is the isolator's
name, its object a factory called with one `Settings` argument that returns an `Isolator`
(see `examples/custom_isolator.py`).
"""

from __future__ import annotations

import attrs

from agora.resources import Resources

#: Namespaces a container may get (clone flags' short names).
NAMESPACES = frozenset({"mnt", "pid", "uts", "ipc", "net"})


@attrs.frozen
class Settings:
    """What every isolator factory is given: the agent's settings and its flags."""

    work_dir: str
    runtime_dir: str  # root-only directory for containers' runtime state
    flags: dict = attrs.field(factory=dict)  # the agent's flags by name (`cgroups_root`, ...)
    reactor: object = None


@attrs.frozen
class ContainerConfig:
    """A container as isolators see it when it is prepared.

    `container_info` is the Mesos ContainerInfo JSON that applies to the container as a
    whole: the ExecutorInfo's, or for a command task its TaskInfo's. `resources` is what the
    container is allotted: its executor's plus its tasks'.
    """

    container_id: str
    directory: str  # the sandbox, on the host
    resources: Resources
    executor_info: dict = attrs.field(factory=dict)
    task_infos: tuple = ()
    container_info: dict | None = None
    user: str | None = None  # who the container runs as (None: the agent's own user)
    scratch_dirs: tuple = ()  # host directories it writes besides the sandbox (overlay uppers)


@attrs.frozen
class Mount:
    """A bind mount into the container: `target` is a path inside its root filesystem, or
    with `host` a path on the host (in the sandbox), mounted before the root filesystem."""

    source: str
    target: str
    read_only: bool = False
    host: bool = False


@attrs.frozen
class LaunchInfo:
    """What an isolator adds to a container's launch (Mesos's ContainerLaunchInfo)."""

    namespaces: frozenset = frozenset()  # subset of NAMESPACES
    env: dict = attrs.field(factory=dict)  # added to the first process's environment
    cgroups: tuple = ()  # cgroup directories every process of the container joins
    netns: str | None = None  # a network namespace (a bind-mounted nsfs path) to join
    hostname: str | None = None  # needs the uts namespace
    mounts: tuple = ()  # Mount, in order
    rlimits: tuple = ()  # (resource name as in RLIMIT_<NAME>, soft, hard); None = unlimited

    def merge(self, other: LaunchInfo | None) -> LaunchInfo:
        """This launch info with `other`'s added (other's env and hostname win)."""
        if other is None:
            return self
        return LaunchInfo(
            namespaces=self.namespaces | other.namespaces,
            env={**self.env, **other.env},
            cgroups=self.cgroups + tuple(c for c in other.cgroups if c not in self.cgroups),
            netns=other.netns or self.netns,
            hostname=other.hostname or self.hostname,
            mounts=self.mounts + other.mounts,
            rlimits=self.rlimits + other.rlimits,
        )


@attrs.frozen
class Limitation:
    """A limit the container broke; it is destroyed and its tasks fail with `reason`."""

    resources: Resources  # what was exceeded, e.g. Resources.parse("mem:64")
    reason: str  # a Mesos TaskStatus reason, e.g. REASON_CONTAINER_LIMITATION_MEMORY
    message: str


@attrs.frozen
class ContainerState:
    """A container a previous run of the agent left running (for `recover`)."""

    container_id: str
    pid: int | None
    directory: str
    resources: Resources | None = None  # what it is allotted (its executor's and tasks')


class Isolator:
    """Base class with a no-op default for every hook; see the module docstring."""

    name = "unnamed"

    def recover(self, states: list) -> object:
        """Take back what this isolator holds for each ContainerState in `states`; clean up
        whatever else it finds of its own (orphans of a previous run)."""

    def prepare(self, config: ContainerConfig) -> LaunchInfo | None:
        """Make ready for `config`'s container; say what its launch needs."""
        return None

    def isolate(self, container_id: str, pid: int) -> object:
        """The container's first process `pid` exists (and waits until this returns)."""

    def watch(self, container_id: str):
        """A Deferred firing with a Limitation when one is reached; None if never."""
        return None

    def check(self, container_id: str) -> Limitation | None:
        """A Limitation the container has already reached, looked up now."""
        return None

    def update(self, container_id: str, resources: Resources) -> object:
        """The container's allotment is now `resources`."""

    def usage(self, container_id: str) -> dict:
        """ResourceStatistics fields (Mesos names) for the container; may block."""
        return {}

    def status(self, container_id: str) -> dict:
        """ContainerStatus fields for the container (merged into the task's status)."""
        return {}

    def cleanup(self, container_id: str) -> object:
        """The container is gone: release what was held for it. Idempotent."""
