"""Master failover with a fake clock: a new leader takes over from the registry.

The "old" and "new" leaders are two `Master`s sharing one MemoryRegistry (the fake that passes
the same interface tests as the SQLite and ZooKeeper registries, tests/test_registry.py).
"""

import attrs
import pytest
from twisted.internet.task import Clock

from agora import mesos_json as mj
from agora import protocol
from agora.resources import Resources
from master.api.views import legacy_task
from master.master import Master
from master.registrar import MemoryRegistry, Registrar
from tests.test_master_unit import FakeLink, FakeStream, add_agent, launch, subscribe

REREGISTER = 30.0


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def registry():
    return MemoryRegistry()


def new_master(clock, registry, recover=True):
    m = Master(clock, ip="127.0.0.1", port=5050, registrar=Registrar(clock, registry),
               allocation_interval=1.0, agent_reregister_timeout=REREGISTER)
    if recover:
        loaded = []
        registry.load().addCallback(loaded.append)
        m.recover(loaded[0])
    m.start()
    return m


@pytest.fixture
def old(clock, registry):
    """A leader with one agent and two frameworks (one PARTITION_AWARE), a task each."""
    m = new_master(clock, registry, recover=False)
    link, agent_id = add_agent(m, clock)
    s1, fw1 = subscribe(m, clock, failover_timeout=60)
    s2, fw2 = subscribe(m, clock, failover_timeout=600,
                        capabilities=[{"type": "PARTITION_AWARE"}])
    for stream, fw, tid in ((s1, fw1, "t1"), (s2, fw2, "t2")):
        offers = stream.of("OFFERS")
        if not offers:
            m.revive(fw, {})
            clock.advance(1)
            offers = stream.of("OFFERS")
        launch(m, fw, offers[-1]["offers"][0], tid)
        m.on_agent_message(link, protocol.StatusUpdate(fw.id, mj.task_status(
            tid, "TASK_RUNNING", source="SOURCE_EXECUTOR", timestamp=1.0, uuid=mj.new_uuid())))
    m.stop()  # the old leader is gone: its links and streams close
    return m, agent_id, fw1, fw2


def reregistration(agent_id, tasks, frameworks, hostname="h1"):
    return protocol.ReregisterAgent(
        agent_id=agent_id, version="test",
        info={"hostname": hostname, "port": 5051,
              "resources": Resources.parse("cpus:4;mem:1024").to_json()},
        tasks=[{"task_id": {"value": tid}, "framework_id": {"value": fw.id},
                "executor_id": {"value": tid}, "state": "TASK_RUNNING",
                "resources": Resources.parse("cpus:1;mem:64").to_json()}
               for tid, fw in tasks],
        frameworks=[fw.info for fw in frameworks])


def reregister(master, clock, agent_id, tasks, frameworks):
    link = FakeLink()
    master.agent_connected(link)
    master.on_agent_message(link, reregistration(agent_id, tasks, frameworks))
    clock.advance(0)  # the registry write
    return link


def resubscribe(master, clock, fw):
    stream = FakeStream()
    info = master.validate_subscribe({"subscribe": {"framework_info": fw.info},
                                      "framework_id": {"value": fw.id}})
    master.subscribe(info, stream, "sid-new")
    clock.advance(0)
    return stream


def reconcile(master, fw, stream, *items):
    before = len(stream.of("UPDATE"))
    master.reconcile(fw, {"reconcile": {"tasks": [
        {"task_id": {"value": tid}, **({"agent_id": {"value": aid}} if aid else {})}
        for tid, aid in items]}})
    return [(u["status"]["task_id"]["value"], u["status"]["state"])
            for u in stream.of("UPDATE")[before:]]


def test_a_new_framework_is_in_the_registry_before_it_is_subscribed(clock, registry):
    """SUBSCRIBED (with the new id) is sent only once the framework is durable."""
    m = new_master(clock, registry)
    stream = FakeStream()
    info = m.validate_subscribe({"subscribe": {"framework_info": {
        "user": "u", "name": "f", "failover_timeout": 5}}})
    m.subscribe(info, stream, "sid")
    assert stream.of("SUBSCRIBED") == [] and registry.records["frameworks"] == {}
    clock.advance(0)
    fid = stream.of("SUBSCRIBED")[0]["framework_id"]["value"]
    assert registry.records["frameworks"][fid]["info"]["failover_timeout"] == 5
    m.stop()


