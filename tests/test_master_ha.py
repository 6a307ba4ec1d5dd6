"""Masters elected in a real ZooKeeper (`agora master --zk`), driven as users would: real
master processes, unmodified pymesos and mesoshttp clients given a `zk://` master string,
ZooKeeper servers stopped and killed under them."""

import http.client
import json
import signal
import threading
import time
import uuid

import pytest

from tests.cluster import AgentProcess, MasterProcess, get_json, wait_for
from tests.schedulers import Recorder, start_driver
from tests.zookeeper import connected_server, kazoo_client
from tests.zookeeper import ensemble, zk_ensemble, zk_server  # noqa: F401  (fixtures)

SESSION_TIMEOUT = 3.0


def request(address: str, method: str, path: str, body=None):
    """(status, headers, body) without following redirects."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data,
                     headers={"Content-Type": "application/json"} if data else {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


SUBSCRIBE = {"type": "SUBSCRIBE", "subscribe": {"framework_info": {"user": "root",
                                                                   "name": "ha"}}}


def elected(m) -> bool:
    """Whether `m` says it leads (False if it does not answer)."""
    try:
        return get_json(m.url + "/metrics/snapshot", timeout=2)["master/elected"] == 1.0
    except OSError:
        return False


@pytest.fixture
def masters(tmp_path):
    """Start `agora master --zk` processes; all are stopped at the end."""
    started = []

    def start(url: str, name: str, timeout: float = SESSION_TIMEOUT) -> MasterProcess:
        m = MasterProcess(tmp_path, ["--zk", url, "--zk-session-timeout", str(timeout)],
                          name=name)
        m.id = m.state()["id"]
        started.append(m)
        return m

    yield start
    for m in started:
        if m.proc.poll() is None:
            m.stop()


@pytest.fixture(scope="module")
def pair(zk_server, tmp_path_factory):
    """Two masters at /mesos (where mesoshttp looks) on the standalone server: m1 leads."""
    tmp = tmp_path_factory.mktemp("pair")
    url = f"zk://{zk_server.address}/mesos"
    m1 = MasterProcess(tmp, ["--zk", url], name="m1")
    m2 = MasterProcess(tmp, ["--zk", url], name="m2")
    for m in (m1, m2):
        m.id = m.state()["id"]
    wait_for(lambda: elected(m1), 10, what="m1 to lead")
    yield m1, m2
    for m in (m2, m1):
        m.stop()


def test_follower_redirects_api_calls_to_the_leader(pair, zk_server):
    """The follower answers scheduler and operator calls with 307 to the leader's same path,
    /redirect points at the leader, and its /master/state names the leader."""
    m1, m2 = pair
    assert not elected(m2)
    status, headers, _ = request(m2.address, "POST", "/api/v1/scheduler", SUBSCRIBE)
    assert (status, headers["Location"]) == (307, f"//{m1.address}/api/v1/scheduler")
    status, headers, _ = request(m2.address, "POST", "/api/v1/scheduler",
                                 {"type": "DECLINE", "framework_id": {"value": "x"}})
    assert (status, headers["Location"]) == (307, f"//{m1.address}/api/v1/scheduler")
    status, headers, _ = request(m2.address, "POST", "/api/v1/operator", {"type": "GET_STATE"})
    assert (status, headers["Location"]) == (307, f"//{m1.address}/api/v1/operator")
    status, _, body = request(m2.address, "POST", "/api/v1", {"type": "GET_HEALTH"})
    assert status == 200 and json.loads(body)["get_health"]["healthy"] is True
    for m in (m1, m2):
        status, headers, _ = request(m.address, "GET", "/redirect")
        assert (status, headers["Location"]) == (307, f"//{m1.address}")
    state = m2.state()
    assert state["leader_info"]["id"] == m1.id and state["leader"] == f"master@{m1.address}"
    assert "elected_time" not in state and state["frameworks"] == []
    assert m1.state()["leader_info"]["id"] == m1.id
    client = kazoo_client(zk_server.address)
    try:
        children = client.get_children("/mesos")
    finally:
        client.stop()
        client.close()
    assert len(children) == 2 and all(c.startswith("json.info_") for c in children)


def test_follower_ignores_agent_registrations(pair, tmp_path):
    """An agent pointed at the follower is not admitted there (it must find the leader)."""
    _, m2 = pair
    agent = AgentProcess(tmp_path, m2.address)
    try:
        wait_for(lambda: "Ignoring RegisterAgent" in m2.tail(), 10,
                 what="m2 to ignore the registration")
        assert m2.state()["slaves"] == []
    finally:
        agent.stop()


def test_mesoshttp_finds_the_leader_through_zookeeper(pair, zk_server):
    """mesoshttp, given zk://…/mesos, subscribes with the leader (whichever znode it reads)."""
    from mesoshttp.client import MesosClient

    m1, _ = pair
    drivers = []
    client = MesosClient(mesos_urls=[f"zk://{zk_server.address}/mesos"],
                         frameworkName="mesoshttp-ha")
    client.on(MesosClient.SUBSCRIBED, drivers.append)
    thread = threading.Thread(target=client.register, daemon=True)
    thread.start()
    try:
        wait_for(lambda: drivers, 20, what="mesoshttp to subscribe")
        assert [f["name"] for f in m1.state()["frameworks"]] == ["mesoshttp-ha"]
        client.tearDown()  # stop its loop once the stream ends...
        drivers[0].tearDown()  # ...which TEARDOWN does (sent to the master it found: 307 if m2)
        wait_for(lambda: not m1.state()["frameworks"], 10, what="the framework to go")
    finally:
        client.tearDown()
        thread.join(20)


