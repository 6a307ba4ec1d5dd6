"""The Linux launcher: containers forked by the launch helper, each in a cgroup of its own.

    Agent (reactor) ──frames over a Unix socket──> launch helper ──fork──> container
       launch {spec}  ──>                            (agent.containerizer.helper)
       <── launched {pid} / failed {message} / exited {status}

The launcher starts the helper once (or finds the one a previous agent run left, which
still has that run's containers as children), gives every container a *membership* cgroup
(every process of the container joins it before exec, so none escapes by setsid and a
destroy kills them all at once, forks racing or not), and turns the helper's events into
`CgroupContainer`s: launcher `Container`s whose members come from the cgroup and whose
exit is the helper's report (the wait status, even for a PID namespace's init, which
reports its task's). If the helper dies, containers fall back to pidfds (status unknown).
"""

from __future__ import annotations

import os
import sys

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.protocol import ClientFactory, ProcessProtocol, Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from agora.fd_reader import FdReader

from agent.containerizer import helper_wire as wire
from agent.containerizer.launcher import Container, LaunchError

log = Logger()

CONNECT_ATTEMPTS = 200  # at 25 ms: the helper has 5 s to listen
CONNECT_INTERVAL = 0.025


class CgroupContainer(Container):
    """A container the helper forked; its processes are those of its membership cgroup."""

    def __init__(self, reactor, container_id: str, pid: int, membership):
        self.membership = membership
        self.status_known = True
        super().__init__(reactor, container_id, pid, None)

    def _watch(self) -> None:
        pass  # the helper reports the exit (see LinuxLauncher._message)

    def members(self) -> list[int]:
        try:
            return self.membership.procs()
        except OSError:
            return []

    def kill_all(self, members: list[int]) -> None:
        # Freeze, kill, thaw until empty: it waits for the kernel, so not in the reactor.
        deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                          self.membership.kill).addErrback(
            lambda f: log.error("Container {cid}: {e}", cid=self.container_id,
                                e=f.getErrorMessage()))

    def watch_pidfd(self) -> None:
        """The helper is gone: learn of the exit from a pidfd (the status is then unknown)."""
        if self.status is not None or self._reader is not None:
            return
        try:
            fd = os.pidfd_open(self.pid)
        except OSError:
            self.status_known = False
            self._exited(0)
            return
        self._reader = FdReader(fd, self._pidfd_ready)
        self.reactor.addReader(self._reader)

    def _pidfd_ready(self) -> None:
        self.reactor.removeReader(self._reader)
        os.close(self._reader.fd)
        self._reader = None
        self.status_known = False
        self._exited(0)

    def reported(self, status: int) -> None:
        if self.status is None:
            self._exited(status)


class _HelperConnection(Protocol):
    def __init__(self, launcher: LinuxLauncher):
        self.launcher = launcher
        self.buffer = wire.FrameBuffer()

    def connectionMade(self):
        self.launcher._connected(self)

    def dataReceived(self, data: bytes):
        try:
            messages = self.buffer.feed(data)
        except ValueError as e:
            log.error("Launch helper sent a bad frame: {e}", e=e)
            self.transport.loseConnection()
            return
        for message in messages:
            self.launcher._message(message)

    def connectionLost(self, reason):
        self.launcher._lost(self)


class _HelperProcess(ProcessProtocol):
    """The helper's output goes to the agent's log."""

    def outReceived(self, data: bytes):
        for line in data.decode("utf-8", "replace").splitlines():
            log.info("launch helper: {line}", line=line)

    errReceived = outReceived