def test_frameworks_that_do_not_come_back_are_removed_after_their_failover_timeout(
        clock, registry, old):
    """A new leader recreates registered frameworks disconnected; each is removed (and
    leaves the registry) when its own failover_timeout runs out."""
    _, _, fw1, fw2 = old
    m = new_master(clock, registry)
    assert {fw1.id, fw2.id} <= set(m.frameworks)
    assert not m.frameworks[fw1.id].connected
    assert m.frameworks[fw1.id].info["failover_timeout"] == 60
    clock.advance(61)
    assert fw1.id not in m.frameworks and fw1.id not in registry.records["frameworks"]
    assert fw2.id in m.frameworks
    m.stop()


def test_a_framework_resubscribes_with_its_registry_id(clock, registry, old):
    """The new leader accepts the returning id, answers SUBSCRIBED with it, and the failover
    timer stops; a torn-down framework leaves the registry."""
    _, _, fw1, _ = old
    m = new_master(clock, registry)
    stream = resubscribe(m, clock, fw1)
    assert stream.of("SUBSCRIBED")[0]["framework_id"]["value"] == fw1.id
    clock.advance(120)
    fw = m.frameworks[fw1.id]
    assert fw.connected and fw.name == "f"
    m.teardown(fw)
    clock.advance(0)
    assert fw1.id not in registry.records["frameworks"]
    m.stop()


def test_agent_that_reregisters_in_time_keeps_its_tasks(clock, registry, old):
    """An admitted agent back within the timeout brings its tasks; nothing is marked
    unreachable when the timeout passes."""
    _, agent_id, fw1, fw2 = old
    m = new_master(clock, registry)
    s1 = resubscribe(m, clock, fw1)
    reregister(m, clock, agent_id, [("t1", fw1), ("t2", fw2)], [fw1, fw2])
    clock.advance(REREGISTER + 1)
    assert agent_id in m.agents and registry.agents[agent_id][0] == "admitted"
    assert m.frameworks[fw1.id].tasks["t1"].state == "TASK_RUNNING"
    assert reconcile(m, m.frameworks[fw1.id], s1, ("t1", agent_id)) == [("t1", "TASK_RUNNING")]
    m.stop()


def test_packed_task_infos_are_read_when_shown_and_garbage_is_no_crash(clock, registry, old):
    """Tasks re-registered as `protocol.task_entry` keep their TaskInfo packed: the
    resources count at once, the name and labels show in the views (the latest status as
    /state's history); an entry whose packed TaskInfo is not one is kept with its resources
    and shows an empty TaskInfo."""
    _, agent_id, fw1, _ = old
    m = new_master(clock, registry)
    resubscribe(m, clock, fw1)
    cpus = Resources.parse("cpus:1;mem:64").to_json()
    good = protocol.task_entry("t1", fw1.id, "t1", "TASK_RUNNING", {
        "name": "web", "task_id": mj.ident("t1"), "resources": cpus,
        "labels": {"labels": [{"key": "tier", "value": "front"}]}}, mj.task_status(
        "t1", "TASK_RUNNING", source="SOURCE_EXECUTOR", timestamp=5.0, healthy=True))
    bad = dict(protocol.task_entry("t9", fw1.id, "t9", "TASK_RUNNING", {"resources": cpus}),
               info=b"\xc1 not msgpack")
    msg = reregistration(agent_id, [], [fw1])
    link = FakeLink()
    m.agent_connected(link)
    m.on_agent_message(link, attrs.evolve(msg, tasks=[good, bad]))
    clock.advance(0)
    tasks = m.frameworks[fw1.id].tasks
    assert isinstance(tasks["t1"]._info, bytes)  # nothing read it yet
    assert m.agents[agent_id].used() == {fw1.id: Resources.parse("cpus:2;mem:128")}
    view = m.task_view(tasks["t1"])
    assert view["name"] == "web" and view["labels"]["labels"][0]["value"] == "front"
    assert m.task_view(tasks["t9"])["name"] == "" and tasks["t9"].info == {}
    shown = legacy_task(tasks["t1"])  # no history here: the latest status stands for it
    assert shown["labels"] == {"labels": [{"key": "tier", "value": "front"}]}
    assert shown["statuses"] == [{"state": "TASK_RUNNING", "timestamp": 5.0, "healthy": True}]
    m.stop()


