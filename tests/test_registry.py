"""master.registrar: the same interface tests against every registry backend.

MemoryRegistry is the fake the master's unit tests use; it must pass what SQLiteRegistry and
ZooKeeperRegistry (on a real ZooKeeper server) pass. Twisted runs in a private reactor thread
(as in tests/test_zookeeper.py); the tests reach it with `blockingCallFromThread`.
"""

import json
import sqlite3
import threading
import uuid

import pytest
from twisted.internet import defer
from twisted.internet.threads import blockingCallFromThread

from agora import zookeeper as zk
from master.registrar import (MemoryRegistry, Registrar, SQLiteRegistry, ZooKeeperRegistry,
                              _MULTI_OPS)
from tests.cluster import wait_for
from tests.zookeeper import kazoo_client
from tests.zookeeper import zk_server  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def reactor():
    """A private epoll reactor in a background thread."""
    from twisted.internet.epollreactor import EPollReactor

    r = EPollReactor()
    thread = threading.Thread(target=r.run, kwargs={"installSignalHandlers": False},
                              daemon=True, name="registry-reactor")
    thread.start()
    wait_for(lambda: r.running, what="the reactor to run")
    yield r
    r.callFromThread(r.stop)
    thread.join(10)


class Backend:
    """Opens a backend of one kind; `reopen()` gives a new one over the same storage."""

    def __init__(self, kind, reactor, tmp_path, request):
        self.kind, self.reactor = kind, reactor
        self.opened = []
        if kind == "memory":
            self.shared = MemoryRegistry()
        elif kind == "sqlite":
            self.file = str(tmp_path / "registry.sqlite")
        else:
            server = request.getfixturevalue("zk_server")
            self.hosts = server.address
            self.path = f"/agora-{uuid.uuid4().hex[:8]}_registry"

    def reopen(self):
        if self.kind == "memory":
            registry = self.shared  # the fake "storage" is the object itself
        elif self.kind == "sqlite":
            registry = SQLiteRegistry(self.file)
        else:
            registry = ZooKeeperRegistry(
                lambda: zk.Session(self.reactor, self.hosts, timeout=4.0), self.path)
        self.call(registry.start)
        self.opened.append(registry)
        return registry

    def call(self, fn, *args):
        return blockingCallFromThread(self.reactor, lambda: defer.maybeDeferred(fn, *args))

    def close(self):
        for registry in self.opened:
            if registry is not self.opened[0] or self.kind != "memory":
                self.call(registry.close)


@pytest.fixture(params=["memory", "sqlite", "zookeeper"])
def backend(request, reactor, tmp_path):
    b = Backend(request.param, reactor, tmp_path, request)
    yield b
    b.close()


def write(backend, registrar, *calls):
    """Make the calls (name, args...) in one reactor turn; wait until all are durable."""
    def go():
        return defer.gatherResults([getattr(registrar, name)(*args) for name, *args in calls],
                                   consumeErrors=True)
    return blockingCallFromThread(backend.reactor, go)


AGENT = {"hostname": "h1", "port": 5051, "resources": []}
FW = {"user": "u", "name": "f", "failover_timeout": 60.0, "id": {"value": "fw-1"}}


def test_a_new_registry_is_empty(backend):
    """A registry that was never written loads no agents, frameworks or weights."""
    records = backend.call(backend.reopen().load)
    assert records == {"agents": {}, "frameworks": {}, "weights": {}}


def test_writes_survive_a_reopen(backend):
    """Agents in each state, frameworks with their info and registered time, and weights
    (roles with '/' too) are all there when the registry is opened again."""
    registrar = Registrar(backend.reactor, backend.reopen())
    write(backend, registrar, ("admit", "a1", AGENT), ("mark", "a2", "unreachable", AGENT),
          ("mark", "a3", "gone", AGENT), ("put_framework", "fw-1", FW, 12.5),
          ("set_weight", "eng/web", 2.0), ("set_weight", "*", 0.5))
    records = backend.call(backend.reopen().load)
    assert records["agents"] == {"a1": ("admitted", AGENT), "a2": ("unreachable", AGENT),
                                 "a3": ("gone", AGENT)}
    assert records["frameworks"] == {"fw-1": {"info": FW, "registered_time": 12.5}}
    assert records["weights"] == {"eng/web": 2.0, "*": 0.5}


