"""The agent's link to the master: registration, secret, Ping/Pong, refusal, reconnects."""

from __future__ import annotations

from twisted.internet.error import ConnectionAborted
from twisted.python.failure import Failure

from agent_harness import agent_reactor, make_cluster, process_alive, wait_for  # noqa: F401

from agora import protocol


def test_agent_registers_with_its_info_and_answers_pings(make_cluster):
    """RegisterAgent carries hostname, port, ip, resources and attributes; Ping gets Pong(seq)."""
    c = make_cluster(attributes="rack:r1;level:2", hostname="node-a")
    assert c.wait_registered() == "fake-S0"
    register = c.master.of(protocol.RegisterAgent)[0]
    info = register.info
    assert info["hostname"] == "node-a" and info["port"] == c.agent.port
    assert info["ip"] == "127.0.0.1"
    names = {r["name"] for r in info["resources"]}
    assert names == {"cpus", "mem", "disk", "ports"}
    assert {"name": "rack", "type": "TEXT", "text": {"value": "r1"}} in info["attributes"]
    assert register.version == "1.11.0" and register.proof == b""
    c.send(protocol.Ping(seq=7))
    wait_for(lambda: protocol.Pong(seq=7) in c.master.messages, what="Pong(7)")


def test_agent_proves_the_shared_secret(make_cluster):
    """With a secret, the registration carries the HMAC of the master's nonce."""
    c = make_cluster(master_options={"secret": b"s3cret"}, secret=b"s3cret")
    c.wait_registered()
    link = c.master.links[0]
    assert c.master.of(protocol.RegisterAgent)[0].proof == protocol.proof(b"s3cret", link.nonce)


def test_refused_agent_stops_connecting(make_cluster):
    """AgentRefused is final: the agent records the reason and does not come back."""
    c = make_cluster(master_options={"refuse": "go away"})
    wait_for(lambda: c.agent.refused == "go away", what="the refusal")
    connections = c.master.connections
    wait_for(lambda: not c.agent.link._running, what="reconnecting to stop")
    assert c.master.connections == connections and not c.agent.registered


def test_reconnect_reregisters_with_the_running_task(make_cluster):
    """After the master drops the link the agent comes back with ReregisterAgent and its task."""
    c = make_cluster()
    c.wait_registered()
    c.run_task("long", "sleep 30")
    c.wait_state("long", "TASK_RUNNING")
    c.call(c.master.drop)
    rereg = wait_for(lambda: c.master.of(protocol.ReregisterAgent), what="ReregisterAgent")[0]
    assert rereg.agent_id == "fake-S0"
    [task] = rereg.tasks
    assert task["task_id"] == {"value": "long"} and task["state"] == "TASK_RUNNING"
    assert task["framework_id"] == {"value": "fw-1"} and task["status"]["state"] == "TASK_RUNNING"
    info = protocol.unpacked(task["info"])  # packed, as protocol.task_entry says
    assert info["task_id"] == {"value": "long"}
    assert protocol.unpacked(task["resources"]) == info["resources"]
    assert rereg.frameworks[0]["id"] == {"value": "fw-1"}
    assert rereg.executors == []  # a command executor is the agent's business, not the master's
    wait_for(lambda: c.agent.registered, what="re-registration")
    # The task kept running through it all.
    assert process_alive(c.executor_pid("long"))


def test_unacked_updates_are_resent_after_a_reconnect(make_cluster):
    """An update the master never acked goes out again as soon as the agent is back."""
    c = make_cluster(master_options={"auto_ack": False}, status_update_retry=60)
    c.wait_registered()
    c.run_task("t", "true")
    first = c.wait_state("t", "TASK_STARTING")
    c.call(c.master.drop)
    wait_for(lambda: c.master.of(protocol.ReregisterAgent), what="ReregisterAgent")
    wait_for(lambda: [s for s in c.master.updates("t") if s["uuid"] == first["uuid"]][1:],
             what="the STARTING update to be re-sent")


def test_silent_master_is_dropped_and_reconnected(make_cluster):
    """With a ping interval, a master that says nothing for 5 intervals gets a new connection."""
    c = make_cluster(master_options={"ping_interval": 0.1})
    c.wait_registered()
    wait_for(lambda: c.master.connections >= 2, what="a reconnect after silence")


