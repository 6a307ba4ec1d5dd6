"""Tasks on a real agent: launch, output, failures, kills, timeouts, retries, endpoints, stop."""

from __future__ import annotations

import os
import signal
import time

from agent_harness import (  # noqa: F401  (fixtures)
    agent_reactor, cluster, make_cluster, no_session_left, process_alive, wait_for)

from agora import mesos_json as mj
from agora import protocol


def custom_executor(executor_id: str, command: str, **extra) -> dict:
    return {"executor_id": {"value": executor_id}, "command": {"value": command}, **extra}


def test_echo_reports_starting_running_finished_and_writes_the_sandbox(cluster):
    """`echo hello` goes STARTING, RUNNING, FINISHED with uuid/agent/task ids; stdout has hello."""
    cluster.run_task("t1", "echo hello")
    cluster.wait_state("t1", "TASK_FINISHED")
    assert cluster.master.states("t1") == ["TASK_STARTING", "TASK_RUNNING", "TASK_FINISHED"]
    for status in cluster.master.updates("t1"):
        assert mj.valid_uuid_b64(status["uuid"])
        assert status["agent_id"] == {"value": "fake-S0"}
        assert status["task_id"] == {"value": "t1"}
        assert status["executor_id"] == {"value": "t1"}
        assert status["source"] == "SOURCE_EXECUTOR"
    assert cluster.read_sandbox("t1") == "hello\n"
    assert cluster.master.of(protocol.StatusUpdate)[0].framework_id == "fw-1"


def test_the_executor_gets_the_mesos_environment(cluster):
    """Tasks see MESOS_SANDBOX, the framework/executor ids and the agent endpoint, cwd = sandbox."""
    cluster.run_task("env", "echo $MESOS_FRAMEWORK_ID $MESOS_EXECUTOR_ID $MESOS_AGENT_ENDPOINT "
                            "$MESOS_CHECKPOINT $MESOS_EXECUTOR_SHUTDOWN_GRACE_PERIOD; pwd; "
                            "echo $MESOS_SANDBOX")
    cluster.wait_state("env", "TASK_FINISHED")
    ids, cwd, sandbox = cluster.read_sandbox("env").splitlines()
    assert ids == f"fw-1 env 127.0.0.1:{cluster.agent.port} 0 2secs"
    assert os.path.realpath(cwd) == os.path.realpath(cluster.sandbox("env")) == sandbox


def test_failing_command_is_task_failed_with_its_exit_status(cluster):
    """A non-zero exit is TASK_FAILED saying the status; stderr lands in the sandbox."""
    cluster.run_task("bad", "echo oops >&2; exit 3")
    status = cluster.wait_state("bad", "TASK_FAILED")
    assert status["message"] == "Command exited with status 3"
    assert "TASK_FINISHED" not in cluster.master.states("bad")
    assert "oops" in cluster.read_sandbox("bad", "stderr")


def test_kill_escalates_to_sigkill_after_the_grace_period(cluster):
    """A task that ignores SIGTERM is SIGKILLed after its grace period: TASK_KILLED, nothing left."""
    grace = {"grace_period": {"nanoseconds": int(0.5e9)}}
    cluster.run_task("stubborn", "trap '' TERM; sleep 100", kill_policy=grace)
    cluster.wait_state("stubborn", "TASK_RUNNING")
    pid = cluster.executor_pid("stubborn")
    sleep_pid = wait_for(lambda: [p for p in _session(pid) if p != pid and
                                  _comm(p) == "sleep"], what="the task's sleep")[0]
    started = time.monotonic()
    cluster.send(protocol.KillTask(framework_id="fw-1", task_id="stubborn"))
    cluster.wait_state("stubborn", "TASK_KILLED")
    assert time.monotonic() - started >= 0.45
    assert "TASK_KILLING" not in cluster.master.states("stubborn")  # no capability, no KILLING
    wait_for(lambda: not process_alive(sleep_pid), what="the task's process to go")
    wait_for(lambda: no_session_left(pid), what="the executor's session to empty")