@pytest.mark.parametrize("entry, says", [
    ({"task_id": {"value": "t1"}, "resources": [{"name": "cpus", "type": "SCALAR",
                                                  "scalar": {"value": "lots"}}]},
     "task 't1': resources[0]: resource 'cpus': 'lots' is not a number"),
    ({"task_id": {"value": "t2"}, "info": b"\xc1"}, "undecodable bytes"),
    ("not an entry", "task entry 'not an entry' is not an object"),
])
def test_a_reregistration_with_an_invalid_task_is_refused_saying_which(
        clock, registry, old, entry, says):
    """Nothing is admitted: the agent is told why (AgentRefused) and the link closed."""
    _, agent_id, fw1, _ = old
    m = new_master(clock, registry)
    link = FakeLink()
    m.agent_connected(link)
    m.on_agent_message(link, attrs.evolve(reregistration(agent_id, [], [fw1]), tasks=[entry]))
    clock.advance(0)
    [refused] = link.of(protocol.AgentRefused)
    assert refused.message.startswith("Invalid re-registration: ") and says in refused.message
    assert not link.connected and not link.of(protocol.AgentRegistered)
    assert agent_id not in m.agents  # still awaited from the registry, not admitted
    m.stop()


def test_agents_not_back_within_the_timeout_are_unreachable(clock, registry, old):
    """Past --agent-reregister-timeout the agent is unreachable (in the registry too);
    when it returns, tasks of frameworks that are not PARTITION_AWARE are killed."""
    _, agent_id, fw1, fw2 = old
    m = new_master(clock, registry)
    s1, s2 = resubscribe(m, clock, fw1), resubscribe(m, clock, fw2)
    clock.advance(REREGISTER + 1)
    assert registry.agents[agent_id][0] == "unreachable"
    assert s1.of("FAILURE")[0]["agent_id"]["value"] == agent_id
    f1, f2 = m.frameworks[fw1.id], m.frameworks[fw2.id]
    assert reconcile(m, f1, s1, ("t1", agent_id)) == [("t1", "TASK_LOST")]
    assert reconcile(m, f2, s2, ("t2", agent_id)) == [("t2", "TASK_UNREACHABLE")]
    link = reregister(m, clock, agent_id, [("t1", fw1), ("t2", fw2)], [fw1, fw2])
    assert [s.framework_id for s in link.of(protocol.ShutdownFramework)] == [fw1.id]
    assert reconcile(m, f2, s2, ("t2", agent_id)) == [("t2", "TASK_RUNNING")]
    m.stop()


def test_reconciliation_waits_for_agents_that_may_still_reregister(clock, registry, old):
    """During the re-register window the master does not answer for tasks it does not
    know that may be on a recovering agent (or on no named agent); implicit reconciliation
    sends only what it knows. After the agent is back it answers."""
    _, agent_id, fw1, fw2 = old
    m = new_master(clock, registry)
    s1, s2 = resubscribe(m, clock, fw1), resubscribe(m, clock, fw2)
    f1, f2 = m.frameworks[fw1.id], m.frameworks[fw2.id]
    assert reconcile(m, f1, s1, ("t1", agent_id), ("t1", None)) == []
    assert reconcile(m, f2, s2, ("t2", agent_id)) == []
    assert reconcile(m, f2, s2) == []  # implicit: nothing known yet
    assert reconcile(m, f2, s2, ("x", "no-such-agent")) == [("x", "TASK_UNKNOWN")]
    reregister(m, clock, agent_id, [("t1", fw1), ("t2", fw2)], [fw1, fw2])
    assert reconcile(m, f2, s2) == [("t2", "TASK_RUNNING")]
    assert reconcile(m, f2, s2, ("x", agent_id)) == [("x", "TASK_GONE")]
    assert reconcile(m, f1, s1, ("x", None)) == [("x", "TASK_LOST")]
    m.stop()


def test_a_gone_agent_stays_refused_after_failover(clock, registry, old):
    """An agent marked gone by the old leader cannot re-register with the new one."""
    old_master, agent_id, _, _ = old
    registry.records["agents"][agent_id] = ("gone", registry.agents[agent_id][1])
    m = new_master(clock, registry)
    link = reregister(m, clock, agent_id, [], [])
    assert link.of(protocol.AgentRefused) and agent_id not in m.agents
    m.stop()


