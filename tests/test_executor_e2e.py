"""Executors end to end through real processes: custom pymesos executors, task groups, the
shipped example, TEARDOWN, the operator event stream and resource accounting.

Every cluster is a real `agora local`; schedulers and executors are unmodified pymesos.
"""

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest
from pymesos import decode_data, encode_data

from agent.executors.command import Dechunker
from agora.recordio import Decoder
from agora.resources import Resources

from tests.cluster import REPO, LocalCluster, own_pid, post_json, processes_with, wait_for
from tests.schedulers import Recorder, command_task, start_driver, unique

AGENT_RESOURCES = "cpus:2;mem:1024"

# A custom executor: reports its pid in every status, echoes framework messages.
ECHO_EXECUTOR = """
import os, threading
from pymesos import MesosExecutorDriver, Executor, encode_data, decode_data

class Echo(Executor):
    def registered(self, driver, executor_info, framework_info, agent_info):
        print("registered", executor_info["executor_id"]["value"], flush=True)

    def launchTask(self, driver, task):
        def run():
            pid = encode_data(str(os.getpid()).encode())
            for state in ("TASK_RUNNING", "TASK_FINISHED"):
                driver.sendStatusUpdate({"task_id": task["task_id"], "state": state,
                                         "data": pid})
        threading.Thread(target=run).start()

    def frameworkMessage(self, driver, message):
        driver.sendFrameworkMessage(encode_data(b"echo:" + decode_data(message)))

    def shutdown(self, driver):
        print("shutdown", flush=True)

MesosExecutorDriver(Echo(), use_addict=False).run()
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("executors"), agents=1,
                     args=["--resources", AGENT_RESOURCES])
    yield c
    c.stop()


@pytest.fixture
def fresh_cluster(tmp_path):
    """A cluster of its own, for tests that launch task groups (see the LAUNCH_GROUP
    accounting test below: a group's executor can leave the allocator inconsistent)."""
    c = LocalCluster(tmp_path, agents=1, args=["--resources", AGENT_RESOURCES])
    yield c
    c.stop()


def scalars(cpus: float, mem: float) -> list:
    return [{"name": "cpus", "type": "SCALAR", "scalar": {"value": cpus}},
            {"name": "mem", "type": "SCALAR", "scalar": {"value": mem}}]


def agent_total(cluster) -> Resources:
    """The resources the (single) agent registered with, from the operator API."""
    status, body = post_json(cluster.url + "/api/v1/operator", {"type": "GET_AGENTS"})
    assert status == 200, body
    [agent] = json.loads(body)["get_agents"]["agents"]
    return Resources.from_json(agent["agent_info"]["resources"])


def offered(offer) -> Resources:
    return Resources.from_json(offer["resources"])


def statuses(sched: Recorder, task_id: str) -> list:
    with sched.lock:
        return [u for u in sched.updates if u["task_id"]["value"] == task_id]


def wait_file(path) -> str:
    """A shell command that runs until `path` exists: the test decides when it finishes."""
    return f"while [ ! -e {path} ]; do sleep 0.05; done"


def stop(driver) -> None:
    driver.stop()
    driver.join()


def kill_leftovers(*markers) -> None:
    for marker in markers:
        for pid in processes_with(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- 1. a custom executor --------------------------------------------------------------


def test_custom_pymesos_executor_runs_tasks_messages_and_shuts_down(cluster, tmp_path):
    """A pymesos executor runs two tasks (reused via executor_ids), echoes a message, stops."""
    script = tmp_path / "echo_executor.py"
    script.write_text(ECHO_EXECUTOR)
    eid = unique("echo")
    executor = {"executor_id": {"value": eid}, "name": eid,
                "command": {"value": f"{sys.executable} {script}", "environment": {
                    "variables": [{"name": "AGORA_TEST_MARKER", "value": eid}]}},
                "resources": scalars(0.1, 32),
                "shutdown_grace_period": {"nanoseconds": 2_000_000_000}}

    def task(offer, name):
        return {"task_id": {"value": name}, "agent_id": offer["agent_id"], "name": name,
                "executor": executor, "resources": scalars(0.1, 32)}

    sched = Recorder(hold=True)
    driver = start_driver(sched, cluster.address, name="custom-executor")
    try:
        first = wait_for(lambda: sched.offers and sched.offers[0], what="an offer")
        assert first["executor_ids"] == []
        one, two = unique("one"), unique("two")
        seen = len(sched.offers)
        driver.launchTasks(first["id"], [task(first, one)], {"refuse_seconds": 0})
        wait_for(lambda: sched.last_state(one) == "TASK_FINISHED", what="task one to finish")
        assert sched.states(one) == ["TASK_RUNNING", "TASK_FINISHED"]
        # The executor outlives its task: later offers on the agent name it.
        again = wait_for(lambda: next((o for o in sched.offers[seen:]
                                       if {"value": eid} in o["executor_ids"]), None),
                         what="an offer carrying the executor id")
        driver.launchTasks(again["id"], [task(again, two)], {"refuse_seconds": 0})
        wait_for(lambda: sched.last_state(two) == "TASK_FINISHED", what="task two to finish")
        assert sched.states(two) == ["TASK_RUNNING", "TASK_FINISHED"]
        pids = {decode_data(u["data"]).decode() for t in (one, two) for u in statuses(sched, t)}
        assert len(pids) == 1, f"the second task did not reuse the executor: {pids}"
        pid = int(pids.pop())
        # The pid it sees for itself (in a container, its own PID namespace's).
        [host_pid] = [p for p in processes_with(eid) if own_pid(p) == pid]
        finished = statuses(sched, two)[-1]
        assert finished["executor_id"] == {"value": eid}
        assert finished["agent_id"] == first["agent_id"]

        # MESSAGE both ways through the master: scheduler -> executor -> scheduler.
        driver.sendFrameworkMessage({"value": eid}, first["agent_id"], encode_data(b"ping"))
        executor_id, agent_id, data = wait_for(lambda: sched.messages and sched.messages[0],
                                               what="the echoed framework message")
        assert (executor_id, agent_id) == ({"value": eid}, first["agent_id"])
        assert decode_data(data) == b"echo:ping"

        # SHUTDOWN (pymesos has no method for it): the executor exits, the scheduler hears.
        driver._send({"type": "SHUTDOWN", "framework_id": {"value": sched.framework_id},
                      "shutdown": {"executor_id": {"value": eid},
                                   "agent_id": first["agent_id"]}})
        lost = wait_for(lambda: [f for f in sched.failures if f[0] == "executor"],
                        what="executorLost")
        assert lost == [("executor", {"value": eid}, first["agent_id"], lost[0][3])]
        assert isinstance(lost[0][3], int)
        wait_for(lambda: not processes_with(eid), what="the executor process to be gone")
        assert not os.path.exists(f"/proc/{host_pid}")
        assert not sched.errors
    finally:
        stop(driver)
        kill_leftovers(eid)


# --- 2. LAUNCH_GROUP ---------------------------------------------------------------------


def launch_group(driver, offer, eid: str, tasks: list, executor_type: str = "DEFAULT",
                 executor_resources=None) -> dict:
    """ACCEPT `offer` with one LAUNCH_GROUP operation; the operation is returned."""
    executor = {"executor_id": {"value": eid}, "type": executor_type,
                "resources": executor_resources or scalars(0.1, 32)}
    if executor_type == "CUSTOM":
        executor["command"] = {"value": "true"}
    op = {"type": "LAUNCH_GROUP", "launch_group": {"executor": executor,
                                                   "task_group": {"tasks": tasks}}}
    driver.acceptOffers([offer["id"]], [op], {"refuse_seconds": 0})
    return op


def test_task_group_runs_every_task_to_finished(fresh_cluster):
    """LAUNCH_GROUP with a DEFAULT executor: all three command tasks reach TASK_FINISHED."""
    sched = Recorder(hold=True)
    driver = start_driver(sched, fresh_cluster.address, name="group-ok")
    try:
        offer = wait_for(lambda: sched.offers and sched.offers[0], what="an offer")
        eid, names = unique("group"), [unique("member") for _ in range(3)]
        launch_group(driver, offer, eid,
                     [command_task(offer, n, f"echo {n}") for n in names])
        wait_for(lambda: all(sched.last_state(n) == "TASK_FINISHED" for n in names),
                 what="three TASK_FINISHED")
        for n in names:
            assert "TASK_RUNNING" in sched.states(n)
            assert statuses(sched, n)[-1]["executor_id"] == {"value": eid}
        assert not sched.errors
    finally:
        stop(driver)


def test_task_group_kills_the_rest_when_one_task_fails(fresh_cluster):
    """When one task of a group fails, the built-in executor kills the others: TASK_KILLED."""
    sched = Recorder(hold=True)
    driver = start_driver(sched, fresh_cluster.address, name="group-fail")
    failing, sleepers = unique("failing"), [unique("sleeper") for _ in range(2)]
    try:
        offer = wait_for(lambda: sched.offers and sched.offers[0], what="an offer")
        launch_group(driver, offer, unique("group"),
                     [command_task(offer, failing, "exit 3")]
                     + [command_task(offer, n, "sleep 300") for n in sleepers])
        wait_for(lambda: all(sched.last_state(n) == "TASK_KILLED" for n in sleepers),
                 what="the other tasks to be killed")
        assert sched.last_state(failing) == "TASK_FAILED"
        assert "3" in statuses(sched, failing)[-1]["message"]
        for n in sleepers:
            assert "TASK_RUNNING" in sched.states(n)
            assert "signal" in statuses(sched, n)[-1]["message"]
        wait_for(lambda: not any(processes_with(n) for n in sleepers),
                 what="the killed tasks' processes to be gone")
    finally:
        stop(driver)
        kill_leftovers(*sleepers)


def test_invalid_task_groups_get_task_error_for_every_task(cluster):
    """A CUSTOM-executor group or one exceeding the offer: TASK_ERROR with a message per task."""
    sched = Recorder(hold=True)
    driver = start_driver(sched, cluster.address, name="group-invalid")
    try:
        offer = wait_for(lambda: sched.offers and sched.offers[0], what="an offer")
        total = agent_total(cluster)
        custom = [unique("custom") for _ in range(2)]
        huge = [unique("huge") for _ in range(2)]
        seen = len(sched.offers)
        ops = [
            {"type": "LAUNCH_GROUP", "launch_group": {
                "executor": {"executor_id": {"value": unique("custom-ex")}, "type": "CUSTOM",
                             "command": {"value": "true"}, "resources": scalars(0.1, 32)},
                "task_group": {"tasks": [command_task(offer, n, "true") for n in custom]}}},
            {"type": "LAUNCH_GROUP", "launch_group": {
                "executor": {"executor_id": {"value": unique("huge-ex")}, "type": "DEFAULT",
                             "resources": scalars(0.1, 32)},
                # Each task fits alone; together they need more than the offer holds.
                "task_group": {"tasks": [command_task(offer, n, "true", cpus=1.5)
                                         for n in huge]}}},
        ]
        driver.acceptOffers([offer["id"]], ops, {"refuse_seconds": 0})
        wait_for(lambda: all(sched.last_state(n) == "TASK_ERROR" for n in custom + huge),
                 what="TASK_ERROR for every task")
        for n in custom + huge:
            [error] = statuses(sched, n)
            assert error["reason"] == "REASON_TASK_GROUP_INVALID"
            assert error["source"] == "SOURCE_MASTER"
        for n in custom:
            assert "DEFAULT" in statuses(sched, n)[0]["message"]
        for n in huge:
            assert "more resources" in statuses(sched, n)[0]["message"]
        # Nothing was launched: the whole offer comes back.
        wait_for(lambda: any(offered(o) == total for o in sched.offers[seen:]),
                 what="the full offer again")
        assert not [f for f in cluster.state()["frameworks"] if f["name"] == "group-invalid"
                    and f["tasks"]]
    finally:
        stop(driver)


# --- 3. the shipped example --------------------------------------------------------------


def test_example_pymesos_scheduler_runs_five_tasks(cluster):
    """examples/pymesos_scheduler.py --tasks 5 --command 'echo hi' exits 0: 5/5 tasks finished."""
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "pymesos_scheduler.py"),
         cluster.address, "--tasks", "5", "--command", "echo hi", "--timeout", "40"],
        cwd=REPO, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5/5 tasks finished" in proc.stdout
    assert proc.stdout.count("TASK_FINISHED") == 5
    wait_for(lambda: any(f["name"] == "pymesos-example"
                         for f in cluster.state()["completed_frameworks"]),
             what="the example's TEARDOWN")


