"""The containerizer: images, isolators and the launcher, around each executor's container.

    launch(config, process, builtin, tasks)
      ├─ isolators.prepare, in order ─────────────> LaunchInfo (namespaces, cgroups, netns,
      │                                              hostname, mounts, rlimits, env)
      ├─ custom executor: its image provisioned; the executor itself runs isolated
      │  our executor: it stays on the host (in the container's cgroups only); each task
      │  gets a *task spec* (its image, volumes, the LaunchInfo) that our executor hands
      │  to the launch helper (agent.containerizer.helper) to start the task with
      ├─ launcher.launch ──> Container
      ├─ isolators.isolate(pid), in order (before exec, only if an isolator has the hook)
      └─ isolators.watch ──> on_limitation(container_id, Limitation)
    destroy(container) ──> every process killed ──> cleanup: isolators in reverse (past
      failures), the provisioner's rootfs, the container's runtime directory

A task spec is a launch-helper spec (see agent/containerizer/README.md), without the process
for a task on the host's filesystem (our executor adds it), written to
`<runtime_dir>/containers/<cid>/tasks/<hash of the task id>.json` (root only); our
executor finds it through `AGORA_CONTAINER_DIR` and launches through `AGORA_LAUNCHER`.
With the posix launcher there are no isolators and no images: tasks that need either fail
with a message that says what to run instead.
"""

from __future__ import annotations

import json
import os
import shutil
import stat

import attrs
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, maybeDeferred
from twisted.internet.defer import succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from agent import checkpoint, users
from agent.containerizer import helper_wire
from agent.containerizer import spawn
from agent.containerizer.launcher import LaunchError, LaunchSpec
from agent.containerizer.launcher import recover as launcher_recover
from isolators.filesystem import has_image, volume_mounts
from isolators.interface import ContainerConfig, ContainerState, Isolator, LaunchInfo

log = Logger()

CONTAINER_DIR_VARIABLE = "AGORA_CONTAINER_DIR"
LAUNCHER_VARIABLE = "AGORA_LAUNCHER"


class ContainerError(LaunchError):
    """The container cannot be launched as asked (its config, image or isolation)."""


@attrs.frozen
class TaskProcess:
    """A task of our executor, as far as its container is concerned.

    On the host's filesystem our executor decides what the task runs and as whom; with an
    image, the image's config merged with the task's command (Mesos's rules) does, plus
    `variables` (MESOS_*, HOST, PORT*, ...), as `user_name` (looked up in the image) unless
    the image or the command names a user."""

    task_id: str
    info: dict  # the TaskInfo
    variables: dict = attrs.field(factory=dict)
    user_name: str | None = None


def task_spec_path(container_dir: str, task_id: str) -> str:
    return os.path.join(container_dir, "tasks", helper_wire.task_key(task_id) + ".json")


def _run_as_spec(run_as: users.RunAs | None) -> dict | None:
    if run_as is None:
        return None
    return {"uid": run_as.uid, "gid": run_as.gid, "groups": list(run_as.groups)}


def _mount_specs(mounts) -> list[dict]:
    return [{"source": m.source, "target": m.target, "read_only": m.read_only,
             "host": m.host} for m in mounts]


