"""/api/v1/executor on a real agent: the wire format, its error cases, and pymesos's executor."""

from __future__ import annotations

import json
import select
import socket

import pytest
from agent_harness import (  # noqa: F401  (fixtures)
    PYTHON, agent_reactor, cluster, make_cluster, no_session_left, wait_for)

from agora import mesos_json as mj
from agora import protocol
from agora.recordio import Decoder

from agent.executors.command import Dechunker, EventStream

IDLE = "sleep 100"  # an executor process that never subscribes: the test speaks for it


def launch_idle(cluster, task_id: str = "t", executor_id: str = "ex") -> dict:
    """Start a custom executor that sits still, so the test can use its ids."""
    executor = {"executor_id": {"value": executor_id}, "command": {"value": IDLE}}
    task = cluster.run_task(task_id, None, executor=executor)
    cluster.executor_pid(executor_id)
    return task


def call(cluster, body, headers=None):
    status, _, reply = cluster.http("POST", "/api/v1/executor", body, headers)
    return status, reply.decode()


def subscribe(cluster, executor_id: str = "ex", unacked_tasks=()) -> EventStream:
    return EventStream(("127.0.0.1", cluster.agent.port), {
        "type": "SUBSCRIBE", "framework_id": {"value": "fw-1"},
        "executor_id": {"value": executor_id},
        "subscribe": {"unacknowledged_tasks": list(unacked_tasks), "unacknowledged_updates": []}})


def events(stream: EventStream, count: int, timeout: float = 5.0) -> list[dict]:
    """The next `count` events (the ones that came with the head first)."""
    got = list(stream.first_events() or [])
    while len(got) < count:
        ready, _, _ = select.select([stream], [], [], timeout)
        assert ready, f"no event in {timeout}s after {got}"
        more = stream.read()
        assert more is not None, f"the stream ended after {got}"
        got.extend(more)
    return got


def update(status: dict, executor_id: str = "ex") -> dict:
    return {"type": "UPDATE", "framework_id": {"value": "fw-1"},
            "executor_id": {"value": executor_id}, "update": {"status": status}}


def running(task_id: str = "t", **extra) -> dict:
    return {"task_id": {"value": task_id}, "state": "TASK_RUNNING",
            "uuid": mj.b64(mj.new_uuid()), "source": "SOURCE_EXECUTOR", **extra}


