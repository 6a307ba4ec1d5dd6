"""What a task sees: MESOS_TASK_ID, HOST, PORT* variables, and the user it runs as."""

from __future__ import annotations

import os
import pwd

import pytest
from agent_harness import (  # noqa: F401  (fixtures)
    agent_reactor, cluster, file_server, make_cluster, wait_for)

from agora import protocol

from agent.executors.command import port_numbers, task_user, task_variables

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="switching users needs the agent to run as root")


def ports(*ranges) -> dict:
    return {"name": "ports", "type": "RANGES",
            "ranges": {"range": [{"begin": b, "end": e} for b, e in ranges]}}


# --- pure ---------------------------------------------------------------------------------


def test_task_variables_from_ports_and_discovery_names():
    """PORT0.. follow the ranges in order; PORTS joins them; named ports get PORT_<NAME>."""
    info = {"task_id": {"value": "t"}, "resources": [ports((31000, 31001), (31005, 31005))],
            "discovery": {"ports": {"ports": [{"number": 31001, "name": "http-api"},
                                              {"number": 9999, "name": "elsewhere"}]}}}
    assert task_variables(info) == {
        "MESOS_TASK_ID": "t", "PORT0": "31000", "PORT1": "31001", "PORT2": "31005",
        "PORT": "31000", "PORTS": "31000,31001,31005", "PORT_HTTP_API": "31001"}
    assert task_variables({"task_id": {"value": "p"}}) == {"MESOS_TASK_ID": "p"}
    assert port_numbers([{"name": "ports", "type": "SCALAR"}]) == []


def test_task_user_prefers_the_task_then_the_executor_then_the_framework():
    """Mesos's rule for who a task runs as."""
    task = {"command": {"user": "alice"}}
    executor = {"command": {"user": "bob"}}
    framework = {"user": "carol"}
    assert task_user(task, executor, framework) == "alice"
    assert task_user({"command": {}}, executor, framework) == "bob"
    assert task_user(None, None, framework) == "carol"
    assert task_user(None, None, {"user": ""}) is None


# --- under an agent ------------------------------------------------------------------------


def test_a_task_sees_its_id_host_and_ports_and_its_own_environment_wins(cluster):
    """MESOS_TASK_ID, HOST and PORT* reach the task; CommandInfo.environment overrides them."""
    command = {"value": "echo $MESOS_TASK_ID $HOST $PORT0 $PORT1 $PORTS $PORT_WEB $PORT",
               "environment": {"variables": [{"name": "PORT", "value": "mine"}]}}
    cluster.run_task("env", command, resources=[ports((31010, 31011))],
                     discovery={"visibility": "FRAMEWORK",
                                "ports": {"ports": [{"number": 31011, "name": "web"}]}})
    cluster.wait_state("env", "TASK_FINISHED")
    assert cluster.read_sandbox("env").split() == [
        "env", cluster.agent.hostname, "31010", "31011", "31010,31011", "31011", "mine"]


def test_each_task_of_a_group_sees_its_own_id_and_ports(cluster):
    """In a task group the variables are per task, not per executor."""
    executor = {"executor_id": {"value": "grp"}, "type": "DEFAULT",
                "framework_id": {"value": "fw-1"}}
    tasks = [{"name": n, "task_id": {"value": n}, "agent_id": {"value": "fake-S0"},
              "resources": [ports((p, p))],
              "command": {"value": "echo $MESOS_TASK_ID=$PORT0 > $MESOS_TASK_ID.out"}}
             for n, p in (("ga", 31020), ("gb", 31021))]
    cluster.send(protocol.RunTaskGroup(framework=cluster.framework(), executor=executor,
                                       task_group={"tasks": tasks}))
    cluster.wait_state("ga", "TASK_FINISHED")
    cluster.wait_state("gb", "TASK_FINISHED")
    assert cluster.read_sandbox("grp", "ga.out") == "ga=31020\n"
    assert cluster.read_sandbox("grp", "gb.out") == "gb=31021\n"


NOBODY = pwd.getpwnam("nobody")
WHO = "id -u; id -g; echo $HOME $USER $LOGNAME; stat -c %U ."


