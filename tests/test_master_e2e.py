"""Master behaviour through real processes: bad requests, failover, agent loss, retries."""

import json
import os
import signal
import socket
import urllib.request

import pytest
from pymesos import MesosSchedulerDriver

from agora import recordio

from tests.cluster import (AgentProcess, LocalCluster, MasterProcess, container_cgroups,
                           get_json, post_json, processes_with, wait_for)
from tests.schedulers import Recorder, framework_info, start_driver, unique


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("master"), agents=1)
    yield c
    c.stop()


def subscribe_raw(address: str, body: dict):
    """Open a SUBSCRIBE stream by hand; returns (socket, status line, headers, first bytes)."""
    host, port = address.split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /api/v1/scheduler HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nAccept: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(data), data))
    buf = b""
    while b"\r\n\r\n" not in buf or buf.count(b"HEARTBEAT") < 1:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return sock, lines[0], headers, rest


def stream_events(body: bytes) -> list:
    """The events in the chunked RecordIO bytes read so far."""
    data = b""
    while body:
        size, _, body = body.partition(b"\r\n")
        n = int(size, 16)
        data, body = data + body[:n], body[n + 2:]
    return [json.loads(r) for r in recordio.Decoder().feed(data)]


def test_subscribe_stream_headers_and_first_events(cluster):
    """SUBSCRIBE answers 200 chunked with a stream id, then SUBSCRIBED and a HEARTBEAT."""
    sock, status, headers, rest = subscribe_raw(cluster.address, {
        "type": "SUBSCRIBE", "subscribe": {"framework_info": framework_info("raw")}})
    try:
        assert status == "HTTP/1.1 200 OK"
        assert headers["transfer-encoding"] == "chunked"
        assert headers["mesos-stream-id"]
        events = stream_events(rest)
        assert [e["type"] for e in events[:2]] == ["SUBSCRIBED", "HEARTBEAT"]
        assert events[0]["subscribed"]["heartbeat_interval_seconds"] == 15.0
    finally:
        sock.close()


def test_malformed_requests_get_4xx_with_message(cluster):
    """Bad JSON, unknown calls, missing fields and stream ids get 4xx and a message."""
    url = cluster.url + "/api/v1/scheduler"
    status, body = post_json(url, b"{not json")
    assert status == 400 and b"JSON" in body
    status, body = post_json(url, {"type": "NO_SUCH_CALL", "framework_id": {"value": "x"}})
    assert status == 400 and b"NO_SUCH_CALL" in body
    status, body = post_json(url, {"type": "SUBSCRIBE", "subscribe": {"framework_info": {
        "name": "no user"}}})
    assert status == 400 and b"user" in body
    status, body = post_json(url, {"type": "SUBSCRIBE"})
    assert status == 400 and b"framework_info" in body
    status, body = post_json(url, {"type": "DECLINE", "framework_id": {"value": "nope"}})
    assert status == 400 and b"not found" in body
    status, body = post_json(url, [1, 2, 3])
    assert status == 400
    status, _ = post_json(url, b"{}", headers={"Content-Type": "text/plain"})
    assert status == 415
    # The master keeps serving after all of that.
    with urllib.request.urlopen(cluster.url + "/health", timeout=10) as r:
        assert r.status == 200
    assert get_json(cluster.url + "/version")["version"] == "1.11.0"


def test_calls_check_stream_id_and_subscription(cluster):
    """Calls need the framework's current Mesos-Stream-Id; a disconnected framework gets 403."""
    sock, _, headers, rest = subscribe_raw(cluster.address, {
        "type": "SUBSCRIBE", "subscribe": {"framework_info": framework_info(
            "stream-check", failover_timeout=60)}})
    fid = stream_events(rest)[0]["subscribed"]["framework_id"]
    url = cluster.url + "/api/v1/scheduler"
    call = {"type": "REVIVE", "framework_id": fid}
    status, body = post_json(url, call)
    assert status == 400 and b"Mesos-Stream-Id" in body
    status, body = post_json(url, call, headers={"Mesos-Stream-Id": "wrong"})
    assert status == 400 and b"didn't match" in body
    status, body = post_json(url, call, headers={"Mesos-Stream-Id": headers["mesos-stream-id"]})
    assert status == 202 and body == b""
    sock.close()
    wait_for(lambda: post_json(url, call, headers={
        "Mesos-Stream-Id": headers["mesos-stream-id"]})[0] == 403, what="403 after disconnect")


