"""Emulated agents (benchmarks/emulated_agents.py) against a real `agora master` process.

The emulated agents run in a private epoll reactor in a background thread (the global
reactor stays untouched); the master is a real process; schedulers are unmodified pymesos.
"""

import threading

import pytest
from twisted.internet.threads import blockingCallFromThread

from benchmarks.emulated_agents import EmulatedAgents
from tests.cluster import MasterProcess, wait_for
from tests.schedulers import Recorder, start_driver, unique

AGENTS = 20
AGENT_RESOURCES = "cpus:1;mem:256;disk:1000;ports:[31000-31100]"


@pytest.fixture(scope="module")
def reactor():
    """A private epoll reactor in a background thread, shared by the tests of this module."""
    from twisted.internet.epollreactor import EPollReactor

    r = EPollReactor()
    thread = threading.Thread(target=r.run, kwargs={"installSignalHandlers": False},
                              daemon=True, name="emulated-agents")
    thread.start()
    wait_for(lambda: r.running, what="the reactor to run")
    yield r
    r.callFromThread(r.stop)
    thread.join(10)


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    """One master for the tests that do not kill it."""
    m = MasterProcess(tmp_path_factory.mktemp("emulated"), args=("--registry", "in_memory"))
    yield m
    m.stop()


@pytest.fixture
def own_master(tmp_path):
    """A master of the test's own, for a test that kills it."""
    m = MasterProcess(tmp_path, args=("--registry", "in_memory"))
    yield m
    m.stop()


@pytest.fixture
def make_agents(reactor):
    """Starts a pool of emulated agents on a master; stops it after the test."""
    pools = []

    def make(master, count: int = AGENTS, finish_after: float | None = None):
        pool = EmulatedAgents(reactor, (master.host, master.port), count, AGENT_RESOURCES,
                              finish_after, registration_timeout=10.0)
        pools.append(pool)
        blockingCallFromThread(reactor, pool.start)
        return pool

    yield make
    for pool in pools:
        blockingCallFromThread(reactor, pool.stop)


def active_agents(master, pool) -> list:
    ids = {a.agent_id for a in pool.agents}
    return [s for s in master.state()["slaves"] if s["active"] and s["id"] in ids]


def run_driver(sched, master, name):
    driver = start_driver(sched, master.address, name=name)
    assert sched.registered_event.wait(10), "the scheduler did not register"
    return driver


def test_twenty_emulated_agents_register_as_active_agents(master, make_agents):
    """/master/state lists each emulated agent as active, with its hostname and resources."""
    pool = make_agents(master)
    assert pool.registered() == AGENTS
    agents = wait_for(lambda: (lambda a: len(a) == AGENTS and a)(active_agents(master, pool)),
                      what=f"{AGENTS} active agents")
    assert sorted(a["hostname"] for a in agents) == sorted(f"emulated-{i}"
                                                           for i in range(AGENTS))
    assert {a["resources"]["cpus"] for a in agents} == {1.0}


def test_pymesos_tasks_run_then_finish(master, make_agents):
    """pymesos tasks go TASK_RUNNING then TASK_FINISHED, and every update is acknowledged."""
    pool = make_agents(master, finish_after=0.2)
    names = [unique("emu") for _ in range(30)]
    sched = Recorder([(n, "sleep 1000") for n in names])
    driver = run_driver(sched, master, "emulated-run")
    try:
        wait_for(lambda: all(sched.last_state(n) == "TASK_FINISHED" for n in names),
                 timeout=10, what="30 tasks to finish")
        for n in names:
            assert sched.states(n) == ["TASK_RUNNING", "TASK_FINISHED"]
        assert len({u["agent_id"]["value"] for u in sched.updates}) > 1  # spread over agents
        wait_for(lambda: pool.acks == 60, timeout=5, what="60 acks to reach the agents")
        assert pool.launched == 30 and pool.running() == 0 and pool.tasks() == 0
    finally:
        driver.stop()
        driver.join()


def test_killed_task_ends_killed(master, make_agents):
    """KillTask on a running emulated task answers TASK_KILLED; its finish timer is cancelled."""
    pool = make_agents(master, count=2, finish_after=30.0)
    name = unique("kill")
    sched = Recorder([(name, "sleep 1000")])
    driver = run_driver(sched, master, "emulated-kill")
    try:
        wait_for(lambda: sched.last_state(name) == "TASK_RUNNING", what="TASK_RUNNING")
        assert pool.running() == 1
        driver.killTask({"value": name})
        wait_for(lambda: sched.last_state(name) == "TASK_KILLED", what="TASK_KILLED")
        assert pool.running() == 0
        assert not any(a._finish_calls for a in pool.agents)
    finally:
        driver.stop()
        driver.join()


def test_agents_reregister_with_their_tasks_after_a_master_restart(tmp_path, own_master,
                                                                  make_agents):
    """After the master is killed, every agent re-registers with the new one, tasks included."""
    master = own_master
    pool = make_agents(master)
    names = [unique("fo") for _ in range(5)]
    sched = Recorder([(n, "sleep 1000") for n in names])
    driver = run_driver(sched, master, "emulated-failover")
    try:
        wait_for(lambda: all(sched.last_state(n) == "TASK_RUNNING" for n in names),
                 what="5 tasks to run")
        old_id = master.state()["id"]
        master.kill()
        new = MasterProcess(tmp_path, args=("--registry", "in_memory", "--port",
                                            str(master.port)), name="master2")
        try:
            new_id = new.state()["id"]
            assert new_id != old_id
            wait_for(lambda: pool.registered_with(new_id) == AGENTS, timeout=10,
                     what="every agent to re-register")
            state = wait_for(lambda: (lambda s: len(s["slaves"]) == AGENTS and s)(new.state()),
                             what="the new master to list every agent")
            tasks = [t for f in state["frameworks"] for t in f["tasks"]]
            assert sorted(t["id"] for t in tasks) == sorted(names)
            assert {t["state"] for t in tasks} == {"TASK_RUNNING"}
        finally:
            new.stop()
    finally:
        driver.stop()
        driver.join()
