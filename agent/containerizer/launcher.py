"""The posix launcher: start a container's first process in a session of its own, watch it end.

A container here is a session: the executor is started with setsid (so pymesos executors,
which `killpg(0, SIGKILL)` themselves, cannot hit the agent), and everything it starts stays
in that session unless it calls setsid itself. Killing a container therefore means signalling
every process of the session, found through /proc (the posix launcher's stand-in for a
freezer cgroup); where there is no /proc, the session leader's process group.

Exits are noticed without polling: a pidfd (Linux >= 5.3) becomes readable when the process
ends, and the reactor watches it like a socket. Elsewhere a thread blocks in waitpid.
Processes are started with subprocess (fork/exec in C), never through a new interpreter.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from typing import Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from agora.fd_reader import FdReader

from agent.procfs import proc_stats, stat_fields
from agent.users import RunAs

log = Logger()

class LaunchError(Exception):
    """A container could not be started; the message says why (it becomes the tasks'
    TASK_FAILED message, REASON_CONTAINER_LAUNCH_FAILED)."""


#: How long a container may take to empty after SIGKILL before we give up and say so.
KILL_SETTLE_TIMEOUT = 5.0
_SETTLE_INTERVAL = 0.02


@attrs.frozen
class LaunchSpec:
    """What to start: argv (argv[0] is looked up in the env's PATH unless `program` is set)."""

    argv: tuple[str, ...] = attrs.field(converter=tuple)
    env: dict
    cwd: str
    stdout: str  # file paths, opened for appending
    stderr: str
    program: str | None = None  # the file to execute, when it differs from argv[0]
    user: RunAs | None = None  # run as this user (the launcher must be root); None: as we are


def wait_status(returncode: int) -> int:
    """The waitpid status for a subprocess returncode (negative = killed by that signal)."""
    return -returncode if returncode < 0 else (returncode & 0xFF) << 8


def describe_status(status: int) -> str:
    """'exited with status 1' / 'terminated with signal Killed' for a wait status."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"terminated with signal {signal.strsignal(sig) or sig}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def session_members(sid: int) -> list[int] | None:
    """Pids of the live (non-zombie) processes in session `sid`; None if /proc is unusable."""
    stats = proc_stats()
    if stats is None:
        return None
    return [pid for pid, fields in stats if int(fields[3]) == sid]


def signal_session(sid: int, sig: int) -> int:
    """Send `sig` to every process in session `sid`; returns how many were signalled."""
    members = session_members(sid)
    if members is None:  # no /proc: the leader's process group is the best we can do
        try:
            os.killpg(sid, sig)
            return 1
        except (ProcessLookupError, PermissionError):
            return 0
    count = 0
    for pid in members:
        try:
            os.kill(pid, sig)
            count += 1
        except (ProcessLookupError, PermissionError):
            pass
    return count


class Container:
    """One launched container: its leader's pid, its exit, and the means to kill it all.

    `exited` fires with the leader's wait status. `destroy(grace)` ends every member:
    SIGTERM to each, SIGKILL to whatever is left after `grace`. Members are the leader's
    session here (one /proc scan per step: the cost grows with the host's process count);
    `CgroupContainer` (agent.containerizer.linux) reads them from its cgroup instead.
    """

    def __init__(self, reactor, container_id: str, pid: int, popen: subprocess.Popen | None):
        self.reactor = reactor
        self.container_id = container_id
        self.pid = pid
        self.status: int | None = None
        self.exited: Deferred = Deferred()
        self._popen = popen
        self._reader: FdReader | None = None
        # Destroy state: phase None (not asked), "TERM" (grace period) or "KILL".
        self._phase: str | None = None
        self._termed: set[int] = set()  # members that already got SIGTERM
        self._waiters: list[Deferred] = []
        self._done = False
        self._kill_call = None
        self._step_call = None
        self._kill_deadline = 0.0
        self._watch()

    def members(self) -> list[int] | None:
        """Pids of the container's live processes; None when they cannot be listed."""
        return session_members(self.pid)

    def kill_all(self, members: list[int]) -> None:
        """SIGKILL every member (a cgroup can do it without racing forks)."""
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    @property
    def running(self) -> bool:
        return self.status is None

    # --- exit -------------------------------------------------------------------------

    def _watch(self) -> None:
        try:
            fd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            # No pidfds: a thread blocks in wait() and hands the result to the reactor.
            thread = threading.Thread(target=self._wait_in_thread, daemon=True,
                                      name=f"wait-{self.pid}")
            thread.start()
            return
        self._reader = FdReader(fd, self._reap)
        self.reactor.addReader(self._reader)

    def _wait_in_thread(self) -> None:
        returncode = self._popen.wait()
        self.reactor.callFromThread(self._exited, wait_status(returncode))

    def _reap(self) -> None:
        returncode = self._popen.poll()
        if returncode is None:
            return  # spurious wake-up
        self.reactor.removeReader(self._reader)
        os.close(self._reader.fd)
        self._reader = None
        self._exited(wait_status(returncode))

    def _exited(self, status: int) -> None:
        self.status = status
        self.exited.callback(status)
        if self._phase is not None:
            self._step()

    # --- kill -------------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        """Send `sig` to every process of the container."""
        members = self.members()
        if members is None:
            signal_session(self.pid, sig)  # no /proc: the leader's process group
            return
        for pid in members:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def destroy(self, grace: float) -> Deferred:
        """End every process of the container; fires (with the leader's status) when none is left."""
        waiter = Deferred()
        if self._done:
            waiter.callback(self.status)
            return waiter
        self._waiters.append(waiter)
        if self._phase is None:
            if grace > 0:
                self._phase = "TERM"
                self._kill_call = self.reactor.callLater(grace, self._escalate)
                self._step()
            else:
                self._escalate()
        elif grace <= 0 and self._phase == "TERM":
            self._escalate()  # a harsher request overrides the grace period
        return waiter

    def _escalate(self) -> None:
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._kill_call = None
        self._phase = "KILL"
        self._kill_deadline = self.reactor.seconds() + KILL_SETTLE_TIMEOUT
        self._step()

    def _step(self) -> None:
        """One look at the session: done if empty, else signal and look again soon."""
        if self._step_call is not None and self._step_call.active():
            self._step_call.cancel()
        self._step_call = None
        if self._done:
            return
        members = self.members()
        if members is None:
            # No /proc: the leader's process group stands for the session.
            if self.status is not None:
                self._finish()
                return
            try:
                os.killpg(self.pid, signal.SIGKILL if self._phase == "KILL" else signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
            return
        if not members and self.status is not None:
            self._finish()
            return
        if self._phase == "KILL":
            self.kill_all(members)
        for pid in members if self._phase == "TERM" else ():
            if pid in self._termed:
                continue  # one SIGTERM each: a handler need not run twice
            self._termed.add(pid)
            try:
                os.kill(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        if self.status is None:
            return  # the leader's exit (or the grace timer) brings the next step
        # The leader is gone but members remain: some were forked after the last sweep, or
        # have not died yet. Look again shortly.
        if self._phase == "KILL" and self.reactor.seconds() > self._kill_deadline:
            log.error("Container {cid}: processes {pids} survive SIGKILL", cid=self.container_id,
                      pids=members)
            self._finish()
            return
        self._step_call = self.reactor.callLater(_SETTLE_INTERVAL, self._step)

    def _finish(self) -> None:
        self._done = True
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._kill_call = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self.status)


class RecoveredContainer(Container):
    """A container an earlier run of the agent launched, still running.

    Its leader is not our child, so its exit is seen through a pidfd (opened by `recover`,
    which checks the start time so a reused pid is never mistaken for it) and its wait status
    is unknown: `status` is 0 and `status_known` False.
    """

    status_known = False

    def __init__(self, reactor, container_id: str, pid: int, pidfd: int | None):
        self._pidfd = pidfd
        self._poll_call = None
        super().__init__(reactor, container_id, pid, None)

    def _watch(self) -> None:
        if self._pidfd is not None:
            self._reader = FdReader(self._pidfd, self._reap)
            self.reactor.addReader(self._reader)
        else:  # no pidfds: look at /proc now and then
            self._poll_call = self.reactor.callLater(0.5, self._poll)

    def _poll(self) -> None:
        self._poll_call = None
        if session_leader_alive(self.pid):
            self._poll_call = self.reactor.callLater(0.5, self._poll)
        else:
            self._exited(0)

    def _reap(self) -> None:
        self.reactor.removeReader(self._reader)
        os.close(self._reader.fd)
        self._reader = None
        self._exited(0)


def session_leader_alive(pid: int) -> bool:
    """Whether `pid` still runs (not a zombie) and leads its own session."""
    fields = stat_fields(pid)
    return fields is not None and int(fields[3]) == pid


def recover(reactor, container_id: str, pid: int, start_ticks: int | None,
            ticks_of: Callable[[int], int | None]) -> RecoveredContainer | None:
    """Re-attach to the container whose leader is `pid`, started at `start_ticks`; None if
    that process is gone (a live process with another start time is someone else)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    except (AttributeError, OSError):
        pidfd = None
    # Checked after opening the pidfd: it now names this very process, whatever comes.
    if ticks_of(pid) is None or ticks_of(pid) != start_ticks or not session_leader_alive(pid):
        if pidfd is not None:
            os.close(pidfd)
        return None
    return RecoveredContainer(reactor, container_id, pid, pidfd)


class PosixLauncher:
    """Starts containers as plain processes in their own sessions (no root needed)."""

    def __init__(self, reactor):
        self.reactor = reactor

    def launch(self, container_id: str, spec: LaunchSpec) -> Container:
        """Start `spec`; raises OSError (e.g. ENOENT, EACCES) when it cannot be started."""
        credentials = {}
        if spec.user is not None:
            # setgroups, setgid, setuid in the child, after fork and before exec.
            credentials = dict(user=spec.user.uid, group=spec.user.gid,
                               extra_groups=list(spec.user.groups))
        stdout = open(spec.stdout, "ab")
        try:
            stderr = open(spec.stderr, "ab")
            try:
                popen = subprocess.Popen(
                    list(spec.argv), executable=spec.program, env=spec.env, cwd=spec.cwd,
                    stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                    close_fds=True, start_new_session=True, **credentials,
                )
            finally:
                stderr.close()
        finally:
            stdout.close()
        return Container(self.reactor, container_id, popen.pid, popen)
