"""A real Agent in a reactor thread, next to a fake master that records what it is sent.

Tests run in the main thread and poll with deadlines (`wait_for`); everything Twisted runs in
a private epoll reactor in a background thread (the global reactor stays untouched), reached
through `AgentCluster.call`. The fake master is built on `agora.link.Link`, like the real one,
and speaks the real protocol on a real socket; the agent starts real executor processes.

Use it from a test module with

    from agent_harness import agent_reactor, cluster, make_cluster  # noqa: F401  (fixtures)

`cluster` is one registered agent with defaults; `make_cluster(master_options, **agent_options)`
builds more (each with its own work dir); all are stopped at the end of the test, which
kills every process they started.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import sys
import threading

import pytest
from twisted.internet.protocol import Factory
from twisted.internet.threads import blockingCallFromThread

from agora import protocol
from agora.link import Link

from agent.agent import Agent
from agent.containerizer.launcher import session_members
from agent.sandbox import sandbox_path
from tests.cluster import wait_for as poll_until

DEADLINE = 10.0


def wait_for(predicate, timeout: float = DEADLINE, interval: float = 0.02,
             what: str = "condition"):
    """Poll `predicate` until it returns something truthy, and return that."""
    return poll_until(predicate, timeout, interval, what)


def process_alive(pid: int) -> bool:
    """True while `pid` runs (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")


class FakeMaster:
    """Admits agents, records every message, and sends what a test tells it to.

    Runs in the reactor thread; the test thread reads `messages` (appends are atomic) and
    calls `send`/`drop` through `AgentCluster.call`.
    """

    def __init__(self, reactor, *, secret: bytes | None = None, auto_ack: bool = True,
                 agent_id: str = "fake-S0", ping_interval: float = 0.0, refuse: str | None = None,
                 ignore: int = 0):
        """`ignore`: leave that many registrations unanswered (as a follower does)."""
        self.reactor = reactor
        self.secret = secret
        self.auto_ack = auto_ack
        self.agent_id = agent_id
        self.ping_interval = ping_interval
        self.refuse = refuse
        self.ignore = ignore
        self.messages: list = []
        self.links: list[Link] = []
        self.link: Link | None = None
        self.connections = 0
        self.port = None

    def start(self) -> int:
        factory = Factory()
        factory.buildProtocol = lambda addr: self._link()
        self.port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        return self.port.getHost().port

    def stop(self):
        for link in self.links:
            if link.connected:
                link.transport.abortConnection()
        return self.port.stopListening()

    def _link(self) -> Link:
        link = Link(self.reactor, send_prefix=False)
        link.nonce = os.urandom(16)
        link.on_message = lambda msg: self._received(link, msg)
        link.on_lost = lambda reason: None
        original = link.connectionMade

        def made():
            original()
            self.connections += 1
            link.send(protocol.Challenge(nonce=link.nonce, master_id="fake-master"))

        link.connectionMade = made
        self.links.append(link)
        self.link = link
        return link

    def _received(self, link: Link, msg) -> None:
        self.messages.append(msg)
        kind = type(msg)
        if kind in (protocol.RegisterAgent, protocol.ReregisterAgent):
            if self.ignore > 0:
                self.ignore -= 1
            elif self.refuse is not None:
                link.send(protocol.AgentRefused(message=self.refuse))
            elif not protocol.check_proof(self.secret, link.nonce, msg.proof):
                link.send(protocol.AgentRefused(message="Authentication failed"))
            else:
                agent_id = msg.agent_id if kind is protocol.ReregisterAgent else self.agent_id
                link.send(protocol.AgentRegistered(agent_id=agent_id, master_id="fake-master",
                                                   ping_interval=self.ping_interval))
        elif kind is protocol.StatusUpdate and self.auto_ack:
            self.ack(msg)

    def ack(self, update: protocol.StatusUpdate) -> None:
        self.send(protocol.StatusUpdateAck(framework_id=update.framework_id,
                                           task_id=update.status["task_id"]["value"],
                                           uuid=update.status["uuid"]))

    def send(self, msg) -> None:
        self.link.send(msg)

    def drop(self) -> None:
        self.link.transport.loseConnection()

    # --- reading what was recorded (any thread) --------------------------------------------

    def of(self, kind) -> list:
        return [m for m in list(self.messages) if type(m) is kind]

    def updates(self, task_id: str | None = None) -> list[dict]:
        """TaskStatus dicts the agent sent, in order (re-sends included)."""
        return [m.status for m in self.of(protocol.StatusUpdate)
                if task_id is None or m.status["task_id"]["value"] == task_id]

    def states(self, task_id: str) -> list[str]:
        """The task's states as reported, re-sends collapsed."""
        seen, out = set(), []
        for status in self.updates(task_id):
            if status["uuid"] not in seen:
                seen.add(status["uuid"])
                out.append(status["state"])
        return out


class AgentCluster:
    """One Agent against one FakeMaster, with helpers to launch tasks and look around."""

    def __init__(self, reactor, work_dir: str, master_options: dict | None = None,
                 **agent_options):
        self.reactor = reactor
        self.work_dir = work_dir
        self.master = FakeMaster(reactor, **(master_options or {}))
        master_port = self.call(self.master.start)
        options = dict(resources="cpus:4;mem:4096;disk:10000", status_update_retry=10.0,
                       executor_registration_timeout=10.0, executor_shutdown_grace=2.0)
        options.update(agent_options)
        self.agent = Agent(reactor, master=("127.0.0.1", master_port), work_dir=work_dir,
                           port=0, **options)
        self.call(self.agent.start)
        self.stopped = False

    def call(self, fn, *args, **kwargs):
        """Run `fn` in the reactor thread and return its (Deferred's) result."""
        return blockingCallFromThread(self.reactor, fn, *args, **kwargs)

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.call(self.agent.stop)
            self.call(self.master.stop)

    # --- driving ---------------------------------------------------------------------

    def wait_registered(self) -> str:
        return wait_for(lambda: self.agent.registered and self.agent.agent_id,
                        what="the agent to register")

    @staticmethod
    def framework(framework_id: str = "fw-1", **extra) -> dict:
        return {"id": {"value": framework_id}, "name": "test", "user": "root", **extra}

    def send(self, msg) -> None:
        self.call(self.master.send, msg)

    def run_task(self, task_id: str, command: str | dict | None,
                 framework: dict | None = None, **extra) -> dict:
        """Send RunTask: a command task (shell string or CommandInfo), or pass `executor=`."""
        self.wait_registered()
        task = {"name": task_id, "task_id": {"value": task_id},
                "agent_id": {"value": self.agent.agent_id},
                "resources": [{"name": "cpus", "type": "SCALAR", "scalar": {"value": 0.1}}],
                **extra}
        if command is not None:
            task["command"] = {"value": command} if isinstance(command, str) else command
        self.send(protocol.RunTask(framework=framework or self.framework(), task=task))
        return task

    def wait_state(self, task_id: str, state: str, timeout: float = DEADLINE) -> dict:
        """The first status with `state` the master got for the task."""
        def found():
            for status in self.master.updates(task_id):
                if status["state"] == state:
                    return status
            return None
        return wait_for(found, timeout, what=f"{task_id} to reach {state} "
                                             f"(seen {self.master.states(task_id)})")

    def sandbox(self, executor_id: str, framework_id: str = "fw-1") -> str:
        return sandbox_path(self.work_dir, self.agent.agent_id, framework_id, executor_id)

    def read_sandbox(self, executor_id: str, name: str = "stdout",
                     framework_id: str = "fw-1") -> str:
        path = os.path.join(self.sandbox(executor_id, framework_id), name)
        try:
            with open(path) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def executor(self, executor_id: str, framework_id: str = "fw-1"):
        """The agent's record of an executor (read in the reactor thread)."""
        def find():
            fw = self.agent.frameworks.get(framework_id)
            return fw.executors.get(executor_id) if fw else None
        return self.call(find)

    def executor_pid(self, executor_id: str, framework_id: str = "fw-1") -> int:
        def pid():
            executor = self.executor(executor_id, framework_id)
            return executor is not None and executor.container is not None and \
                executor.container.pid
        return wait_for(pid, what=f"executor {executor_id} to start")

    # --- HTTP ------------------------------------------------------------------------

    def http(self, method: str, path: str, body=None, headers=None):
        """(status, headers, body bytes) of one request to the agent."""
        conn = http.client.HTTPConnection("127.0.0.1", self.agent.port, timeout=DEADLINE)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            conn.request(method, path, body=data,
                         headers={"Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def get_json(self, path: str):
        status, _, body = self.http("GET", path)
        assert status == 200, (path, status, body)
        return json.loads(body)


def no_session_left(sid: int) -> bool:
    """True when no live process of session `sid` remains."""
    return not session_members(sid)


@pytest.fixture(scope="session")
def agent_reactor():
    """A private epoll reactor in a background thread, shared by the agent tests."""
    from twisted.internet.epollreactor import EPollReactor

    reactor = EPollReactor()
    thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                              daemon=True, name="agent-reactor")
    thread.start()
    wait_for(lambda: reactor.running, what="the reactor to run")
    yield reactor
    reactor.callFromThread(reactor.stop)
    thread.join(DEADLINE)


@pytest.fixture
def make_cluster(agent_reactor, tmp_path):
    """Build AgentClusters with options; all are stopped (no process left) at the end."""
    clusters = []

    def make(master_options: dict | None = None, **agent_options) -> AgentCluster:
        work_dir = str(tmp_path / f"work{len(clusters)}")
        cluster = AgentCluster(agent_reactor, work_dir, master_options, **agent_options)
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.stop()


@pytest.fixture
def cluster(make_cluster):
    """One registered agent with default options against a fake master that acks at once."""
    c = make_cluster()
    c.wait_registered()
    return c


PYTHON = sys.executable  # the interpreter for executors written in Python


class FileServer:
    """A real HTTP server on 127.0.0.1 serving `directory`, for URIs to fetch.

    A request under `/gated/` waits until `gate` is set (or 10 s), so a test can hold a
    fetch in progress; `hits` counts requests per path.
    """

    def __init__(self, directory):
        self.gate = threading.Event()
        self.hits: dict[str, int] = {}
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(directory), **kwargs)

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                server.hits[path] = server.hits.get(path, 0) + 1
                if path.startswith("/gated/"):
                    server.gate.wait(10)
                    self.path = path[len("/gated"):]
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                       name="file-server")
        self.thread.start()

    def stop(self) -> None:
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def file_server(tmp_path):
    """A FileServer over `tmp_path / "www"` (created empty)."""
    root = tmp_path / "www"
    root.mkdir()
    server = FileServer(root)
    server.root = root
    yield server
    server.stop()


def make_tarball(path, files: dict[str, str], modes: dict[str, int] | None = None) -> str:
    """Write a .tar.gz at `path` holding `files` (name -> text); returns the path."""
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = (modes or {}).get(name, 0o644)
            tar.addfile(info, io.BytesIO(data))
    return str(path)
