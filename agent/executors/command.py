"""The built-in executor: runs command tasks (and simple task groups) under the v1 executor API.

Started by the agent as `python -m agent.executors.command` in the task's sandbox, with the
MESOS_* environment (spec §4.1). It subscribes to MESOS_AGENT_ENDPOINT, and for each task
it is given:

    LAUNCH ──> TASK_STARTING ──> /bin/sh -c <value> ──> TASK_RUNNING ──> exit ──> TASK_FINISHED
                                                                              └─> TASK_FAILED
    KILL ──> (TASK_KILLING) ──> SIGTERM to the task's group ──grace──> SIGKILL ──> TASK_KILLED

It exits once every task is terminal and the agent has ACKNOWLEDGED every update (or a few
seconds later without the agent).

Task groups (LAUNCH_GROUP) follow Mesos's default executor (`src/launcher/default_executor.cpp`):
the group's tasks run side by side in the shared sandbox; when one of them ends TASK_FAILED
or TASK_KILLED, every other running task *of that group* is killed, each with its own kill
policy's grace period (3 s without one) — a task that finishes successfully leaves the others
running. Tasks of other groups on the same executor are not touched.

Each task sees, under its CommandInfo's own `environment` (which wins): `MESOS_TASK_ID`,
`HOST` (the agent's hostname, from our environment), and for its `ports` resources `PORT0`..,
`PORT` (= PORT0), `PORTS` (comma-separated) and `PORT_<NAME>` for ports its DiscoveryInfo
names. With `AGORA_SWITCH_USER=1` (set by an agent running as root) the executor stays root
and starts each task as its user: the task's command `user`, else the executor's, else the
framework's, with that user's groups and HOME, USER and LOGNAME.

A task's `health_check` (COMMAND, HTTP, TCP) is run as Mesos's executors run it: the
schedule is `agora.health_checks`'s, the probes are `agent.executors.probe`'s (inside
the task's namespaces when it runs in a container); health goes out as TASK_RUNNING with
`healthy`, and too many failures in a row kill the task (see agent/README.md "Health
checks"). An invalid one fails the task (REASON_TASK_INVALID) before it starts.

It runs once per task, so its start-up time is part of every launch: it uses the standard
library only (plain sockets rather than http.client, which alone costs ~20 ms to import)
and our pure RecordIO decoder, never Twisted. One thread reads the agent's event stream and
runs everything; one small thread per task (and per health check) waits for its end and
wakes it.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from agora import health_checks as health
from agora.recordio import Decoder

CONTAINER_DIR_VARIABLE = "AGORA_CONTAINER_DIR"  # where the agent put our tasks' specs
LAUNCHER_VARIABLE = "AGORA_LAUNCHER"  # the launch helper's socket ("@" = abstract)

API_PATH = "/api/v1/executor"
DEFAULT_KILL_GRACE = 3.0  # Mesos: the kill policy's default grace period
DEFAULT_SHUTDOWN_GRACE = 5.0
ACK_WAIT = 5.0  # how long to wait for the agent to acknowledge the last update
CALL_TIMEOUT = 10.0
SWITCH_USER_VARIABLE = "AGORA_SWITCH_USER"  # "1": start each task as its user (we are root)
DISCONNECTED_TIMEOUT = 5.0  # how long to look for the agent when not checkpointing
DEFAULT_RECOVERY_TIMEOUT = 15 * 60.0  # Mesos's --recovery_timeout, when checkpointing
_DURATION_UNITS = (("weeks", 604800.0), ("days", 86400.0), ("hrs", 3600.0), ("mins", 60.0),
                   ("secs", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9))


def log(message: str) -> None:
    """A line on stderr, which the agent keeps in the sandbox."""
    sys.stderr.write(f"[executor] {message}\n")
    sys.stderr.flush()


def parse_duration(text: str | None, default: float) -> float:
    """Seconds in a Mesos duration string such as `5secs` or `100ms`; `default` if unusable."""
    if not text:
        return default
    text = text.strip()
    for unit, factor in _DURATION_UNITS:
        if text.endswith(unit):
            try:
                return float(text[: -len(unit)]) * factor
            except ValueError:
                break
    return default


def new_uuid() -> str:
    """A random (version 4) UUID as padded base64 of its 16 bytes, as the API wants it."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    return base64.b64encode(bytes(raw)).decode("ascii")


def grace_of(kill_policy, default: float) -> float:
    """The grace period of a KillPolicy JSON, in seconds."""
    if isinstance(kill_policy, dict):
        ns = (kill_policy.get("grace_period") or {}).get("nanoseconds")
        if isinstance(ns, (int, float)):
            return max(0.0, ns / 1e9)
    return default


def exit_message(returncode: int) -> str:
    if returncode < 0:
        return f"Command terminated with signal {signal.strsignal(-returncode) or -returncode}"
    return f"Command exited with status {returncode}"


def environment_variables(command: dict) -> dict:
    """The variables of a CommandInfo's `environment` (VALUE ones, and SECRETs given by value)."""
    env = {}
    for var in (command.get("environment") or {}).get("variables") or []:
        if not isinstance(var, dict) or not isinstance(var.get("name"), str):
            continue
        if var.get("type", "VALUE") == "VALUE" and isinstance(var.get("value"), str):
            env[var["name"]] = var["value"]
        elif isinstance(((var.get("secret") or {}).get("value") or {}).get("data"), str):
            env[var["name"]] = base64.b64decode(var["secret"]["value"]["data"]).decode(
                "utf-8", "replace")
    return env