# --- 4. TEARDOWN -------------------------------------------------------------------------


def test_teardown_kills_running_tasks(cluster):
    """driver.stop() without failover TEARDOWNs: the running task dies, the framework completes."""
    name = unique("doomed")
    sched = Recorder([(name, "sleep 300")])
    driver = start_driver(sched, cluster.address, name="teardown")
    try:
        wait_for(lambda: sched.last_state(name) == "TASK_RUNNING", what="TASK_RUNNING")
        assert processes_with(name)
        fid = sched.framework_id
        stop(driver)
        driver = None
        wait_for(lambda: not processes_with(name), what="the task's processes to be gone")
        [completed] = wait_for(lambda: [f for f in cluster.state()["completed_frameworks"]
                                        if f["id"] == fid], what="the completed framework")
        assert not any(f["id"] == fid for f in cluster.state()["frameworks"])
        assert completed["active"] is False
        assert [(t["id"], t["state"]) for t in completed["completed_tasks"]] == [
            (name, "TASK_KILLED")]
    finally:
        if driver is not None:
            stop(driver)
        kill_leftovers(name)


# --- 5. the operator event stream --------------------------------------------------------


class OperatorStream:
    """`POST /api/v1/operator {"type": "SUBSCRIBE"}` over a raw socket, decoded as it comes."""

    def __init__(self, address: str):
        host, port = address.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        body = b'{"type": "SUBSCRIBE"}'
        self.sock.sendall(b"POST /api/v1/operator HTTP/1.1\r\nHost: %s\r\n"
                          b"Content-Type: application/json\r\nAccept: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (address.encode(), len(body), body))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(65536)
            assert chunk, f"the stream closed before its head: {head!r}"
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        self.status = lines[0]
        self.headers = {k.strip().lower(): v.strip()
                        for k, _, v in (line.partition(":") for line in lines[1:])}
        self.chunks, self.records, self.events = Dechunker(), Decoder(), []
        self._feed(rest)

    def _feed(self, data: bytes) -> None:
        self.events += [json.loads(r) for r in self.records.feed(self.chunks.feed(data))]

    def wait(self, predicate, timeout: float = 20.0, what: str = "events"):
        """Read until `predicate(events)` is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self.events)
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; got "
                                     f"{[e['type'] for e in self.events]}")
            if select.select([self.sock], [], [], left)[0]:
                data = self.sock.recv(65536)
                assert data, f"the operator stream ended while waiting for {what}"
                self._feed(data)

    def close(self) -> None:
        self.sock.close()


def task_events(events: list, kind: str, task_id: str) -> list:
    """The payloads of one task's TASK_ADDED (its Task) or TASK_UPDATED events."""
    out = []
    for e in events:
        if e["type"] != kind:
            continue
        if kind == "TASK_ADDED":
            task = e["task_added"]["task"]
            if task["task_id"] == {"value": task_id}:
                out.append(task)
        elif (e["task_updated"].get("status") or {}).get("task_id") == {"value": task_id}:
            out.append(e["task_updated"])
    return out


def test_operator_subscribe_streams_task_added_and_updated(cluster):
    """Operator SUBSCRIBE: SUBSCRIBED with get_state, then TASK_ADDED, TASK_UPDATED to FINISHED."""
    stream = OperatorStream(cluster.address)
    name = unique("watched")
    driver = None
    try:
        assert stream.status == "HTTP/1.1 200 OK"
        assert stream.headers["transfer-encoding"] == "chunked"
        first = stream.wait(lambda ev: ev and ev[0], what="SUBSCRIBED")
        assert first["type"] == "SUBSCRIBED"
        state = first["subscribed"]["get_state"]
        assert {"get_tasks", "get_executors", "get_frameworks", "get_agents"} <= set(state)
        assert len(state["get_agents"]["agents"]) == 1

        sched = Recorder([(name, "echo watched")])
        driver = start_driver(sched, cluster.address, name="watched")
        wait_for(lambda: sched.last_state(name) == "TASK_FINISHED", what="TASK_FINISHED")
        fid = {"value": sched.framework_id}
        [added] = stream.wait(lambda ev: task_events(ev, "TASK_ADDED", name), what="TASK_ADDED")
        assert added["state"] == "TASK_STAGING"
        assert added["framework_id"] == fid and added["agent_id"]["value"]
        updates = stream.wait(
            lambda ev: (u := task_events(ev, "TASK_UPDATED", name))
            and u[-1]["state"] == "TASK_FINISHED" and u, what="TASK_UPDATED to TASK_FINISHED")
        states = [u["state"] for u in updates]
        assert "TASK_RUNNING" in states and states[-1] == "TASK_FINISHED"
        assert states.index("TASK_RUNNING") < states.index("TASK_FINISHED")
        for u in updates:  # Mesos's required fields: framework_id, status, state
            assert u["framework_id"] == fid and u["status"]["state"] == u["state"]
        framework_added = [e for e in stream.events if e["type"] == "FRAMEWORK_ADDED"]
        assert any(e["framework_added"]["framework"]["framework_info"]["id"] == fid
                   for e in framework_added)
        stop(driver)
        driver = None
        stream.wait(lambda ev: any(e["type"] == "FRAMEWORK_REMOVED" and
                                   e["framework_removed"]["framework_info"]["id"] == fid
                                   for e in ev), what="FRAMEWORK_REMOVED")
    finally:
        stream.close()
        if driver is not None:
            stop(driver)


# --- 6. resources offered and freed ------------------------------------------------------


def test_terminal_updates_free_resources_for_new_offers(cluster, tmp_path):
    """While tasks run offers hold the rest; once they finish, an offer holds the whole agent."""
    total = agent_total(cluster)
    flag = tmp_path / "finish"
    names = [unique("holder") for _ in range(2)]
    sched = Recorder([(n, wait_file(flag)) for n in names], cpus=0.5, mem=128, refuse=0.1)
    driver = start_driver(sched, cluster.address, name="accounting")
    try:
        wait_for(lambda: all(sched.last_state(n) == "TASK_RUNNING" for n in names),
                 what="both tasks running")
        running = len(sched.offers)
        used = Resources.parse("cpus:1;mem:256")
        wait_for(lambda: any(offered(o) == total - used for o in sched.offers[running:]),
                 what="an offer of everything but the running tasks")
        assert all(offered(o) <= total - used for o in sched.offers[running:])
        flag.touch()
        wait_for(lambda: all(sched.last_state(n) == "TASK_FINISHED" for n in names),
                 what="both tasks finished")
        finished = len(sched.offers)
        wait_for(lambda: any(offered(o) == total for o in sched.offers[finished:]),
                 what="an offer of the whole agent")
        [agent] = cluster.state()["slaves"]
        assert agent["used_resources"]["cpus"] == 0 and agent["used_resources"]["mem"] == 0
    finally:
        flag.touch()
        stop(driver)
        kill_leftovers(*names)


def test_task_group_executor_resources_are_not_offered_twice(fresh_cluster, tmp_path):
    """While a group runs, offers exclude its tasks' and executor's resources; then all return."""
    total = agent_total(fresh_cluster)
    flag = tmp_path / "finish"
    names = [unique("grouped") for _ in range(3)]
    sched = Recorder(hold=True)
    driver = start_driver(sched, fresh_cluster.address, name="group-accounting")
    try:
        offer = wait_for(lambda: sched.offers and sched.offers[0], what="an offer")
        eid = unique("group")
        launch_group(driver, offer, eid,
                     [command_task(offer, n, wait_file(flag), cpus=0.25, mem=64) for n in names],
                     executor_resources=scalars(0.5, 128))
        # Offers are held, never declined: the one after the launch is all that is left.
        rest = wait_for(lambda: sched.offers[1:], what="an offer while the group runs")[0]
        wait_for(lambda: all(sched.last_state(n) == "TASK_RUNNING" for n in names),
                 what="the group running")
        used = Resources.parse("cpus:1.25;mem:320")  # 3 x (0.25, 64) + the executor (0.5, 128)
        assert offered(rest) == total - used
        flag.touch()
        wait_for(lambda: all(sched.last_state(n) == "TASK_FINISHED" for n in names),
                 what="the group finished")
        wait_for(lambda: [f for f in sched.failures if f[0] == "executor"],
                 what="the group's executor to exit")
        # Every offer but the accepted one is still held: together they are the whole agent.
        wait_for(lambda: sum((offered(o) for o in sched.offers[1:]), Resources()) == total,
                 what="the whole agent on offer again")
    finally:
        flag.touch()
        stop(driver)
        kill_leftovers(*names)