def test_subscribe_streams_subscribed_then_the_queued_launch(cluster):
    """SUBSCRIBE: 200 chunked; SUBSCRIBED with exact id dicts, then LAUNCH of the queued task."""
    task = launch_idle(cluster)
    raw = socket.create_connection(("127.0.0.1", cluster.agent.port), timeout=5)
    body = json.dumps({"type": "SUBSCRIBE", "framework_id": {"value": "fw-1"},
                       "executor_id": {"value": "ex"},
                       "subscribe": {"unacknowledged_tasks": [],
                                     "unacknowledged_updates": []}}).encode()
    raw.sendall(b"POST /api/v1/executor HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    data = b""
    chunks, records, got = Dechunker(), Decoder(), []
    while len(got) < 2:
        more = raw.recv(65536)
        assert more, f"the stream ended after {got}"
        if not data:
            # Status line, headers and the first events arrive in one piece (spec §5.2).
            head, _, rest = more.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding: chunked" in head
            assert rest, "the first events did not come with the headers"
            more = rest
        data += more
        got += [json.loads(r) for r in records.feed(chunks.feed(more))]
    raw.close()
    subscribed, launch = got
    assert subscribed["type"] == "SUBSCRIBED"
    payload = subscribed["subscribed"]
    assert payload["executor_info"]["executor_id"] == {"value": "ex"}
    assert payload["framework_info"]["id"] == {"value": "fw-1"}
    assert payload["agent_info"]["id"] == {"value": "fake-S0"} and payload["container_id"]
    assert launch == {"type": "LAUNCH", "launch": {"task": task}}


def test_update_is_acknowledged_and_forwarded_with_agent_ids(cluster):
    """A valid UPDATE gets 202 and ACKNOWLEDGED{task_id, uuid}; the master gets it filled in."""
    launch_idle(cluster)
    stream = subscribe(cluster)
    events(stream, 2)
    status = running()
    assert call(cluster, update(status))[0] == 202
    [ack] = events(stream, 1)
    assert ack == {"type": "ACKNOWLEDGED",
                   "acknowledged": {"task_id": {"value": "t"}, "uuid": status["uuid"]}}
    forwarded = cluster.wait_state("t", "TASK_RUNNING")
    assert forwarded["uuid"] == status["uuid"]
    assert forwarded["agent_id"] == {"value": "fake-S0"}
    assert forwarded["executor_id"] == {"value": "ex"}
    stream.close()


def test_resubscribe_does_not_relaunch_a_task_the_executor_holds(cluster):
    """A task listed in unacknowledged_tasks is not sent again (pymesos would assert)."""
    task = launch_idle(cluster)
    stream = subscribe(cluster)
    events(stream, 2)
    stream.close()
    again = subscribe(cluster, unacked_tasks=[task])
    assert [e["type"] for e in events(again, 1)] == ["SUBSCRIBED"]
    launch_idle_second = cluster.run_task("t2", None, executor={
        "executor_id": {"value": "ex"}, "command": {"value": IDLE}})
    [launch] = events(again, 1)
    assert launch["launch"]["task"] == launch_idle_second
    again.close()


def test_calls_before_subscribe_are_403(cluster):
    """UPDATE or MESSAGE from an executor that has not subscribed: 403."""
    launch_idle(cluster)
    status, text = call(cluster, update(running()))
    assert status == 403 and "not subscribed" in text


@pytest.mark.parametrize("body, message", [
    (b"{not json", "Malformed JSON"),
    (b"[1, 2]", "JSON object"),
    ({"type": "UPDATE", "executor_id": {"value": "ex"}}, "framework_id"),
    ({"type": "SUBSCRIBE", "framework_id": {"value": "nope"}, "executor_id": {"value": "ex"}},
     "Framework nope"),
    ({"type": "SUBSCRIBE", "framework_id": {"value": "fw-1"}, "executor_id": {"value": "nope"}},
     "Executor nope"),
])
def test_malformed_calls_and_unknown_ids_are_400(cluster, body, message):
    """Bad JSON, missing ids, unknown framework or executor: 400 naming the problem."""
    launch_idle(cluster)
    status, text = call(cluster, body)
    assert status == 400 and message in text


def test_bad_updates_after_subscribe_are_400(cluster):
    """Bad uuid, TASK_STAGING, a foreign source, an unknown task, bad message data: 400."""
    launch_idle(cluster)
    stream = subscribe(cluster)
    events(stream, 2)
    for status, message in [
        (running(uuid="AAAA"), "16 UUID bytes"),
        (running(state="TASK_STAGING"), "TASK_STAGING"),
        (running(source="SOURCE_MASTER"), "SOURCE_EXECUTOR"),
        (running(task_id="other"), "not launched"),
    ]:
        code, text = call(cluster, update(status))
        assert code == 400 and message in text, (status, code, text)
    code, text = call(cluster, {"type": "MESSAGE", "framework_id": {"value": "fw-1"},
                                "executor_id": {"value": "ex"}, "message": {"data": "**"}})
    assert code == 400 and "base64" in text
    stream.close()


def test_messages_flow_both_ways(cluster):
    """Executor MESSAGE → FrameworkMessage to the master; master FrameworkMessage → MESSAGE event."""
    launch_idle(cluster)
    stream = subscribe(cluster)
    events(stream, 2)
    code, _ = call(cluster, {"type": "MESSAGE", "framework_id": {"value": "fw-1"},
                             "executor_id": {"value": "ex"}, "message": {"data": mj.b64(b"hi")}})
    assert code == 202
    wait_for(lambda: protocol.FrameworkMessage("fw-1", "ex", b"hi") in cluster.master.messages,
             what="the message at the master")
    cluster.send(protocol.FrameworkMessage(framework_id="fw-1", executor_id="ex", data=b"yo"))
    assert events(stream, 1) == [{"type": "MESSAGE", "message": {"data": mj.b64(b"yo")}}]
    stream.close()


PYMESOS_EXECUTOR = """
import sys, threading
from pymesos import MesosExecutorDriver, Executor, encode_data, decode_data

class Echo(Executor):
    def registered(self, driver, executor_info, framework_info, agent_info):
        print("registered", executor_info["executor_id"]["value"], flush=True)

    def launchTask(self, driver, task):
        def run():
            driver.sendStatusUpdate({"task_id": task["task_id"], "state": "TASK_RUNNING"})
            print("running", task["task_id"]["value"], flush=True)
            driver.sendStatusUpdate({"task_id": task["task_id"], "state": "TASK_FINISHED"})
        threading.Thread(target=run).start()

    def frameworkMessage(self, driver, message):
        driver.sendFrameworkMessage(encode_data(b"echo:" + decode_data(message)))

    def shutdown(self, driver):
        print("shutdown", flush=True)

MesosExecutorDriver(Echo()).run()
"""


def test_unmodified_pymesos_executor_runs_tasks_and_messages(cluster, tmp_path):
    """pymesos's MesosExecutorDriver registers, runs 2 tasks, echoes a message, obeys SHUTDOWN."""
    script = tmp_path / "echo_executor.py"
    script.write_text(PYMESOS_EXECUTOR)
    executor = {"executor_id": {"value": "echo"}, "name": "echo",
                "command": {"value": f"{PYTHON} {script}"}}
    cluster.run_task("p1", None, executor=executor)
    cluster.run_task("p2", None, executor=executor)
    for tid in ("p1", "p2"):
        finished = cluster.wait_state(tid, "TASK_FINISHED")
        assert cluster.master.states(tid) == ["TASK_RUNNING", "TASK_FINISHED"]
        # pymesos sends no agent_id or executor_id: the agent fills them in.
        assert finished["agent_id"] == {"value": "fake-S0"}
        assert finished["executor_id"] == {"value": "echo"}
        assert finished["source"] == "SOURCE_EXECUTOR"
    cluster.send(protocol.FrameworkMessage(framework_id="fw-1", executor_id="echo",
                                           data=b"ping"))
    wait_for(lambda: protocol.FrameworkMessage("fw-1", "echo", b"echo:ping")
             in cluster.master.messages, what="the echoed framework message")
    assert "registered echo" in cluster.read_sandbox("echo")
    pid = cluster.executor_pid("echo")
    cluster.send(protocol.ShutdownExecutor(framework_id="fw-1", executor_id="echo"))
    exited = wait_for(lambda: cluster.master.of(protocol.ExitedExecutor), what="ExitedExecutor")
    assert exited[0].executor_id == "echo"
    wait_for(lambda: no_session_left(pid), what="the pymesos executor to be gone")
    assert "shutdown" in cluster.read_sandbox("echo")


def test_subscribed_executors_get_heartbeats(make_cluster):
    """HEARTBEAT events arrive on the stream every executor_heartbeat_interval."""
    c = make_cluster(executor_heartbeat_interval=0.1)
    c.wait_registered()
    launch_idle(c)
    stream = subscribe(c)
    got = events(stream, 4)
    assert [e["type"] for e in got[:2]] == ["SUBSCRIBED", "LAUNCH"]
    assert {e["type"] for e in got[2:]} == {"HEARTBEAT"}
    stream.close()


def test_unacknowledged_updates_in_subscribe_are_taken_and_acknowledged(cluster):
    """An update the agent never got, listed in SUBSCRIBE, goes to the master and is acked."""
    launch_idle(cluster)
    first = subscribe(cluster)
    events(first, 2)
    first.close()
    lost = running(executor_id={"value": "ex"})
    again = EventStream(("127.0.0.1", cluster.agent.port), {
        "type": "SUBSCRIBE", "framework_id": {"value": "fw-1"}, "executor_id": {"value": "ex"},
        "subscribe": {"unacknowledged_tasks": [], "unacknowledged_updates": [
            {"status": lost}, {"status": lost}]}})  # twice: the duplicate is dropped
    got = events(again, 3)
    assert got[0]["type"] == "SUBSCRIBED"
    assert [e["acknowledged"]["uuid"] for e in got[1:3]] == [lost["uuid"]] * 2
    forwarded = cluster.wait_state("t", "TASK_RUNNING")
    assert forwarded["uuid"] == lost["uuid"] and forwarded["agent_id"] == {"value": "fake-S0"}
    assert cluster.master.states("t") == ["TASK_RUNNING"]
    again.close()
