"""The master state machine with a fake clock, in-memory streams and agent links."""

import json

import pytest
from twisted.internet.task import Clock

from agora import mesos_json as mj
from agora import protocol, recordio
from agora.resources import Resources
from master.master import CallError, Master
from master.registrar import MemoryRegistry, Registrar


class FakeStream:
    """Collects the events a framework would receive."""

    def __init__(self):
        self.events, self.closed, self._callbacks = [], False, []
        self._decoder = recordio.Decoder()

    def write(self, data):
        if not self.closed:
            self.events.extend(json.loads(r) for r in self._decoder.feed(data))

    def close(self):
        if not self.closed:
            self.closed = True
            for cb in self._callbacks:
                cb()

    def on_close(self, cb):
        self._callbacks.append(cb)

    def of(self, kind):
        return [e[kind.lower()] for e in self.events if e["type"] == kind]


class FakeLink:
    """Collects the messages an agent would receive."""

    class _Peer:
        host, port = "127.0.0.1", 1

    class _Transport:
        def getPeer(self):
            return FakeLink._Peer()

    def __init__(self):
        self.sent, self.connected, self.agent = [], True, None
        self.transport = self._Transport()

    def send(self, msg):
        self.sent.append(msg)

    def close(self):
        self.connected = False

    def _peer(self):
        return "127.0.0.1:1"

    def of(self, kind):
        return [m for m in self.sent if isinstance(m, kind)]


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def master(clock):
    m = Master(clock, ip="127.0.0.1", port=5050,
               registrar=Registrar(clock, MemoryRegistry()), allocation_interval=1.0)
    m.start()
    yield m
    m.stop()


def add_agent(master, clock, resources="cpus:4;mem:1024"):
    link = FakeLink()
    master.agent_connected(link)
    master.on_agent_message(link, protocol.RegisterAgent(
        info={"hostname": "h1", "port": 5051, "resources": Resources.parse(resources).to_json()},
        version="test"))
    clock.advance(0)  # the registry write
    return link, link.of(protocol.AgentRegistered)[0].agent_id


def subscribe(master, clock, **info):
    stream = FakeStream()
    fi = master.validate_subscribe({"type": "SUBSCRIBE", "subscribe": {"framework_info": {
        "user": "u", "name": "f", **info}}})
    master.subscribe(fi, stream, "sid")
    clock.advance(0)
    fid = stream.of("SUBSCRIBED")[0]["framework_id"]["value"]
    return stream, master.frameworks[fid]


def launch(master, fw, offer, task_id, cpus=1.0, **task):
    master.accept(fw, {"accept": {"offer_ids": [offer["id"]], "operations": [{
        "type": "LAUNCH", "launch": {"task_infos": [{
            "task_id": {"value": task_id}, "agent_id": offer["agent_id"], "name": task_id,
            "command": {"value": "true"},
            "resources": Resources.parse(f"cpus:{cpus};mem:64").to_json(), **task}]}}]}})


def test_offer_launch_update_acknowledge(master, clock):
    """An offer is accepted, the task goes to the agent, updates flow back and acks go on."""
    link, agent_id = add_agent(master, clock)
    stream, fw = subscribe(master, clock)
    offer = stream.of("OFFERS")[0]["offers"][0]
    assert offer["agent_id"]["value"] == agent_id
    launch(master, fw, offer, "t1")
    run = link.of(protocol.RunTask)[0]
    assert run.task["task_id"]["value"] == "t1" and run.framework["id"]["value"] == fw.id
    uuid = mj.new_uuid()
    master.on_agent_message(link, protocol.StatusUpdate(fw.id, mj.task_status(
        "t1", "TASK_FINISHED", source="SOURCE_EXECUTOR", timestamp=1.0, uuid=uuid)))
    update = stream.of("UPDATE")[-1]["status"]
    assert update["state"] == "TASK_FINISHED" and update["agent_id"]["value"] == agent_id
    master.acknowledge(fw, {"acknowledge": {"agent_id": {"value": agent_id},
                                            "task_id": {"value": "t1"}, "uuid": mj.b64(uuid)}})
    assert link.of(protocol.StatusUpdateAck)[0].uuid == mj.b64(uuid)
    assert "t1" not in fw.tasks and fw.completed_tasks[-1].state == "TASK_FINISHED"


