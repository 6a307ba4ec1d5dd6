"""Health checks run by the built-in executor: the pure schedule, then COMMAND, HTTP and TCP
checks of real tasks on a real agent, on the host and in Linux containers (their own PID,
mount and network namespaces)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid

import pytest
from agent_harness import agent_reactor, cluster, make_cluster, wait_for  # noqa: F401

from agora import protocol
from agora import health_checks as health
from agora.health_checks import Health, HealthCheck, Verdict
from tests.cluster import processes_with
from tests.images import busybox_images  # noqa: F401  (fixture)
from tests.zookeeper import free_ports

REASON = "REASON_TASK_HEALTH_CHECK_STATUS_UPDATED"
SERVE = "exec python3 -m http.server --bind 127.0.0.1 $PORT0"


# --- the pure part ------------------------------------------------------------------------


def test_the_health_module_imports_nothing():
    """agora.health_checks is pure: a fresh interpreter loads no other module for it."""
    code = ("import sys; before = set(sys.modules); import agora.health_checks; "
            "print(sorted(set(sys.modules) - before - {'__future__', 'agora', "
            "'agora.health_checks'}))")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                         env=dict(os.environ, PYTHONPATH=".")).stdout
    assert out.strip() == "[]"


def test_parse_takes_mesos_defaults_and_fields():
    """Missing fields get the Mesos proto defaults; timeout 0 means none; paths default to /."""
    check = health.parse({"type": "TCP", "tcp": {"port": 80}})
    assert (check.kind, check.port, check.delay, check.interval, check.timeout,
            check.consecutive_failures, check.grace_period) == ("TCP", 80, 15, 10, 20, 3, 10)
    check = health.parse({"type": "HTTP", "http": {"port": 8080, "scheme": "https"},
                          "timeout_seconds": 0, "interval_seconds": 0.5})
    assert (check.scheme, check.path, check.timeout, check.interval) == ("https", "/", None, 0.5)
    assert health.parse({"type": "COMMAND", "command": {"value": "true"}}).name == \
        "COMMAND health check"


@pytest.mark.parametrize("bad, says", [
    ([], "must be an object"),
    ({}, "'type' must be one of COMMAND, HTTP, TCP"),
    ({"type": "GRPC"}, "'GRPC'"),
    ({"type": "COMMAND"}, "needs 'command'"),
    ({"type": "COMMAND", "command": {"shell": True}}, "needs 'value' (the shell command)"),
    ({"type": "COMMAND", "command": {"value": "x", "arguments": "x"}}, "list of strings"),
    ({"type": "COMMAND", "command": {"value": "x", "environment": {"variables": [1]}}},
     "environment.variables"),
    ({"type": "HTTP"}, "needs 'http'"),
    ({"type": "HTTP", "http": {"port": 0}}, "'http.port' must be a port number"),
    ({"type": "HTTP", "http": {"port": 80, "scheme": "ftp"}}, "http or https"),
    ({"type": "HTTP", "http": {"port": 80, "path": "health"}}, "must start with '/'"),
    ({"type": "TCP", "tcp": {"port": "80"}}, "'tcp.port' must be a port number"),
    ({"type": "TCP", "tcp": {"port": 80, "protocol": "IPX"}}, "IPv4 or IPv6"),
    ({"type": "TCP", "tcp": {"port": 80}, "interval_seconds": -1}, "must not be negative"),
    ({"type": "TCP", "tcp": {"port": 80}, "delay_seconds": "5"}, "must be a number"),
    ({"type": "TCP", "tcp": {"port": 80}, "consecutive_failures": 1.5}, "whole number"),
])
def test_parse_says_what_is_wrong(bad, says):
    """Every invalid HealthCheck is a ValueError naming the field."""
    with pytest.raises(ValueError) as e:
        health.parse(bad)
    assert says in str(e.value)


def check(**fields) -> HealthCheck:
    fields = {"delay": 1.0, "interval": 2.0, "timeout": 1.0, "consecutive_failures": 3,
              "grace_period": 0.0, **fields}
    return HealthCheck("TCP", port=1, **fields)


def test_the_first_check_waits_for_the_delay_and_the_next_for_the_interval():
    """Due `delay` after the start, then `interval` after each result; none while one runs."""
    h = Health(check(), started=100.0)
    assert not h.due(100.9) and h.due(101.0) and h.wake_at() == 101.0
    h.begin()
    assert not h.due(105.0) and h.wake_at() is None
    h.result(True, "", 101.5)
    assert h.wake_at() == 103.5 and not h.due(103.4) and h.due(103.5)


def test_health_is_reported_on_the_first_result_and_on_changes_only():
    """pass → report True; pass → nothing; fail → report False; fail → nothing; pass → True."""
    h = Health(check(consecutive_failures=5), started=0.0)
    outcomes = [h.result(ok, "why", float(t)) for t, ok in
                enumerate([True, True, False, False, True], start=1)]
    assert [v.report for v in outcomes] == [True, None, False, None, True]
    assert not any(v.kill for v in outcomes)


def test_consecutive_failures_kill_and_stop_checking():
    """The Nth failure in a row says kill; a pass in between resets the count."""
    h = Health(check(consecutive_failures=2), started=0.0)
    assert h.result(False, "a", 1.0) == Verdict(report=False)
    assert h.result(True, "", 2.0) == Verdict(report=True)
    assert h.result(False, "b", 3.0) == Verdict(report=False)
    assert h.result(False, "refused", 4.0) == Verdict(kill=True)
    assert h.stopped and not h.due(1e9)
    assert h.kill_message("t1") == \
        "Task t1 killed: TCP health check failed 2 times in a row (last: refused)"


def test_failures_in_the_grace_period_are_ignored_until_the_first_pass():
    """Inside the grace period failures do not count; once a check passed, they do."""
    h = Health(check(grace_period=10.0, consecutive_failures=1), started=0.0)
    assert h.result(False, "", 5.0) == Verdict(ignored=True)
    assert h.result(False, "", 10.0) == Verdict(ignored=True)  # Mesos: `<=` grace
    h = Health(check(grace_period=10.0, consecutive_failures=1), started=0.0)
    assert h.result(True, "", 4.0) == Verdict(report=True)
    assert h.result(False, "", 5.0) == Verdict(report=False, kill=True)  # it passed once
    h = Health(check(grace_period=10.0, consecutive_failures=2), started=0.0)
    assert h.result(False, "late", 10.1) == Verdict(report=False)  # past the grace period


def test_a_result_after_stop_means_nothing():
    """The task is being killed: a check that was running when it began reports nothing."""
    h = Health(check(), started=0.0)
    h.begin()
    h.stop()
    assert h.result(False, "x", 5.0) == Verdict() and h.healthy is None


def test_zero_consecutive_failures_kills_at_the_first_failure():
    """consecutive_failures 0 (Mesos: `failures >= 0`) kills on the first counted failure."""
    assert Health(check(consecutive_failures=0), started=0.0).result(False, "", 1.0).kill


# --- real tasks on the host -----------------------------------------------------------------


def hc(kind: str, delay=0.0, interval=0.2, timeout=2.0, failures=3, grace=0.0, **spec) -> dict:
    """A Mesos HealthCheck JSON with short times."""
    out = {"type": kind, "delay_seconds": delay, "interval_seconds": interval,
           "timeout_seconds": timeout, "consecutive_failures": failures,
           "grace_period_seconds": grace}
    if kind == "COMMAND":
        out["command"] = spec.get("command") or {"value": spec["value"]}
    else:
        out[kind.lower()] = {k: v for k, v in spec.items()}
    return out


def health_updates(c, task_id: str) -> list[dict]:
    """The TASK_RUNNING updates that carry a health result, re-sends collapsed."""
    seen, out = set(), []
    for s in c.master.updates(task_id):
        if "healthy" in s and s["state"] == "TASK_RUNNING" and s["uuid"] not in seen:
            seen.add(s["uuid"])
            out.append(s)
    return out


def wait_healthy(c, task_id: str, healthy: bool = True, timeout: float = 15.0) -> dict:
    try:
        return wait_for(lambda: next((s for s in health_updates(c, task_id)
                                      if s["healthy"] is healthy), None), timeout,
                        what=f"{task_id} healthy={healthy}")
    except AssertionError as e:
        raise AssertionError(f"{e}; updates: {c.master.updates(task_id)}; executor stderr: "
                             f"{c.read_sandbox(task_id, 'stderr')[-2000:]}") from None


def lines(c, task_id: str, name: str) -> list[str]:
    return c.read_sandbox(task_id, name).splitlines()


def ports(port: int) -> dict:
    return {"name": "ports", "type": "RANGES", "ranges": {"range": [{"begin": port,
                                                                     "end": port}]}}


def test_a_passing_command_check_reports_healthy_once(cluster):
    """`true`-like check in the sandbox with the task's environment: one TASK_RUNNING
    healthy=true with the health reason, not repeated by later passes."""
    cluster.run_task("ok", "sleep 1000", health_check=hc(
        "COMMAND", value='echo "$MESOS_TASK_ID $(pwd)" >> checks; test -n "$HOST"'))
    status = wait_healthy(cluster, "ok")
    assert status["reason"] == REASON and status["source"] == "SOURCE_EXECUTOR"
    wait_for(lambda: len(lines(cluster, "ok", "checks")) >= 4, what="4 checks")
    assert len(health_updates(cluster, "ok")) == 1
    task_id, cwd = lines(cluster, "ok", "checks")[0].split()
    assert task_id == "ok" and os.path.realpath(cwd) == os.path.realpath(cluster.sandbox("ok"))
    cluster.send(protocol.KillTask(framework_id="fw-1", task_id="ok"))
    killed = cluster.wait_state("ok", "TASK_KILLED")
    assert "healthy" not in killed  # killed by the scheduler, not by its health


def test_a_failing_command_check_kills_the_task_after_n_failures(cluster):
    """3 failures in a row: TASK_RUNNING healthy=false once, then TASK_KILLED healthy=false
    naming the check; exactly 3 checks ran."""
    cluster.run_task("sick", "sleep 1000", health_check=hc(
        "COMMAND", value="echo x >> checks; exit 3", failures=3))
    killed = cluster.wait_state("sick", "TASK_KILLED")
    assert killed["healthy"] is False
    assert killed["message"] == ("Task sick killed: COMMAND health check failed 3 times in a "
                                 "row (last: Command exited with status 3)")
    assert [s["healthy"] for s in health_updates(cluster, "sick")] == [False]
    assert len(lines(cluster, "sick", "checks")) == 3


def test_the_grace_period_ignores_failures_until_the_first_pass(cluster):
    """Failing while the task starts (inside the grace period) is ignored; after the first
    pass a failure counts at once, grace period or not."""
    cluster.run_task("slow", "sleep 1000", health_check=hc(
        "COMMAND", value="test -f ready && echo pass >> checks || { echo fail >> checks; false; }",
        failures=1, grace=60))
    wait_for(lambda: lines(cluster, "slow", "checks").count("fail") >= 2, what="2 failures")
    open(os.path.join(cluster.sandbox("slow"), "ready"), "w").close()
    wait_healthy(cluster, "slow")
    assert [s["healthy"] for s in health_updates(cluster, "slow")] == [True]
    assert "TASK_KILLED" not in cluster.master.states("slow")
    os.unlink(os.path.join(cluster.sandbox("slow"), "ready"))
    killed = cluster.wait_state("slow", "TASK_KILLED")
    assert killed["healthy"] is False and "failed once" in killed["message"]
    assert [s["healthy"] for s in health_updates(cluster, "slow")] == [True, False]


def test_a_check_that_times_out_fails_and_is_killed_without_piling_up(cluster):
    """A check that hangs past its timeout counts as a failure and is killed; the next one
    starts only after it: 2 started, 2 failures, the task killed, no check process left."""
    marker = f"sleep 7.{uuid.uuid4().int % 10 ** 6}"
    cluster.run_task("hang", "sleep 1000", health_check=hc(
        "COMMAND", value=f"echo x >> started; {marker}", timeout=0.3, interval=0.5,
        failures=2))
    killed = cluster.wait_state("hang", "TASK_KILLED")
    assert "COMMAND health check failed 2 times in a row (last: timed out after 0.3s)" in \
        killed["message"], killed
    assert len(lines(cluster, "hang", "started")) == 2
    wait_for(lambda: not processes_with(marker), what="the hung checks to be killed")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_a_command_check_runs_as_the_tasks_user(cluster):
    """A task run as `nobody` is checked as `nobody` too (a root check would fail here)."""
    cluster.run_task("nobody", {"value": "sleep 1000", "user": "nobody"}, health_check=hc(
        "COMMAND", value='test "$(id -un)" = nobody && test "$USER" = nobody', failures=1))
    wait_healthy(cluster, "nobody")
    cluster.send(protocol.KillTask(framework_id="fw-1", task_id="nobody"))
    cluster.wait_state("nobody", "TASK_KILLED")


def test_a_bad_health_check_fails_the_task_before_it_starts(cluster):
    """An invalid health_check: TASK_FAILED (REASON_TASK_INVALID) saying what is wrong, and
    the command never runs."""
    cluster.run_task("bad", "touch ran; sleep 1000",
                     health_check={"type": "HTTP", "http": {"port": 80, "path": "x"}})
    failed = cluster.wait_state("bad", "TASK_FAILED")
    assert failed["reason"] == "REASON_TASK_INVALID"
    assert failed["message"] == ("Task uses an invalid health check: 'http.path' must "
                                 "start with '/', not 'x'")
    assert cluster.master.states("bad") == ["TASK_FAILED"]
    assert not os.path.exists(os.path.join(cluster.sandbox("bad"), "ran"))


def test_a_bad_health_check_in_a_task_group_fails_the_whole_group(cluster):
    """LAUNCH_GROUP with one invalid check: every task of the group fails, none starts."""
    executor = {"executor_id": {"value": "grp"}, "type": "DEFAULT",
                "framework_id": {"value": "fw-1"}}
    tasks = [{"name": t, "task_id": {"value": t}, "agent_id": {"value": cluster.agent.agent_id},
              "resources": [{"name": "cpus", "type": "SCALAR", "scalar": {"value": 0.1}}],
              "command": {"value": f"touch {t}; sleep 1000"}} for t in ("g-ok", "g-bad")]
    tasks[0]["health_check"] = hc("TCP", port=1)
    tasks[1]["health_check"] = dict(hc("TCP", port=1), interval_seconds=None)
    cluster.wait_registered()
    cluster.send(protocol.RunTaskGroup(framework=cluster.framework(), executor=executor,
                                       task_group={"tasks": tasks}))
    bad = cluster.wait_state("g-bad", "TASK_FAILED")
    ok = cluster.wait_state("g-ok", "TASK_FAILED")
    assert bad["message"] == ("Task uses an invalid health check: 'interval_seconds' must be "
                              "a number, not None")
    assert ok["message"].startswith("Task g-bad of its group uses an invalid health check")
    assert ok["reason"] == bad["reason"] == "REASON_TASK_INVALID"
    assert not [n for n in ("g-ok", "g-bad") if os.path.exists(
        os.path.join(cluster.sandbox("grp"), n))]


def test_an_http_check_passes_on_200_and_kills_on_404(cluster):
    """MESOS_HTTP against `python3 -m http.server $PORT0`: / is healthy; /missing (404) is
    killed after its failures, the message giving the status. (Grace periods cover the
    servers' start.)"""
    good, bad = free_ports(2)
    cluster.run_task("web", SERVE, resources=[ports(good)],
                     health_check=hc("HTTP", port=good, path="/", timeout=1, grace=30))
    cluster.run_task("web404", SERVE, resources=[ports(bad)],
                     health_check=hc("HTTP", port=bad, path="/missing", failures=2,
                                     grace=2))
    wait_healthy(cluster, "web")
    killed = cluster.wait_state("web404", "TASK_KILLED", timeout=20)
    assert killed["healthy"] is False
    assert f"GET http://127.0.0.1:{bad}/missing: unexpected HTTP response code 404" in \
        killed["message"]
    cluster.send(protocol.KillTask(framework_id="fw-1", task_id="web"))
    cluster.wait_state("web", "TASK_KILLED")


def test_a_tcp_check_passes_on_an_open_port_and_kills_on_a_closed_one(cluster):
    """MESOS_TCP: a listening task is healthy; a port nobody listens on kills the task."""
    listening, closed = free_ports(2)
    cluster.run_task("tcp", SERVE, resources=[ports(listening)],
                     health_check=hc("TCP", port=listening, grace=30))
    cluster.run_task("tcp-closed", "sleep 1000", health_check=hc("TCP", port=closed,
                                                                 failures=2))
    wait_healthy(cluster, "tcp")
    killed = cluster.wait_state("tcp-closed", "TASK_KILLED")
    assert f"cannot connect to 127.0.0.1:{closed}" in killed["message"], killed
    cluster.send(protocol.KillTask(framework_id="fw-1", task_id="tcp"))
    cluster.wait_state("tcp", "TASK_KILLED")


# --- real tasks in Linux containers ---------------------------------------------------------

linux_only = pytest.mark.skipif(os.geteuid() != 0, reason="the linux launcher needs root")


@pytest.fixture
def linux(make_cluster):
    """An agent with the linux launcher: each task in its own mount and PID namespaces."""
    c = make_cluster(launcher="linux", isolation="filesystem/linux,namespaces/pid",
                     container_flags={"image_providers": ""})
    c.wait_registered()
    return c


@linux_only
def test_a_command_check_runs_inside_the_tasks_pid_and_mount_namespaces(linux):
    """The check sees the container's /proc: PID 2 is the task's `sleep`, a handful of
    processes in all; it runs as the task in the sandbox; it passes and nothing is left."""
    linux.run_task("ns", "exec sleep 1000", health_check=hc(
        "COMMAND", value='echo "$$ $(cat /proc/2/comm) $(ls /proc | grep -c "^[0-9]") '
                         '$(pwd)" >> checks; test "$(cat /proc/2/comm)" = sleep', grace=30))
    wait_healthy(linux, "ns")
    pid, comm, count, cwd = lines(linux, "ns", "checks")[0].split()
    assert comm == "sleep" and int(count) <= 6 and int(pid) < 10, (pid, comm, count)
    assert os.path.realpath(cwd) == os.path.realpath(linux.sandbox("ns"))
    linux.send(protocol.KillTask(framework_id="fw-1", task_id="ns"))
    linux.wait_state("ns", "TASK_KILLED")


@linux_only
def test_a_failing_check_in_a_container_kills_it(linux):
    """A COMMAND check failing inside the container: TASK_KILLED healthy=false."""
    linux.run_task("cfail", "exec sleep 1000", health_check=hc(
        "COMMAND", value="test -e /proc/1/nonexistent", failures=2))
    killed = linux.wait_state("cfail", "TASK_KILLED")
    assert killed["healthy"] is False and "failed 2 times in a row" in killed["message"]


@linux_only
def test_a_command_check_sees_the_tasks_image_and_its_writes(make_cluster, busybox_images):
    """In a busybox image (overlay root filesystem), the check sees the image's files and
    what the task wrote into its root filesystem, with the image's environment."""
    c = make_cluster(launcher="linux", isolation="filesystem/linux,namespaces/pid",
                     container_flags={"image_providers": "oci",
                                      "oci_image_dir": busybox_images.oci_image_dir})
    c.wait_registered()
    image = {"type": "OCI", "oci": {"name": busybox_images.oci_layout_name}}
    c.run_task("img", "echo written > /tmp/by-task; exec sleep 1000",
               container={"type": "MESOS", "mesos": {"image": image}},
               health_check=hc("COMMAND", grace=30, value=(
                   'echo "$(cat /etc/agora-image) $(cat /tmp/by-task) $AGORA_IMAGE" '
                   '> /mnt/mesos/sandbox/checks; test -f /tmp/by-task')))
    wait_healthy(c, "img", timeout=30)
    assert lines(c, "img", "checks") == ["busybox written busybox"]
    assert not os.path.exists("/etc/agora-image")  # (the host has no such file)
    c.send(protocol.KillTask(framework_id="fw-1", task_id="img"))
    c.wait_state("img", "TASK_KILLED")


@pytest.fixture
def loopback_network(tmp_path):
    """A CNI network with nothing but the loopback interface: the task gets a network
    namespace of its own whose 127.0.0.1 the host cannot reach."""
    if not os.path.exists("/usr/lib/cni/loopback"):
        pytest.skip("containernetworking-plugins is not installed (scripts/test installs it)")
    config_dir = tmp_path / "cni"
    config_dir.mkdir()
    (config_dir / "10-lo.conflist").write_text(
        '{"cniVersion": "0.4.0", "name": "lo-only", "plugins": [{"type": "loopback"}]}')
    return str(config_dir)


@linux_only
def test_http_and_tcp_checks_connect_inside_the_tasks_network_namespace(make_cluster,
                                                                       loopback_network):
    """A server on 127.0.0.1 in the task's own network namespace (unreachable from the host)
    is healthy over HTTP and TCP: the checks connect from inside it."""
    c = make_cluster(launcher="linux", isolation="filesystem/linux,namespaces/pid,network/cni",
                     container_flags={"image_providers": "",
                                      "network_cni_config_dir": loopback_network})
    c.wait_registered()
    port = free_ports(1)[0]
    container = {"type": "MESOS", "network_infos": [{"name": "lo-only"}]}
    c.run_task("nethttp", SERVE, resources=[ports(port)], container=container,
               health_check=hc("HTTP", port=port, path="/", grace=30))
    c.run_task("nettcp", SERVE, resources=[ports(port)], container=container,
               health_check=hc("TCP", port=port, grace=30))
    wait_healthy(c, "nethttp", timeout=30)
    wait_healthy(c, "nettcp", timeout=30)
    # Both serve the same port, each in its own namespace; the host's port is free.
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    for task in ("nethttp", "nettcp"):
        c.send(protocol.KillTask(framework_id="fw-1", task_id=task))
        c.wait_state(task, "TASK_KILLED")