def test_stale_offer_and_invalid_task(cluster):
    """Accepting a used offer gives TASK_LOST (invalid offers); a bad task gives TASK_ERROR."""
    sched = Recorder(hold=True)
    driver = start_driver(sched, cluster.address, name="stale")
    try:
        offer = wait_for(lambda: sched.offers and sched.offers[0], what="an offer")
        bad = unique("bad")
        driver.launchTasks(offer["id"], [{
            "task_id": {"value": bad}, "agent_id": offer["agent_id"], "name": bad,
            "command": {"value": "true"},
            "resources": [{"name": "cpus", "type": "SCALAR", "scalar": {"value": 100000}}]}])
        wait_for(lambda: sched.last_state(bad) == "TASK_ERROR", what="TASK_ERROR")
        err = [u for u in sched.updates if u["task_id"]["value"] == bad][-1]
        assert err["reason"] == "REASON_TASK_INVALID" and "more resources" in err["message"]
        stale = unique("stale")
        driver.launchTasks(offer["id"], [{
            "task_id": {"value": stale}, "agent_id": offer["agent_id"], "name": stale,
            "command": {"value": "true"},
            "resources": [{"name": "cpus", "type": "SCALAR", "scalar": {"value": 0.1}}]}])
        wait_for(lambda: sched.last_state(stale) == "TASK_LOST", what="TASK_LOST")
        lost = [u for u in sched.updates if u["task_id"]["value"] == stale][-1]
        assert lost["reason"] == "REASON_INVALID_OFFERS"
    finally:
        driver.stop()
        driver.join()


def test_kill_reconcile_and_decline_filters(cluster):
    """KILL ends a running task; RECONCILE reports states; DECLINE filters then REVIVE clears."""
    name = unique("sleep")
    sched = Recorder([(name, "sleep 300")], refuse=3600)
    driver = start_driver(sched, cluster.address, name="kill")
    try:
        wait_for(lambda: sched.last_state(name) == "TASK_RUNNING", what="TASK_RUNNING")
        driver.reconcileTasks([{"task_id": {"value": name}}])
        wait_for(lambda: any(u.get("reason") == "REASON_RECONCILIATION" for u in sched.updates),
                 what="a reconciliation update")
        driver.reconcileTasks([{"task_id": {"value": "never-launched"}}])
        wait_for(lambda: sched.last_state("never-launched") == "TASK_LOST", what="unknown task")
        driver.killTask({"value": name})
        wait_for(lambda: sched.last_state(name) == "TASK_KILLED", what="TASK_KILLED")
        # Offers were declined for an hour: no new offer arrives until REVIVE.
        seen = len(sched.offers)
        with pytest.raises(AssertionError):
            wait_for(lambda: len(sched.offers) > seen, timeout=1.5, what="no offer")
        driver.reviveOffers()
        wait_for(lambda: len(sched.offers) > seen, what="an offer after REVIVE")
    finally:
        driver.stop()
        driver.join()


def test_framework_failover_within_timeout(cluster):
    """A scheduler that fails over re-subscribes with its id; its task keeps running."""
    name = unique("long")
    sched = Recorder([(name, "sleep 300")])
    driver = start_driver(sched, cluster.address, name="failover", failover_timeout=30)
    wait_for(lambda: sched.last_state(name) == "TASK_RUNNING", what="TASK_RUNNING")
    fid = sched.framework_id
    driver.stop(failover=True)
    driver.join()
    state = wait_for(lambda: [f for f in cluster.state()["frameworks"]
                              if f["id"] == fid and not f["connected"]], what="disconnect")
    assert state[0]["tasks"][0]["state"] == "TASK_RUNNING"
    second = Recorder()
    driver2 = MesosSchedulerDriver(second, framework_info("failover", failover_timeout=30,
                                                          id={"value": fid}),
                                   cluster.address, use_addict=False)
    driver2.start()
    try:
        assert second.reregistered_event.wait(20)
        driver2.reconcileTasks([])
        wait_for(lambda: second.last_state(name) == "TASK_RUNNING", what="reconciled task")
        driver2.killTask({"value": name})
        wait_for(lambda: second.last_state(name) == "TASK_KILLED", what="TASK_KILLED")
    finally:
        driver2.stop()
        driver2.join()


