"""Agent recovery through real processes: SIGKILL an agent under a checkpointing pymesos
framework, restart it on the same work dir, and its tasks keep running (`--recover
reconnect`), or are killed (`--recover cleanup`)."""

import os

import pytest

from tests.cluster import AgentProcess, MasterProcess, get_json, processes_with, wait_for
from tests.schedulers import Recorder, start_driver, unique

RESOURCES = "cpus:2;mem:1024;disk:1000"


@pytest.fixture
def master(tmp_path):
    m = MasterProcess(tmp_path)
    yield m
    m.stop()


def start_agent(tmp_path, master, *args):
    return AgentProcess(tmp_path, master.address, ["--resources", RESOURCES, *args])


def task_pids(name: str) -> set:
    """The task's own processes (the command executor does not carry the marker)."""
    return {pid for pid in processes_with(name) if _command(pid).startswith(("sleep", "sh"))}


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def agent_tasks(agent) -> dict:
    state = get_json(agent.url + "/state")
    return {t["id"]: t["state"] for fw in state["frameworks"] for e in fw["executors"]
            for t in e["tasks"]}


def run(sched, name, command):
    with sched.lock:
        sched.pending.append((name, command))


@pytest.fixture
def framework(master):
    sched = Recorder(refuse=0.2)
    driver = start_driver(sched, master.address, name="recovery", checkpoint=True,
                          failover_timeout=60)
    assert sched.registered_event.wait(20), "pymesos did not subscribe"
    yield sched, driver
    driver.stop()
    driver.join()


def test_sigkilled_agent_recovers_its_running_task(tmp_path, master, framework):
    """SIGKILL the agent and restart it with its work dir: the same task process keeps
    running, the master never reports it lost, a task that finished meanwhile gets its
    TASK_FINISHED through, and killing the survivor afterwards works."""
    sched, driver = framework
    agent = start_agent(tmp_path, master)
    long, short = unique("long"), unique("short")
    run(sched, long, "sleep 300")
    run(sched, short, f"while [ ! -e {tmp_path}/go ]; do sleep 0.05; done")
    driver.reviveOffers()
    for name in (long, short):
        wait_for(lambda: sched.last_state(name) == "TASK_RUNNING", 20, what=f"{name} to run")
    pids = task_pids(long)
    assert pids
    agent_id = master.state()["slaves"][0]["id"]
    port = agent.port

    agent.kill()
    (tmp_path / "go").touch()  # the short task finishes while no agent is there
    agent = AgentProcess(tmp_path, master.address, ["--resources", RESOURCES], name="agent")
    try:
        assert agent.port == port  # executors connect back to where they were started
        wait_for(lambda: sched.last_state(short) == "TASK_FINISHED", 20,
                 what="the TASK_FINISHED sent while the agent was down")
        wait_for(lambda: agent_tasks(agent).get(long) == "TASK_RUNNING", 20,
                 what="the agent to know the running task again")
        slaves = master.state()["slaves"]
        assert [(s["id"], s["active"]) for s in slaves] == [(agent_id, True)]
        assert task_pids(long) == pids
        assert sched.states(long) == ["TASK_STARTING", "TASK_RUNNING"]
        assert not sched.failures
        assert "Recovered executor" in agent.tail(200)

        driver.killTask({"value": long})
        wait_for(lambda: sched.last_state(long) == "TASK_KILLED", 20, what="TASK_KILLED")
        wait_for(lambda: not task_pids(long), 10, what="the task's processes to go")
    finally:
        agent.stop()


def test_recover_cleanup_kills_what_the_old_agent_left(tmp_path, master, framework):
    """`--recover cleanup` kills the executors of the SIGKILLed agent and registers anew."""
    sched, driver = framework
    agent = start_agent(tmp_path, master)
    name = unique("left")
    run(sched, name, "sleep 300")
    driver.reviveOffers()
    wait_for(lambda: sched.last_state(name) == "TASK_RUNNING", 20, what="the task to run")
    old_id = master.state()["slaves"][0]["id"]
    agent.kill()
    assert task_pids(name)
    agent = start_agent(tmp_path, master, "--recover", "cleanup")
    try:
        wait_for(lambda: not task_pids(name), 10, what="the leftover task to be killed")
        wait_for(lambda: any(s["id"] != old_id and s["active"]
                             for s in master.state()["slaves"]), 20,
                 what="the agent to register with a new id")
        assert not os.path.exists(os.path.join(agent.work_dir, "meta", "slaves", old_id))
    finally:
        agent.stop()