def test_state_statuses_carry_the_latest_health_and_container_status(master, clock):
    """/state's `statuses`: one entry per state, the last with the latest update's health,
    labels and container status (Mesos's model(TaskStatus)); a health change adds none."""
    from master.api.views import legacy_task

    link, agent_id = add_agent(master, clock)
    stream, fw = subscribe(master, clock)
    launch(master, fw, stream.of("OFFERS")[0]["offers"][0], "t1")
    net = {"network_infos": [{"ip_addresses": [{"ip_address": "10.9.0.2"}]}]}
    for healthy in (True, False):
        master.on_agent_message(link, protocol.StatusUpdate(fw.id, mj.task_status(
            "t1", "TASK_RUNNING", source="SOURCE_EXECUTOR", timestamp=2.0, uuid=mj.new_uuid(),
            healthy=healthy, container_status=net)))
    staging, running = legacy_task(fw.tasks["t1"])["statuses"]
    assert staging.keys() == {"state", "timestamp"} and staging["state"] == "TASK_STAGING"
    assert running == {"state": "TASK_RUNNING", "timestamp": 2.0, "healthy": False,
                       "container_status": net}


def test_legacy_resources_form_and_its_cache():
    """Scalars summed over roles, ranges merged, set items united, zero defaults; equal
    Resources get the same (cached) dict."""
    from master.api.views import legacy_resources

    res = Resources.parse("cpus:2;cpus(web):1.5;ports:[31000-31005];ports(web):[31006-31010];"
                          "zones:{b,a};zones(web):{c}")
    assert legacy_resources(res) == {"cpus": 3.5, "mem": 0.0, "disk": 0.0, "gpus": 0.0,
                                     "ports": "[31000-31010]", "zones": "{a, b, c}"}
    assert legacy_resources(Resources.parse(str(res))) is legacy_resources(res)


def test_state_summary_has_frameworks_without_their_tasks(master, clock):
    from master.api.views import legacy_state

    link, agent_id = add_agent(master, clock)
    stream, fw = subscribe(master, clock)
    launch(master, fw, stream.of("OFFERS")[0]["offers"][0], "t1")
    [summary] = legacy_state(master, summary=True)["frameworks"]
    [full] = legacy_state(master)["frameworks"]
    assert "tasks" not in summary and "offers" not in summary
    assert [t["id"] for t in full["tasks"]] == ["t1"]
    assert summary == {k: v for k, v in full.items()
                       if k not in ("tasks", "unreachable_tasks", "completed_tasks", "offers")}


def test_unused_resources_are_reoffered_after_the_filter(master, clock):
    """What an ACCEPT leaves unused returns to the pool, filtered for refuse_seconds."""
    add_agent(master, clock)
    stream, fw = subscribe(master, clock)
    offer = stream.of("OFFERS")[0]["offers"][0]
    launch(master, fw, offer, "t1")
    clock.advance(1.0)
    assert len(stream.of("OFFERS")) == 1  # filtered for the default 5 s
    clock.advance(5.0)
    later = stream.of("OFFERS")[-1]["offers"][0]
    assert Resources.from_json(later["resources"]).scalar("cpus") == pytest.approx(3.0)


def test_invalid_tasks_get_task_error(master, clock):
    """Duplicate ids, a missing agent_id or too many resources give TASK_ERROR with a reason."""
    add_agent(master, clock)
    stream, fw = subscribe(master, clock)
    offer = stream.of("OFFERS")[0]["offers"][0]
    launch(master, fw, offer, "big", cpus=100)
    err = stream.of("UPDATE")[-1]["status"]
    assert err["state"] == "TASK_ERROR" and err["reason"] == "REASON_TASK_INVALID"
    assert "more resources" in err["message"] and "uuid" not in err


