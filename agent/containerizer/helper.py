"""The launch helper: a small long-lived process that forks every container of one agent.

    python -S -m agent.containerizer.helper --runtime-dir DIR [--idle-exit SECS]

Forking from this single-threaded process costs a few milliseconds per container, against
~60-80 ms for a new interpreter per container (the toolchain spec measured both), and never
forks the agent itself (a big multi-threaded Twisted process). The helper listens on the
abstract socket `helper_wire.address(runtime_dir)`, takes `launch` frames, forks, and the
child becomes the container (`agent.containerizer.spawn`). With a PID namespace the helper
unshares CLONE_NEWPID just around the fork, so its child is PID 1 of a new namespace, the
container's init, and the helper's own children's namespace is put back right after.

It keeps each container's exit status until somebody hears it: the connection that
launched it, or one that asks with `wait` (an agent that restarted). It survives the
agent (it runs in a session of its own), so containers stay its children, and exits once
it has no connection and no container left for `--idle-exit` seconds.
Standard library only: it must start fast and fork small.
"""

from __future__ import annotations

import argparse
import errno
import gc
import os
import selectors
import signal
import socket
import struct
import sys
import time

from agent.containerizer import helper_wire as wire
from agent.containerizer import spawn
from agent.containerizer import syscalls as sc

KEPT_STATUSES = 10000  # exit statuses nobody has collected yet, at most


class Child:
    """One forked container, from fork until its exit is delivered."""

    __slots__ = ("id", "pid", "conn", "report", "report_data", "report_done", "go_w",
                 "init", "state", "message", "task_status", "status")

    def __init__(self, container_id, pid, conn, report, go_w, init):
        self.id = container_id
        self.pid = pid
        self.conn = conn
        self.report = report  # read end of the child's report pipe
        self.report_data = b""
        self.report_done = False
        self.go_w = go_w
        self.init = init
        self.state = "starting"  # -> running -> (exited | failed)
        self.message = None  # set when the launch failed
        self.task_status = None  # an init's report of its task's status
        self.status = None  # the reaped wait status


class Connection:
    def __init__(self, sock):
        self.sock = sock
        self.buffer = wire.FrameBuffer()
        self.fds: list[int] = []
        self.out = bytearray()
        self.closed = False