def task_environment(base: dict, command: dict, variables: dict | None = None) -> dict:
    """The task's environment: ours, minus what we added for ourselves, plus `variables`
    (see `task_variables`), plus the command's own, which win."""
    env = dict(base)
    for name in (SWITCH_USER_VARIABLE, CONTAINER_DIR_VARIABLE, LAUNCHER_VARIABLE):
        env.pop(name, None)
    # The agent put our package on PYTHONPATH; the task should not see it (it could shadow
    # a user's own modules named `agent` or `agora`).
    if "AGORA_TASK_PYTHONPATH" in env:
        original = env.pop("AGORA_TASK_PYTHONPATH")
        if original:
            env["PYTHONPATH"] = original
        else:
            env.pop("PYTHONPATH", None)
    env.update(variables or {})
    env.update(environment_variables(command))
    return env


def port_numbers(resources) -> list[int]:
    """The port numbers of a task's `ports` RANGES resources, in the order given."""
    ports = []
    for r in resources or []:
        if not isinstance(r, dict) or r.get("name") != "ports" or r.get("type") != "RANGES":
            continue
        for rng in (r.get("ranges") or {}).get("range") or []:
            begin, end = rng.get("begin"), rng.get("end")
            if isinstance(begin, int) and isinstance(end, int) and begin <= end:
                ports.extend(range(begin, end + 1))
    return ports


def task_variables(info: dict) -> dict:
    """MESOS_TASK_ID, PORT0.., PORT, PORTS and PORT_<NAME> for a TaskInfo (HOST comes from
    the agent, in the executor's own environment)."""
    env = {"MESOS_TASK_ID": info["task_id"]["value"]}
    ports = port_numbers(info.get("resources"))
    for i, port in enumerate(ports):
        env[f"PORT{i}"] = str(port)
    if ports:
        env["PORT"] = str(ports[0])
        env["PORTS"] = ",".join(str(p) for p in ports)
    discovery = info.get("discovery") if isinstance(info.get("discovery"), dict) else {}
    for port in (discovery.get("ports") or {}).get("ports") or []:
        if isinstance(port, dict) and isinstance(port.get("name"), str) and port["name"] \
                and port.get("number") in ports:
            env["PORT_" + re.sub(r"[^A-Z0-9_]", "_", port["name"].upper())] = str(port["number"])
    return env


def task_user(task: dict | None, executor: dict | None, framework: dict | None) -> str | None:
    """Who a task runs as (Mesos's rule): its command's `user`, else its executor's command's,
    else the framework's; None when none names one."""
    for info in (task, executor):
        command = info.get("command") if isinstance(info, dict) else None
        user = command.get("user") if isinstance(command, dict) else None
        if isinstance(user, str) and user:
            return user
    user = framework.get("user") if isinstance(framework, dict) else None
    return user if isinstance(user, str) and user else None


def credentials(user: str) -> tuple[dict, dict]:
    """(Popen keyword arguments, login environment) to run as `user`; KeyError if unknown."""
    entry = pwd.getpwnam(user)
    groups = sorted(set(os.getgrouplist(user, entry.pw_gid)))
    return ({"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": groups},
            {"HOME": entry.pw_dir, "USER": user, "LOGNAME": user})


def command_argv(command: dict) -> tuple[list[str], str | None]:
    """(argv, program) for a CommandInfo: `/bin/sh -c value`, or `value` with `arguments`."""
    value = command.get("value")
    if not isinstance(value, str) or not value:
        raise ValueError("the task's command has no 'value'")
    if command.get("shell", True):
        return ["/bin/sh", "-c", value], None
    arguments = [a for a in command.get("arguments") or [] if isinstance(a, str)]
    return (arguments or [value]), value


def popen_in_group(argv: list[str], **kwargs) -> subprocess.Popen:
    """Popen in a process group of its own (signalled as a whole with killpg)."""
    try:
        return subprocess.Popen(argv, process_group=0, **kwargs)
    except TypeError:  # Python < 3.11 has no process_group
        return subprocess.Popen(argv, preexec_fn=os.setpgrp, **kwargs)


# --- HTTP over plain sockets ---------------------------------------------------------------


class LaunchFailed(Exception):
    """The task's container could not be started (REASON_CONTAINER_LAUNCH_FAILED)."""


class HTTPFailure(Exception):
    """The agent answered with a non-2xx status (or not at all)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def _request(host: str, body: bytes) -> bytes:
    return (f"POST {API_PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Accept: application/json\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
            "\r\n").encode("ascii") + body


def _read_head(sock: socket.socket) -> tuple[int, dict, bytes]:
    """Read a response head: (status, lower-cased headers, bytes already read past it)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the agent closed the connection before answering")
        buf += data
        if len(buf) > 65536:
            raise ConnectionError("response head too large")
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise ConnectionError(f"bad status line {lines[0]!r}") from None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