def test_a_task_with_an_invalid_health_check_gets_task_error(master, clock):
    """The master validates TaskInfo.health_check as Mesos does: TASK_ERROR naming the field,
    and the task never reaches the agent."""
    link, _ = add_agent(master, clock)
    stream, fw = subscribe(master, clock)
    offer = stream.of("OFFERS")[0]["offers"][0]
    launch(master, fw, offer, "sick", health_check={"type": "HTTP", "http": {"port": 70000}})
    err = stream.of("UPDATE")[-1]["status"]
    assert err["state"] == "TASK_ERROR" and err["reason"] == "REASON_TASK_INVALID"
    assert "invalid health check" in err["message"] and "port" in err["message"]
    assert not link.of(protocol.RunTask)


def test_failover_timeout_removes_framework(master, clock):
    """A disconnected framework is removed when its failover timeout passes, not before."""
    link, _ = add_agent(master, clock)
    stream, fw = subscribe(master, clock, failover_timeout=10)
    launch(master, fw, stream.of("OFFERS")[0]["offers"][0], "t1")
    stream.close()
    clock.advance(9)
    assert fw.id in master.frameworks
    clock.advance(2)
    assert fw.id not in master.frameworks
    assert link.of(protocol.ShutdownFramework)[0].framework_id == fw.id


def test_resubscribe_replaces_stream(master, clock):
    """A re-SUBSCRIBE with the same id closes the old stream and keeps the framework."""
    add_agent(master, clock)
    stream, fw = subscribe(master, clock, failover_timeout=10)
    info = master.validate_subscribe({"subscribe": {"framework_info": {
        "user": "u", "name": "f", "id": {"value": fw.id}}}, "framework_id": {"value": fw.id}})
    second = FakeStream()
    master.subscribe(info, second, "sid2")
    assert stream.closed and not second.closed
    assert master.frameworks[fw.id].connected and master.frameworks[fw.id].stream_id == "sid2"
    with pytest.raises(CallError) as e:
        master.framework_for_call({"framework_id": {"value": fw.id}}, "sid")
    assert e.value.status == 400


def test_agent_ping_timeouts_mark_unreachable(master, clock):
    """An agent that stops answering pings is unreachable; tasks become TASK_LOST."""
    link, agent_id = add_agent(master, clock)
    stream, fw = subscribe(master, clock)
    launch(master, fw, stream.of("OFFERS")[0]["offers"][0], "t1")
    for _ in range(master.max_agent_ping_timeouts + 1):
        clock.advance(master.agent_ping_timeout)
    assert agent_id not in master.agents
    lost = stream.of("UPDATE")[-1]["status"]
    assert lost["state"] == "TASK_LOST" and lost["reason"] == "REASON_AGENT_UNREACHABLE"
    assert stream.of("FAILURE")[-1]["agent_id"]["value"] == agent_id


def test_agent_secret_is_checked(clock):
    """With a secret, a wrong proof is refused and the right one admitted."""
    m = Master(clock, ip="127.0.0.1", port=5050, registrar=Registrar(clock, MemoryRegistry()),
               secret=b"s")
    for given, admitted in ((b"wrong", False), (None, True)):
        link = FakeLink()
        m.agent_connected(link)
        proof = protocol.proof(b"s", link.nonce) if given is None else given
        m.on_agent_message(link, protocol.RegisterAgent(
            info={"hostname": "h", "port": 1, "resources": []}, version="t", proof=proof))
        clock.advance(0)
        assert bool(link.of(protocol.AgentRegistered)) is admitted
        assert bool(link.of(protocol.AgentRefused)) is not admitted