def test_shutdown_agent_kills_everything_and_stops_connecting(make_cluster):
    """ShutdownAgent: the agent's tasks are killed, and it does not reconnect."""
    c = make_cluster()
    c.wait_registered()
    c.run_task("doomed", "sleep 100")
    c.wait_state("doomed", "TASK_RUNNING")
    pid = c.executor_pid("doomed")
    c.send(protocol.ShutdownAgent(message="removed by the operator"))
    wait_for(lambda: c.agent.refused == "removed by the operator", what="the shutdown")
    wait_for(lambda: not process_alive(pid), what="the task's executor to be gone")
    assert c.master.connections == 1 and not c.agent.registered


def test_new_leader_gets_the_reregistration_and_the_old_link_goes(make_cluster, agent_reactor):
    """Told of a new leading master, the agent closes the old link at once and re-registers
    with the new master, its running task included."""
    from agent_harness import FakeMaster

    c = make_cluster()
    c.wait_registered()
    c.run_task("long", "sleep 30")
    c.wait_state("long", "TASK_RUNNING")
    other = FakeMaster(agent_reactor)
    port = c.call(other.start)
    try:
        c.call(c.agent._leader, "127.0.0.1", port)
        rereg = wait_for(lambda: other.of(protocol.ReregisterAgent), what="ReregisterAgent")[0]
        assert rereg.agent_id == "fake-S0"
        assert [t["task_id"]["value"] for t in rereg.tasks] == ["long"]
        wait_for(lambda: not c.master.link.connected, what="the old link to close")
        wait_for(lambda: c.agent.registered, what="registration with the new master")
        assert c.agent.master_address == ("127.0.0.1", port)
    finally:
        c.call(other.stop)


def test_an_ignored_reregistration_is_retried_within_seconds(make_cluster):
    """A master that ignores a ReregisterAgent (a leader that does not know it leads yet)
    costs the agent about a second, not the whole registration timeout."""
    c = make_cluster(master_options={"ignore": 0})
    c.wait_registered()
    c.master.ignore = 1
    c.call(c.master.drop)
    wait_for(lambda: len(c.master.of(protocol.ReregisterAgent)) >= 2, 4,
             what="a second ReregisterAgent")
    wait_for(lambda: c.agent.registered, what="re-registration")
    assert c.master.connections == 2  # the copy came on the same connection


# --- MasterLink alone, on a fake clock and in-memory transports -----------------------------

def _link_under_test(registration, **options):
    """A started MasterLink on a MemoryReactorClock; (reactor, MasterLink, registered list)."""
    from twisted.internet.testing import MemoryReactorClock

    from agent.master_link import MasterLink

    reactor, registered = MemoryReactorClock(), []
    link = MasterLink(reactor, "127.0.0.1", 5050, registration=registration,
                      on_registered=registered.append, on_message=lambda msg: None, **options)
    link.start()
    return reactor, link, registered


def _accept(reactor):
    """Make the latest connection: (the agent's Link, its in-memory transport)."""
    from twisted.internet.testing import StringTransport

    factory = reactor.tcpClients[-1][2]
    proto, transport = factory.buildProtocol(None), StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def _sent(transport):
    data = transport.value()
    assert data.startswith(protocol.PREFIX)
    return protocol.Decoder().feed(data[len(protocol.PREFIX):])


def test_an_unanswered_registration_is_sent_again_on_the_same_connection():
    """No answer within 1 s, then 2 s: the registration goes again on the same link (the
    master keeps its place in the queue); once answered, nothing more is sent."""
    reg = protocol.ReregisterAgent(agent_id="a1", info={}, version="1.11.0")
    reactor, link, registered = _link_under_test(lambda challenge: reg)
    proto, transport = _accept(reactor)
    proto.dataReceived(protocol.encode([protocol.Challenge(nonce=b"n", master_id="m")]))
    reactor.advance(0)
    assert _sent(transport) == [reg]
    reactor.advance(1.0)
    reactor.advance(0)
    assert _sent(transport) == [reg, reg]
    reactor.advance(1.9)
    reactor.advance(0)
    assert _sent(transport) == [reg, reg]  # the second wait is 2 s
    reactor.advance(0.1)
    reactor.advance(0)
    assert _sent(transport) == [reg, reg, reg]
    assert len(reactor.tcpClients) == 1 and not transport.disconnecting
    proto.dataReceived(protocol.encode([protocol.AgentRegistered("a1", "m", 0.0)]))
    reactor.advance(100)
    assert _sent(transport) == [reg, reg, reg] and registered and link.registered