def test_failover_timeout_expiry_removes_framework(cluster):
    """When failover_timeout passes without the scheduler, its tasks are killed."""
    name = unique("orphan")
    sched = Recorder([(name, "sleep 300")])
    driver = start_driver(sched, cluster.address, name="expire", failover_timeout=1)
    wait_for(lambda: sched.last_state(name) == "TASK_RUNNING", what="TASK_RUNNING")
    fid = sched.framework_id
    driver.stop(failover=True)
    driver.join()
    wait_for(lambda: any(f["id"] == fid for f in cluster.state()["completed_frameworks"]),
             what="framework removed")
    wait_for(lambda: not processes_with(name), what="the task's process to be gone")


def test_operator_and_legacy_endpoints(cluster):
    """The v1 operator calls and legacy endpoints answer in Mesos's shapes."""
    api = cluster.url + "/api/v1/operator"  # served by /api/v1 through the longest prefix
    status, body = post_json(api, {"type": "GET_HEALTH"})
    assert status == 200 and json.loads(body) == {"type": "GET_HEALTH",
                                                  "get_health": {"healthy": True}}
    for call in ("GET_VERSION", "GET_STATE", "GET_AGENTS", "GET_FRAMEWORKS", "GET_TASKS",
                 "GET_ROLES"):
        status, body = post_json(cluster.url + "/api/v1", {"type": call})
        assert status == 200, (call, body)
        assert call.lower() in json.loads(body)
    agents = json.loads(post_json(api, {"type": "GET_AGENTS"})[1])["get_agents"]["agents"]
    assert agents and agents[0]["agent_info"]["resources"]
    status, body = post_json(api, {"type": "NOPE"})
    assert status == 400
    for path in ("/master/state", "/state", "/state-summary", "/master/frameworks",
                 "/master/slaves", "/master/tasks", "/metrics/snapshot", "/version"):
        assert isinstance(get_json(cluster.url + path), dict), path
    metrics = get_json(cluster.url + "/metrics/snapshot")
    assert metrics["master/slaves_active"] == 1.0 and metrics["master/elected"] == 1.0
    state = get_json(cluster.url + "/master/state")
    assert state["slaves"][0]["resources"]["cpus"] > 0


def test_status_update_retried_until_acknowledged(tmp_path):
    """A status update the scheduler does not acknowledge is sent again, then stops once acked."""
    master = MasterProcess(tmp_path)
    agent = AgentProcess(tmp_path, master.address, args=["--status-update-retry", "0.3",
                                                         "--resources", "cpus:2;mem:1024"])
    name = unique("retry")
    sched = Recorder([(name, "true")])
    driver = MesosSchedulerDriver(sched, framework_info("retry"), master.address,
                                  use_addict=False, implicit_acknowledgements=False)
    driver.start()
    try:
        first = wait_for(lambda: [u for u in sched.updates if u["task_id"]["value"] == name],
                         what="first update")[0]
        wait_for(lambda: len([u for u in sched.updates if u.get("uuid") == first["uuid"]]) >= 3,
                 what="the same update to be retried")
        driver.acknowledgeStatusUpdate(first)
        wait_for(lambda: any(u["task_id"]["value"] == name and u.get("uuid") != first["uuid"]
                             for u in sched.updates), what="the next update after the ack")
        for update in list(sched.updates):
            if update["task_id"]["value"] == name:
                driver.acknowledgeStatusUpdate(update)
        wait_for(lambda: sched.last_state(name) == "TASK_FINISHED", what="TASK_FINISHED")
    finally:
        driver.stop()
        driver.join()
        agent.stop()
        master.stop()