def test_pymesos_follows_the_leader_through_sigkill_and_sigterm(zk_server, masters):
    """pymesos with a zk:// master string subscribes to the leader; SIGKILL it and the
    follower leads within the session timeout and pymesos re-subscribes there; SIGTERM that
    one and a third master takes over at once."""
    path = f"/agora-{uuid.uuid4().hex[:8]}"
    url = f"zk://{zk_server.address}{path}"
    m1, m2 = masters(url, "m1"), masters(url, "m2")
    wait_for(lambda: elected(m1), 10, what="m1 to lead")
    sched = Recorder()
    driver = start_driver(sched, url, name="ha-pymesos", failover_timeout=60)
    try:
        assert sched.registered_event.wait(20), "pymesos did not subscribe"
        assert driver.master == m1.address
        fid = sched.framework_id

        m1.kill()
        killed = time.monotonic()
        wait_for(lambda: elected(m2), SESSION_TIMEOUT + 7, 0.05, what="m2 to lead")
        failover = time.monotonic() - killed
        assert failover < SESSION_TIMEOUT + 5, failover
        assert sched.reregistered_event.wait(10), "pymesos did not re-subscribe"
        assert driver.master == m2.address
        assert [f["id"] for f in m2.state()["frameworks"]] == [fid]

        m3 = masters(url, "m3")
        sched.reregistered_event.clear()
        m2.stop(signal.SIGTERM)
        stopped = time.monotonic()
        wait_for(lambda: elected(m3), 3, 0.02, what="m3 to lead")
        assert time.monotonic() - stopped < 2.0
        assert sched.reregistered_event.wait(10), "pymesos did not re-subscribe to m3"
        assert driver.master == m3.address
    finally:
        driver.stop()
        driver.join()


def leader_session(hosts: str, path: str) -> int:
    """The session id owning the lowest json.info_ znode under `path`."""
    client = kazoo_client(hosts)
    try:
        child = min(client.get_children(path))
        return client.get(f"{path}/{child}")[1].ephemeralOwner
    finally:
        client.stop()
        client.close()


def test_leader_survives_one_zookeeper_node_and_exits_when_quorum_is_lost(ensemble, masters):
    """Stop the ensemble member the leader talks to: it keeps leading. Stop a second one
    (no quorum): the leader exits with status 1 and no master leads. Bring both back: the
    surviving follower leads, and a fresh master follows it."""
    timeout = 2.0
    path = f"/agora-{uuid.uuid4().hex[:8]}"
    url = ensemble.url(path)
    m1, m2 = masters(url, "m1", timeout), masters(url, "m2", timeout)
    wait_for(lambda: elected(m1), 10, what="m1 to lead")
    session = leader_session(ensemble.hosts, path)
    first = wait_for(lambda: connected_server(ensemble, session), 5, what="m1's ZooKeeper")
    first.stop()
    # Past the session timeout m1 would have exited had it lost the session.
    deadline = time.monotonic() + 1.5 * timeout
    while time.monotonic() < deadline:
        assert m1.proc.poll() is None, m1.tail()
        time.sleep(0.1)
    wait_for(lambda: elected(m1), 5, what="m1 to lead again")
    assert leader_session(ensemble.hosts, path) == session
    assert not elected(m2)

    second = next(s for s in ensemble.servers if s.running)
    second.stop()
    lost = time.monotonic()
    assert m1.proc.wait(timeout + 5) == 1
    assert time.monotonic() - lost < timeout + 3
    assert "Lost leadership" in m1.tail()
    wait_for(lambda: request(m2.address, "POST", "/api/v1/scheduler", SUBSCRIBE)[0] == 503,
             timeout + 5, what="m2 to know no leader")
    assert not elected(m2) and m2.proc.poll() is None

    ensemble.start()
    ensemble.wait_quorum()
    wait_for(lambda: elected(m2), 3 * timeout + 10, what="m2 to lead once quorum is back")
    m3 = masters(url, "m3", timeout)
    status, headers, _ = request(m3.address, "POST", "/api/v1/scheduler", SUBSCRIBE)
    assert (status, headers["Location"]) == (307, f"//{m2.address}/api/v1/scheduler")
