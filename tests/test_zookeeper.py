"""agora.zookeeper: the pure parts, then Contender/Detector against a real ZooKeeper.

Twisted runs in a private epoll reactor in a background thread; tests run in the main thread,
reach it with `blockingCallFromThread` and poll what it recorded with deadlines.
"""

import json
import subprocess
import sys
import threading
import time
import uuid

import pytest
from twisted.internet.threads import blockingCallFromThread

from agora import mesos_json as mj
from agora import zookeeper as zk
from tests.cluster import REPO, wait_for
from tests.zookeeper import connected_server, kazoo_client, start_standalone
from tests.zookeeper import ensemble, zk_ensemble, zk_server  # noqa: F401  (fixtures)


# --- pure ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text,hosts,path", [
    ("zk://127.0.0.1:2181/agora", "127.0.0.1:2181", "/agora"),
    ("zk://h1:2181,h2:2182,h3:2183/agora", "h1:2181,h2:2182,h3:2183", "/agora"),
    ("zoo://h1,h2/mesos/", "h1:2181,h2:2181", "/mesos"),
    ("zk://h1:2181/a/b/c", "h1:2181", "/a/b/c"),
    ("ZK://h1:2181/agora", "h1:2181", "/agora"),
])
def test_parse_url_accepts_mesos_forms(text, hosts, path):
    """zk:// and zoo:// URLs with one or more hosts, default port 2181, a nested path."""
    url = zk.parse_url(text)
    assert (url.hosts, url.path) == (hosts, path)
    assert zk.parse_url(str(url)) == url


@pytest.mark.parametrize("text,why", [
    ("127.0.0.1:2181/agora", "expected zk://"),
    ("http://h1:2181/agora", "expected zk://"),
    ("zk://h1:2181", "missing znode path"),
    ("zk://h1:2181/", "missing znode path"),
    ("zk://h1:port/agora", "bad port"),
    ("zk://h1:99999/agora", "bad port"),
    ("zk://h1,,h2/agora", "missing host"),
    ("zk://:2181/agora", "missing host"),
    ("zk://user:pw@h1:2181/agora", "credentials"),
    ("zk://h1/a//b", "bad znode path"),
    ("zk://h1/a/../b", "bad znode path"),
])
def test_parse_url_says_what_is_wrong(text, why):
    """Malformed URLs raise ValueError naming the problem."""
    with pytest.raises(ValueError, match=why):
        zk.parse_url(text)


def test_leader_child_is_the_lowest_json_info_name():
    """The lowest json.info_ child leads; log_replicas and foreign names are ignored."""
    assert zk.leader_child([]) is None
    assert zk.leader_child(["log_replicas"]) is None
    assert zk.leader_child(["json.info_0000000012", "log_replicas", "json.info_0000000003",
                            "json.info_0000000010"]) == "json.info_0000000003"
    assert zk.leader_child(["info_0000000001", "json.info_0000000002"]) == \
        "json.info_0000000002"


def test_master_info_round_trip_and_leader_address():
    """MasterInfo decodes from znode bytes; clients go to hostname:port, else ip:port."""
    info = mj.master_info("m1", "10.0.0.1", 5050, "m1.example")
    assert zk.decode_master_info(json.dumps(info).encode()) == info
    assert zk.leader_address(info) == "m1.example:5050"
    assert zk.leader_address({"address": {"ip": "10.0.0.2", "port": 5051}}) == "10.0.0.2:5051"
    assert zk.leader_address(None) is None
    for bad in (b"\x08\x01", b"[]", b'{"pid": "master@1.2.3.4:5"}'):
        with pytest.raises(ValueError):
            zk.decode_master_info(bad)


def test_child_watch_drops_reads_older_than_what_it_reported():
    """A children read that finishes late (older cversion) never replaces a newer view."""
    class Session:
        state = zk.CONNECTED

        def add_listener(self, listener):
            pass

    seen = []
    watch = zk._ChildWatch(Session(), "/agora", seen.append)
    both, second = ["json.info_0000000001", "json.info_0000000002"], ["json.info_0000000002"]
    watch._deliver((both, 4))
    watch._deliver((second, 5))
    watch._deliver((both, 4))  # a read issued before the deletion, answered after
    watch._deliver((second, 5))  # the same version again (a re-read after reconnecting)
    assert seen == [both, second, second]


def test_pure_part_imports_neither_kazoo_nor_twisted():
    """Parsing and choosing the leader work without kazoo or Twisted loaded."""
    code = ("import sys, agora.zookeeper as z; z.parse_url('zk://h/p'); z.leader_child([]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kazoo', 'twisted')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


# --- against ZooKeeper ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def zk_reactor():
    """A private epoll reactor in a background thread."""
    from twisted.internet.epollreactor import EPollReactor

    reactor = EPollReactor()
    thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                              daemon=True, name="zk-reactor")
    thread.start()
    wait_for(lambda: reactor.running, what="the reactor to run")
    yield reactor
    reactor.callFromThread(reactor.stop)
    thread.join(10)