def test_a_master_that_never_challenges_gets_a_new_connection():
    """A link on which the Challenge does not arrive within the whole registration timeout
    (10 s: a busy master may take seconds to get to it) is dropped."""
    reactor, link, _ = _link_under_test(lambda challenge: None)
    proto, transport = _accept(reactor)
    reactor.advance(9.9)
    assert not transport.disconnecting
    reactor.advance(0.1)
    assert transport.disconnecting or transport.disconnected


def test_a_leading_master_is_given_the_whole_timeout_before_a_copy():
    """A master whose Challenge says it leads answers however long its queue: the agent
    sends no copy for 10 s (a busy new leader is not sent thousands of them)."""
    reg = protocol.ReregisterAgent(agent_id="a1", info={}, version="1.11.0")
    reactor, link, _ = _link_under_test(lambda challenge: reg)
    proto, transport = _accept(reactor)
    proto.dataReceived(protocol.encode([protocol.Challenge(b"n", "m", leading=True)]))
    reactor.advance(0)
    reactor.advance(9.9)
    reactor.advance(0)
    assert _sent(transport) == [reg]
    reactor.advance(0.1)
    reactor.advance(0)
    assert _sent(transport) == [reg, reg] and len(reactor.tcpClients) == 1


def test_a_new_leader_is_reached_after_a_random_share_of_the_spread():
    """Told of a new leader, the agent drops the old link at once and connects within
    NEW_MASTER_SPREAD (here after 0.3 of it), so that 10,000 agents do not all arrive in the
    same instant; the new link re-registers."""
    reg = protocol.ReregisterAgent(agent_id="a1", info={}, version="1.11.0")
    reactor, link, _ = _link_under_test(lambda challenge: reg, rand=lambda: 0.3)
    proto, transport = _accept(reactor)
    proto.dataReceived(protocol.encode([protocol.Challenge(b"n", "m", leading=True)]))
    proto.dataReceived(protocol.encode([protocol.AgentRegistered("a1", "m", 0.0)]))
    link.set_master("127.0.0.2", 5050)
    assert transport.disconnecting or transport.disconnected
    proto.connectionLost(Failure(ConnectionAborted()))
    reactor.advance(0.29)
    assert len(reactor.tcpClients) == 1 and not link.registered
    reactor.advance(0.01)
    assert reactor.tcpClients[-1][:2] == ("127.0.0.2", 5050) and len(reactor.tcpClients) == 2


def test_a_new_leader_during_a_connection_attempt_gets_one_connection():
    """Told of a new leader while still trying the old one, the agent abandons that attempt
    and makes exactly one connection to the new leader."""
    reactor, link, _ = _link_under_test(lambda challenge: None, rand=lambda: 0.5)
    connector = reactor.connectors[-1]
    link._connector = connector  # MemoryReactor's connectors report no state of their own
    connector.state = "connecting"
    connector.stopConnecting = lambda: link._connection_failed(Failure(ConnectionAborted()))
    link.set_master("127.0.0.2", 5050)
    reactor.advance(5)
    assert [c[:2] for c in reactor.tcpClients] == [("127.0.0.1", 5050), ("127.0.0.2", 5050)]


def test_a_second_challenge_as_a_follower_gets_the_registration_again_and_short_waits():
    """A master that challenged as leader and then cannot answer challenges again as a
    follower: the agent sends its registration at once, then again after 1 s, not 10 s."""
    reg = protocol.ReregisterAgent(agent_id="a1", info={}, version="1.11.0")
    reactor, link, _ = _link_under_test(lambda challenge: reg)
    proto, transport = _accept(reactor)
    proto.dataReceived(protocol.encode([protocol.Challenge(b"n", "m", leading=True)]))
    reactor.advance(0)
    proto.dataReceived(protocol.encode([protocol.Challenge(b"n", "m", leading=False)]))
    reactor.advance(0)
    assert _sent(transport) == [reg, reg]
    reactor.advance(1.0)
    reactor.advance(0)
    assert _sent(transport) == [reg, reg, reg]