def test_offer_timeout_rescinds(clock):
    """An offer held past --offer-timeout is rescinded and its resources offered again."""
    m = Master(clock, ip="127.0.0.1", port=5050, registrar=Registrar(clock, MemoryRegistry()),
               offer_timeout=30.0)
    m.start()
    add_agent(m, clock)
    stream, fw = subscribe(m, clock)
    offer = stream.of("OFFERS")[0]["offers"][0]
    clock.advance(29)
    assert not stream.of("RESCIND")
    clock.advance(1)
    assert stream.of("RESCIND")[0]["offer_id"] == offer["id"]
    assert offer["id"]["value"] not in m.offers
    clock.advance(1)
    assert len(stream.of("OFFERS")) == 2
    m.stop()


def test_drain_kills_tasks_then_drained_and_gone(master, clock):
    """DRAIN_AGENT stops offers, kills tasks with the grace period, then marks the agent gone."""
    link, agent_id = add_agent(master, clock)
    stream, fw = subscribe(master, clock)
    launch(master, fw, stream.of("OFFERS")[0]["offers"][0], "t1")
    agent = master.agents[agent_id]
    master.drain_agent(agent, 2.0, mark_gone=True)
    kill = link.of(protocol.KillTask)[0]
    assert kill.task_id == "t1" and kill.kill_policy == {"grace_period": {"nanoseconds": 2000000000}}
    assert agent.drain_state == "DRAINING" and not agent.active
    offers_before = len(stream.of("OFFERS"))
    clock.advance(10)
    assert len(stream.of("OFFERS")) == offers_before  # a draining agent is not offered
    master.on_agent_message(link, protocol.StatusUpdate(fw.id, mj.task_status(
        "t1", "TASK_KILLED", source="SOURCE_EXECUTOR", timestamp=1.0, uuid=mj.new_uuid())))
    assert agent_id not in master.agents
    assert link.of(protocol.ShutdownAgent)
    clock.advance(0)  # the registry write
    assert master.registrar.agents()[agent_id][0] == "gone"


def test_deactivate_and_reactivate_agent(master, clock):
    """A deactivated agent gets no offers until it is reactivated."""
    _, agent_id = add_agent(master, clock)
    master.deactivate_agent(master.agents[agent_id])
    stream, fw = subscribe(master, clock)
    clock.advance(2)
    assert not stream.of("OFFERS")
    master.reactivate_agent(master.agents[agent_id])
    clock.advance(0)
    assert stream.of("OFFERS")


@pytest.mark.parametrize("role", ["a//b", "-x", "a/..", "with space", "/lead", "*/x"])
def test_subscribe_rejects_invalid_roles(master, role):
    """SUBSCRIBE with a role Mesos would reject gets 400 with the reason."""
    with pytest.raises(CallError) as e:
        master.validate_subscribe({"subscribe": {"framework_info": {"user": "u", "role": role}}})
    assert e.value.status == 400 and "Invalid role" in e.value.message


def test_subscribe_accepts_hierarchical_roles(master):
    """Roles such as '*', 'eng' and 'eng/web' are accepted."""
    for role in ("*", "eng", "eng/web"):
        master.validate_subscribe({"subscribe": {"framework_info": {"user": "u", "role": role}}})


def test_a_copy_of_a_first_registration_admits_the_agent_once(master, clock):
    """RegisterAgent sent again on its link (unanswered, or crossing the answer) admits one
    agent under one id, and a copy after the answer gets the same AgentRegistered."""
    link = FakeLink()
    master.agent_connected(link)
    msg = protocol.RegisterAgent(
        info={"hostname": "h1", "port": 5051,
              "resources": Resources.parse("cpus:4;mem:1024").to_json()}, version="test")
    master.on_agent_message(link, msg)
    master.on_agent_message(link, msg)
    clock.advance(0)  # the registry write
    master.on_agent_message(link, msg)
    answers = link.of(protocol.AgentRegistered)
    assert len(answers) == 2 and answers[0] == answers[1]
    assert list(master.agents) == [answers[0].agent_id]
    assert list(master.registrar.agents()) == [answers[0].agent_id]
