"""The I/O of health checks: TCP connects, HTTP GETs, and commands run inside a task's container.

    tcp(port, ipv6, timeout) -> (ok, message)          a connection to 127.0.0.1:port opens
    http(scheme, port, path, ipv6, timeout) -> (ok, message)   GET answers 200-399
        Both run in a worker thread of the executor; for a task with a network namespace of
        its own, `enter_network(fd)` first moves that thread (and only it: setns applies to
        the calling thread) into the task's namespace, so 127.0.0.1 is the task's.

    python -S -m agent.executors.probe REQUEST          (the namespace fds inherited)
        joins the task's cgroups, enters its namespaces (ipc, uts, net, pid, mnt: the task's
        filesystem, processes and network), forks (a PID namespace only takes children),
        and the child runs the check's command as the task runs (rlimits, cwd, user, env:
        `agent.containerizer.spawn.finish_and_exec`); exits as the command did. REQUEST is
        JSON: {"namespaces": {name: fd}, "cgroups": [dir], "process": {argv, program, env,
        cwd, user, rlimits}}. A separate interpreter because setns into a mount namespace
        needs a single-threaded caller, and the executor has threads.

Standard library only, like the executor.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

#: Namespaces a command check enters, in order (the mount namespace last, as nsenter does).
NAMESPACES = ("ipc", "uts", "net", "pid", "mnt")
MAX_STATUS_LINE = 8192


def _host(ipv6: bool) -> str:
    # 127.0.0.1 rather than localhost: an image's /etc/hosts may lack it (as Mesos says).
    return "::1" if ipv6 else "127.0.0.1"


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("timed out")
    return left


def enter_network(fd: int) -> None:
    """Move the calling thread into the network namespace open at `fd`."""
    from agent.containerizer import syscalls as sc
    sc.setns(fd, sc.CLONE_NEWNET)


def tcp(port: int, ipv6: bool, timeout: float | None) -> tuple[bool, str]:
    """Whether a TCP connection to the loopback `port` opens within `timeout`."""
    address = (_host(ipv6), port)
    try:
        with socket.create_connection(address, timeout=timeout):
            return True, ""
    except OSError as e:
        return False, f"cannot connect to {address[0]}:{port}: {e.strerror or e}"


def http(scheme: str, port: int, path: str, ipv6: bool,
         timeout: float | None) -> tuple[bool, str]:
    """Whether GET scheme://127.0.0.1:port/path answers 200-399 within `timeout` (https
    without verifying the certificate, as Mesos's `curl -k`)."""
    host = _host(ipv6)
    url = f"{scheme}://{'[::1]' if ipv6 else host}:{port}{path}"
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            if scheme == "https":
                import ssl
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                sock.settimeout(_remaining(deadline))
                sock = context.wrap_socket(sock)
            request = (f"GET {path} HTTP/1.1\r\nHost: {url.split('/')[2]}\r\n"
                       "User-Agent: agora-health-check\r\nAccept: */*\r\n"
                       "Connection: close\r\n\r\n")
            sock.settimeout(_remaining(deadline))
            sock.sendall(request.encode("latin-1"))
            data = b""
            while b"\n" not in data and len(data) < MAX_STATUS_LINE:
                sock.settimeout(_remaining(deadline))
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        finally:
            sock.close()
    except socket.timeout:
        return False, f"GET {url} timed out"
    except OSError as e:
        return False, f"GET {url} failed: {e.strerror or e}"
    line = data.split(b"\n", 1)[0].decode("latin-1").strip()
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return False, f"GET {url}: not an HTTP response ({line[:80]!r})"
    status = int(parts[1])
    if 200 <= status < 400:
        return True, ""
    return False, f"GET {url}: unexpected HTTP response code {line.split(None, 1)[1]}"


def run_in_container(request: dict) -> int:
    """(In a fresh process) enter the task's cgroups and namespaces and run the command;
    its exit code (or the same signal)."""
    from agent.containerizer import spawn
    from agent.containerizer import syscalls as sc
    try:
        for directory in request.get("cgroups") or ():
            with open(os.path.join(directory, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        namespaces = request.get("namespaces") or {}
        for name in NAMESPACES:
            if name in namespaces:
                sc.setns(namespaces[name], sc.NAMESPACE_FLAGS[name][0])
                os.close(namespaces[name])
    except OSError as e:
        sys.stderr.write(f"[health check] cannot enter the task's container: {e}\n")
        return 127
    child = os.fork()
    if child == 0:
        try:
            spawn.finish_and_exec(request["process"])
        except (OSError, spawn.SetupError) as e:
            sys.stderr.write(f"[health check] {e}\n")
        except BaseException as e:  # noqa: BLE001 — a forked child must not unwind
            sys.stderr.write(f"[health check] unexpected {type(e).__name__}: {e}\n")
        finally:
            sys.stderr.flush()
            os._exit(127)
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    return os.waitstatus_to_exitcode(status)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m agent.executors.probe REQUEST-JSON\n")
        return 2
    return run_in_container(json.loads(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