class Dechunker:
    """Incremental decoder of a chunked HTTP body; `ended` once the last chunk is read."""

    def __init__(self):
        self.buf = b""
        self.state = "size"  # size line -> data -> CRLF -> size line ...
        self.remaining = 0
        self.ended = False

    def feed(self, data: bytes) -> bytes:
        """The body bytes that `data` completes; ValueError on a malformed chunk."""
        self.buf += data
        out = []
        while not self.ended:
            if self.state == "data":
                if not self.buf:
                    break
                take = self.buf[: self.remaining]
                out.append(take)
                self.buf = self.buf[len(take):]
                self.remaining -= len(take)
                if self.remaining:
                    break
                self.state = "crlf"
                continue
            nl = self.buf.find(b"\n")
            if nl < 0:
                break
            line, self.buf = self.buf[:nl], self.buf[nl + 1:]
            if self.state == "crlf":
                self.state = "size"
                continue
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                self.ended = True
            else:
                self.remaining, self.state = size, "data"
        return b"".join(out)


def call(endpoint: tuple[str, int], body: dict, timeout: float = CALL_TIMEOUT) -> int:
    """POST one call to the agent; the status, or HTTPFailure for a non-2xx answer."""
    payload = json.dumps(body).encode("utf-8")
    with socket.create_connection(endpoint, timeout=timeout) as sock:
        sock.sendall(_request(f"{endpoint[0]}:{endpoint[1]}", payload))
        status, headers, rest = _read_head(sock)
        if 200 <= status < 300:
            return status
        length = int(headers.get("content-length") or 0)
        while len(rest) < length:
            data = sock.recv(65536)
            if not data:
                break
            rest += data
        raise HTTPFailure(status, rest.decode("utf-8", "replace")[:500])


class EventStream:
    """The SUBSCRIBE response: a chunked RecordIO stream of JSON events."""

    def __init__(self, endpoint: tuple[str, int], body: dict):
        self.sock = socket.create_connection(endpoint, timeout=CALL_TIMEOUT)
        try:
            payload = json.dumps(body).encode("utf-8")
            self.sock.sendall(_request(f"{endpoint[0]}:{endpoint[1]}", payload))
            status, headers, rest = _read_head(self.sock)
            if status != 200:
                raise HTTPFailure(status, rest.decode("utf-8", "replace")[:500])
        except BaseException:
            self.sock.close()
            raise
        self.sock.settimeout(None)
        self.chunks = Dechunker() if "chunked" in headers.get("transfer-encoding", "") else None
        self.records = Decoder()
        self.head_rest = rest  # body bytes that came with the head (the first events)

    def fileno(self) -> int:
        return self.sock.fileno()

    def first_events(self) -> list[dict] | None:
        """The events that arrived together with the response head."""
        data, self.head_rest = self.head_rest, b""
        return self._decode(data) if data else []

    def read(self) -> list[dict] | None:
        """The events that have arrived (call when readable); None once the stream ended."""
        try:
            data = self.sock.recv(65536)
        except OSError:
            return None
        if not data:
            return None
        return self._decode(data)

    def _decode(self, data: bytes) -> list[dict] | None:
        try:
            if self.chunks is not None:
                data = self.chunks.feed(data)
            events = [json.loads(r) for r in self.records.feed(data)] if data else []
        except ValueError as e:
            log(f"Garbage on the event stream: {e}")
            return None
        if self.chunks is not None and self.chunks.ended and not events:
            return None
        return events

    def close(self) -> None:
        self.sock.close()


# --- the executor -----------------------------------------------------------------------


class Contained:
    """A task the agent's launch helper started in its container (its own namespaces, an
    image's root filesystem): `pid` is its first process, an init that passes signals on
    to the task when the container has its own PID namespace."""

    def __init__(self, pid: int, init: bool, client):
        self.pid = pid
        self.init = init
        self.client = client

    def signal(self, sig: int) -> None:
        if self.init:
            os.kill(self.pid, sig)  # the init forwards it; SIGKILL ends the whole namespace
        else:
            os.killpg(self.pid, sig)


class Task:
    """One task this executor runs."""

    def __init__(self, info: dict, group: tuple[str, ...] | None):
        self.info = info
        self.task_id = info["task_id"]["value"]
        self.group = group  # the ids of its task group, if launched in one
        self.proc: subprocess.Popen | Contained | None = None
        self.kill_grace = grace_of(info.get("kill_policy"), DEFAULT_KILL_GRACE)
        self.killing = False
        self.kill_at: float | None = None  # when to escalate to SIGKILL
        self.terminal = False  # the terminal update was made
        # Health checking (see "health checks" below): the check, its schedule once the
        # task runs, the check in flight, and how the task runs (for COMMAND checks).
        self.check: health.HealthCheck | None = None
        self.health: health.Health | None = None
        self.check_run: CheckRun | None = None
        self.unhealthy: str | None = None  # the kill message, once a check killed the task
        self.env: dict = {}
        self.as_user: dict = {}
        self.spec: dict | None = None  # its container's spec, when it runs in one
        self.namespaces: dict[str, int] | None = None  # fds of its own namespaces