class Candidate:
    """A Session with a Contender and a Detector in the test reactor, recording their reports."""

    def __init__(self, reactor, hosts: str, path: str, timeout: float = 4.0, port: int = 1):
        self.reactor = reactor
        self.info = mj.master_info(str(uuid.uuid4()), "127.0.0.1", port, "127.0.0.1")
        self.events = []  # ("leading", bool) | ("lost", reason) | ("leader", info)
        self.session = zk.Session(reactor, hosts, timeout=timeout, connect_timeout=10)
        self.contender = zk.Contender(
            self.session, path, json.dumps(self.info).encode(),
            on_leading=lambda v: self.events.append(("leading", v)),
            on_lost=lambda reason: self.events.append(("lost", reason)))
        self.detector = zk.Detector(self.session, path,
                                    on_change=lambda info: self.events.append(("leader", info)))
        self.znode = blockingCallFromThread(reactor, self._start)

    def _start(self):
        d = self.session.start()
        d.addCallback(lambda _: self.detector.start())
        return d.addCallback(lambda _: self.contender.start())

    @property
    def leading(self) -> bool:
        return self.contender.leading

    def leader_id(self):
        return (self.detector.leader or {}).get("id")

    def lost(self):
        return [e[1] for e in self.events if e[0] == "lost"]

    def close(self):
        blockingCallFromThread(self.reactor, self.session.stop)


