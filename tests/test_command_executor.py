"""The built-in command executor: start-up cost, its pure helpers, and its behaviour under an agent."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from agent_harness import (  # noqa: F401  (fixtures)
    agent_reactor, cluster, make_cluster, no_session_left, wait_for)

from agora import mesos_json as mj
from agora import protocol

from agent.agent import CODE_ROOT
from agent.executors.command import (
    Dechunker, command_argv, exit_message, new_uuid, parse_duration, task_environment)


# --- start-up -------------------------------------------------------------------------------


def test_executor_imports_no_twisted_and_starts_fast():
    """`python -S -m agent.executors.command` loads only the stdlib and our pure modules, quickly."""
    env = dict(os.environ, PYTHONPATH=CODE_ROOT)
    code = ("import sys, time; t = time.perf_counter(); import agent.executors.command; "
            "print(time.perf_counter() - t); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('twisted', 'attrs', 'msgpack', 'http', 'email', 'zope')))")
    out = subprocess.run([sys.executable, "-S", "-c", code], env=env, cwd="/",
                         capture_output=True, text=True, check=True, timeout=30).stdout
    seconds, heavy = out.splitlines()
    assert heavy == "[]"
    assert float(seconds) < 0.25, f"importing the executor took {float(seconds):.3f}s"


def test_executor_without_agent_environment_exits_with_a_message():
    """Started by hand (no MESOS_* variables), it says why it cannot run and exits 2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESOS_")}
    env["PYTHONPATH"] = CODE_ROOT
    result = subprocess.run([sys.executable, "-S", "-m", "agent.executors.command"], env=env,
                            cwd="/", capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "MESOS_AGENT_ENDPOINT" in result.stderr


# --- pure helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_dechunker_handles_any_split(step):
    """Chunked bodies decode the same however the bytes are split; the last chunk ends it."""
    wire = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
    d, out = Dechunker(), b""
    for i in range(0, len(wire), step):
        out += d.feed(wire[i:i + step])
    assert out == b"hello world" and d.ended


def test_durations_and_uuids():
    """Mesos durations parse to seconds; uuids are base64 of 16 bytes (what pymesos decodes)."""
    assert parse_duration("5secs", 0) == 5 and parse_duration("100ms", 0) == 0.1
    assert parse_duration("3mins", 0) == 180 and parse_duration("junk", 7) == 7
    assert mj.valid_uuid_b64(new_uuid()) and new_uuid() != new_uuid()


def test_command_shell_and_arguments():
    """shell=true runs /bin/sh -c value; shell=false runs value with arguments as argv."""
    assert command_argv({"value": "echo hi"}) == (["/bin/sh", "-c", "echo hi"], None)
    assert command_argv({"value": "/bin/echo", "shell": False, "arguments": ["echo", "a"]}) == (
        ["echo", "a"], "/bin/echo")
    assert command_argv({"value": "/bin/true", "shell": False}) == (["/bin/true"], "/bin/true")
    with pytest.raises(ValueError):
        command_argv({"shell": True})


def test_task_environment_adds_variables_and_restores_pythonpath():
    """Tasks get CommandInfo variables and the agent's PYTHONPATH back, not the executor's."""
    base = {"PATH": "/bin", "PYTHONPATH": "/code:/user", "AGORA_TASK_PYTHONPATH": "/user"}
    command = {"environment": {"variables": [{"name": "A", "value": "1"},
                                             {"name": "S", "type": "SECRET",
                                              "secret": {"value": {"data": mj.b64(b"pw")}}}]}}
    env = task_environment(base, command)
    assert env == {"PATH": "/bin", "PYTHONPATH": "/user", "A": "1", "S": "pw"}
    assert "PYTHONPATH" not in task_environment({"PYTHONPATH": "/code",
                                                 "AGORA_TASK_PYTHONPATH": ""}, {})


def test_exit_messages():
    """Exit statuses and signals read like Mesos's messages."""
    assert exit_message(0) == "Command exited with status 0"
    assert exit_message(-9) == "Command terminated with signal Killed"


# --- under a real agent ---------------------------------------------------------------------


def test_executor_exits_once_its_last_update_is_acknowledged(cluster):
    """After TASK_FINISHED is taken by the agent, the executor process goes away on its own."""
    cluster.run_task("quick", "sleep 0.2")
    pid = cluster.executor_pid("quick")
    cluster.wait_state("quick", "TASK_FINISHED")
    wait_for(lambda: no_session_left(pid), what="the executor to exit")
    # A command executor is invisible to the master: no ExitedExecutor for it.
    assert cluster.master.of(protocol.ExitedExecutor) == []


def test_shell_false_arguments_and_environment(cluster):
    """shell=false runs the program with argv as given; CommandInfo variables reach the task."""
    command = {"value": "/bin/sh", "shell": False,
               "arguments": ["sh", "-c", "echo $GREETING $0-$1", "zero", "one"],
               "environment": {"variables": [{"name": "GREETING", "value": "hi"}]}}
    cluster.run_task("args", command)
    cluster.wait_state("args", "TASK_FINISHED")
    assert cluster.read_sandbox("args") == "hi zero-one\n"


def test_task_does_not_see_our_pythonpath(cluster):
    """The repo root the agent adds for its executor is not on the task's PYTHONPATH."""
    cluster.run_task("pp", "echo \"[$PYTHONPATH]\"")
    cluster.wait_state("pp", "TASK_FINISHED")
    assert CODE_ROOT not in cluster.read_sandbox("pp")


def test_killing_state_is_sent_only_with_the_capability(cluster):
    """A framework with TASK_KILLING_STATE sees TASK_KILLING before TASK_KILLED."""
    framework = cluster.framework(capabilities=[{"type": "TASK_KILLING_STATE"}])
    cluster.run_task("k", "sleep 100", framework=framework)
    cluster.wait_state("k", "TASK_RUNNING")
    cluster.send(protocol.KillTask(framework_id="fw-1", task_id="k"))
    killed = cluster.wait_state("k", "TASK_KILLED")
    assert cluster.master.states("k") == ["TASK_STARTING", "TASK_RUNNING", "TASK_KILLING",
                                          "TASK_KILLED"]
    assert killed["message"] == "Command terminated with signal Terminated"


def _group_task(cluster, task_id: str, command: str) -> dict:
    return {"name": task_id, "task_id": {"value": task_id},
            "agent_id": {"value": cluster.agent.agent_id}, "command": {"value": command},
            "kill_policy": {"grace_period": {"nanoseconds": int(0.2e9)}}}


def test_task_group_runs_side_by_side_and_a_failure_kills_the_rest(cluster):
    """LAUNCH_GROUP: tasks share the sandbox; when one fails the other is killed."""
    executor = {"executor_id": {"value": "grp"}, "type": "DEFAULT",
                "framework_id": {"value": "fw-1"}}
    tasks = [_group_task(cluster, "g-fail", "echo from-a; sleep 0.2; exit 2"),
             _group_task(cluster, "g-long", "echo from-b; sleep 100")]
    cluster.send(protocol.RunTaskGroup(framework=cluster.framework(), executor=executor,
                                       task_group={"tasks": tasks}))
    cluster.wait_state("g-long", "TASK_RUNNING")
    pid = cluster.executor_pid("grp")
    assert cluster.wait_state("g-fail", "TASK_FAILED")["message"] == \
        "Command exited with status 2"
    cluster.wait_state("g-long", "TASK_KILLED")
    wait_for(lambda: no_session_left(pid), what="the group's executor to exit")
    output = cluster.read_sandbox("grp")
    assert "from-a" in output and "from-b" in output
    exited = wait_for(lambda: cluster.master.of(protocol.ExitedExecutor),
                      what="ExitedExecutor at the master")
    assert exited[0].executor_id == "grp"


def test_executor_resubscribes_when_its_stream_drops(cluster):
    """If the agent's event stream ends, the executor subscribes again and its task carries on."""
    cluster.run_task("steady", "sleep 0.5")
    cluster.wait_state("steady", "TASK_RUNNING")
    first = cluster.executor("steady").stream
    cluster.call(first.close)

    def resubscribed():
        executor = cluster.executor("steady")
        return executor is None or executor.stream not in (None, first)

    wait_for(resubscribed, what="a new subscription")
    cluster.wait_state("steady", "TASK_FINISHED")
    assert cluster.master.states("steady") == ["TASK_STARTING", "TASK_RUNNING", "TASK_FINISHED"]
    assert "Re-subscribed" in cluster.read_sandbox("steady", "stderr")


# --- task groups, as Mesos's default executor runs them ------------------------------------


def _run_group(cluster, executor_id: str, tasks: list[dict]) -> None:
    executor = {"executor_id": {"value": executor_id}, "type": "DEFAULT",
                "framework_id": {"value": "fw-1"}}
    cluster.send(protocol.RunTaskGroup(framework=cluster.framework(), executor=executor,
                                       task_group={"tasks": tasks}))


def test_a_task_that_finishes_leaves_the_rest_of_its_group_running(cluster):
    """Only TASK_FAILED or TASK_KILLED takes the group down; TASK_FINISHED does not."""
    _run_group(cluster, "fin", [_group_task(cluster, "f-done", "true"),
                                _group_task(cluster, "f-long", "sleep 100")])
    cluster.wait_state("f-done", "TASK_FINISHED")
    cluster.wait_state("f-long", "TASK_RUNNING")
    # The finished task's ack has been processed; the other still runs.
    wait_for(lambda: cluster.executor("fin") is not None and
             "f-done" not in cluster.executor("fin").tasks, what="f-done to be settled")
    assert cluster.master.states("f-long") == ["TASK_STARTING", "TASK_RUNNING"]
    cluster.send(protocol.KillTask(framework_id="fw-1", task_id="f-long"))
    cluster.wait_state("f-long", "TASK_KILLED")


def test_killing_one_task_kills_its_group_each_with_its_own_grace(cluster):
    """KILL of one task: the others are killed too, each after its own kill policy's grace
    (a task that ignores SIGTERM lasts its grace period, then SIGKILL)."""
    stubborn = _group_task(cluster, "k-stubborn", "trap '' TERM; sleep 100")
    stubborn["kill_policy"] = {"grace_period": {"nanoseconds": int(1.0e9)}}
    _run_group(cluster, "kgrp", [_group_task(cluster, "k-target", "sleep 100"),
                                 _group_task(cluster, "k-other", "sleep 100"), stubborn])
    for tid in ("k-target", "k-other", "k-stubborn"):
        cluster.wait_state(tid, "TASK_RUNNING")
    pid = cluster.executor_pid("kgrp")
    started = time.monotonic()
    cluster.send(protocol.KillTask(framework_id="fw-1", task_id="k-target"))
    cluster.wait_state("k-target", "TASK_KILLED")
    cluster.wait_state("k-other", "TASK_KILLED")
    other_done = time.monotonic() - started
    killed = cluster.wait_state("k-stubborn", "TASK_KILLED")
    assert time.monotonic() - started >= 0.95 > other_done
    assert killed["message"] == "Command terminated with signal Killed"
    wait_for(lambda: no_session_left(pid), what="the group's executor to exit")


def test_a_failure_in_one_group_leaves_other_groups_on_the_executor_alone(cluster):
    """Two groups on one default executor: a failure in one kills only that group."""
    _run_group(cluster, "two", [_group_task(cluster, "a-long", "sleep 100")])
    cluster.wait_state("a-long", "TASK_RUNNING")
    _run_group(cluster, "two", [_group_task(cluster, "b-fail", "sleep 0.3; exit 1"),
                                _group_task(cluster, "b-long", "sleep 100")])
    cluster.wait_state("b-fail", "TASK_FAILED")
    cluster.wait_state("b-long", "TASK_KILLED")
    assert cluster.master.states("a-long") == ["TASK_STARTING", "TASK_RUNNING"]
    cluster.send(protocol.KillTask(framework_id="fw-1", task_id="a-long"))
    cluster.wait_state("a-long", "TASK_KILLED")