def test_weights_are_recovered(clock, registry):
    """Role weights in the registry are set in the new leader's allocator."""
    registry.records["weights"]["eng"] = 3.0
    m = new_master(clock, registry)
    assert m.allocator.weights() == {"eng": 3.0}
    m.stop()


def test_update_weights_is_durable_then_applied_and_survives_failover(clock, registry):
    """UPDATE_WEIGHTS writes the registry before the allocator changes; a new leader has the
    weights; bad weights are refused with a 400 that says why."""
    from master.api.views import roles
    from master.master import CallError

    m = new_master(clock, registry)
    done = []
    m.update_weights([{"role": "eng", "weight": 2.5}]).addCallback(done.append)
    assert not done and "eng" not in m.allocator.weights()
    clock.advance(0)
    assert done and m.allocator.weights() == {"eng": 2.5}
    assert registry.records["weights"] == {"eng": 2.5}
    for bad in ([{"role": "eng", "weight": 0}], [{"weight": 1}], "x"):
        with pytest.raises(CallError) as e:
            m.update_weights(bad)
        assert e.value.status == 400
    m.stop()
    m2 = new_master(clock, registry)
    assert m2.allocator.weights() == {"eng": 2.5}
    _, fw = subscribe(m2, clock, role="eng")
    assert [r["weight"] for r in roles(m2) if r["name"] == "eng"] == [2.5]
    m2.stop()


def test_get_agents_lists_agents_expected_to_reregister(clock, registry, old):
    """GET_AGENTS' recovered_agents holds the agents the registry knows that have not come
    back yet; they leave it when they re-register."""
    from master.api.views import v1_agents

    _, agent_id, fw1, fw2 = old
    m = new_master(clock, registry)
    assert [a["id"]["value"] for a in v1_agents(m)["recovered_agents"]] == [agent_id]
    reregister(m, clock, agent_id, [], [])
    assert v1_agents(m)["recovered_agents"] == []
    m.stop()


def test_an_elected_master_serves_only_once_it_has_read_the_registry(clock):
    """Between election and the end of the registry read the master does not lead (API
    calls get 503) and agent registrations are held, then handled once it has recovered."""
    import types

    from twisted.internet import defer

    from master.service import MasterService

    svc = MasterService(clock, zk="zk://127.0.0.1:1/agora", registry="in_memory")
    pending = defer.Deferred()
    svc.registry.load = lambda: pending
    svc.election = types.SimpleNamespace(leading=True, leader=None)
    svc._leading_changed(True)
    assert not svc.leading
    held = []
    assert svc._after_recovery(lambda: held.append("registration"))
    pending.callback({"agents": {}, "frameworks": {}, "weights": {}})
    assert held == ["registration"] and svc.leading
    assert not svc._after_recovery(lambda: None)
    svc.master.stop()


def test_copies_of_a_reregistration_are_not_taken_again(clock, registry, old):
    """Copies of a ReregisterAgent on its link (the agent re-sends an unanswered one) are
    dropped while it is in flight and answered again once it is done: one re-registration."""
    _, agent_id, fw1, fw2 = old
    m = new_master(clock, registry)
    link = FakeLink()
    m.agent_connected(link)
    msg = reregistration(agent_id, [("t1", fw1), ("t2", fw2)], [fw1, fw2], hostname="h2")
    m.on_agent_message(link, msg)  # its info changed: a registry write is on its way
    m.on_agent_message(link, msg)
    clock.advance(0)
    assert len(link.of(protocol.AgentRegistered)) == 1
    task = m.frameworks[fw1.id].tasks["t1"]
    m.on_agent_message(link, msg)  # crossed the answer
    assert [r.agent_id for r in link.of(protocol.AgentRegistered)] == [agent_id] * 2
    assert m.metrics["slave_reregistrations"] == 1 and m.metrics["dropped_registrations"] == 2
    assert m.frameworks[fw1.id].tasks["t1"] is task
    m.stop()


def ha_service(clock, leading: bool, load=None):
    """A MasterService with --zk whose election says `leading` (and the registry `load()`)."""
    import types

    from master.service import MasterService

    svc = MasterService(clock, zk="zk://127.0.0.1:1/agora", registry="in_memory")
    if load is not None:
        svc.registry.load = load
    svc.election = types.SimpleNamespace(leading=leading, leader=None)
    if leading:
        svc._leading_changed(True)
    return svc


