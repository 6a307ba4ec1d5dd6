"""Real ZooKeeper for tests: servers run as plain `java … QuorumPeerMain cfg` processes.

Debian's ZooKeeper 3.8 (`/usr/share/java/zookeeper.jar`) on 127.0.0.1 with free ports, as
specs/zookeeper-spark.md §1 describes. A server is ready when `srvr` shows `Mode:` (`ruok`
says `imok` before it serves). `tickTime=500` lets sessions be as short as 1 s, so expiry
tests take seconds. Servers are stopped by PID; their data lives under pytest's tmp dirs.

Use from a test module with

    from tests.zookeeper import zk_server, zk_ensemble, ensemble  # noqa: F401  (fixtures)

`zk_server` is one standalone server per module; `zk_ensemble` a 3-node ensemble per module
and `ensemble` the same one with every node running and in quorum before each test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess

import pytest

from tests.cluster import wait_for

ZOOKEEPER_JAR = "/usr/share/java/zookeeper.jar"
SLF4J_JAR = "/usr/share/java/slf4j-simple.jar"  # without a binding the server logs nothing
TICK_MS = 500


def java() -> str | None:
    return shutil.which("java")


def available() -> bool:
    return os.path.exists(ZOOKEEPER_JAR) and java() is not None


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (held open together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def four_letter(port: int, word: str, timeout: float = 1.0) -> str:
    """Send a four-letter command and read the answer to EOF ('' if the server is down)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(word.encode())
            chunks = []
            while True:
                data = s.recv(4096)
                if not data:
                    break
                chunks.append(data)
            return b"".join(chunks).decode(errors="replace")
    except OSError:
        return ""


class ZooKeeperServer:
    """One ZooKeeper server process; `peers` (myid -> (quorum, election) ports) makes it an
    ensemble member."""

    def __init__(self, base_dir: str, client_port: int, myid: int = 1,
                 peers: dict[int, tuple[int, int]] | None = None):
        self.dir = base_dir
        self.port = client_port
        self.myid = myid
        self.address = f"127.0.0.1:{client_port}"
        self.proc: subprocess.Popen | None = None
        data = os.path.join(base_dir, "data")
        os.makedirs(data, exist_ok=True)
        lines = [f"tickTime={TICK_MS}", "initLimit=10", "syncLimit=5", f"dataDir={data}",
                 f"clientPort={client_port}", "clientPortAddress=127.0.0.1",
                 "admin.enableServer=false", "4lw.commands.whitelist=ruok,srvr,stat,mntr,cons",
                 "maxClientCnxns=0"]
        for sid, (quorum, election) in sorted((peers or {}).items()):
            lines.append(f"server.{sid}=127.0.0.1:{quorum}:{election}")
        if peers:
            with open(os.path.join(data, "myid"), "w") as f:
                f.write(f"{myid}\n")
        self.config = os.path.join(base_dir, "zoo.cfg")
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.log_path = os.path.join(base_dir, "server.log")

    def start(self) -> None:
        """Start the JVM (returns at once; see `wait_serving`)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [java(), "-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
                 "-Dzookeeper.forceSync=no", "-cp", f"{ZOOKEEPER_JAR}:{SLF4J_JAR}",
                 "org.apache.zookeeper.server.quorum.QuorumPeerMain", self.config],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def mode(self) -> str | None:
        """'standalone', 'leader' or 'follower' while serving, else None."""
        for line in four_letter(self.port, "srvr").splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return None

    def wait_serving(self, timeout: float = 20.0) -> str:
        def serving():
            if not self.running:
                raise AssertionError(f"ZooKeeper {self.address} exited:\n{self.tail()}")
            return self.mode()
        return wait_for(serving, timeout, 0.05, f"ZooKeeper {self.address} to serve")

    def stop(self, sig=signal.SIGKILL) -> None:
        """Stop the server by its PID (SIGKILL by default: immediate, and the data survives)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(f.readlines()[-n:]).decode(errors="replace")
        except OSError:
            return ""


class Ensemble:
    """A 3-node (by default) ensemble on loopback; nodes are indexed from 0."""

    def __init__(self, base_dir: str, size: int = 3):
        ports = free_ports(3 * size)
        peers = {i + 1: (ports[size + i], ports[2 * size + i]) for i in range(size)}
        self.servers = [ZooKeeperServer(os.path.join(base_dir, f"zk{i + 1}"), ports[i], i + 1,
                                        peers) for i in range(size)]
        self.hosts = ",".join(s.address for s in self.servers)

    def url(self, path: str) -> str:
        return f"zk://{self.hosts}{path}"

    def start(self) -> None:
        for s in self.servers:
            if not s.running:
                s.start()

    def wait_quorum(self, timeout: float = 30.0) -> None:
        """Until every running node serves (one leader, the rest followers)."""
        for s in self.servers:
            if s.running:
                s.wait_serving(timeout)

    def stop_node(self, i: int) -> None:
        self.servers[i].stop()

    def start_node(self, i: int) -> None:
        self.servers[i].start()

    def stop(self) -> None:
        for s in self.servers:
            s.stop()


def connected_server(ens: Ensemble, session_id: int) -> ZooKeeperServer | None:
    """The ensemble member serving session `session_id` (from the `cons` four-letter word)."""
    marker = f"sid=0x{session_id:x}"
    for s in ens.servers:
        if s.running and marker in four_letter(s.port, "cons"):
            return s
    return None


def kazoo_client(hosts: str):
    """A started plain kazoo client (the caller stops and closes it)."""
    from kazoo.client import KazooClient

    client = KazooClient(hosts=hosts)
    client.start(10)
    return client


def start_standalone(base_dir: str) -> ZooKeeperServer:
    server = ZooKeeperServer(base_dir, free_ports(1)[0])
    server.start()
    try:
        server.wait_serving()
    except BaseException:
        server.stop()
        raise
    return server


def _require_zookeeper() -> None:
    if not available():
        pytest.skip(f"ZooKeeper is not installed ({ZOOKEEPER_JAR} or java missing; "
                    "apt-get install zookeeper)")


@pytest.fixture(scope="module")
def zk_server(tmp_path_factory):
    """One standalone ZooKeeper server for the module (tests use their own znode paths)."""
    _require_zookeeper()
    server = start_standalone(str(tmp_path_factory.mktemp("zk")))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def zk_ensemble(tmp_path_factory):
    """A 3-node ZooKeeper ensemble on loopback for the module."""
    _require_zookeeper()
    ens = Ensemble(str(tmp_path_factory.mktemp("zk-ensemble")))
    ens.start()
    try:
        ens.wait_quorum()
    except BaseException:
        ens.stop()
        raise
    yield ens
    ens.stop()


@pytest.fixture
def ensemble(zk_ensemble):
    """The module's ensemble with all three nodes running and serving (tests may stop some)."""
    zk_ensemble.start()
    zk_ensemble.wait_quorum()
    return zk_ensemble