@needs_root
def test_a_command_task_runs_as_the_user_it_names(cluster, file_server):
    """command.user: the task's uid/gid/HOME/USER are that user's; sandbox and fetched files
    are theirs too."""
    (file_server.root / "f.txt").write_text("x")
    command = {"value": WHO + "; stat -c %U f.txt", "user": "nobody",
               "uris": [{"value": file_server.url + "/f.txt"}]}
    cluster.run_task("who", command)
    cluster.wait_state("who", "TASK_FINISHED")
    assert cluster.read_sandbox("who").split() == [
        str(NOBODY.pw_uid), str(NOBODY.pw_gid), NOBODY.pw_dir, "nobody", "nobody",
        "nobody", "nobody"]


@needs_root
def test_the_framework_user_applies_when_the_task_names_none(cluster):
    """FrameworkInfo.user is the default user."""
    cluster.run_task("fwuser", WHO, framework=cluster.framework(user="nobody"))
    cluster.wait_state("fwuser", "TASK_FINISHED")
    assert cluster.read_sandbox("fwuser").split()[:2] == [str(NOBODY.pw_uid),
                                                          str(NOBODY.pw_gid)]


@needs_root
def test_a_custom_executor_runs_as_its_user(cluster):
    """A custom executor's process itself runs as the executor's (or framework's) user."""
    executor = {"executor_id": {"value": "as-nobody"},
                "command": {"value": WHO + "; sleep 30", "user": "nobody"}}
    cluster.run_task("ce", None, executor=executor)
    pid = cluster.executor_pid("as-nobody")
    wait_for(lambda: len(cluster.read_sandbox("as-nobody").split()) == 6, what="its output")
    assert cluster.read_sandbox("as-nobody").split() == [
        str(NOBODY.pw_uid), str(NOBODY.pw_gid), NOBODY.pw_dir, "nobody", "nobody", "nobody"]
    assert os.stat(f"/proc/{pid}").st_uid == NOBODY.pw_uid


@needs_root
def test_tasks_of_one_group_may_run_as_different_users(cluster):
    """Like Mesos's nested containers, each task of a group runs as its own user."""
    executor = {"executor_id": {"value": "mixed"}, "type": "DEFAULT",
                "framework_id": {"value": "fw-1"}}
    tasks = [{"name": n, "task_id": {"value": n}, "agent_id": {"value": "fake-S0"},
              "command": {"value": "echo $MESOS_TASK_ID=$(id -u)", **extra}}
             for n, extra in (("as-root", {}), ("as-nobody", {"user": "nobody"}))]
    cluster.send(protocol.RunTaskGroup(framework=cluster.framework(), executor=executor,
                                       task_group={"tasks": tasks}))
    cluster.wait_state("as-root", "TASK_FINISHED")
    cluster.wait_state("as-nobody", "TASK_FINISHED")
    # (The shared sandbox belongs to the executor's user, root here: only the output
    # files, inherited from the executor, are writable for the nobody task.)
    assert sorted(cluster.read_sandbox("mixed").split()) == [f"as-nobody={NOBODY.pw_uid}",
                                                             "as-root=0"]


@needs_root
def test_an_unknown_user_fails_the_task_before_anything_starts(cluster):
    """A user that does not exist: TASK_FAILED, CONTAINER_LAUNCH_FAILED, no executor."""
    cluster.run_task("ghost", {"value": "touch ran", "user": "no-such-user-agora"})
    status = cluster.wait_state("ghost", "TASK_FAILED")
    assert status["reason"] == "REASON_CONTAINER_LAUNCH_FAILED"
    assert "user 'no-such-user-agora' does not exist" in status["message"]
    assert cluster.master.states("ghost") == ["TASK_FAILED"]
    executor = {"executor_id": {"value": "ghost-ex"}, "command": {"value": "sleep 30"}}
    cluster.run_task("ghost2", None, executor=executor,
                     framework=cluster.framework(user="no-such-user-agora"))
    status = cluster.wait_state("ghost2", "TASK_FAILED")
    assert status["reason"] == "REASON_CONTAINER_LAUNCH_FAILED"
    exited = wait_for(lambda: cluster.master.of(protocol.ExitedExecutor), what="ExitedExecutor")
    assert exited[0].executor_id == "ghost-ex" and exited[0].status == -1


@needs_root
def test_no_switch_user_runs_everything_as_the_agent(make_cluster):
    """With switch_user off, the named user is ignored (and need not exist)."""
    c = make_cluster(switch_user=False)
    c.wait_registered()
    c.run_task("me", {"value": "id -u", "user": "no-such-user-agora"})
    c.wait_state("me", "TASK_FINISHED")
    assert c.read_sandbox("me") == f"{os.geteuid()}\n"
    assert c.get_json("/flags")["flags"]["switch_user"] == "false"