def test_changed_resources_refuse_to_recover(tmp_path, master, framework):
    """A checkpoint made with other resources is refused with a message naming the fix."""
    sched, driver = framework
    agent = start_agent(tmp_path, master)
    name = unique("res")
    run(sched, name, "sleep 300")
    driver.reviveOffers()
    wait_for(lambda: sched.last_state(name) == "TASK_RUNNING", 20, what="the task to run")
    agent.kill()
    with pytest.raises(AssertionError, match="--recover cleanup"):
        AgentProcess(tmp_path, master.address, ["--resources", "cpus:1;mem:512"],
                     name="agent")
    agent = start_agent(tmp_path, master, "--recover", "cleanup")
    try:
        wait_for(lambda: not task_pids(name), 10, what="the leftover task to be killed")
    finally:
        agent.stop()


def test_recover_attaches_only_to_the_same_process():
    """A live pid with the recorded start time is re-attached and its exit is seen; another
    start time (pid reuse) or a gone pid is not."""
    import subprocess

    from twisted.internet.task import Clock

    from agent.checkpoint import process_start_ticks
    from agent.containerizer.launcher import recover

    class Reactor(Clock):
        def addReader(self, reader):
            self.reader = reader

        def removeReader(self, reader):
            self.reader = None

    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        ticks = process_start_ticks(proc.pid)
        reactor = Reactor()
        assert recover(reactor, "c", proc.pid, ticks + 1, process_start_ticks) is None
        container = recover(reactor, "c", proc.pid, ticks, process_start_ticks)
        assert container is not None and container.running
        exits = []
        container.exited.addCallback(exits.append)
        proc.kill()
        proc.wait()
        reactor.reader.doRead()
        assert exits == [0] and not container.status_known
        assert recover(reactor, "c", proc.pid, ticks, process_start_ticks) is None
    finally:
        proc.kill()
        proc.wait()


def test_recover_agent_reads_the_books_and_skips_completed_runs(tmp_path):
    """The checkpoint layout round-trips: frameworks, executors, their open run and tasks
    with their journals; completed runs and unreadable files are left out."""
    from agent import checkpoint

    work = str(tmp_path)
    assert checkpoint.recover_agent(work) is None
    checkpoint.write_json(checkpoint.agent_path(work), {"agent_id": "S1", "port": 5051})
    checkpoint.write_json(os.path.join(checkpoint.framework_dir(work, "S1", "fw"),
                                       checkpoint.FRAMEWORK_FILE), {"id": {"value": "fw"}})
    checkpoint.write_json(os.path.join(checkpoint.executor_meta_dir(work, "S1", "fw", "e"),
                                       checkpoint.EXECUTOR_FILE),
                          {"info": {"executor_id": {"value": "e"}}, "kind": "command"})
    run = checkpoint.meta_run_dir(work, "S1", "fw", "e", "c1")
    checkpoint.write_json(os.path.join(run, checkpoint.RUN_FILE),
                          {"pid": 42, "start_ticks": 7, "directory": "/sb"})
    checkpoint.write_json(checkpoint.task_info_path(work, "S1", "fw", "e", "c1", "t"),
                          {"info": {"task_id": {"value": "t"}}, "how": "task"})
    status = {"task_id": {"value": "t"}, "state": "TASK_RUNNING", "uuid": "u1"}
    checkpoint.TaskUpdates(checkpoint.task_updates_path(work, "S1", "fw", "e", "c1", "t")
                           ).update("fw", status)
    done = checkpoint.meta_run_dir(work, "S1", "fw", "e", "c0")
    checkpoint.write_json(os.path.join(done, checkpoint.COMPLETED_FILE), {})
    bad = checkpoint.framework_dir(work, "S1", "bad")
    os.makedirs(bad)
    with open(os.path.join(bad, checkpoint.FRAMEWORK_FILE), "w") as f:
        f.write("{not json")
    found = checkpoint.recover_agent(work)
    assert found.agent["agent_id"] == "S1" and list(found.frameworks) == ["fw"]
    assert len(found.errors) == 1 and "bad" in found.errors[0]
    run = found.frameworks["fw"].executors["e"].run
    assert (run.container_id, run.pid, run.start_ticks, run.directory) == ("c1", 42, 7, "/sb")
    assert run.tasks["t"].records[0]["update"]["status"] == status


# A pymesos executor that runs its task until the framework says "finish".
HOLDING_EXECUTOR = """
from pymesos import MesosExecutorDriver, Executor

class Holding(Executor):
    def launchTask(self, driver, task):
        self.task_id = task["task_id"]
        driver.sendStatusUpdate({"task_id": self.task_id, "state": "TASK_RUNNING"})

    def frameworkMessage(self, driver, message):
        driver.sendStatusUpdate({"task_id": self.task_id, "state": "TASK_FINISHED"})

MesosExecutorDriver(Holding(), use_addict=False).run()
"""