def test_overwrites_and_removals(backend):
    """A record written again is replaced; a removed one is gone; removing what is not
    there is harmless; a put and a removal of the same key in one batch leave no record."""
    registrar = Registrar(backend.reactor, backend.reopen())
    write(backend, registrar, ("admit", "a1", AGENT), ("put_framework", "fw-1", FW, 1.0))
    write(backend, registrar, ("mark", "a1", "gone", AGENT), ("remove_framework", "fw-1"),
          ("remove_framework", "never"), ("admit", "a2", AGENT), ("remove", "a2"))
    assert registrar.agents() == {"a1": ("gone", AGENT)}
    assert registrar.frameworks() == {}
    records = backend.call(backend.reopen().load)
    assert records["agents"] == {"a1": ("gone", AGENT)} and records["frameworks"] == {}


def test_a_turns_writes_are_one_apply_and_each_fires_once_durable(backend):
    """Writes made in one reactor turn reach the backend as one batch; each write's Deferred
    fires only after the batch is durable (a fresh reader sees it then)."""
    registry = backend.reopen()
    registrar = Registrar(backend.reactor, registry)
    batches = []
    apply = registry.apply
    registry.apply = lambda ops: (batches.append(len(ops)), apply(ops))[1]
    seen = []

    def go():
        ds = [registrar.admit(f"a{i}", AGENT) for i in range(50)]
        ds[0].addCallback(lambda _: seen.append(set(registrar.agents())))
        return defer.gatherResults(ds)

    blockingCallFromThread(backend.reactor, go)
    assert batches == [50]
    assert seen == [{f"a{i}" for i in range(50)}]
    assert len(backend.call(backend.reopen().load)["agents"]) == 50


def test_a_batch_bigger_than_one_transaction(backend):
    """More records than fit one ZooKeeper multi are all written."""
    registrar = Registrar(backend.reactor, backend.reopen())
    n = _MULTI_OPS + 200
    write(backend, registrar, *[("admit", f"a{i}", AGENT) for i in range(n)])
    assert len(backend.call(backend.reopen().load)["agents"]) == n


def test_zookeeper_layout_and_durability_before_acknowledgement(reactor, zk_server):
    """Records are znodes `<path>/<kind>/<quoted key>` holding JSON, on the server when the
    write's Deferred fires; the election path gets nothing."""
    path = f"/agora-{uuid.uuid4().hex[:8]}"
    registry = ZooKeeperRegistry(lambda: zk.Session(reactor, zk_server.address, timeout=4.0),
                                 path + "_registry")
    blockingCallFromThread(reactor, registry.start)
    registrar = Registrar(reactor, registry)
    client = kazoo_client(zk_server.address)
    try:
        found = []

        def go():
            d = registrar.set_weight("eng/web", 3.0)
            d.addCallback(lambda _: found.append(
                client.exists(path + "_registry/weights/eng%2Fweb") is not None))
            return d

        blockingCallFromThread(reactor, go)
        assert found == [True]
        data, _ = client.get(path + "_registry/weights/eng%2Fweb")
        assert json.loads(data) == 3.0
        assert client.exists(path) is None
    finally:
        client.stop()
        client.close()
        blockingCallFromThread(reactor, lambda: defer.maybeDeferred(registry.close))


def test_zookeeper_registry_replaces_an_expired_session(reactor, zk_server):
    """A session ZooKeeper lost is replaced at the next load (a follower may outlive it)."""
    registry = ZooKeeperRegistry(lambda: zk.Session(reactor, zk_server.address, timeout=4.0),
                                 f"/agora-{uuid.uuid4().hex[:8]}_registry")
    blockingCallFromThread(reactor, registry.start)
    first = registry.session
    first.state = zk.LOST  # as after an expiry (its client is closed below)
    blockingCallFromThread(reactor, first.stop)
    first.state = zk.LOST
    records = blockingCallFromThread(reactor, registry.load)
    assert registry.session is not first and records["agents"] == {}
    blockingCallFromThread(reactor, lambda: defer.maybeDeferred(registry.close))