def test_agent_retries_an_update_until_the_master_acks_it(make_cluster):
    """Without an ack the same uuid comes again after the retry interval; the ack releases the next."""
    c = make_cluster(master_options={"auto_ack": False}, status_update_retry=0.3)
    c.wait_registered()
    c.run_task("r", "true")
    first = c.wait_state("r", "TASK_STARTING")
    wait_for(lambda: len(c.master.updates("r")) >= 2, what="a re-send")
    assert [s["uuid"] for s in c.master.updates("r")][:2] == [first["uuid"]] * 2
    assert c.master.states("r") == ["TASK_STARTING"]  # nothing overtakes the head
    c.call(c.master.ack, protocol.StatusUpdate("fw-1", first))
    running = c.wait_state("r", "TASK_RUNNING")
    c.call(c.master.ack, protocol.StatusUpdate("fw-1", running))
    c.wait_state("r", "TASK_FINISHED")


def test_executor_that_never_subscribes_times_out(make_cluster):
    """A custom executor that does not subscribe in time is killed: REGISTRATION_TIMEOUT."""
    c = make_cluster(executor_registration_timeout=0.3)
    c.wait_registered()
    c.run_task("late", None, executor=custom_executor("sleeper", "sleep 100"))
    pid = c.executor_pid("sleeper")
    status = c.wait_state("late", "TASK_FAILED")
    assert status["reason"] == "REASON_EXECUTOR_REGISTRATION_TIMEOUT"
    assert status["source"] == "SOURCE_AGENT" and mj.valid_uuid_b64(status["uuid"])
    exited = wait_for(lambda: c.master.of(protocol.ExitedExecutor), what="ExitedExecutor")[0]
    assert exited.executor_id == "sleeper" and exited.status == signal.SIGKILL
    wait_for(lambda: no_session_left(pid), what="the executor to be gone")


def test_launch_failure_is_container_launch_failed(cluster):
    """An executor command that cannot be executed fails its task with CONTAINER_LAUNCH_FAILED."""
    executor = {"executor_id": {"value": "nope"},
                "command": {"value": "/no/such/program", "shell": False}}
    cluster.run_task("nl", None, executor=executor)
    status = cluster.wait_state("nl", "TASK_FAILED")
    assert status["reason"] == "REASON_CONTAINER_LAUNCH_FAILED"
    assert "/no/such/program" in status["message"]
    assert "/no/such/program" in cluster.read_sandbox("nope", "stderr")


def test_executor_crash_fails_the_task(cluster):
    """If the command executor dies under a running task, the agent reports TASK_FAILED."""
    cluster.run_task("crash", "sleep 100")
    cluster.wait_state("crash", "TASK_RUNNING")
    pid = cluster.executor_pid("crash")
    os.kill(pid, signal.SIGKILL)
    status = cluster.wait_state("crash", "TASK_FAILED")
    assert status["reason"] == "REASON_COMMAND_EXECUTOR_FAILED"
    assert status["source"] == "SOURCE_AGENT"
    assert "signal" in status["message"]
    wait_for(lambda: no_session_left(pid), what="the orphaned task to be killed")


def test_kill_before_delivery_is_killed_by_the_agent(make_cluster):
    """A task killed while its executor has not subscribed never starts: TASK_KILLED at once."""
    c = make_cluster()
    c.wait_registered()
    c.run_task("early", None, executor=custom_executor("slow", "sleep 100"))
    pid = c.executor_pid("slow")
    c.send(protocol.KillTask(framework_id="fw-1", task_id="early"))
    status = c.wait_state("early", "TASK_KILLED")
    assert status["reason"] == "REASON_TASK_KILLED_DURING_LAUNCH"
    wait_for(lambda: no_session_left(pid), what="the idle executor to be shut down")