class LinuxLauncher:
    """Launches containers through the helper; see the module docstring."""

    name = "linux"

    def __init__(self, reactor, runtime_dir: str, membership, *, python: str = sys.executable,
                 code_root: str | None = None, idle_exit: float = 30.0, roots=()):
        """`membership(container_id)` returns the container's membership cgroup (not yet
        created): an object with `path`, `create()`, `procs()`, `kill()` and `remove()`.
        `roots` are this agent's cgroup directories, removed (if empty) when it stops."""
        self.roots = tuple(roots)
        self.reactor = reactor
        self.runtime_dir = runtime_dir
        self.membership = membership
        self.python = python
        self.code_root = code_root
        self.idle_exit = idle_exit
        self.address = wire.address(runtime_dir)
        self._connection: _HelperConnection | None = None
        self._ready: list[Deferred] = []
        self._pending: dict[str, tuple] = {}  # id -> (Deferred, membership, before_exec)
        self._containers: dict[str, CgroupContainer] = {}
        self._waits: dict[str, Deferred] = {}
        self._spawned = False
        self._stopping = False
        self._closed: Deferred | None = None  # stop() waits on it

    # --- the helper ----------------------------------------------------------------------

    def start(self) -> Deferred:
        """Connect to the helper, starting it if none serves this runtime directory."""
        os.makedirs(self.runtime_dir, mode=0o700, exist_ok=True)
        return self._ensure()

    def _ensure(self) -> Deferred:
        if self._connection is not None:
            return succeed(None)
        d = Deferred()
        self._ready.append(d)
        if len(self._ready) == 1:
            self._attempt(CONNECT_ATTEMPTS)
        return d

    def _attempt(self, left: int) -> None:
        factory = ClientFactory()
        factory.noisy = False  # no "Starting factory" log line for each attempt
        factory.protocol = lambda: _HelperConnection(self)
        factory.clientConnectionFailed = lambda connector, reason: self._refused(left, reason)
        self.reactor.connectUNIX(self.address, factory)

    def _refused(self, left: int, reason) -> None:
        if not self._spawned:
            self._spawn()
        if left <= 0:
            waiters, self._ready = self._ready, []
            for d in waiters:
                d.errback(LaunchError(f"the launch helper did not start: {reason.value}"))
            return
        self.reactor.callLater(CONNECT_INTERVAL, self._attempt, left - 1)

    def _spawn(self) -> None:
        self._spawned = True
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        if self.code_root:
            env["PYTHONPATH"] = self.code_root
        argv = [self.python, "-S", "-P", "-m", "agent.containerizer.helper",
                "--runtime-dir", self.runtime_dir, "--idle-exit", str(self.idle_exit)]
        self.reactor.spawnProcess(_HelperProcess(), self.python, argv, env=env,
                                  path=self.runtime_dir)

    def _connected(self, connection: _HelperConnection) -> None:
        self._connection = connection
        waiters, self._ready = self._ready, []
        for d in waiters:
            d.callback(None)

    def _lost(self, connection: _HelperConnection) -> None:
        if self._connection is not connection:
            return
        self._connection = None
        if self._closed is not None:
            closed, self._closed = self._closed, None
            closed.callback(None)
        self._spawned = False
        if not self._stopping:
            log.error("Lost the launch helper; running containers are watched through pidfds")
        for cid, (d, membership, _) in list(self._pending.items()):
            del self._pending[cid]
            _remove(membership)
            d.errback(LaunchError("the launch helper went away during the launch"))
        for container in self._containers.values():
            container.watch_pidfd()
        for d in self._waits.values():
            d.callback(None)
        self._waits.clear()

    def _send(self, message: dict) -> None:
        self._connection.transport.write(wire.encode(message))

    def _message(self, message: dict) -> None:
        op, cid = message.get("op"), message.get("id")
        if op == "created" and cid in self._pending:
            self._created(cid, message["pid"], self._pending[cid][2])
        elif op in ("launched", "failed") and cid in self._pending:
            d, membership, _ = self._pending.pop(cid)
            if op == "failed":
                _remove(membership)
                d.errback(LaunchError(message.get("message") or "the launch failed"))
                return
            container = CgroupContainer(self.reactor, cid, message["pid"], membership)
            self._containers[cid] = container
            container.exited.addBoth(self._forget, cid)
            d.callback(container)
        elif op == "exited":
            container = self._containers.get(cid)
            if container is not None:
                container.reported(message["status"])
            elif cid in self._waits:
                self._waits.pop(cid).callback(message["status"])
        elif op == "waiting" and cid in self._waits:
            self._waits.pop(cid).callback("waiting")
        elif op == "unknown" and cid in self._waits:
            self._waits.pop(cid).callback(None)

    def _forget(self, result, cid: str):
        self._containers.pop(cid, None)
        return result

    def stop(self) -> Deferred:
        """Let go of the helper: it exits once its last container has."""
        self._stopping = True
        for root in self.roots:
            try:
                os.rmdir(root)
            except OSError:
                pass  # not empty (a container outlives us) or not there
        if self._connection is None:
            return succeed(None)
        # Fires once `exit` is written and the connection closed: a reactor that stops
        # sooner would leave the helper waiting out its idle time.
        self._closed = Deferred()
        self._send({"op": "exit"})
        self._connection.transport.loseConnection()
        return self._closed

    # --- containers ----------------------------------------------------------------------

    def launch(self, container_id: str, spec: dict, before_exec=None) -> Deferred:
        """Start the container `spec` describes (see helper_wire); fires with a
        CgroupContainer once its first process has exec'd, or fails with LaunchError.
        `before_exec(container_id, pid)` (may return a Deferred) runs while that process
        waits, before it execs."""
        membership = self.membership(container_id)
        try:
            membership.create()
        except (OSError, ValueError) as e:
            return fail(LaunchError(f"cannot create the container's cgroup: {e}"))
        spec = dict(spec, cgroups=[*(spec.get("cgroups") or ()), membership.path])
        d = Deferred()

        def send(_):
            self._pending[container_id] = (d, membership, before_exec)
            self._send({"op": "launch", "id": container_id, "spec": spec,
                        "go": before_exec is not None})

        def failed(failure):
            _remove(membership)
            d.errback(failure)

        self._ensure().addCallbacks(send, failed)
        return d

    def _created(self, container_id: str, pid: int, before_exec) -> None:
        """The child waits: run `before_exec`, then let it go (or kill it on failure)."""
        def go(_):
            if self._connection is not None:
                self._send({"op": "go", "id": container_id})

        def failed(failure):
            log.failure("Isolating container {cid} failed", failure, cid=container_id)
            pending = self._pending.pop(container_id, None)
            try:
                os.kill(pid, 9)
            except OSError:
                pass
            if pending is not None:
                _remove(pending[1])
                pending[0].errback(LaunchError(f"isolation failed: {failure.getErrorMessage()}"))

        d = maybeDeferred(before_exec, container_id, pid)
        d.addCallbacks(go, failed)

    def orphans(self, live: set[str]) -> Deferred:
        """Ids of the membership cgroups under our root that hold no container in `live`."""
        def scan():
            parent = os.path.dirname(self.membership("x").path)
            try:
                names = os.listdir(parent)
            except OSError:
                return []
            return [n for n in names if n not in live
                    and os.path.isdir(os.path.join(parent, n))]

        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), scan)

    def destroy_orphan(self, container_id: str) -> Deferred:
        """Kill every process of a container nobody recovered."""
        membership = self.membership(container_id)

        def kill():
            try:
                membership.kill()
            except Exception as e:  # noqa: BLE001
                log.error("Could not kill orphan {cid}: {e}", cid=container_id, e=e)

        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), kill)

    def cleanup(self, container_id: str) -> Deferred:
        """Remove the container's membership cgroup (it must be empty by now)."""
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), _remove,
                                 self.membership(container_id))

    def recover(self, container_id: str, pid: int) -> Deferred:
        """Re-attach to a container an earlier agent run launched (its first process is
        `pid`, already checked against pid reuse). Fires with a CgroupContainer, which may
        have exited already. Its exit status is known if the helper that forked it runs."""
        membership = self.membership(container_id)

        def ask(_):
            d = self._waits[container_id] = Deferred()
            self._send({"op": "wait", "id": container_id})
            return d

        def answered(answer):
            container = CgroupContainer(self.reactor, container_id, pid, membership)
            if answer == "waiting":  # the helper will report the exit
                self._containers[container_id] = container
                container.exited.addBoth(self._forget, container_id)
            elif answer is None:  # forked by a helper that is gone
                container.watch_pidfd()
            else:  # it ended while no agent listened
                container.reported(answer)
            return container

        d = self._ensure()
        d.addCallback(ask)
        d.addCallback(answered)
        return d


def _remove(membership) -> None:
    try:
        membership.remove()
    except Exception as e:  # noqa: BLE001 — CgroupError or OSError: say so, carry on
        log.warn("Could not remove cgroup {path}: {e}", path=membership.path, e=e)
