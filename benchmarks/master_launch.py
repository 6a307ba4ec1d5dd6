#!/usr/bin/env python3
"""The master's hot path end to end: a real master process, emulated agents, raw schedulers.

Starts `agora master` (in-memory registry) as a child process, connects `--agents` emulated
agents to it (benchmarks/emulated_agents.py, over the real protocol), then subscribes
`--frameworks` schedulers that speak the v1 HTTP API directly (no pymesos: a lean client so
the client is not what is measured). Each scheduler launches small command tasks
(`--task cpus:0.01;mem:1` by default), at most `--per-offer` per offer (by default just
enough to spread `--tasks` over every agent in one round), acknowledges every status update,
and declines and suppresses once its share is launched. Measured:

* agent registration time, and the master's CPU time for it;
* SUBSCRIBE -> SUBSCRIBED and SUBSCRIBE -> first OFFERS;
* launch rate: tasks RUNNING (as the schedulers see them) per second, from the first
  OFFERS to the last RUNNING; ACCEPT -> RUNNING latency per task;
* ACKNOWLEDGE: calls per second, call latency, and UPDATE -> StatusUpdateAck-at-the-agent
  round trip; the master's CPU time per task (launch + RUNNING update + ack);
* with `--finish-after`, the TASK_FINISHED wave (update + ack): the master's CPU per task;
* `GET /master/state` (and /state-summary, /metrics/snapshot) latency and size with every
  task running, or finished with `--finish-after` (perf-anchors A10);
* with `--failover`, SIGKILL the master, start a new one on the same port and time until
  every agent has re-registered with its tasks (perf-anchors A9).

    python benchmarks/master_launch.py --agents 1000 --tasks 10000
    python benchmarks/master_launch.py --agents 10000 --tasks 100000 --failover
    python benchmarks/master_launch.py --agents 1000 --tasks 10000 --profile /tmp/master

`--profile PREFIX` samples the master with py-spy (`pip install py-spy`) in each phase into
`PREFIX-<phase>.txt` (collapsed stacks; `flamegraph.pl` or speedscope draw them) and prints
the functions with the most samples. Progress goes to stdout; the last line is
`key=value` figures.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task as ttask, threads  # noqa: E402
from twisted.internet.protocol import ClientFactory, Protocol  # noqa: E402

from agora import recordio  # noqa: E402
from agora.resources import Resources  # noqa: E402
from benchmarks.emulated_agents import (DEFAULT_RESOURCES, FD_HEADROOM,  # noqa: E402
                                        EmulatedAgents, raise_fd_limit)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the master process ------------------------------------------------------------------


class MasterProcess:
    """`agora master` as a child process; its stderr goes to a log file.

    `command` runs another `agora` command instead (`name` for its log, `banner` the
    pattern of its "listening" line, whose group is the port): the Marathon benchmark's.
    """

    def __init__(self, work_dir: str, port: int = 0, args=(), log_level: str = "info",
                 command: list | None = None, name: str = "master",
                 banner: str = r"Master: http://[\d.]+:(\d+)"):
        self.log_path = os.path.join(work_dir, f"{name}.log")
        self.name, self.banner = name, banner
        env = dict(os.environ, PYTHONUNBUFFERED="1", AGORA_LOG_LEVEL=log_level,
                   PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log = open(self.log_path, "ab")
        command = command or ["master", "--port", str(port), "--work-dir",
                              os.path.join(work_dir, "master"), "--registry", "in_memory",
                              *args]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", *command],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self.log)
        self.pid = self.proc.pid
        self.port = None

    def wait_banner(self, timeout: float = 30.0) -> int:
        """Block until the master prints where it listens; its port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                break
            match = re.search(self.banner, line)
            if match:
                self.port = int(match.group(1))
                return self.port
        raise RuntimeError(f"the {self.name} did not start; see {self.log_path}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the master so far (from /proc/<pid>/stat)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def rss_mb(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def fd_limit(self) -> int:
        with open(f"/proc/{self.pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
        return 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# --- a lean HTTP client ------------------------------------------------------------------


class _OneRequest(Protocol):
    """Writes one request, reads the reply until the server closes the connection."""

    def __init__(self, request: bytes, done: defer.Deferred):
        self.request, self.done = request, done
        self.chunks = []

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        self.chunks.append(data)

    def connectionLost(self, reason):
        data = b"".join(self.chunks)
        head, _, body = data.partition(b"\r\n\r\n")
        try:
            status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            self.done.errback(RuntimeError(f"no HTTP reply: {reason.getErrorMessage()}"))
            return
        self.done.callback((status, body))


class _Factory(ClientFactory):
    noisy = False  # no "Starting factory" log event for every call

    def __init__(self, proto: Protocol, failed):
        self.proto, self.failed = proto, failed

    def buildProtocol(self, addr):
        return self.proto

    def clientConnectionFailed(self, connector, reason):
        self.failed(reason)


def http_request(reactor, address, method: str, path: str, body: bytes = b"",
                 headers: dict | None = None) -> defer.Deferred:
    """(status, body) of one request on a fresh connection (`Connection: close`)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {address[0]}:{address[1]}",
             f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    done = defer.Deferred()
    reactor.connectTCP(address[0], address[1], _Factory(_OneRequest(request, done), done.errback))
    return done


class _CallConnection(Protocol):
    """A connection carrying one call at a time; reused unless the server closes it."""

    def __init__(self, client: "CallClient"):
        self.client = client
        self.buf = bytearray()
        self.pending = None  # Deferred of the call in flight
        self.reusable = True

    def connectionMade(self):
        self.client._ready(self)

    def send(self, request: bytes, done: defer.Deferred) -> None:
        self.pending = done
        self.sent_at = time.monotonic()
        self.transport.write(request)

    def dataReceived(self, data):
        buf = self.buf
        buf += data
        end = buf.find(b"\r\n\r\n")
        if end < 0 or self.pending is None:
            return
        head = bytes(buf[:end]).decode("latin-1").lower()
        match = re.search(r"content-length: *(\d+)", head)
        length = int(match.group(1)) if match else 0
        if len(buf) < end + 4 + length:
            return
        body = bytes(buf[end + 4:end + 4 + length])
        del buf[:end + 4 + length]
        self.reusable = "connection: close" not in head
        done, self.pending = self.pending, None
        self.client.latencies.append(time.monotonic() - self.sent_at)
        self.client._finished(self)
        done.callback((int(head.split(" ", 2)[1]), body))

    def connectionLost(self, reason):
        self.reusable = False
        self.client._lost(self)
        if self.pending is not None:
            done, self.pending = self.pending, None
            done.errback(reason)


class CallClient:
    """POSTs calls over at most `size` connections, kept alive when the server allows it.

    With a server that answers `Connection: close` this is one connection per call (what
    pymesos's http.client then does); with keep-alive, connections are reused.
    """

    def __init__(self, reactor, address, size: int):
        self.reactor, self.address, self.size = reactor, address, size
        self.idle: list[_CallConnection] = []
        self.queue: collections.deque = collections.deque()
        self.connections = 0  # open or being opened
        self.opened = 0  # connections made, over the client's life
        self.latencies: list[float] = []  # of each call, from its first byte sent to the reply

    def request(self, request: bytes) -> defer.Deferred:
        done = defer.Deferred()
        self.queue.append((request, done))
        self._pump()
        return done

    def _pump(self) -> None:
        while self.queue and self.idle:
            conn = self.idle.pop()
            conn.send(*self.queue.popleft())
        while len(self.queue) > self.connections - len(self.idle) and \
                self.connections < self.size:
            self.connections += 1
            self.opened += 1
            self.reactor.connectTCP(self.address[0], self.address[1],
                                    _Factory(_CallConnection(self), self._failed))

    def _ready(self, conn) -> None:
        self.idle.append(conn)
        self._pump()

    def _finished(self, conn) -> None:
        if conn.reusable:
            self.idle.append(conn)
            self.reactor.callLater(0, self._pump)

    def _lost(self, conn) -> None:
        self.connections -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        self._pump()

    def _failed(self, reason) -> None:
        self.connections -= 1
        if self.queue:
            self.queue.popleft()[1].errback(reason)
        self._pump()


class _EventStream(Protocol):
    """A SUBSCRIBE stream: chunked HTTP/1.1 carrying RecordIO-framed JSON events."""

    def __init__(self, request: bytes, on_head, on_event, on_lost):
        self.request = request
        self.on_head, self.on_event, self.on_lost = on_head, on_event, on_lost
        self._head_done = False
        self._buf = bytearray()
        self._left = 0  # bytes of the current chunk still to read
        self._crlf = 0  # bytes of the CRLF after a chunk still to skip
        self._records = recordio.Decoder()

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        buf = self._buf
        buf += data
        if not self._head_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
            del buf[:end + 4]
            self._head_done = True
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (line.partition(":") for line in lines[1:])}
            self.on_head(int(lines[0].split(" ", 2)[1]), headers)
        out, pos, end = [], 0, len(buf)
        while True:
            if self._crlf:
                n = min(self._crlf, end - pos)
                pos += n
                self._crlf -= n
                if self._crlf:
                    break
            if not self._left:
                nl = buf.find(b"\r\n", pos)
                if nl < 0:
                    break
                size = int(bytes(buf[pos:nl]).split(b";")[0], 16)
                pos = nl + 2
                if size == 0:
                    self.transport.loseConnection()
                    break
                self._left = size
            n = min(self._left, end - pos)
            if not n:
                break
            out.append(bytes(buf[pos:pos + n]))
            pos += n
            self._left -= n
            if not self._left:
                self._crlf = 2
        del buf[:pos]
        if out:
            for record in self._records.feed(b"".join(out)):
                self.on_event(json.loads(record))

    def connectionLost(self, reason):
        self.on_lost(reason)


# --- a scheduler -------------------------------------------------------------------------


def percentile(values, q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Scheduler:
    """A v1 HTTP scheduler launching `tasks` small tasks and acknowledging every update."""

    def __init__(self, reactor, address, name: str, tasks: int, per_offer: int,
                 task_resources: str, stats: "Stats", refuse_seconds: float = 1.0,
                 max_calls: int = 64):
        self.reactor, self.address, self.name = reactor, address, name
        self.total, self.per_offer = tasks, per_offer
        res = Resources.parse(task_resources)
        self.task_json = res.to_json()
        self.task_scalars = {k: v for k, v in res.scalars().items() if v > 0}
        self.stats = stats
        self.refuse_seconds = refuse_seconds
        # Offer calls and acknowledgements on separate connections: acks must not delay
        # launches (a scheduler library would not queue them behind each other either).
        self.calls = CallClient(reactor, address, max_calls)
        self.acks = CallClient(reactor, address, max_calls)
        self.framework_id = None
        self.stream_id = None
        self.next_task = 0
        self.accepted_at: dict[str, float] = {}
        self.running: set[str] = set()
        self.suppressed = False
        self.subscribed = defer.Deferred()
        self.first_offers = defer.Deferred()
        self.connected = False
        self.subscribe_sent = 0.0
        self.errors: list[str] = []

    # -- the stream --

    def subscribe_call(self) -> dict:
        """The SUBSCRIBE call this scheduler sends."""
        return {"type": "SUBSCRIBE", "subscribe": {"framework_info": {
            "user": "root", "name": self.name, "failover_timeout": 3600}}}

    def subscribe(self) -> defer.Deferred:
        body = json.dumps(self.subscribe_call()).encode()
        request = (f"POST /api/v1/scheduler HTTP/1.1\r\nHost: {self.address[0]}:"
                   f"{self.address[1]}\r\nContent-Type: application/json\r\n"
                   f"Accept: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                   ).encode() + body
        stream = _EventStream(request, self._on_head, self._on_event, self._on_lost)
        self.subscribe_sent = time.monotonic()
        self.reactor.connectTCP(self.address[0], self.address[1],
                                _Factory(stream, self.subscribed.errback))
        return self.subscribed

    def _on_head(self, status: int, headers: dict) -> None:
        if status != 200:
            self.subscribed.errback(RuntimeError(f"SUBSCRIBE answered {status}"))
            return
        self.stream_id = headers.get("mesos-stream-id")
        self.connected = True

    def _on_lost(self, reason) -> None:
        self.connected = False

    def _on_event(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "OFFERS":
            self._offers(event["offers"]["offers"])
        elif kind == "UPDATE":
            self._update(event["update"]["status"])
        elif kind == "SUBSCRIBED":
            self.framework_id = event["subscribed"]["framework_id"]["value"]
            self.stats.subscribed.append(time.monotonic() - self.subscribe_sent)
            self.subscribed.callback(self)
        elif kind == "ERROR":
            self.errors.append(event.get("error", {}).get("message", ""))
            print(f"{self.name}: ERROR {self.errors[-1]}", file=sys.stderr)

    # -- calls --

    def call(self, body: dict, client: CallClient | None = None) -> defer.Deferred:
        data = json.dumps(body, separators=(",", ":")).encode()
        request = (f"POST /api/v1/scheduler HTTP/1.1\r\nHost: {self.address[0]}:"
                   f"{self.address[1]}\r\nContent-Type: application/json\r\n"
                   f"Mesos-Stream-Id: {self.stream_id}\r\nContent-Length: {len(data)}\r\n\r\n"
                   ).encode() + data
        d = (client or self.calls).request(request)
        d.addCallback(self._check, body["type"])
        return d

    def _check(self, result, kind: str):
        status, body = result
        if status != 202:
            message = f"{kind} answered {status}: {body[:200]!r}"
            self.errors.append(message)
            print(f"{self.name}: {message}", file=sys.stderr)
        return result

    def _offers(self, offers: list) -> None:
        now = time.monotonic()
        if not self.first_offers.called:
            self.stats.first_offers.append(now - self.subscribe_sent)
            self.first_offers.callback(now)
        self.stats.offers += len(offers)
        fid = {"value": self.framework_id}
        declined = []
        for offer in offers:
            have = {r["name"]: r["scalar"]["value"] for r in offer["resources"]
                    if r.get("type") == "SCALAR"}
            fits = min(int(have.get(k, 0.0) / v + 1e-6) for k, v in self.task_scalars.items())
            n = min(fits, self.per_offer, self.total - self.next_task)
            if n <= 0:
                declined.append(offer["id"])
                continue
            infos = []
            for _ in range(n):
                tid = f"{self.name}-{self.next_task}"
                self.next_task += 1
                self.accepted_at[tid] = now
                infos.append({"name": tid, "task_id": {"value": tid},
                              "agent_id": offer["agent_id"], "resources": self.task_json,
                              "command": {"value": "sleep 3600"}})
            self.stats.accepts += 1
            self.call({"type": "ACCEPT", "framework_id": fid, "accept": {
                "offer_ids": [offer["id"]],
                "operations": [{"type": "LAUNCH", "launch": {"task_infos": infos}}],
                "filters": {"refuse_seconds": self.refuse_seconds}}})
        if declined:
            self.call({"type": "DECLINE", "framework_id": fid, "decline": {
                "offer_ids": declined, "filters": {"refuse_seconds": 3600}}})
        if self.next_task >= self.total and not self.suppressed:
            self.suppressed = True
            self.call({"type": "SUPPRESS", "framework_id": fid})

    def _update(self, status: dict) -> None:
        now = time.monotonic()
        tid, state = status["task_id"]["value"], status["state"]
        stats = self.stats
        if state == "TASK_RUNNING":
            if tid not in self.running:
                self.running.add(tid)
                stats.running += 1
                stats.last_running = now
                accepted = self.accepted_at.pop(tid, None)
                if accepted is not None:
                    stats.launch_latency.append(now - accepted)
        elif state == "TASK_FINISHED":
            stats.finished += 1
        else:
            stats.other_states[state] = stats.other_states.get(state, 0) + 1
            if len(self.errors) < 5:
                self.errors.append(f"{tid} {state}: {status.get('message', '')}")
                print(f"{self.name}: {tid} {state}: {status.get('message', '')}",
                      file=sys.stderr)
        uuid = status.get("uuid")
        if uuid:
            stats.ack_pending[uuid] = now
            self.call({"type": "ACKNOWLEDGE", "framework_id": {"value": self.framework_id},
                       "acknowledge": {"agent_id": status["agent_id"],
                                       "task_id": status["task_id"], "uuid": uuid}},
                      self.acks).addCallback(stats.acked)


class Stats:
    """What the schedulers and the agents saw, shared by all of them."""

    def __init__(self):
        self.subscribed: list[float] = []
        self.first_offers: list[float] = []
        self.offers = 0
        self.accepts = 0
        self.running = 0
        self.finished = 0
        self.last_running = 0.0
        self.other_states: dict[str, int] = {}
        self.launch_latency: list[float] = []
        self.ack_calls = 0  # answered
        self.ack_pending: dict[str, float] = {}  # uuid -> when the UPDATE arrived
        self.ack_round_trip: list[float] = []  # UPDATE at the scheduler -> ack at the agent

    def acked(self, result):
        self.ack_calls += 1
        return result

    def agent_got_ack(self, uuid: str) -> None:
        sent = self.ack_pending.pop(uuid, None)
        if sent is not None:
            self.ack_round_trip.append(time.monotonic() - sent)


# --- the run -----------------------------------------------------------------------------


def wait_until(reactor, predicate, timeout: float, what: str, interval: float = 0.05):
    """A Deferred firing once `predicate()` is true; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout

    @defer.inlineCallbacks
    def poll():
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
            yield ttask.deferLater(reactor, interval, lambda: None)

    return poll()


# Frames every sample has (the reactor loop and its plumbing): left out of the summary.
_PLUMBING = re.compile(r"^(<module>|main|run_master|_serve|_run_code|_run_module_as_main|"
                       r"ReactorBase\.(run|mainLoop)|EPollReactor\.doPoll|callWithLogger|"
                       r"callWithContext|ThreadedContextTracker\.callWithContext|"
                       r"ContextTracker\.callWithContext|_PollLikeMixin\._doReadOrWrite) ")


def summarize_profile(path: str, top: int = 15) -> list[str]:
    """Top functions by own and by inclusive samples in a py-spy `--format raw` file."""
    own, incl, total = {}, {}, 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            total += n
            frames = [re.sub(r" \((.*?)/([^/]+/[^/]+\.py):(\d+)\)$", r" (\2:\3)", fr)
                      for fr in stack.split(";")]
            own[frames[-1]] = own.get(frames[-1], 0) + n
            for fr in set(frames):
                if not _PLUMBING.match(fr):
                    incl[fr] = incl.get(fr, 0) + n
    out = [f"  {total} samples; own time:"]
    for name, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"    {100 * n / max(total, 1):5.1f}%  {name}")
    out.append("  inclusive time:")
    for name, n in sorted(incl.items(), key=lambda kv: -kv[1])[:top * 2]:
        out.append(f"    {100 * n / max(total, 1):5.1f}%  {name}")
    return out


class Profiler:
    """py-spy sampling one process into `<prefix>-<phase>.txt` (raw collapsed stacks)."""

    def __init__(self, prefix: str | None, rate: int):
        self.prefix, self.rate = prefix, rate
        self.proc = None
        self.path = None

    @defer.inlineCallbacks
    def start(self, reactor, pid: int, phase: str):
        if not self.prefix:
            return
        self.path = f"{self.prefix}-{phase}.txt"
        self.proc = subprocess.Popen(
            [py_spy(), "record", "--pid", str(pid), "--format", "raw", "--rate",
             str(self.rate), "--nonblocking", "-o", self.path],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        yield ttask.deferLater(reactor, 0.5, lambda: None)  # let py-spy attach

    @defer.inlineCallbacks
    def stop(self, phase: str):
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        yield threads.deferToThread(proc.wait)
        if os.path.exists(self.path):
            print(f"py-spy profile, {phase} ({self.path}):", flush=True)
            for line in summarize_profile(self.path):
                print(line, flush=True)
        else:
            err = proc.stderr.read().decode(errors="replace").strip()
            print(f"py-spy wrote no profile for {phase}: {err[-300:]}", flush=True)


def state_latency(reactor, address, path: str, repeat: int):
    """(seconds of each GET, size of the last body in bytes)."""

    @defer.inlineCallbacks
    def run():
        times, size = [], 0
        for _ in range(repeat):
            t0 = time.monotonic()
            status, body = yield http_request(reactor, address, "GET", path)
            times.append(time.monotonic() - t0)
            if status != 200:
                raise RuntimeError(f"GET {path} answered {status}")
            size = len(body)
        return times, size

    return run()


def py_spy() -> str:
    """The py-spy next to this Python (a venv's bin), else the one on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), "py-spy")
    found = local if os.path.exists(local) else shutil.which("py-spy")
    if not found:
        raise RuntimeError("--profile needs py-spy: pip install py-spy")
    return found


def load_average() -> float:
    """The 1-minute load average: other work on the machine skews every figure but CPU times."""
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def ms(seconds: float) -> float:
    return round(1000 * seconds, 1)


class Bench:
    """One run: a master process, the emulated agents, the schedulers, and the figures."""

    def __init__(self, reactor, args, work_dir: str):
        self.reactor, self.args, self.work_dir = reactor, args, work_dir
        self.fig: dict = {"agents": args.agents, "tasks": args.tasks,
                          "frameworks": args.frameworks, "loadavg_before": load_average()}
        self.stats = Stats()
        self.profiler = Profiler(args.profile, args.profile_rate)
        self.masters: list[MasterProcess] = []
        self.pool: EmulatedAgents | None = None
        self.schedulers: list[Scheduler] = []
        self.address = None
        self._t0 = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self._t0:7.2f}s] {text}", flush=True)

    @property
    def master(self) -> MasterProcess:
        return self.masters[-1]

    @defer.inlineCallbacks
    def start_master(self, port: int = 0):
        args = self.args
        master = MasterProcess(self.work_dir, port, args=["--allocation-interval",
                                                          str(args.allocation_interval)],
                               log_level=args.master_log_level)
        self.masters.append(master)
        port = yield threads.deferToThread(master.wait_banner)
        self.address = ("127.0.0.1", port)
        return master

    @defer.inlineCallbacks
    def run(self):
        args, fig = self.args, self.fig
        raise_fd_limit(args.agents + 2 * args.max_calls * args.frameworks + FD_HEADROOM)
        master = yield self.start_master()
        fig["master_pid"] = master.pid
        self.say(f"master pid {master.pid} on port {self.address[1]}, open-files limit "
                 f"{master.fd_limit()}; log {master.log_path}")
        yield self.register()
        yield self.launch()
        if args.finish_after is not None:
            yield self.finish()
        yield self.state_endpoints()
        if args.failover:
            yield self.failover()
        fig["errors"] = sum(len(s.errors) for s in self.schedulers)
        fig["client_cpu_s"] = round(self_cpu(), 1)

    @defer.inlineCallbacks
    def stop(self):
        if self.pool is not None:
            yield self.pool.stop()
        for master in self.masters:
            master.stop()

    # --- phases ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def register(self):
        args, fig, master = self.args, self.fig, self.master
        self.pool = pool = EmulatedAgents(self.reactor, self.address, args.agents,
                                          args.agent_resources, args.finish_after)
        pool.on_ack = lambda msg: self.stats.agent_got_ack(msg.uuid)
        step = max(args.agents // 10, args.batch)

        def progress(done, total):
            if done % step == 0 or done == total:
                self.say(f"registered {done}/{total} agents")

        yield self.profiler.start(self.reactor, master.pid, "register")
        cpu0, mine0, t0 = master.cpu_seconds(), self_cpu(), time.monotonic()
        yield pool.start(batch=args.batch, progress=progress)
        fig["register_s"] = round(time.monotonic() - t0, 3)
        used = master.cpu_seconds() - cpu0
        fig["register_master_cpu_s"] = round(used, 2)
        fig["register_master_us_per_agent"] = round(1e6 * used / args.agents)
        fig["register_client_cpu_s"] = round(self_cpu() - mine0, 2)
        fig["master_rss_registered_mb"] = round(master.rss_mb())
        yield self.profiler.stop("registration")
        self.say(f"{args.agents} agents registered in {fig['register_s']}s (master CPU "
                 f"{used:.2f}s, RSS {fig['master_rss_registered_mb']} MB)")

    @defer.inlineCallbacks
    def launch(self):
        args, fig, master, stats = self.args, self.fig, self.master, self.stats
        shares = [args.tasks // args.frameworks + (i < args.tasks % args.frameworks)
                  for i in range(args.frameworks)]
        per_offer = args.per_offer or max(1, math.ceil(args.tasks / args.agents))
        self.schedulers = [Scheduler(self.reactor, self.address, f"bench{i}", n, per_offer,
                                     args.task, stats, max_calls=args.max_calls)
                           for i, n in enumerate(shares)]
        yield self.profiler.start(self.reactor, master.pid, "launch")
        cpu0, mine0, t0 = master.cpu_seconds(), self_cpu(), time.monotonic()
        yield defer.gatherResults([s.subscribe() for s in self.schedulers], consumeErrors=True)
        yield defer.gatherResults([s.first_offers for s in self.schedulers],
                                  consumeErrors=True)
        t_offers = time.monotonic()
        fig["subscribed_ms"] = ms(max(stats.subscribed))
        fig["first_offers_ms"] = ms(max(stats.first_offers))
        self.say(f"{args.frameworks} framework(s) subscribed; SUBSCRIBED after "
                 f"{fig['subscribed_ms']} ms, first OFFERS after {fig['first_offers_ms']} ms; "
                 f"launching {args.tasks} tasks, {per_offer} per offer")
        last = [time.monotonic(), master.cpu_seconds(), self_cpu()]

        def progress():
            now, cpu, mine = time.monotonic(), master.cpu_seconds(), self_cpu()
            self.say(f"running {stats.running}/{args.tasks}, acks {stats.ack_calls}; busy: "
                     f"master {(cpu - last[1]) / (now - last[0]):.0%}, this process "
                     f"{(mine - last[2]) / (now - last[0]):.0%}")
            last[:] = now, cpu, mine

        loop = ttask.LoopingCall(progress)
        loop.start(args.report_every, now=False)
        try:
            yield wait_until(self.reactor, lambda: stats.running >= args.tasks, args.timeout,
                             f"{args.tasks} tasks to be RUNNING", interval=0.01)
            yield wait_until(self.reactor, lambda: not stats.ack_pending, args.timeout,
                             "every RUNNING update to be acknowledged at its agent")
        finally:
            loop.stop()
        t_acked = time.monotonic()
        used = master.cpu_seconds() - cpu0
        yield self.profiler.stop("launch (SUBSCRIBE to the last ack)")
        clients = [c for s in self.schedulers for c in (s.calls, s.acks)]
        latencies = [x for c in clients for x in c.latencies]
        launch_s = max(stats.last_running - t_offers, 1e-9)
        fig.update(
            launch_s=round(launch_s, 3), tasks_per_s=round(args.tasks / launch_s),
            launch_p50_ms=ms(percentile(stats.launch_latency, 0.5)),
            launch_p99_ms=ms(percentile(stats.launch_latency, 0.99)),
            acked_s=round(t_acked - t_offers, 3),
            acked_tasks_per_s=round(args.tasks / (t_acked - t_offers)),
            ack_rtt_p50_ms=ms(percentile(stats.ack_round_trip, 0.5)),
            ack_rtt_p99_ms=ms(percentile(stats.ack_round_trip, 0.99)),
            call_p50_ms=ms(percentile(latencies, 0.5)),
            call_p99_ms=ms(percentile(latencies, 0.99)),
            calls_per_connection=round(len(latencies) / max(1, sum(c.opened for c in clients)),
                                       1),
            accepts=stats.accepts,
            launch_master_cpu_s=round(used, 2),
            master_us_per_task=round(1e6 * used / args.tasks),
            master_busy=round(used / max(t_acked - t0, 1e-9), 2),
            launch_client_cpu_s=round(self_cpu() - mine0, 2))
        if stats.other_states:
            fig["other_states"] = ",".join(f"{k}:{v}" for k, v in stats.other_states.items())
        self.say(f"{args.tasks} tasks RUNNING in {fig['launch_s']}s ({fig['tasks_per_s']}/s), "
                 f"every update acknowledged after {fig['acked_s']}s "
                 f"({fig['acked_tasks_per_s']} tasks/s); master CPU {used:.1f}s = "
                 f"{fig['master_us_per_task']} us/task; this process "
                 f"{fig['launch_client_cpu_s']}s")

    @defer.inlineCallbacks
    def state_endpoints(self):
        args, fig, master = self.args, self.fig, self.master
        fig["master_rss_mb"] = round(master.rss_mb())
        yield self.profiler.start(self.reactor, master.pid, "state")
        for path, key in (("/metrics/snapshot", "metrics"), ("/master/state-summary", "summary"),
                          ("/master/state", "state")):
            times, size = yield state_latency(self.reactor, self.address, path,
                                              args.state_repeat)
            fig[f"{key}_ms"] = round(1000 * statistics.median(times))
            fig[f"{key}_mb"] = round(size / 1e6, 2)
            self.say(f"GET {path}: {', '.join(f'{1000 * t:.0f}' for t in times)} ms, "
                     f"{size / 1e6:.2f} MB")
        yield self.profiler.stop("GET /metrics/snapshot, /master/state-summary, /master/state")

    @defer.inlineCallbacks
    def finish(self):
        """Wait for the TASK_FINISHED wave; the master's CPU per finish is counted from now
        on (updates that came during the launch are not in it)."""
        args, stats, master = self.args, self.stats, self.master
        cpu0, t0, before = master.cpu_seconds(), time.monotonic(), stats.finished
        yield wait_until(self.reactor,
                         lambda: stats.finished >= args.tasks and not stats.ack_pending,
                         args.timeout + args.finish_after,
                         "every task to finish and be acknowledged")
        counted = stats.finished - before
        if counted:
            self.fig["finish_master_us_per_task"] = round(
                1e6 * (master.cpu_seconds() - cpu0) / counted)
        self.say(f"{args.tasks} tasks FINISHED and acknowledged "
                 f"{time.monotonic() - t0:.1f}s after the launch ({counted} in that time)")

    @defer.inlineCallbacks
    def failover(self):
        args, fig, pool = self.args, self.fig, self.pool
        old_id = pool.agents[0].master_id
        held = pool.tasks()
        self.master.kill()
        self.say(f"master killed; {args.agents} agents hold {held} tasks")
        master = yield self.start_master(self.address[1])
        t0, cpu0 = time.monotonic(), master.cpu_seconds()
        yield self.profiler.start(self.reactor, master.pid, "failover")

        def moved():
            counts = [n for mid, n in pool.masters().items() if mid != old_id]
            return counts and max(counts) >= args.agents

        yield wait_until(self.reactor, moved, args.timeout, "every agent to re-register")
        used = master.cpu_seconds() - cpu0
        fig.update(failover_reregister_s=round(time.monotonic() - t0, 3),
                   failover_master_cpu_s=round(used, 2), failover_tasks=held)
        yield self.profiler.stop("re-registration after failover")
        self.say(f"all {args.agents} agents re-registered {fig['failover_reregister_s']}s "
                 f"after the new master started (its CPU {used:.2f}s)")
        status, body = yield http_request(self.reactor, self.address, "GET",
                                          "/master/state-summary")
        fig["failover_active_agents"] = json.loads(body)["activated_slaves"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--tasks", type=int, default=10000)
    p.add_argument("--frameworks", type=int, default=1)
    p.add_argument("--task", default="cpus:0.01;mem:1", help="resources of one task")
    p.add_argument("--per-offer", type=int, default=0,
                   help="most tasks launched on one offer (default: tasks / agents)")
    p.add_argument("--agent-resources", default=DEFAULT_RESOURCES)
    p.add_argument("--allocation-interval", type=float, default=1.0, metavar="SECS")
    p.add_argument("--finish-after", type=float, default=None, metavar="SECS",
                   help="agents report TASK_FINISHED this long after RUNNING (default never); "
                        "longer than the launch phase, or the wave's cost lands in its figure")
    p.add_argument("--failover", action="store_true",
                   help="at the end, kill the master and time the agents' re-registration "
                        "(without --finish-after, so that the agents hold their tasks)")
    p.add_argument("--batch", type=int, default=500, help="agents connecting at once")
    p.add_argument("--max-calls", type=int, default=64,
                   help="connections per scheduler for offer calls, and as many for acks")
    p.add_argument("--report-every", type=float, default=5.0, metavar="SECS")
    p.add_argument("--state-repeat", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECS",
                   help="give up on a phase after this long")
    p.add_argument("--master-log-level", default="info")
    p.add_argument("--profile", default=None, metavar="PREFIX",
                   help="py-spy the master in each phase into PREFIX-<phase>.txt")
    p.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    args = p.parse_args(argv)
    from twisted.internet import reactor

    bench = Bench(reactor, args, tempfile.mkdtemp(prefix="agora-bench-"))
    status = run_bench(reactor, bench)
    fig = bench.fig
    fig.update(loadavg_after=load_average(), cpus=os.cpu_count(),
               python=sys.version.split()[0])
    print(" ".join(f"{k}={v}" for k, v in fig.items()), flush=True)
    return status


def quiet_process() -> None:
    """For a process playing thousands of agents: log only warnings (to stderr), and give
    its collector the master's thresholds (master/service.py), so that it is not the
    bottleneck it would be with a full collection every time its heap grows by a quarter."""
    import gc

    from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                                globalLogBeginner, textFileLogObserver)

    from master.service import GC_THRESHOLDS

    gc.set_threshold(*GC_THRESHOLDS)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(
        textFileLogObserver(sys.stderr),
        [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)])], redirectStandardIO=False)


def run_bench(reactor, bench) -> int:
    """Run `bench.run()` under the reactor (in a `quiet_process`), then `bench.stop()`; 0 on
    success, else 1."""
    quiet_process()
    outcome = []

    def failed(f):
        print(f"benchmark failed: {f.getTraceback()}", file=sys.stderr)
        outcome.append(1)

    def go():
        d = bench.run()
        d.addCallbacks(lambda _: outcome.append(0), failed)
        d.addBoth(lambda _: bench.stop())
        d.addErrback(failed)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    return outcome[0] if outcome else 1


if __name__ == "__main__":
    sys.exit(main())