class Containerizer:
    """See the module docstring. Runs in the reactor thread; blocking work goes to threads."""

    def __init__(self, reactor, launcher, *, runtime_dir: str, isolators: list[Isolator] = (),
                 provisioner=None, on_limitation=None, threadpool=None):
        self.reactor = reactor
        self.launcher = launcher
        self.runtime_dir = runtime_dir
        self.isolators = list(isolators)
        self.provisioner = provisioner
        self.on_limitation = on_limitation or (lambda cid, limitation: None)
        self.threadpool = threadpool or reactor.getThreadPool()
        self._launch_info: dict[str, LaunchInfo] = {}
        self._destroying: dict[str, Deferred] = {}  # container id -> fires after cleanup
        self._has_isolate = any(type(i).isolate is not Isolator.isolate for i in self.isolators)

    @property
    def linux(self) -> bool:
        return getattr(self.launcher, "name", "posix") == "linux"

    def _thread(self, f, *args, **kwargs) -> Deferred:
        return deferToThreadPool(self.reactor, self.threadpool, f, *args, **kwargs)

    def container_dir(self, container_id: str) -> str:
        return os.path.join(self.runtime_dir, "containers", container_id)

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> Deferred:
        if self.linux:
            os.makedirs(self.runtime_dir, mode=0o700, exist_ok=True)
            os.chmod(self.runtime_dir, 0o700)
            return self.launcher.start()
        return succeed(None)

    def stop(self) -> Deferred:
        return self.launcher.stop() if self.linux else succeed(None)

    # --- recovery ------------------------------------------------------------------------

    def recover_container(self, container_id: str, pid: int, start_ticks: int | None,
                          ticks_of) -> Deferred:
        """Re-attach to a container an earlier agent run launched (its first process `pid`,
        started at `start_ticks`); fires with it (it may have ended already: the helper
        kept its status) or None when it is gone."""
        if not self.linux:
            return succeed(launcher_recover(self.reactor, container_id, pid, start_ticks,
                                            ticks_of))
        alive = ticks_of(pid) is not None and ticks_of(pid) == start_ticks
        d = self.launcher.recover(container_id, pid)

        def known(container):
            if not alive and not (container.status is not None and container.status_known):
                return None  # neither running nor remembered by the helper
            return container

        return d.addCallback(known)

    def recover(self, states: list[ContainerState]) -> Deferred:
        """After the agent's books are back: isolators take back the containers in
        `states` and destroy the rest of theirs; so do the launcher and the provisioner."""
        if not self.linux:
            return succeed(None)
        live = {s.container_id for s in states}

        @inlineCallbacks
        def run():
            for isolator in self.isolators:
                try:
                    yield maybeDeferred(isolator.recover, list(states))
                    for state in states:
                        if state.resources is not None:
                            yield maybeDeferred(isolator.update, state.container_id,
                                                state.resources)
                except Exception:  # noqa: BLE001 — recover the others
                    log.failure("Isolator {name} failed to recover", name=isolator.name)
            for state in states:
                self._watch(state.container_id)
            orphans = yield self.launcher.orphans(live)
            for cid in orphans:
                log.warn("Destroying orphan container {cid}", cid=cid)
                yield self.launcher.destroy_orphan(cid)
                yield self.cleanup(cid)
            for name in _listdir_all(os.path.join(self.runtime_dir, "containers")):
                if name not in live and name not in orphans:
                    yield self.cleanup(name)
            if self.provisioner is not None:
                keys = {key for cid in live for key in
                        [cid] + [f"{cid}.{n[:-5]}" for n in
                                 _listdir(os.path.join(self.container_dir(cid), "tasks"))]}
                yield self._thread(self.provisioner.recover, keys)

        return run()

    # --- launching -----------------------------------------------------------------------

    def launch(self, config: ContainerConfig, process: LaunchSpec, *, builtin: bool,
               tasks: list[TaskProcess] = (), before_exec=None) -> Deferred:
        """Start the container of `config` running `process` (our executor when `builtin`,
        with `tasks` to prepare specs for); fires with the launcher's Container, or fails
        with ContainerError (everything prepared is cleaned up first). `before_exec(pid)`
        runs once the first process exists and before it execs (e.g. to checkpoint its pid:
        an agent that dies at any moment then knows every container it started)."""
        if not self.linux:
            d = maybeDeferred(self._launch_posix, config, process, builtin, tasks)
            if before_exec is not None:
                d.addCallback(lambda container: (before_exec(container.pid), container)[1])
            return d
        d = self._launch_linux(config, process, builtin, list(tasks), before_exec)

        def failed(failure):
            cleanup = self.cleanup(config.container_id)
            cleanup.addBoth(lambda _: failure)
            return cleanup

        d.addErrback(failed)
        return d

    def _launch_posix(self, config, process, builtin, tasks):
        infos = [config.container_info] + [t.info.get("container") for t in tasks]
        if any(has_image(info) for info in infos if info):
            raise ContainerError("the task names an image, which needs the linux launcher: "
                                 "start the agent as root with --launcher linux (and the "
                                 "filesystem/linux isolator)")
        if any((info or {}).get("volumes") for info in infos):
            raise ContainerError("volumes need the linux launcher and the filesystem/linux "
                                 "isolator: start the agent as root with --launcher linux")
        return self.launcher.launch(config.container_id, process)

    @inlineCallbacks
    def _launch_linux(self, config: ContainerConfig, process: LaunchSpec, builtin: bool,
                      tasks: list[TaskProcess], before_exec):
        cid = config.container_id
        os.makedirs(os.path.join(self.container_dir(cid), "tasks"), mode=0o700, exist_ok=True)
        info = LaunchInfo()
        for isolator in self.isolators:
            try:
                more = yield maybeDeferred(isolator.prepare, config)
            except Exception as e:  # noqa: BLE001 — any isolator's failure fails the launch
                raise ContainerError(f"{isolator.name}: {e}") from None
            info = info.merge(more)
        self._launch_info[cid] = info
        spec = {"argv": list(process.argv), "program": process.program,
                "env": {**process.env, **info.env}, "cwd": process.cwd,
                "user": _run_as_spec(process.user),
                "stdio_paths": [process.stdout, process.stderr],
                "cgroups": list(info.cgroups)}
        if builtin:
            yield self.add_tasks(config, tasks)
            # Our executor runs in the helper's fork itself: no interpreter start-up.
            spec["builtin"] = "command-executor"
            spec["env"][CONTAINER_DIR_VARIABLE] = self.container_dir(cid)
            spec["env"][LAUNCHER_VARIABLE] = "@" + self.launcher.address[1:]
        else:
            image = (yield self._rootfs(config.container_info, cid, cid))
            spec.update(self._isolation(info, config.container_info, config.directory, image))
            if image is not None:
                spec.update(self._image_process(image[0],
                                                config.executor_info.get("command") or {},
                                                {**process.env, **info.env},
                                                config.user, process.cwd))
        hook = None
        if self._has_isolate or before_exec is not None:
            @inlineCallbacks
            def hook(container_id, pid):
                if before_exec is not None:
                    yield maybeDeferred(before_exec, pid)
                if self._has_isolate:
                    yield self._isolate(container_id, pid)
        container = yield self.launcher.launch(cid, spec, before_exec=hook)
        self._watch(cid)
        return container

    def _watch(self, cid: str) -> None:
        """Hand every limitation an isolator sees for the container to `on_limitation`."""
        for isolator in self.isolators:
            watching = isolator.watch(cid)
            if watching is not None:
                watching.addCallback(lambda limitation: limitation and
                                     self.on_limitation(cid, limitation))
                watching.addErrback(lambda f, name=isolator.name: log.failure(
                    "Isolator {name} failed to watch", f, name=name))

    @inlineCallbacks
    def _isolate(self, container_id: str, pid: int):
        for isolator in self.isolators:
            yield maybeDeferred(isolator.isolate, container_id, pid)

    def _isolation(self, info: LaunchInfo, container_info: dict | None, sandbox: str,
                   image) -> dict:
        """The namespaces, mounts and root filesystem part of a launch-helper spec."""
        mounts = list(info.mounts)
        namespaces = set(info.namespaces)
        out = {"namespaces": sorted(namespaces), "netns": info.netns,
               "hostname": info.hostname, "rlimits": [list(r) for r in info.rlimits]}
        if image is not None:
            if "mnt" not in namespaces:
                raise ContainerError("an image needs the filesystem/linux isolator "
                                     "(--isolation filesystem/linux,...)")
            out["rootfs"] = rootfs_spec(*image)
            mounts.insert(0, _sandbox_mount(sandbox))
        elif mounts and "mnt" not in namespaces:
            raise ContainerError("volumes need the filesystem/linux isolator")
        out["mounts"] = _mount_specs(mounts)
        return out

    def add_tasks(self, config: ContainerConfig, tasks: list[TaskProcess]) -> Deferred:
        """Write the task specs of `tasks` (our executor launches them with these)."""
        return DeferredList([self._task_spec(config, t) for t in tasks],
                            fireOnOneErrback=True, consumeErrors=True).addErrback(
            lambda failure: failure.value.subFailure)

    @inlineCallbacks
    def _task_spec(self, config: ContainerConfig, task: TaskProcess):
        cid = config.container_id
        info = self._launch_info.get(cid, LaunchInfo())
        container_info = task.info.get("container") or config.container_info
        key = f"{cid}.{helper_wire.task_key(task.task_id)}"
        image = yield self._rootfs(task.info.get("container"), key, cid)
        task_info = info
        if task.info.get("container") is not None and task.info.get("container") is not \
                config.container_info:
            try:  # a task of a group with volumes of its own
                task_info = info.merge(LaunchInfo(mounts=volume_mounts(
                    task.info["container"], config.directory, image is not None)))
            except ValueError as e:
                raise ContainerError(str(e)) from None
        spec = self._isolation(task_info, container_info, config.directory, image)
        # The container's membership cgroup too: a destroy must find the task's processes.
        spec["cgroups"] = list(info.cgroups) + [self.launcher.membership(cid).path]
        if image is not None:  # (else our executor fills in the process, as without a spec)
            spec.update(self._image_process(image[0], task.info.get("command") or {},
                                            {**info.env, **task.variables}, task.user_name,
                                            None))
        path = task_spec_path(self.container_dir(cid), task.task_id)
        yield self._thread(checkpoint.atomic_write, path, json.dumps(spec).encode(), False)

    def _rootfs(self, container_info: dict | None, key: str, cid: str) -> Deferred:
        """(provisioned Rootfs, its mount point) for the image of `container_info`, or None."""
        if not has_image(container_info):
            return succeed(None)
        if self.provisioner is None:
            raise ContainerError("the agent has no image provisioner (--image-providers)")
        image = image_of(container_info)
        d = self._thread(self.provisioner.provision, key, image)

        def mounted(rootfs):
            target = os.path.join(self.container_dir(cid), "rootfs", key)
            os.makedirs(target, exist_ok=True)
            return rootfs, target

        def failed(failure):
            raise ContainerError(f"Failed to provision the image: {failure.getErrorMessage()}")

        d.addCallbacks(mounted, failed)
        return d

    def _image_process(self, rootfs, command: dict, variables: dict, user_name: str | None,
                       cwd: str | None) -> dict:
        """argv, env, cwd and user for a process in an image (the image config merged with
        the CommandInfo by Mesos's rules)."""
        from agent.containerizer.provisioner import runtime
        try:
            argv, env, workdir, image_user = runtime.merge(rootfs.config, command)
        except ValueError as e:
            raise ContainerError(str(e)) from None
        env = {**env, **variables, "MESOS_SANDBOX": spawn.SANDBOX_TARGET,
               **runtime.command_environment(command)}
        env.setdefault("PATH", runtime.DEFAULT_PATH)
        name = (command.get("user") if isinstance(command.get("user"), str) else None) \
            or image_user or user_name
        try:
            user = image_user_spec(rootfs, name) if name else None
        except ValueError as e:
            raise ContainerError(str(e)) from None
        return {"argv": argv, "program": None, "env": env,
                "cwd": workdir or cwd or spawn.SANDBOX_TARGET, "user": user}

    # --- after the end -------------------------------------------------------------------

    def destroy(self, container, grace: float = 0.0) -> Deferred:
        """Kill every process of `container` (SIGKILL after `grace`), then clean up once;
        fires with its status. Asking again may shorten the grace, nothing more."""
        waiter = container.destroy(grace)
        cid = container.container_id
        done = self._destroying.get(cid)
        if done is None:
            done = self._destroying[cid] = Deferred()

            def cleaned(status):
                c = self.cleanup(cid)
                c.addBoth(lambda _: (self._destroying.pop(cid, None), done.callback(status)))

            waiter.addCallback(cleaned)
        result = Deferred()
        done.addBoth(lambda status: (result.callback(status), status)[1])
        return result

    @inlineCallbacks
    def cleanup(self, container_id: str):
        """Release what the container held: isolators in reverse order (a failure is logged
        and the rest still run), its root filesystems, its runtime directory."""
        self._launch_info.pop(container_id, None)
        for isolator in reversed(self.isolators):
            try:
                yield maybeDeferred(isolator.cleanup, container_id)
            except Exception:  # noqa: BLE001 — keep cleaning up past a failure
                log.failure("Isolator {name} failed to clean up container {cid}",
                            name=isolator.name, cid=container_id)
        if self.linux:
            directory = self.container_dir(container_id)
            if self.provisioner is not None:
                keys = [container_id] + [f"{container_id}.{name[:-5]}" for name in
                                         _listdir(os.path.join(directory, "tasks"))]
                for key in keys:
                    try:
                        yield self._thread(self.provisioner.destroy, key)
                    except Exception:  # noqa: BLE001
                        log.failure("Could not remove the rootfs of {key}", key=key)
            yield self.launcher.cleanup(container_id)
            yield self._thread(shutil.rmtree, directory, True)

    # --- questions -----------------------------------------------------------------------

    def check(self, container_id: str):
        """A limitation the container has reached (asked now), or None."""
        for isolator in self.isolators:
            limitation = isolator.check(container_id)
            if limitation is not None:
                return limitation
        return None

    def status(self, container_id: str) -> dict:
        """ContainerStatus fields the isolators report (e.g. network_infos); with the
        linux launcher at least the container id (as Mesos's agent sends it)."""
        if not self.linux:
            return {}
        out: dict = {"container_id": {"value": container_id}}
        for isolator in self.isolators:
            out.update(isolator.status(container_id) or {})
        return out

    def usage(self, container_ids: list[str]) -> dict[str, dict]:
        """(In a thread) what the isolators measure, per container."""
        out: dict[str, dict] = {}
        for cid in container_ids:
            stats: dict = {}
            for isolator in self.isolators:
                try:
                    stats.update(isolator.usage(cid) or {})
                except OSError:
                    continue
            if stats:
                out[cid] = stats
        return out