class CheckRun:
    """One health check in flight: a child process (COMMAND) or a thread (HTTP, TCP)."""

    def __init__(self, seq: int, deadline: float | None, proc: subprocess.Popen | None):
        self.seq = seq
        self.deadline = deadline
        self.proc = proc
        self.timed_out = False  # counted as failed; we wait for it to go away

    def kill(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class CommandExecutor:
    """The event loop: subscribe, launch, watch, kill, report; see the module docstring."""

    def __init__(self, env: dict):
        host, _, port = env["MESOS_AGENT_ENDPOINT"].rpartition(":")
        self.endpoint = (host, int(port))
        self.framework_id = env["MESOS_FRAMEWORK_ID"]
        self.executor_id = env["MESOS_EXECUTOR_ID"]
        self.env = env
        self.shutdown_grace = parse_duration(env.get("MESOS_EXECUTOR_SHUTDOWN_GRACE_PERIOD"),
                                             DEFAULT_SHUTDOWN_GRACE)
        # Checkpointing: wait up to the recovery timeout for a restarted agent, and keep
        # unacknowledged updates for it instead of exiting ACK_WAIT after the last task.
        self.checkpoint = env.get("MESOS_CHECKPOINT") == "1"
        if self.checkpoint:
            self.recovery_timeout = parse_duration(env.get("MESOS_RECOVERY_TIMEOUT"),
                                                   DEFAULT_RECOVERY_TIMEOUT)
        else:
            self.recovery_timeout = DISCONNECTED_TIMEOUT
        self.switch_user = env.get(SWITCH_USER_VARIABLE) == "1"
        self.framework_info: dict = {}
        self.executor_info: dict = {}
        self.tasks: dict[str, Task] = {}
        self.unacked: dict[str, dict] = {}  # uuid -> status sent but not acknowledged
        self.stream: EventStream | None = None
        self.subscribed = False
        self.disconnected_at: float | None = None
        self.retry_at = 0.0
        self.retry_delay = 0.1
        self.shutting_down = False
        self.finish_by: float | None = None  # exit at this time even without acks
        self.exit_code: int | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._exits: list[tuple[str, int]] = []
        self._checks: list[tuple[str, int, bool, str]] = []  # (task id, seq, passed, why)
        self._check_seq = 0
        self._lock = threading.Lock()

    # --- main loop ------------------------------------------------------------------------

    def run(self) -> int:
        self.disconnected_at = time.monotonic()
        while self.exit_code is None:
            now = time.monotonic()
            if self.stream is None and now >= self.retry_at:
                self.subscribe()
                continue
            readers = [self._wake_r] + ([self.stream] if self.stream is not None else [])
            ready, _, _ = select.select(readers, [], [], self.timeout(now))
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
                self.reap()
            if self.stream is not None and self.stream in ready:
                self.handle(self.stream.read())
            self.tick(time.monotonic())
        if self.stream is not None:
            self.stream.close()
        return self.exit_code

    def timeout(self, now: float) -> float:
        deadlines = [t.kill_at for t in self.tasks.values() if t.kill_at is not None]
        deadlines += self.check_deadlines()
        if self.finish_by is not None:
            deadlines.append(self.finish_by)
        if self.stream is None:
            deadlines.append(self.retry_at)
            deadlines.append(self.disconnected_at + self.recovery_timeout)
        return max(0.0, min(deadlines) - now) if deadlines else 60.0

    def tick(self, now: float) -> None:
        for task in list(self.tasks.values()):
            if task.kill_at is not None and now >= task.kill_at:
                task.kill_at = None
                self.signal(task, signal.SIGKILL)
            if task.health is not None:
                self.check_health(task, now)
        if self.finish_by is not None and now >= self.finish_by:
            log(f"Exiting without acknowledgements for {len(self.unacked)} update(s)")
            self.finish(1)
        elif self.stream is None and now >= self.disconnected_at + self.recovery_timeout:
            log(f"No agent for {self.recovery_timeout:.0f}s; killing the tasks and exiting")
            self.abandon()

    def finish(self, code: int) -> None:
        self.exit_code = code

    # --- the agent ---------------------------------------------------------------------

    def subscribe(self) -> None:
        unacked_tasks = [t.info for t in self.tasks.values()
                         if not t.terminal or any(s["task_id"]["value"] == t.task_id
                                                  for s in self.unacked.values())]
        body = {"type": "SUBSCRIBE", "framework_id": {"value": self.framework_id},
                "executor_id": {"value": self.executor_id},
                "subscribe": {"unacknowledged_tasks": unacked_tasks,
                              "unacknowledged_updates": [{"status": s}
                                                         for s in self.unacked.values()]}}
        try:
            self.stream = EventStream(self.endpoint, body)
        except HTTPFailure as e:
            if e.status == 503:
                self.retry_later()
                return
            log(f"The agent refused our subscription ({e}); giving up")
            self.abandon()
        except OSError as e:
            self.retry_later()
            if self.subscribed:
                log(f"Cannot reach the agent at {self.endpoint[0]}:{self.endpoint[1]}: {e}")
        else:
            self.disconnected_at = None
            self.retry_delay = 0.1
            self.handle(self.stream.first_events())
            self.check_done()  # what waited for the agent to come back waits for acks now

    def handle(self, events: list[dict] | None) -> None:
        if events is None:
            self.lost_stream()
            return
        for event in events:
            if self.stream is None or self.exit_code is not None:
                return
            self.dispatch(event)

    def retry_later(self) -> None:
        self.retry_at = time.monotonic() + self.retry_delay
        self.retry_delay = min(self.retry_delay * 2, 2.0)

    def lost_stream(self) -> None:
        log("The agent's event stream ended; reconnecting")
        self.stream.close()
        self.stream = None
        self.disconnected_at = time.monotonic()
        self.retry_at = 0.0
        if self.checkpoint:
            self.finish_by = None  # the agent may come back within the recovery timeout

    def send(self, body: dict) -> bool:
        body = dict(body, framework_id={"value": self.framework_id},
                    executor_id={"value": self.executor_id})
        try:
            call(self.endpoint, body)
            return True
        except HTTPFailure as e:
            log(f"The agent rejected our {body['type']}: {e}")
        except OSError as e:
            log(f"Cannot send {body['type']} to the agent: {e}")
        return False

    def update(self, task: Task, state: str, message: str | None = None,
               reason: str | None = None, healthy: bool | None = None) -> None:
        status = {"task_id": {"value": task.task_id}, "state": state,
                  "source": "SOURCE_EXECUTOR", "executor_id": {"value": self.executor_id},
                  "timestamp": time.time(), "uuid": new_uuid()}
        if message:
            status["message"] = message
        if reason:
            status["reason"] = reason
        if healthy is not None:
            status["healthy"] = healthy
        self.unacked[status["uuid"]] = status
        try:
            call(self.endpoint, {"type": "UPDATE", "framework_id": {"value": self.framework_id},
                                 "executor_id": {"value": self.executor_id},
                                 "update": {"status": status}})
        except HTTPFailure as e:
            log(f"The agent rejected {state} for {task.task_id}: {e}")
            self.unacked.pop(status["uuid"], None)  # it will not be acknowledged
        except OSError as e:
            # Kept: it goes out again with the next SUBSCRIBE (unacknowledged_updates).
            log(f"Cannot send {state} for {task.task_id} now: {e}")
        self.check_done()

    # --- events ----------------------------------------------------------------------

    def dispatch(self, event: dict) -> None:
        kind = event.get("type")
        payload = event.get(str(kind).lower()) or {}
        if kind == "SUBSCRIBED":
            self.framework_info = payload.get("framework_info") or {}
            self.executor_info = payload.get("executor_info") or {}
            if self.subscribed:
                log("Re-subscribed to the agent")
            self.subscribed = True
        elif kind == "LAUNCH":
            self.launch([payload.get("task") or {}], group=False)
        elif kind == "LAUNCH_GROUP":
            self.launch((payload.get("task_group") or {}).get("tasks") or [], group=True)
        elif kind == "KILL":
            task = self.tasks.get((payload.get("task_id") or {}).get("value"))
            if task is not None:
                self.kill(task, grace_of(payload.get("kill_policy"), task.kill_grace))
        elif kind == "ACKNOWLEDGED":
            self.unacked.pop(payload.get("uuid"), None)
            self.check_done()
        elif kind == "SHUTDOWN":
            self.shutdown()
        elif kind == "MESSAGE":
            log(f"Framework message of {len(payload.get('data', ''))} base64 characters ignored")
        elif kind == "ERROR":
            log(f"Error from the agent: {payload.get('message')}")

    def launch(self, infos: list[dict], group: bool) -> None:
        infos = [i for i in infos
                 if isinstance(i, dict) and isinstance((i.get("task_id") or {}).get("value"), str)]
        ids = tuple(info["task_id"]["value"] for info in infos)
        checks, invalid = self.health_checks(infos)
        for info in infos:
            task_id = info["task_id"]["value"]
            if task_id in self.tasks:
                log(f"Task {task_id} was already launched; ignoring it")
                continue
            task = self.tasks[task_id] = Task(info, ids if group else None)
            if self.shutting_down:
                task.terminal = True
                self.update(task, "TASK_KILLED", "The executor is shutting down")
                continue
            if not group and len(self.tasks) > 1:
                task.terminal = True
                self.update(task, "TASK_FAILED", "The command executor runs a single task",
                            "REASON_TASK_INVALID")
                continue
            if invalid:  # a task group starts whole or not at all, as Mesos validates it
                task.terminal = True
                if task_id in invalid:
                    message = f"Task uses an invalid health check: {invalid[task_id]}"
                else:
                    other = next(iter(invalid))
                    message = (f"Task {other} of its group uses an invalid health check: "
                               f"{invalid[other]}")
                self.update(task, "TASK_FAILED", message, "REASON_TASK_INVALID")
                continue
            task.check = checks.get(task_id)
            self.start(task)

    @staticmethod
    def health_checks(infos: list[dict]) -> tuple[dict, dict]:
        """({task id: HealthCheck}, {task id: why its health_check is invalid})."""
        checks, invalid = {}, {}
        for info in infos:
            if info.get("health_check") is None:
                continue
            try:
                checks[info["task_id"]["value"]] = health.parse(info["health_check"])
            except ValueError as e:
                invalid[info["task_id"]["value"]] = str(e)
        return checks, invalid

    def start(self, task: Task) -> None:
        self.update(task, "TASK_STARTING")
        command = task.info.get("command") or {}
        try:
            spec = self.container_spec(task)
            if spec is not None and spec.get("argv") is not None:  # the image says what runs
                argv, program = spec["argv"], None
            else:
                argv, program = command_argv(command)
            env = task_environment(self.env, command, task_variables(task.info))
            as_user, user = {}, None
            if self.switch_user:
                user = task_user(task.info, self.executor_info, self.framework_info)
            if user is not None:
                try:
                    as_user, login = credentials(user)
                except KeyError:
                    task.terminal = True
                    self.update(task, "TASK_FAILED", f"user '{user}' does not exist",
                                "REASON_CONTAINER_LAUNCH_FAILED")
                    self.after_terminal(task)
                    return
                env.update(login)
                env.update(environment_variables(command))  # the command's own still win
            task.env, task.as_user = env, as_user
            if spec is not None:
                proc = self.start_contained(task, spec, argv, program, env, as_user)
                threading.Thread(target=self.wait_contained, args=(task.task_id, proc),
                                 daemon=True).start()
                task.proc, task.spec = proc, spec
                self.update(task, "TASK_RUNNING")
                self.start_health(task)
                return
            log(f"Starting task {task.task_id}" + (f" as {user}" if user else "") +
                f": {' '.join(argv)}")
            proc = popen_in_group(argv, executable=program, env=env, stdin=subprocess.DEVNULL,
                                  close_fds=True, **as_user)
        except LaunchFailed as e:
            task.terminal = True
            self.update(task, "TASK_FAILED", str(e), "REASON_CONTAINER_LAUNCH_FAILED")
            self.after_terminal(task)
            return
        except (OSError, ValueError) as e:
            task.terminal = True
            self.update(task, "TASK_FAILED", f"Failed to launch the command: {e}",
                        "REASON_COMMAND_EXECUTOR_FAILED")
            self.after_terminal(task)
            return
        task.proc = proc
        threading.Thread(target=self.wait, args=(task.task_id, proc), daemon=True).start()
        self.update(task, "TASK_RUNNING")
        self.start_health(task)

    def container_spec(self, task: Task) -> dict | None:
        """The spec the agent prepared for the task's container, if it runs in one."""
        directory = self.env.get(CONTAINER_DIR_VARIABLE)
        if not directory:
            return None
        from agent.containerizer.helper_wire import task_key
        path = os.path.join(directory, "tasks", task_key(task.task_id) + ".json")
        try:
            with open(path, "rb") as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise LaunchFailed(f"the agent prepared no container for the task: {e}") from None

    def start_contained(self, task: Task, spec: dict, argv, program, env, as_user) -> Contained:
        """Have the launch helper start the task in its container (the process is ours to
        give unless the agent set it from the task's image)."""
        from agent.containerizer import helper_wire
        if spec.get("argv") is None:
            user = None
            if as_user:
                user = {"uid": as_user["user"], "gid": as_user["group"],
                        "groups": as_user["extra_groups"]}
            spec.update(argv=argv, program=program, env=env, cwd=os.getcwd(), user=user)
        log(f"Starting task {task.task_id} in its container: {' '.join(spec['argv'])}")
        name = self.env[LAUNCHER_VARIABLE]
        container_id = (os.path.basename(self.env[CONTAINER_DIR_VARIABLE].rstrip("/")) + "." +
                        helper_wire.task_key(task.task_id))
        try:
            client = helper_wire.Client("\0" + name[1:] if name.startswith("@") else name)
            pid = client.launch(container_id, spec, [1, 2])
        except helper_wire.HelperError as e:
            raise LaunchFailed(f"Failed to launch the task's container: {e}") from None
        return Contained(pid, "pid" in (spec.get("namespaces") or ()), client)

    def wait_contained(self, task_id: str, proc: Contained) -> None:
        """(In a thread) wait for the helper to report the task's end, and wake the loop."""
        from agent.containerizer import helper_wire
        status = None
        try:
            while status is None:
                for message in proc.client.receive():
                    if message.get("op") == "exited":
                        status = message["status"]
        except (OSError, ValueError, helper_wire.HelperError):
            status = signal.SIGKILL  # the helper went away: count the task as killed
        proc.client.close()
        with self._lock:
            self._exits.append((task_id, os.waitstatus_to_exitcode(status)))
        os.write(self._wake_w, b"x")

    def wait(self, task_id: str, proc: subprocess.Popen) -> None:
        """(In a thread) wait for a task's exit and wake the loop."""
        returncode = proc.wait()
        with self._lock:
            self._exits.append((task_id, returncode))
        os.write(self._wake_w, b"x")

    def reap(self) -> None:
        with self._lock:
            exits, self._exits = self._exits, []
            checks, self._checks = self._checks, []
        for task_id, returncode in exits:
            task = self.tasks[task_id]
            task.kill_at = None
            task.terminal = True
            self.end_health(task)
            # Whatever it left behind in its process group goes with it (a PID namespace's
            # init took everything with it, and its pid may be someone else's by now).
            if not (isinstance(task.proc, Contained) and task.proc.init):
                self.signal(task, signal.SIGKILL)
            message = exit_message(returncode)
            log(f"Task {task_id}: {message}")
            if task.killing and task.unhealthy:
                self.update(task, "TASK_KILLED", task.unhealthy, healthy=False)
            elif task.killing:
                self.update(task, "TASK_KILLED", message)
            elif returncode == 0:
                self.update(task, "TASK_FINISHED", message)
            else:
                self.update(task, "TASK_FAILED", message)
            if task.killing or returncode != 0:
                self.after_terminal(task)
        # After the exits: a result for a task that has just ended is dropped, not acted on.
        for task_id, seq, passed, why in checks:
            self.check_ended(self.tasks[task_id], seq, passed, why)

    def after_terminal(self, task: Task) -> None:
        """A task of a group failed or was killed: the rest of the group goes too."""
        if task.group is None:
            return
        for other_id in task.group:
            other = self.tasks.get(other_id)
            if other is not None and not other.terminal:
                self.kill(other, other.kill_grace)

    def kill(self, task: Task, grace: float) -> None:
        if task.terminal or task.proc is None:
            return
        if task.killing:
            # A second KILL may shorten the grace period, never extend it.
            if task.kill_at is not None:
                task.kill_at = min(task.kill_at, time.monotonic() + grace)
            return
        task.killing = True
        if task.health is not None:
            task.health.stop()  # as Mesos: no health updates once the kill has begun
        capabilities = {c.get("type") for c in self.framework_info.get("capabilities") or []
                        if isinstance(c, dict)}
        if "TASK_KILLING_STATE" in capabilities:
            self.update(task, "TASK_KILLING")
        log(f"Killing task {task.task_id} (grace period {grace:g}s)")
        if grace > 0:
            self.signal(task, signal.SIGTERM)
            task.kill_at = time.monotonic() + grace
        else:
            self.signal(task, signal.SIGKILL)

    @staticmethod
    def signal(task: Task, sig: int) -> None:
        try:
            if isinstance(task.proc, Contained):
                task.proc.signal(sig)
            else:
                os.killpg(task.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def shutdown(self) -> None:
        log("Shutting down at the agent's request")
        self.shutting_down = True
        grace = max(0.0, self.shutdown_grace - 1.0)  # leave time to report before the agent kills
        for task in self.tasks.values():
            self.kill(task, min(task.kill_grace, grace))
        self.check_done()

    def abandon(self) -> None:
        """No agent to report to: kill everything at once and exit."""
        for task in self.tasks.values():
            if task.proc is not None and not task.terminal:
                self.signal(task, signal.SIGKILL)
            self.end_health(task)
        self.finish(1)

    # --- health checks ----------------------------------------------------------------
    #
    # The schedule and the meaning of results are agora.health_checks'; here, the I/O.
    # A COMMAND check is a child process in a process group of its own (on the host: as the
    # task, in the sandbox; in a container: through agent.executors.probe, inside the
    # task's namespaces), waited for by a thread; HTTP and TCP checks run in a thread (in
    # the task's network namespace if it has one). Each wakes the loop through the wake
    # pipe with (task id, seq, passed, why). A check past its timeout is failed and killed;
    # the next one starts only once it is gone, so hung checks never pile up.

    def start_health(self, task: Task) -> None:
        if task.check is not None:
            task.health = health.Health(task.check, time.monotonic())
            log(f"Task {task.task_id}: {task.check.name} every {task.check.interval:g}s, "
                f"starting in {task.check.delay:g}s")

    def check_deadlines(self) -> list[float]:
        out = []
        for task in self.tasks.values():
            run = task.check_run
            if run is not None and not run.timed_out and run.deadline is not None:
                out.append(run.deadline)
            if task.health is not None and task.health.wake_at() is not None:
                out.append(task.health.wake_at())
        return out

    def check_health(self, task: Task, now: float) -> None:
        run, check = task.check_run, task.check
        if run is not None and not run.timed_out and run.deadline is not None \
                and now >= run.deadline:
            run.timed_out = True
            run.kill()
            self.health_result(task, False, f"timed out after {check.timeout:g}s", now)
        if not task.health.due(now) or task.terminal or task.killing:
            return
        if task.check_run is not None:  # the one that timed out has not gone yet
            task.health.begin()
            self.health_result(task, False, "the previous check has not ended yet", now)
            return
        self._check_seq += 1
        seq = self._check_seq
        task.health.begin()
        try:
            if check.kind == "COMMAND":
                proc = self.spawn_check(task, check)
                threading.Thread(target=self.wait_check, args=(task.task_id, seq, proc),
                                 daemon=True).start()
            else:
                proc = None
                netns = self.task_namespaces(task).get("net")
                threading.Thread(target=self.probe_socket,
                                 args=(task.task_id, seq, check,
                                       None if netns is None else os.dup(netns)),
                                 daemon=True).start()
        except (OSError, ValueError) as e:
            self.health_result(task, False, f"cannot start: {e}", now)
            return
        task.check_run = CheckRun(seq, None if check.timeout is None else now + check.timeout,
                                  proc)

    def spawn_check(self, task: Task, check: health.HealthCheck) -> subprocess.Popen:
        """Start a COMMAND check: as the task, with its environment (and the check's own)."""
        argv, program = command_argv(check.command)
        spec = task.spec
        out = {"stdin": subprocess.DEVNULL, "stdout": 2, "stderr": 2, "close_fds": True}
        if spec is None:
            env = dict(task.env, **environment_variables(check.command))
            return popen_in_group(argv, executable=program, env=env, **out, **task.as_user)
        namespaces = self.task_namespaces(task)
        request = {"namespaces": namespaces, "cgroups": spec.get("cgroups") or [],
                   "process": {"argv": argv, "program": program,
                               "env": dict(spec.get("env") or {},
                                           **environment_variables(check.command)),
                               "cwd": spec.get("cwd"), "user": spec.get("user"),
                               "rlimits": spec.get("rlimits") or []}}
        # Our own interpreter and package (our environment), started from / so that
        # nothing in the sandbox is on its sys.path.
        return popen_in_group([sys.executable, "-S", "-m", "agent.executors.probe",
                               json.dumps(request)], env=self.env, cwd="/",
                              pass_fds=list(namespaces.values()), **out)

    def task_namespaces(self, task: Task) -> dict[str, int]:
        """Fds of the namespaces the task's container does not share with us (opened once,
        while the task runs, so that its pid cannot have been reused)."""
        if task.namespaces is None:
            opened: dict[str, int] = {}
            try:
                if isinstance(task.proc, Contained):
                    from agent.executors.probe import NAMESPACES
                    for name in NAMESPACES:
                        theirs = f"/proc/{task.proc.pid}/ns/{name}"
                        mine, other = os.stat(f"/proc/self/ns/{name}"), os.stat(theirs)
                        if (mine.st_dev, mine.st_ino) != (other.st_dev, other.st_ino):
                            opened[name] = os.open(theirs, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                for fd in opened.values():  # all or none: a check half inside is wrong
                    os.close(fd)
                raise
            task.namespaces = opened
        return task.namespaces

    def wait_check(self, task_id: str, seq: int, proc: subprocess.Popen) -> None:
        """(In a thread) wait for a COMMAND check to end, and wake the loop."""
        returncode = proc.wait()
        self.checked(task_id, seq, returncode == 0, exit_message(returncode))

    def probe_socket(self, task_id: str, seq: int, check: health.HealthCheck,
                     netns: int | None) -> None:
        """(In a thread of its own, which may enter the task's network namespace) run an
        HTTP or TCP check, and wake the loop."""
        from agent.executors import probe
        try:
            if netns is not None:
                try:
                    probe.enter_network(netns)
                finally:
                    os.close(netns)
            if check.kind == "HTTP":
                passed, why = probe.http(check.scheme, check.port, check.path, check.ipv6,
                                         check.timeout)
            else:
                passed, why = probe.tcp(check.port, check.ipv6, check.timeout)
        except Exception as e:  # noqa: BLE001 — a result must come back, whatever happened
            passed, why = False, f"{type(e).__name__}: {e}"
        self.checked(task_id, seq, passed, why)

    def checked(self, task_id: str, seq: int, passed: bool, why: str) -> None:
        with self._lock:
            self._checks.append((task_id, seq, passed, why))
        os.write(self._wake_w, b"x")

    def check_ended(self, task: Task, seq: int, passed: bool, why: str) -> None:
        run = task.check_run
        if run is None or run.seq != seq:
            return
        task.check_run = None
        if not run.timed_out and task.health is not None:
            self.health_result(task, passed, why, time.monotonic())

    def health_result(self, task: Task, passed: bool, why: str, now: float) -> None:
        check = task.check
        verdict = task.health.result(passed, why, now)
        if verdict.ignored:
            log(f"Task {task.task_id}: {check.name} failed within the grace period "
                f"(ignored): {why}")
        elif not passed:
            log(f"Task {task.task_id}: {check.name} failed {task.health.failures} time(s) "
                f"in a row: {why}")
        if verdict.report is not None and not task.terminal and not task.killing:
            log(f"Task {task.task_id} is {'healthy' if verdict.report else 'unhealthy'}")
            self.update(task, "TASK_RUNNING", reason="REASON_TASK_HEALTH_CHECK_STATUS_UPDATED",
                        healthy=verdict.report)
        if verdict.kill and not task.terminal and not task.killing:
            task.unhealthy = task.health.kill_message(task.task_id)
            log(task.unhealthy)
            self.kill(task, task.kill_grace)

    def end_health(self, task: Task) -> None:
        """The task has ended: no more checks; the one in flight is killed."""
        if task.health is not None:
            task.health.stop()
        if task.check_run is not None:
            task.check_run.kill()
            task.check_run = None
        for fd in (task.namespaces or {}).values():
            os.close(fd)
        task.namespaces = None if task.namespaces is None else {}

    def check_done(self) -> None:
        """Exit when every task is terminal and reported; start the clock if only acks lack."""
        if self.exit_code is not None:
            return
        if not self.tasks and not self.shutting_down:
            return
        if any(not t.terminal for t in self.tasks.values()):
            return
        if not self.unacked:
            self.finish(0)
        elif self.finish_by is None and (self.stream is not None or not self.checkpoint):
            self.finish_by = time.monotonic() + ACK_WAIT


def main() -> int:
    try:
        executor = CommandExecutor(dict(os.environ))
    except (KeyError, ValueError) as e:
        log(f"Not started by an agent? Missing or bad environment: {e}")
        return 2
    # The agent kills us with SIGTERM on shutdown; take our tasks with us.
    signal.signal(signal.SIGTERM, lambda *_: (executor.abandon(), sys.exit(143)))
    return executor.run()


if __name__ == "__main__":
    sys.exit(main())
