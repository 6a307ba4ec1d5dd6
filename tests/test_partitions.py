"""Agent partitions end to end (issue 5 item 5): cut an agent off past the ping timeout by
SIGSTOP-ing it, then heal it with SIGCONT. Mesos semantics: a PARTITION_AWARE framework sees
TASK_UNREACHABLE and, after the agent returns, TASK_RUNNING through reconciliation; any other
framework sees TASK_LOST and its tasks on the agent are killed when it returns."""

import os
import signal

from tests.cluster import AgentProcess, MasterProcess, processes_with, wait_for
from tests.schedulers import Recorder, start_driver, unique


def reconcile(driver, sched, name: str, agent_id: str) -> str:
    """Explicitly reconcile one task; the state of the answer."""
    before = len(sched.updates)
    driver.reconcileTasks([{"task_id": {"value": name}, "agent_id": {"value": agent_id}}])
    wait_for(lambda: len(sched.updates) > before, 5, what="a reconciliation answer")
    update = sched.updates[-1]
    assert update["task_id"]["value"] == name and update["reason"] == "REASON_RECONCILIATION"
    return update["state"]


def test_partition_then_heal(tmp_path):
    """SIGSTOP the agent past the ping timeout, then SIGCONT it; check both frameworks' views."""
    master = MasterProcess(tmp_path, args=["--agent-ping-timeout", "0.3",
                                           "--max-agent-ping-timeouts", "3"])
    agent = AgentProcess(tmp_path, master.address, args=["--resources", "cpus:2;mem:1024"])
    aware_name, plain_name = unique("aware"), unique("plain")
    aware = Recorder([(aware_name, "sleep 300")])
    plain = Recorder([(plain_name, "sleep 300")])
    drivers = []
    stopped = False
    try:
        drivers.append(start_driver(aware, master.address, name="aware",
                                    capabilities=[{"type": "PARTITION_AWARE"}]))
        drivers.append(start_driver(plain, master.address, name="plain"))
        wait_for(lambda: aware.last_state(aware_name) == "TASK_RUNNING"
                 and plain.last_state(plain_name) == "TASK_RUNNING", what="both tasks RUNNING")
        aware_pids, plain_pids = processes_with(aware_name), processes_with(plain_name)
        assert aware_pids and plain_pids
        agent_id = master.state()["slaves"][0]["id"]

        agent.send_signal(signal.SIGSTOP)
        stopped = True
        wait_for(lambda: aware.last_state(aware_name) == "TASK_UNREACHABLE"
                 and plain.last_state(plain_name) == "TASK_LOST", 15,
                 what="TASK_UNREACHABLE and TASK_LOST")
        assert not master.state()["slaves"]
        assert ("agent", {"value": agent_id}) in aware.failures
        # The executors ran on while the agent was cut off.
        assert all(os.path.exists(f"/proc/{p}") for p in aware_pids + plain_pids)
        assert reconcile(drivers[0], aware, aware_name, agent_id) == "TASK_UNREACHABLE"
        assert reconcile(drivers[1], plain, plain_name, agent_id) == "TASK_LOST"
        seen = len(aware.updates)

        agent.send_signal(signal.SIGCONT)
        stopped = False
        try:
            wait_for(lambda: [s for s in master.state()["slaves"] if s["id"] == agent_id], 20,
                     what="the agent to re-register")
        except AssertionError:
            raise AssertionError(f"agent:\n{agent.tail()}\nmaster:\n{master.tail()}") from None
        wait_for(lambda: not processes_with(plain_name), 20,
                 what="the non-partition-aware task to be killed")
        assert processes_with(aware_name), "the partition-aware task was killed"

        # Nothing unsolicited for the partition-aware task; it learns by reconciliation.
        assert [u["state"] for u in aware.updates[seen:]] == []
        wait_for(lambda: reconcile(drivers[0], aware, aware_name, agent_id) == "TASK_RUNNING",
                 15, 0.2, what="reconciliation to say TASK_RUNNING")
        last = aware.updates[-1]
        assert last["state"] == "TASK_RUNNING"
        assert last["agent_id"]["value"] == agent_id
        assert all(u["state"] == "TASK_RUNNING" for u in aware.updates[seen:]), \
            [u["state"] for u in aware.updates[seen:]]
        # The non-partition-aware framework never hears RUNNING again for its lost task.
        assert "TASK_RUNNING" not in plain.states(plain_name)[plain.states(plain_name)
                                                              .index("TASK_LOST"):]
        assert reconcile(drivers[1], plain, plain_name, agent_id) == "TASK_LOST"
        running = {t["id"] for f in master.state()["frameworks"] for t in f["tasks"]
                   if t["state"] == "TASK_RUNNING"}
        assert aware_name in running and plain_name not in running
    finally:
        if stopped:
            agent.send_signal(signal.SIGCONT)
        for d in drivers:
            d.stop()
            d.join()
        agent.stop()
        master.stop()
        for name in (aware_name, plain_name):
            for pid in processes_with(name):
                os.kill(pid, signal.SIGKILL)