class Helper:
    def __init__(self, runtime_dir: str, idle_exit: float):
        self.runtime_dir = runtime_dir
        self.idle_exit = idle_exit
        self.uid = os.getuid()
        self.selector = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_UNIX,
                                      socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind(wire.address(runtime_dir))
        self.listener.listen(512)
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self._reap)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the agent's session may be signalled
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self.connections: dict[int, Connection] = {}
        self.children: dict[str, Child] = {}  # by container id, until the exit is delivered
        self.by_pid: dict[int, Child] = {}
        self.idle_since = time.monotonic()
        self.exiting = False  # the agent stopped: exit as soon as no container is left

    # --- loop -----------------------------------------------------------------------------

    def run(self) -> int:
        while True:
            if self.exiting and not self.by_pid:
                return 0
            busy = self.connections or self.by_pid
            if busy:
                self.idle_since = time.monotonic()
            elif time.monotonic() - self.idle_since >= self.idle_exit:
                return 0
            for key, mask in self.selector.select(timeout=None if busy else self.idle_exit):
                key.data(key, mask)

    def _accept(self, key, mask):
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", creds)
            if uid != self.uid:
                sock.close()  # only the agent's user may launch containers
                continue
            sock.setblocking(False)
            conn = Connection(sock)
            self.connections[sock.fileno()] = conn
            self.selector.register(sock, selectors.EVENT_READ, self._readable)

    def _readable(self, key, mask):
        conn = self.connections.get(key.fd)
        if conn is None:
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if not mask & selectors.EVENT_READ:
            return
        try:
            data, ancdata, _, _ = conn.sock.recvmsg(
                262144, socket.CMSG_SPACE(wire.MAX_FDS * 4 * 4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, ancdata = b"", []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                count = len(payload) // 4
                conn.fds.extend(struct.unpack(f"{count}i", payload[:count * 4]))
        if not data:
            self._close(conn)
            return
        try:
            messages = conn.buffer.feed(data)
        except ValueError:
            self._close(conn)
            return
        for message in messages:
            self._handle(conn, message)

    def _handle(self, conn: Connection, message: dict) -> None:
        op = message.get("op")
        cid = message.get("id")
        if op == "launch":
            count = int(message.get("fds") or 0)
            fds, conn.fds = conn.fds[:count], conn.fds[count:]
            spec = message.get("spec") or {}
            try:
                fds += self._open_stdio(spec.get("stdio_paths") or ())
                self._launch(conn, cid, spec, fds, bool(message.get("go")))
            except OSError as e:
                self._send(conn, {"op": "failed", "id": cid, "message": str(e)})
            finally:
                for fd in fds:
                    os.close(fd)
        elif op == "go":
            child = self.children.get(cid)
            if child is not None and child.go_w is not None:
                os.write(child.go_w, b"g")
                os.close(child.go_w)
                child.go_w = None
        elif op == "wait":
            child = self.children.get(cid)
            if child is None:
                self._send(conn, {"op": "unknown", "id": cid})
                return
            child.conn = conn
            if child.state in ("exited", "failed"):
                self._deliver(child)
            else:
                self._send(conn, {"op": "waiting", "id": cid})
        elif op == "exit":
            self.exiting = True
        elif op == "ping":
            self._send(conn, {"op": "pong", "pid": os.getpid()})

    # --- launching ------------------------------------------------------------------------

    @staticmethod
    def _open_stdio(paths) -> list[int]:
        """stdout/stderr files named by the launcher (appended to; a symlink is refused: a
        sandbox belongs to the container's user)."""
        fds = []
        try:
            for path in paths:
                fds.append(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT |
                                   os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
        except OSError as e:
            for fd in fds:
                os.close(fd)
            raise OSError(e.errno, f"cannot open {path}: {e.strerror}") from None
        return fds

    def _launch(self, conn, cid, spec, fds, go) -> None:
        if not isinstance(cid, str) or not cid or cid in self.children:
            self._send(conn, {"op": "failed", "id": cid,
                              "message": f"container id {cid!r} is empty or in use"})
            return
        init = "pid" in (spec.get("namespaces") or ())
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        go_r = go_w = None
        if go:
            go_r, go_w = os.pipe2(os.O_CLOEXEC)
        try:
            if init:
                sc.unshare(sc.CLONE_NEWPID)
            try:
                pid = os.fork()
            except OSError:
                pid = -1
                raise
            finally:
                if init and pid != 0:  # put our children's namespace back (not in the child)
                    sc.setns(self.own_pidns, sc.CLONE_NEWPID)
        except OSError as e:
            for fd in (report_r, report_w, go_r, go_w):
                if fd is not None:
                    os.close(fd)
            self._send(conn, {"op": "failed", "id": cid, "message": f"fork: {e}"})
            return
        if pid == 0:
            self._in_child(spec, fds, report_w, go_r, init)
        os.close(report_w)
        if go_r is not None:
            os.close(go_r)
        os.set_blocking(report_r, False)
        child = Child(cid, pid, conn, report_r, go_w, init)
        self.children[cid] = child
        self.by_pid[pid] = child
        self.selector.register(report_r, selectors.EVENT_READ,
                               lambda key, mask, child=child: self._report(child))
        if go:
            self._send(conn, {"op": "created", "id": cid, "pid": pid})

    def _in_child(self, spec, fds, report_w, go_r, init) -> None:
        """In the forked child: drop the helper's state, then become the container."""
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, *spawn.RESET_SIGNALS):
                signal.signal(sig, signal.SIG_DFL)
            keep = sorted({0, 1, 2, report_w, *fds} | ({go_r} if go_r is not None else set()))
            low = 3
            for fd in keep:
                if fd >= low:
                    os.closerange(low, fd)
                    low = fd + 1
            os.closerange(low, os.sysconf("SC_OPEN_MAX"))
        except BaseException:  # noqa: BLE001
            os._exit(126)
        spawn.become(spec, fds, report_w, go_r, init)
        os._exit(127)  # not reached

    def _report(self, child: Child) -> None:
        """The child's report pipe has news: errors, an init's progress, or EOF (exec'd)."""
        while True:
            try:
                data = os.read(child.report, 4096)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                child.report_done = True
                self.selector.unregister(child.report)
                os.close(child.report)
                break
            child.report_data += data
        *lines, child.report_data = child.report_data.split(b"\n")
        for line in lines:
            text = line.decode("utf-8", "replace")
            if text.startswith("E "):
                child.message = text[2:]
            elif text == "R":
                self._running(child)
            elif text.startswith("S "):
                child.task_status = int(text[2:])
        if child.report_done:
            if child.message is None and not child.init:
                self._running(child)  # the pipe closed on exec
            self._settle(child)

    def _running(self, child: Child) -> None:
        if child.state == "starting" and child.message is None:
            child.state = "running"
            self._send(child.conn, {"op": "launched", "id": child.id, "pid": child.pid})

    def _reap(self, key, mask) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.by_pid.pop(pid, None)
            if child is not None:
                child.status = status
                self._settle(child)

    def _settle(self, child: Child) -> None:
        """Once both the report pipe is closed and the process is reaped: say how it ended."""
        if not child.report_done or child.status is None:
            return
        if child.go_w is not None:
            os.close(child.go_w)
            child.go_w = None
        if child.message is not None:
            child.state = "failed"
        else:
            child.state = "exited"
            if child.init and child.task_status is not None:
                child.status = child.task_status
        self._deliver(child)

    def _deliver(self, child: Child) -> None:
        if child.conn is None or child.conn.closed:
            if len(self.children) > KEPT_STATUSES:
                self.children.pop(child.id, None)
            return
        if child.state == "failed":
            self._send(child.conn, {"op": "failed", "id": child.id, "message": child.message})
        else:
            self._send(child.conn, {"op": "exited", "id": child.id, "status": child.status})
        self.children.pop(child.id, None)

    # --- output ---------------------------------------------------------------------------

    def _send(self, conn: Connection | None, message: dict) -> None:
        if conn is None or conn.closed:
            return
        conn.out += wire.encode(message)
        self._flush(conn)

    def _flush(self, conn: Connection) -> None:
        while conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(conn)
                return
            del conn.out[:sent]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
        self.selector.modify(conn.sock, events, self._readable)

    def _close(self, conn: Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.connections.pop(conn.sock.fileno(), None)
        self.selector.unregister(conn.sock)
        conn.sock.close()
        for fd in conn.fds:
            os.close(fd)
        conn.fds = []
        for child in self.children.values():
            if child.conn is conn:
                child.conn = None
        # Exits that happened while nobody listened stay for a later `wait`; those whose
        # listener just left too.
        self.idle_since = time.monotonic()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="agent.containerizer.helper")
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--idle-exit", type=float, default=30.0,
                        help="exit after this long with no connection and no container")
    args = parser.parse_args(argv)
    try:
        helper = Helper(args.runtime_dir, args.idle_exit)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            print("launch helper: another helper already serves this runtime directory",
                  file=sys.stderr)
            return 3
        raise
    for module, _ in spawn.BUILTINS.values():
        __import__(module)  # once here, not in every fork that runs it
    print(f"launch helper {os.getpid()} ready", flush=True)
    gc.freeze()  # forked children must not copy what start-up built on their first collection
    return helper.run()


if __name__ == "__main__":
    sys.exit(main())