def rootfs_spec(rootfs, target: str) -> dict:
    """The launch helper's `rootfs` for a provisioned Rootfs mounted on `target` (overlay
    layers relative to their common parent, so the mount options fit in a page)."""
    if rootfs.kind == "overlay":
        layers = list(rootfs.layers)
        base = os.path.commonpath(layers) if len(layers) > 1 else os.path.dirname(layers[0])
        return {"kind": "overlay", "base": base,
                "layers": [os.path.relpath(layer, base) for layer in layers],
                "upper": rootfs.upper, "work": rootfs.work, "target": target}
    return {"kind": "bind", "path": rootfs.path, "target": target}


def _sandbox_mount(sandbox: str):
    from isolators.interface import Mount
    return Mount(sandbox, spawn.SANDBOX_TARGET)


def image_of(container_info: dict) -> dict:
    """The Mesos Image JSON of a ContainerInfo (a DOCKER ContainerInfo's image too: our
    containerizer runs those as well)."""
    mesos = container_info.get("mesos") or {}
    if mesos.get("image"):
        return mesos["image"]
    docker = container_info.get("docker") or {}
    return {"type": "DOCKER", "docker": {"name": docker["image"]},
            "cached": not docker.get("force_pull_image", False)}


def image_user_spec(rootfs, name: str) -> dict:
    """uid, gid and groups of user `name` (or "uid[:gid]", or "user:group") in the image's
    /etc/passwd and /etc/group; ValueError if it is not there."""
    user, _, group = name.partition(":")
    passwd = _parse_db(image_file(rootfs, "etc/passwd"))
    groups_db = _parse_db(image_file(rootfs, "etc/group"))
    if user.isdigit():
        uid = int(user)
        entry = next((e for e in passwd if e[2] == user), None)
    else:
        entry = next((e for e in passwd if e[0] == user), None)
        if entry is None:
            raise ValueError(f"user '{user}' does not exist in the image")
        uid = int(entry[2])
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            g = next((e for e in groups_db if e[0] == group), None)
            if g is None:
                raise ValueError(f"group '{group}' does not exist in the image")
            gid = int(g[2])
    else:
        gid = int(entry[3]) if entry is not None and entry[3].isdigit() else 0
    supplementary = {gid}
    if entry is not None:
        for g in groups_db:
            if len(g) > 3 and entry[0] in g[3].split(",") and g[2].isdigit():
                supplementary.add(int(g[2]))
    return {"uid": uid, "gid": gid, "groups": sorted(supplementary)}


def _parse_db(data: bytes | None) -> list[list[str]]:
    if not data:
        return []
    return [line.split(":") for line in data.decode("utf-8", "replace").splitlines()
            if line and not line.startswith("#") and line.count(":") >= 3]


def image_file(rootfs, path: str) -> bytes | None:
    """A small file of the image (top layer first, whiteouts honoured); None if absent."""
    if rootfs.kind != "overlay":
        candidates = [rootfs.path]
    else:
        candidates = list(rootfs.layers)
    parts = path.strip("/").split("/")
    for layer in candidates:
        full = os.path.join(layer, *parts)
        try:
            st = os.lstat(full)
        except OSError:
            st = None
        if st is not None:
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                return None  # whited out
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    return f.read(1 << 20)
            return None
        for depth in range(len(parts) - 1, 0, -1):  # an opaque directory hides what is below
            try:
                if os.getxattr(os.path.join(layer, *parts[:depth]),
                               "trusted.overlay.opaque") == b"y":
                    return None
            except OSError:
                continue
    return None


def _listdir_all(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _listdir(path: str) -> list[str]:
    try:
        return [n for n in os.listdir(path) if n.endswith(".json")]
    except OSError:
        return []