@pytest.mark.parametrize("partition_aware", [False, True])
def test_agent_loss_makes_tasks_lost_or_unreachable(tmp_path, partition_aware):
    """When an agent dies, its tasks become TASK_LOST (or TASK_UNREACHABLE if partition-aware)."""
    master = MasterProcess(tmp_path, args=["--agent-ping-timeout", "0.2",
                                           "--max-agent-ping-timeouts", "3"])
    agent = AgentProcess(tmp_path, master.address, args=["--resources", "cpus:2;mem:1024"])
    name = unique("doomed")
    sched = Recorder([(name, "sleep 300")])
    caps = [{"type": "PARTITION_AWARE"}] if partition_aware else []
    driver = start_driver(sched, master.address, name="loss", capabilities=caps)
    try:
        wait_for(lambda: sched.last_state(name) == "TASK_RUNNING", what="TASK_RUNNING")
        agent.kill()
        expected = "TASK_UNREACHABLE" if partition_aware else "TASK_LOST"
        wait_for(lambda: sched.last_state(name) == expected, timeout=20, what=expected)
        assert any(f[0] == "agent" for f in sched.failures)
        assert not [s for s in master.state()["slaves"]]
    finally:
        driver.stop()
        driver.join()
        # What an operator does with a dead agent's host: start the agent again on its work
        # dir with --recover cleanup, which destroys what the dead one left running.
        again = AgentProcess(tmp_path, master.address,
                             args=["--resources", "cpus:2;mem:1024", "--recover", "cleanup"])
        try:
            wait_for(lambda: not processes_with(name), what="the orphaned task destroyed")
            wait_for(lambda: not container_cgroups(again), what="its cgroups removed")
        finally:
            again.stop()
            master.stop()
            for pid in processes_with(name):
                os.kill(pid, signal.SIGKILL)


def test_agent_secret_handshake(tmp_path):
    """With a shared secret, an agent with the wrong secret is refused and the right one admitted."""
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    master = MasterProcess(tmp_path, args=["--secret-file", str(secret)])
    bad = AgentProcess(tmp_path, master.address, args=["--secret-file", str(wrong)], name="bad")
    good = AgentProcess(tmp_path, master.address, args=["--secret-file", str(secret)],
                        name="good")
    try:
        wait_for(lambda: len(master.state()["slaves"]) == 1, what="the good agent")
        wait_for(lambda: "does not match" in bad.tail(), what="the refusal in the agent log")
        assert len(master.state()["slaves"]) == 1
    finally:
        bad.stop()
        good.stop()
        master.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_local_stops_cleanly(tmp_path, sig):
    """SIGTERM or Ctrl-C stops `agora local` with its running tasks, leaving no process behind."""
    c = LocalCluster(tmp_path, agents=2)
    name = unique("bystander")
    sched = Recorder([(name, "sleep 300")])
    driver = start_driver(sched, c.address, name="bystander", failover_timeout=300)
    wait_for(lambda: sched.last_state(name) == "TASK_RUNNING", what="TASK_RUNNING")
    driver.stop(failover=True)
    driver.join()
    assert processes_with(name)
    assert c.stop(sig) == 0
    wait_for(lambda: not processes_with(name), what="no task process left")
    wait_for(lambda: not processes_with(c.work_dir), what="no agora process left")


def test_drain_agent_through_operator_api(tmp_path):
    """DRAIN_AGENT kills the agent's tasks within the grace period and can mark it gone."""
    master = MasterProcess(tmp_path)
    agent = AgentProcess(tmp_path, master.address, args=["--resources", "cpus:2;mem:1024"])
    name = unique("drained")
    sched = Recorder([(name, "sleep 300")])
    driver = start_driver(sched, master.address, name="drain")
    try:
        wait_for(lambda: sched.last_state(name) == "TASK_RUNNING", what="TASK_RUNNING")
        agent_id = master.state()["slaves"][0]["id"]
        api = master.url + "/api/v1"
        status, body = post_json(api, {"type": "DRAIN_AGENT", "drain_agent": {
            "agent_id": {"value": "no-such-agent"}}})
        assert status == 404 and b"no-such-agent" in body
        status, _ = post_json(api, {"type": "DRAIN_AGENT", "drain_agent": {
            "agent_id": {"value": agent_id}, "max_grace_period": {"nanoseconds": 10**9},
            "mark_gone": True}})
        assert status == 200
        wait_for(lambda: sched.last_state(name) == "TASK_KILLED", what="TASK_KILLED")
        wait_for(lambda: not master.state()["slaves"], what="the agent to be gone")
        wait_for(lambda: not processes_with(name), what="the task's processes to end")
    finally:
        driver.stop()
        driver.join()
        agent.stop()
        master.stop()