def test_pymesos_executor_reconnects_to_the_restarted_agent(tmp_path, master, framework):
    """A checkpointing pymesos executor survives the agent's SIGKILL, re-subscribes to the
    restarted agent and goes on: a framework message through it ends its task."""
    import sys

    sched, driver = framework
    script = tmp_path / "holding_executor.py"
    script.write_text(HOLDING_EXECUTOR)
    eid, name = unique("holding"), unique("held")
    executor = {"executor_id": {"value": eid}, "name": eid,
                "command": {"value": f"{sys.executable} {script}", "environment": {
                    "variables": [{"name": "AGORA_TEST_MARKER", "value": eid}]}},
                "resources": [{"name": "cpus", "type": "SCALAR", "scalar": {"value": 0.1}},
                              {"name": "mem", "type": "SCALAR", "scalar": {"value": 32}}]}
    sched.hold = True
    agent = start_agent(tmp_path, master)
    offer = wait_for(lambda: sched.offers and sched.offers[-1], 20, what="an offer")
    driver.launchTasks(offer["id"], [{"task_id": {"value": name}, "name": name,
                                      "agent_id": offer["agent_id"], "executor": executor,
                                      "resources": executor["resources"]}])
    wait_for(lambda: sched.last_state(name) == "TASK_RUNNING", 20, what="the task to run")
    pids = set(processes_with(eid))
    assert pids
    agent.kill()
    agent = start_agent(tmp_path, master)
    try:
        wait_for(lambda: f"Executor {eid} of framework" in agent.tail(200)
                 and "subscribed" in agent.tail(200), 20, what="the executor to re-subscribe")
        assert set(processes_with(eid)) == pids
        wait_for(lambda: any(s["active"] for s in master.state()["slaves"]), 10,
                 what="the agent to re-register")
        driver.sendFrameworkMessage({"value": eid}, offer["agent_id"], "ZmluaXNo")
        wait_for(lambda: sched.last_state(name) == "TASK_FINISHED", 20,
                 what="TASK_FINISHED from the re-subscribed executor")
        assert not sched.failures
    finally:
        agent.stop()


def test_recovered_executors_that_do_not_come_back_fail_their_tasks(tmp_path, master,
                                                                      framework):
    """After a restart, an executor that is alive but never re-subscribes is killed after
    --executor-reregistration-timeout (REASON_EXECUTOR_REREGISTRATION_TIMEOUT), and one that
    died while the agent was down fails its task (REASON_EXECUTOR_TERMINATED)."""
    import sys

    sched, driver = framework
    sched.hold = True
    mute, dead = unique("mute"), unique("dead")
    resources = [{"name": "cpus", "type": "SCALAR", "scalar": {"value": 0.1}},
                 {"name": "mem", "type": "SCALAR", "scalar": {"value": 32}}]

    def task(offer, name):  # a "custom executor" that never speaks the executor API
        return {"task_id": {"value": name}, "name": name, "agent_id": offer["agent_id"],
                "resources": resources,
                "executor": {"executor_id": {"value": name}, "resources": resources,
                             "command": {"value": f"{sys.executable} -c 'import time; "
                                                  f"time.sleep(300)' {name}"}}}

    agent = start_agent(tmp_path, master)
    offer = wait_for(lambda: sched.offers and sched.offers[-1], 20, what="an offer")
    driver.launchTasks(offer["id"], [task(offer, mute), task(offer, dead)])
    wait_for(lambda: processes_with(mute) and processes_with(dead), 20,
             what="both executors to start")
    agent.kill()
    for pid in processes_with(dead):
        os.kill(pid, 9)
    wait_for(lambda: not processes_with(dead), 10, what="the dead executor to go")
    agent = start_agent(tmp_path, master, "--executor-reregistration-timeout", "1")
    try:
        def final(name):
            with sched.lock:
                return [u for u in sched.updates if u["task_id"]["value"] == name]

        wait_for(lambda: final(dead), 20, what="the dead executor's task to fail")
        [update] = final(dead)
        assert (update["state"], update["reason"]) == ("TASK_FAILED",
                                                       "REASON_EXECUTOR_TERMINATED")
        wait_for(lambda: final(mute), 20, what="the mute executor's task to fail")
        [update] = final(mute)
        assert (update["state"], update["reason"]) == (
            "TASK_FAILED", "REASON_EXECUTOR_REREGISTRATION_TIMEOUT")
        wait_for(lambda: not processes_with(mute), 10, what="the mute executor to be killed")
    finally:
        agent.stop()
