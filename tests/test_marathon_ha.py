"""Marathon outliving its processes: two `agora marathon --zk` on a real ZooKeeper (one
leads, the other proxies; SIGKILL the leader and the other takes over with the same
framework and its tasks), and a lone Marathon restarted on its SQLite store."""

import pytest

from tests.cluster import AgentProcess, MasterProcess, processes_with, wait_for
from tests.marathon_harness import EventLog, MarathonProcess, request, settled
from tests.zookeeper import zk_server  # noqa: F401  (fixture)

from marathon.models import MarathonApp  # noqa: E402  (after the harness's shim)


def leader_of(m) -> str | None:
    try:
        status, body, _ = request(m.url + "/v2/leader")
    except OSError:
        return None
    return body.get("leader") if status == 200 else None


@pytest.fixture
def cluster(tmp_path, zk_server):  # noqa: F811
    master = MasterProcess(tmp_path)
    agent = AgentProcess(tmp_path, master.address,
                         args=["--resources", "cpus:4;mem:4096;disk:4096;ports:[27000-27999]"])
    started = []

    def marathon(name):
        m = MarathonProcess(tmp_path, master.address, name=name, args=[
            "--zk", f"zk://{zk_server.address}/marathon-{tmp_path.name}",
            "--zk-session-timeout", "2", "--hostname", "127.0.0.1"])
        m.address = f"127.0.0.1:{m.port}"
        started.append(m)
        return m

    try:
        yield master, marathon
    finally:
        for p in started + [agent, master]:
            if p.proc.poll() is None:
                p.stop()
            else:
                p.log.close()
    wait_for(lambda: not processes_with(str(tmp_path)), timeout=20, what="tasks gone")


def test_leader_killed_the_other_takes_over_and_apps_keep_running(cluster):
    """A follower proxies to the leader; after SIGKILL of the leader the follower is elected,
    re-registers as the same framework, and the app's tasks are the same ones, still running."""
    master, marathon = cluster
    first = marathon("m1")
    wait_for(lambda: leader_of(first) == first.address, timeout=30, what="m1 to lead")
    second = marathon("m2")
    wait_for(lambda: leader_of(second) == first.address, timeout=30, what="m2 to follow m1")
    # The follower answers for the leader: created through m2, run by m1.
    c2 = second.client
    created = c2.create_app("kept", MarathonApp(cmd="sleep 600", cpus=0.1, mem=16,
                                                instances=2))
    assert created.id == "/kept"
    before = wait_for(lambda: settled(c2, "/kept", 2), timeout=60, what="2 tasks")
    framework = first.client.get_info().framework_id
    first.kill()
    wait_for(lambda: leader_of(second) == second.address, timeout=30, what="m2 to lead")
    info = wait_for(lambda: (i := c2.get_info()) and i.elected and i.framework_id and i,
                    timeout=30, what="m2's scheduler")
    assert info.framework_id == framework
    after = wait_for(lambda: settled(c2, "/kept", 2), timeout=30, what="the app on m2")
    assert {t.id for t in after.tasks} == {t.id for t in before.tasks}
    running = {t["id"] for t in master.state()["frameworks"][0]["tasks"]
               if t["state"] == "TASK_RUNNING"}
    assert {t.id for t in before.tasks} <= running
    assert [f["id"] for f in master.state()["frameworks"]] == [framework]
    # The new leader schedules: a scale works and the event stream is its own.
    log = EventLog(c2)
    c2.scale_app("kept", instances=3)
    wait_for(lambda: settled(c2, "/kept", 3), timeout=60, what="3 tasks after failover")
    assert [e for e in log.of("status_update_event") if e["appId"] == "/kept"]
    c2.delete_app("kept", force=True)
    wait_for(lambda: not c2.list_apps(), timeout=30, what="the app deleted")


def test_follower_redirects_events_and_serves_ping_itself(cluster):
    """/v2/events on a follower is a 302 to the leader; /ping and /v2/leader are local."""
    import http.client

    _, marathon = cluster
    first = marathon("m1")
    wait_for(lambda: leader_of(first) == first.address, timeout=30, what="m1 to lead")
    second = marathon("m2")
    wait_for(lambda: leader_of(second) == first.address, timeout=30, what="m2 to follow")
    conn = http.client.HTTPConnection("127.0.0.1", second.port, timeout=10)
    conn.request("GET", "/v2/events?event_type=deployment_info",
                 headers={"Accept": "text/event-stream"})
    r = conn.getresponse()
    assert r.status == 302
    assert r.getheader("Location") == \
        f"http://{first.address}/v2/events?event_type=deployment_info"
    conn.close()
    status, body, _ = request(second.url + "/ping")
    assert status == 200 and body == "pong"
    status, body, headers = request(second.url + "/v2/info")
    assert status == 200 and body["leader"] == first.address
    assert headers.get("X-Marathon-Leader") == f"http://{first.address}"


def test_restarted_marathon_takes_its_apps_back_from_its_store(cluster, tmp_path):
    """Without ZooKeeper: SIGKILL Marathon, start it again on the same work dir; it
    re-registers as the same framework and finds its app with the same tasks."""
    master, _ = cluster
    first = MarathonProcess(tmp_path, master.address, name="solo")
    try:
        c = first.client
        c.create_app("solo", MarathonApp(cmd="sleep 600", cpus=0.1, mem=16, instances=2))
        before = wait_for(lambda: settled(c, "/solo", 2), timeout=60, what="2 tasks")
        framework = c.get_info().framework_id
    finally:
        first.kill()
    again = MarathonProcess(tmp_path, master.address, name="solo")
    try:
        c = again.client
        info = wait_for(lambda: (i := c.get_info()) and i.framework_id and i, timeout=30,
                        what="re-registration")
        assert info.framework_id == framework
        after = wait_for(lambda: settled(c, "/solo", 2), timeout=30, what="the app back")
        assert {t.id for t in after.tasks} == {t.id for t in before.tasks}
        c.delete_app("solo", force=True)
        wait_for(lambda: not c.list_apps(), timeout=30, what="deleted")
    finally:
        again.stop()


def test_marathon_finds_the_master_through_zookeeper(tmp_path, zk_server):  # noqa: F811
    """`agora marathon --master zk://...` follows the elected master, as pymesos does."""
    url = f"zk://{zk_server.address}/mesos-{tmp_path.name}"
    master = MasterProcess(tmp_path, ["--zk", url, "--zk-session-timeout", "3"])
    agent = AgentProcess(tmp_path, url, args=["--resources", "cpus:2;mem:1024;disk:1024"])
    m = None
    try:
        m = MarathonProcess(tmp_path, url, name="zk-master")
        c = m.client
        c.create_app("found", MarathonApp(cmd="sleep 600", cpus=0.1, mem=16, instances=1))
        wait_for(lambda: settled(c, "/found", 1), timeout=60, what="a task via zk://")
        assert c.get_info().marathon_config.master == url
    finally:
        for p in ([m] if m else []) + [agent, master]:
            p.stop()
    wait_for(lambda: not processes_with(str(tmp_path)), timeout=20, what="tasks gone")