def test_kill_of_an_unknown_task_is_lost(cluster):
    """Killing a task the agent never had answers TASK_LOST, so the scheduler can move on."""
    cluster.send(protocol.KillTask(framework_id="fw-9", task_id="ghost"))
    status = cluster.wait_state("ghost", "TASK_LOST")
    assert status["reason"] == "REASON_TASK_UNKNOWN"


def test_endpoints_show_state_health_flags_version_and_metrics(cluster):
    """/state lists the running task under its framework and executor; the rest answer."""
    cluster.run_task("shown", "sleep 30")
    cluster.wait_state("shown", "TASK_RUNNING")
    for path in ("/state", "/slave(1)/state"):
        state = cluster.get_json(path)
        assert state["id"] == "fake-S0" and state["pid"].startswith("slave(1)@127.0.0.1:")
        assert state["resources"]["cpus"] == 4.0 and state["resources"]["ports"] == "[31000-32000]"
        [fw] = state["frameworks"]
        [executor] = fw["executors"]
        assert executor["id"] == "shown" and executor["directory"]
        assert [t["state"] for t in executor["tasks"]] == ["TASK_RUNNING"]
    assert cluster.http("GET", "/health")[0] == 200
    assert cluster.get_json("/version")["version"] == "1.11.0"
    assert cluster.get_json("/flags")["flags"]["launcher"] == "posix"
    metrics = cluster.get_json("/metrics/snapshot")
    assert metrics["slave/registered"] == 1.0 and metrics["slave/tasks_running"] == 1.0
    assert metrics["slave/executors_running"] == 1.0
    cluster.run_task("done", "true")
    cluster.wait_state("done", "TASK_FINISHED")
    wait_for(lambda: cluster.get_json("/metrics/snapshot")["slave/tasks_finished"] == 1.0,
             what="tasks_finished")


def test_shutdown_framework_kills_its_tasks(cluster):
    """ShutdownFramework: the executor gets SHUTDOWN, the task is KILLED, nothing is left."""
    cluster.run_task("fw-task", "sleep 100")
    cluster.wait_state("fw-task", "TASK_RUNNING")
    pid = cluster.executor_pid("fw-task")
    cluster.send(protocol.ShutdownFramework(framework_id="fw-1"))
    cluster.wait_state("fw-task", "TASK_KILLED")
    wait_for(lambda: no_session_left(pid), what="the framework's processes to go")
    wait_for(lambda: cluster.call(lambda: "fw-1" not in cluster.agent.frameworks),
             what="the framework to be forgotten")


def test_agent_stop_leaves_no_process(make_cluster):
    """stop() kills every container, even a task that ignores SIGTERM, and closes its port."""
    c = make_cluster()
    c.wait_registered()
    c.run_task("a", "sleep 100")
    c.run_task("b", "trap '' TERM; sleep 100")
    # An executor that itself ignores SIGTERM: only the agent's SIGKILL can end it.
    c.run_task("c", None, executor=custom_executor("deaf", "trap '' TERM; sleep 100"))
    c.wait_state("a", "TASK_RUNNING")
    c.wait_state("b", "TASK_RUNNING")
    pids = [c.executor_pid("a"), c.executor_pid("b"), c.executor_pid("deaf")]
    c.stop()
    for pid in pids:
        assert no_session_left(pid), f"session {pid} survived: {_session(pid)}"
    try:
        c.http("GET", "/health")
    except OSError:
        pass
    else:
        raise AssertionError("the agent still serves after stop()")


def _session(sid: int) -> list[int]:
    from agent.containerizer.launcher import session_members
    return session_members(sid) or []


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def test_invalid_tasks_fail_with_the_reason(cluster):
    """A task with neither command nor executor, or an id that cannot be a directory: TASK_FAILED."""
    cluster.run_task("empty", None)
    status = cluster.wait_state("empty", "TASK_FAILED")
    assert status["reason"] == "REASON_TASK_INVALID" and "neither" in status["message"]
    cluster.run_task("a/b", "true")
    status = cluster.wait_state("a/b", "TASK_FAILED")
    assert status["reason"] == "REASON_TASK_INVALID" and "directory" in status["message"]