def test_sqlite_registry_takes_over_the_old_agents_table(tmp_path):
    """A registry file from before frameworks were kept still has its agents."""
    path = str(tmp_path / "registry.sqlite")
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE agents (id TEXT PRIMARY KEY, state TEXT, info TEXT)")
    db.execute("INSERT INTO agents VALUES ('a1', 'gone', ?)", (json.dumps(AGENT),))
    db.commit()
    db.close()
    registry = SQLiteRegistry(path)
    assert registry.agents == {"a1": ("gone", AGENT)}
    registry.close()
    assert SQLiteRegistry(path).agents == {"a1": ("gone", AGENT)}


def zk_registry(reactor, hosts: str, path: str) -> ZooKeeperRegistry:
    registry = ZooKeeperRegistry(lambda: zk.Session(reactor, hosts, timeout=4.0), path)
    blockingCallFromThread(reactor, registry.start)
    return registry


def close(reactor, *registries):
    for registry in registries:
        blockingCallFromThread(reactor, lambda r=registry: defer.maybeDeferred(r.close))


def test_a_standby_mirrors_the_registry_and_its_load_reads_only_what_changed(reactor,
                                                                             zk_server):
    """A started ZooKeeper registry follows the leader's writes; load() after a change reads
    that change, not every record again."""
    path = f"/agora-{uuid.uuid4().hex[:8]}_registry"
    leader = zk_registry(reactor, zk_server.address, path)
    blockingCallFromThread(reactor, leader.load)  # the leader writes from here on
    registrar = Registrar(reactor, leader)
    standby = zk_registry(reactor, zk_server.address, path)
    try:
        def write(*calls):
            blockingCallFromThread(reactor, lambda: defer.gatherResults(
                [getattr(registrar, name)(*args) for name, *args in calls]))

        write(*[("admit", f"a{i}", AGENT) for i in range(50)], ("set_weight", "web", 2.0))
        wait_for(lambda: len(standby.mirror.records["agents"]) == 50, what="the mirror")
        assert standby.mirror.records["weights"] == {"web": 2.0}
        reads = standby.mirror.reads
        write(("mark", "a7", "gone", AGENT), ("remove", "a8"),
              ("put_framework", "fw-1", FW, 12.5))
        records = blockingCallFromThread(reactor, standby.load)
        assert records["agents"]["a7"] == ("gone", AGENT)
        assert "a8" not in records["agents"] and len(records["agents"]) == 49
        assert records["frameworks"] == {"fw-1": {"info": FW, "registered_time": 12.5}}
        assert standby.mirror.reads - reads <= 3  # a7 and fw-1 (and a8, if still listed)
        assert standby.mirror.stopped  # the new leader is the only writer now
    finally:
        close(reactor, standby, leader)


def test_a_standby_elected_right_after_a_write_sees_it(reactor, zk_server):
    """load() waits for the watch events of writes committed before it was called: an agent
    marked gone a moment before the standby took over is gone for the new leader."""
    path = f"/agora-{uuid.uuid4().hex[:8]}_registry"
    leader = zk_registry(reactor, zk_server.address, path)
    blockingCallFromThread(reactor, leader.load)
    registrar = Registrar(reactor, leader)
    try:
        blockingCallFromThread(reactor, lambda: defer.gatherResults(
            [registrar.admit(f"a{i}", AGENT) for i in range(20)]))
        for round_ in range(5):
            standby = zk_registry(reactor, zk_server.address, path)
            wait_for(lambda: len(standby.mirror.records["agents"]) == 20, what="the mirror")
            gone = f"a{round_}"

            def mark_then_load():  # the write is durable, and at once the standby loads
                d = registrar.mark(gone, "gone", AGENT)
                return d.addCallback(lambda _: standby.load())

            records = blockingCallFromThread(reactor, mark_then_load)
            assert records["agents"][gone] == ("gone", AGENT), round_
            close(reactor, standby)
    finally:
        close(reactor, leader)