@pytest.fixture
def candidates(zk_reactor):
    """Make Candidates; all their sessions are closed at the end."""
    made = []

    def make(hosts, path, **kw):
        c = Candidate(zk_reactor, hosts, path, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def test_lowest_contender_leads_and_only_json_info_znodes_exist(zk_server, candidates):
    """Two contenders: the first (lowest) leads, both detectors see it, and the directory
    holds nothing but their two json.info_ znodes with MasterInfo (address, pid)."""
    path = f"/agora-{uuid.uuid4().hex[:8]}"
    a = candidates(zk_server.address, path, port=5050)
    b = candidates(zk_server.address, path, port=5051)
    assert a.znode < b.znode and a.znode.startswith("json.info_")
    wait_for(lambda: a.leading, 5, what="a to lead")
    assert not b.leading
    wait_for(lambda: a.leader_id() == b.leader_id() == a.info["id"], 5,
             what="both detectors to see a")
    client = kazoo_client(zk_server.address)
    try:
        children = sorted(client.get_children(path))
        assert children == [a.znode, b.znode]
        data, stat = client.get(f"{path}/{a.znode}")
        assert stat.ephemeralOwner != 0
        info = json.loads(data)
        assert info["address"] == {"hostname": "127.0.0.1", "ip": "127.0.0.1", "port": 5050}
        assert info["pid"] == "master@127.0.0.1:5050"
    finally:
        client.stop()
        client.close()


def test_leader_that_withdraws_is_replaced_within_a_second(zk_server, candidates):
    """Closing the leader's session hands leadership to the next contender at once."""
    path = f"/agora-{uuid.uuid4().hex[:8]}"
    a = candidates(zk_server.address, path)
    b = candidates(zk_server.address, path)
    wait_for(lambda: a.leading and b.leader_id() == a.info["id"], 5, what="a to lead")
    started = time.monotonic()
    a.close()
    wait_for(lambda: b.leading, 1.0, 0.01, what="b to lead")
    wait_for(lambda: b.leader_id() == b.info["id"], 1.0, 0.01, what="b's detector to see b")
    assert time.monotonic() - started < 1.0
    assert not b.lost()


def test_pymesos_detector_agrees_on_the_leader(zk_server, candidates):
    """pymesos's own ZooKeeper detector (with the path as chroot) picks our leader, then
    the next one when it goes."""
    from pymesos.detector import MasterDetector

    path = f"/agora-{uuid.uuid4().hex[:8]}"
    a = candidates(zk_server.address, path, port=5050)
    b = candidates(zk_server.address, path, port=5051)
    seen = []

    class Driver:  # what MesosSchedulerDriver.onNewMasterDetectedMessage does with the data
        def onNewMasterDetectedMessage(self, data):
            parsed = json.loads(data)
            seen.append(f"{parsed['address']['ip']}:{parsed['address']['port']}")

        def onNoMasterDetectedMessage(self):
            seen.append(None)

    detector = MasterDetector(zk_server.address + path, Driver())
    detector.start()
    try:
        wait_for(lambda: seen and seen[-1] == "127.0.0.1:5050", 5, what="pymesos to see a")
        a.close()
        wait_for(lambda: seen[-1] == "127.0.0.1:5051", 5, what="pymesos to see b")
        # b's own watch may fire a moment after pymesos's: both see the same znode go.
        wait_for(lambda: b.leading, 5, what="b to lead")
    finally:
        detector.stop()


def test_leader_stops_at_once_when_disconnected_and_loses_candidacy_after_timeout(
        zk_reactor, tmp_path):
    """ZooKeeper dies: the leader stops leading at once (SUSPENDED) and gives its
    candidacy up once disconnected for the session timeout."""
    server = start_standalone(str(tmp_path / "zk"))
    try:
        c = Candidate(zk_reactor, server.address, "/agora", timeout=2.0)
        wait_for(lambda: c.leading and c.leader_id() == c.info["id"], 5, what="c to lead")
        server.stop()
        stopped = time.monotonic()
        wait_for(lambda: not c.leading, 1.0, 0.01, what="c to stop leading")
        assert not c.lost()
        wait_for(c.lost, 5, 0.02, what="c to lose its candidacy")
        assert 1.5 < time.monotonic() - stopped < 4.0
        assert "session timeout" in c.lost()[0]
        assert c.session.state == zk.LOST
        assert ("leader", None) in c.events  # the detector forgets the leader too
        c.close()
    finally:
        server.stop()


def test_leader_survives_losing_its_zookeeper_server(ensemble, candidates):
    """Stopping the ensemble member a leader is connected to suspends it only briefly: the
    same session reconnects to another member and it leads again with the same znode."""
    path = f"/agora-{uuid.uuid4().hex[:8]}"
    c = candidates(ensemble.hosts, path, timeout=4.0)
    wait_for(lambda: c.leading, 5, what="c to lead")
    server = wait_for(lambda: connected_server(ensemble, c.session.client.client_id[0]), 5,
                      what="the server c is connected to")
    server.stop()
    wait_for(lambda: ("leading", False) in c.events, 5, 0.01, what="c to be suspended")
    wait_for(lambda: c.leading, 5, 0.01, what="c to lead again")
    assert c.events.count(("leading", True)) == 2 and not c.lost()
    assert connected_server(ensemble, c.session.client.client_id[0]) not in (None, server)
    client = kazoo_client(ensemble.hosts)
    try:
        assert client.get_children(path) == [c.znode]
    finally:
        client.stop()
        client.close()


def test_registry_mirror_reads_everything_again_after_reconnecting(ensemble, zk_reactor):
    """A standby's registry mirror loses its watches with its server: written meanwhile (and
    after), an agent marked gone is still gone when the standby loads the registry."""
    from twisted.internet import defer

    from master.registrar import Registrar, ZooKeeperRegistry

    def registry(path):
        r = ZooKeeperRegistry(lambda: zk.Session(zk_reactor, ensemble.hosts, timeout=6.0), path)
        blockingCallFromThread(zk_reactor, r.start)
        return r

    path = f"/agora-{uuid.uuid4().hex[:8]}_registry"
    leader = registry(path)
    blockingCallFromThread(zk_reactor, leader.load)
    registrar = Registrar(zk_reactor, leader)
    info = {"hostname": "h", "port": 5051, "resources": []}
    standby = registry(path)
    try:
        blockingCallFromThread(zk_reactor, lambda: defer.gatherResults(
            [registrar.admit(f"a{i}", info) for i in range(10)]))
        wait_for(lambda: len(standby.mirror.records["agents"]) == 10, what="the mirror")
        mirror, reads = standby.mirror, standby.mirror.reads
        server = wait_for(lambda: connected_server(ensemble, standby.session.client.client_id[0]),
                          5, what="the standby's server")
        server.stop()
        # The leader's session may have been on that server too: its write is retried
        # until the leader reconnects elsewhere (marking gone twice is harmless).
        wait_for(lambda: _marked(zk_reactor, registrar, "a3", info), 10,
                 what="the leader's write")
        wait_for(lambda: standby.session.state == zk.CONNECTED and mirror.reads >= reads + 10,
                 10, what="the mirror to reconnect and read everything again")
        blockingCallFromThread(zk_reactor, lambda: registrar.mark("a4", "gone", info))
        records = blockingCallFromThread(zk_reactor, standby.load)
        assert standby.mirror is mirror  # the same session, reconnected
        assert records["agents"]["a3"][0] == "gone" and records["agents"]["a4"][0] == "gone"
        assert [k for k, (state, _) in records["agents"].items() if state == "gone"] in (
            ["a3", "a4"], ["a4", "a3"])
    finally:
        for r in (standby, leader):
            blockingCallFromThread(zk_reactor, lambda r=r: defer.maybeDeferred(r.close))


def _marked(reactor, registrar, agent_id: str, info: dict) -> bool:
    from kazoo.exceptions import ConnectionLoss
    try:
        blockingCallFromThread(reactor, lambda: registrar.mark(agent_id, "gone", info))
        return True
    except ConnectionLoss:
        return False


def test_session_start_fails_clearly_when_no_server_answers(zk_reactor):
    """Connecting to a port where no ZooKeeper listens fails within the connect timeout,
    with a message naming the hosts."""
    from tests.zookeeper import free_ports

    session = zk.Session(zk_reactor, f"127.0.0.1:{free_ports(1)[0]}", connect_timeout=0.5)
    with pytest.raises(ConnectionError, match="no ZooKeeper server at 127.0.0.1:.* 0.5s"):
        blockingCallFromThread(zk_reactor, session.start)
    assert session.state == zk.CLOSED