def agent_link(svc, clock):
    """A connection from an agent to the service's agent port: (its link, the Challenge)."""
    from twisted.internet.testing import StringTransport

    from master.service import AgentLinkFactory

    factory = AgentLinkFactory(svc.master, lambda: svc.leading, svc._after_recovery,
                               answering=svc._answering)
    link, transport = factory.buildProtocol(None), StringTransport()
    link.makeConnection(transport)
    clock.advance(0)
    [challenge] = protocol.Decoder().feed(transport.value())
    return link, challenge


def test_registrations_held_for_the_registry_are_held_once_per_link(clock):
    """While the elected master reads its registry, an agent's copies of the registration it
    holds are dropped; the registration is handled once, after recovery."""
    from twisted.internet import defer

    pending = defer.Deferred()
    svc = ha_service(clock, True, load=lambda: pending)
    link, challenge = agent_link(svc, clock)
    assert challenge.leading  # elected: it will answer, the agent need not send copies
    register = protocol.RegisterAgent(
        info={"hostname": "h1", "port": 5051,
              "resources": Resources.parse("cpus:4;mem:1024").to_json()}, version="test")
    link.dataReceived(protocol.PREFIX + protocol.encode([register, register]))
    link.dataReceived(protocol.encode([register]))
    assert svc.master.metrics["dropped_registrations"] == 2 and not svc.master.agents
    pending.callback({"agents": {}, "frameworks": {}, "weights": {}})
    clock.advance(0)  # the registry write
    assert len(svc.master.agents) == 1 and svc.master.metrics["slave_registrations"] == 1
    svc.master.stop()


def test_a_follower_challenges_as_a_follower_and_ignores_registrations(clock):
    """A follower's Challenge says it does not lead (the agent then re-sends after a second,
    in case it leads by then); the registration is ignored, as Mesos does."""
    svc = ha_service(clock, False)
    link, challenge = agent_link(svc, clock)
    assert not challenge.leading
    link.dataReceived(protocol.PREFIX + protocol.encode([protocol.RegisterAgent(
        info={"hostname": "h1", "port": 5051, "resources": []}, version="test")]))
    clock.advance(0)
    assert not svc.master.agents and not svc.master.registrar.agents()


def test_the_collector_rests_while_the_registry_s_agents_come_back(clock):
    """A new leader turns the cyclic collector off until the agents it expects are back (or
    GC_PAUSE_MAX has passed), then freezes what they brought and turns it on again."""
    import gc

    from twisted.internet import defer

    from master import service

    info = {"hostname": "h1", "port": 5051, "ip": "127.0.0.1",
            "resources": Resources.parse("cpus:4;mem:1024").to_json()}
    records = {"agents": {"a1": ("admitted", info), "a2": ("admitted", info)},
               "frameworks": {}, "weights": {}}
    try:
        for comes_back in (True, False):
            svc = ha_service(clock, True, load=lambda: defer.succeed(records))
            assert not gc.isenabled() and svc.master.awaited_agents == 2
            if comes_back:
                for agent_id in ("a1", "a2"):
                    link = FakeLink()
                    svc.master.agent_connected(link)
                    svc.master.on_agent_message(link, protocol.ReregisterAgent(
                        agent_id=agent_id, info=info, version="test"))
                clock.advance(service.GC_PAUSE_CHECK)
            else:
                clock.advance(service.GC_PAUSE_MAX - service.GC_PAUSE_CHECK)
                assert not gc.isenabled()
                clock.advance(service.GC_PAUSE_CHECK)
            assert gc.isenabled(), comes_back
            svc.master.stop()
    finally:
        gc.enable()
        gc.unfreeze()


def test_a_leader_that_stops_leading_tells_agents_it_challenged_as_leader(clock):
    """A registration that a leader must ignore (its ZooKeeper session is suspended) is not
    left to the agent's 10 s wait: the link is challenged again as a follower's, once."""
    svc = ha_service(clock, True)
    link, challenge = agent_link(svc, clock)
    assert challenge.leading and svc.leading
    svc.election.leading = False  # suspended
    register = protocol.RegisterAgent(
        info={"hostname": "h1", "port": 5051, "resources": []}, version="test")
    link.dataReceived(protocol.PREFIX + protocol.encode([register]))
    link.dataReceived(protocol.encode([register]))
    clock.advance(0)
    sent = protocol.Decoder().feed(link.transport.value())
    assert sent == [challenge, protocol.Challenge(challenge.nonce, challenge.master_id)]
    assert not svc.master.agents
    svc.master.stop()
