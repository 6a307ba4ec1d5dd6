"""Tasks in Linux containers on a real agent: namespaces, cgroups limits, volumes, usage,
kills, and nothing left behind (no cgroup, mount, process or runtime directory)."""

from __future__ import annotations

import json
import os

import pytest

from agent_harness import agent_reactor, make_cluster, wait_for  # noqa: F401  (fixtures)

from agora import protocol

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the linux launcher needs root")

ISOLATION = "filesystem/linux,namespaces/pid,namespaces/uts,namespaces/ipc,cgroups/cpu," \
            "cgroups/mem,cgroups/pids,posix/rlimits"


@pytest.fixture
def linux(make_cluster):
    """An agent with the linux launcher and most isolators."""
    c = make_cluster(launcher="linux", isolation=ISOLATION,
                     container_flags={"image_providers": ""})
    c.wait_registered()
    return c


def mem(mb: float) -> dict:
    return {"name": "mem", "type": "SCALAR", "scalar": {"value": mb}}


def cpus(n: float) -> dict:
    return {"name": "cpus", "type": "SCALAR", "scalar": {"value": n}}


def container_dirs(cluster) -> list[str]:
    """Every directory the containerizer keeps for this agent's containers right now."""
    root = cluster.agent.containerizer.isolators[3].settings.flags["cgroups_root"]
    found = []
    for hierarchy in ("cpu", "memory", "pids", "freezer"):
        base = f"/sys/fs/cgroup/{hierarchy}/{root}"
        if os.path.isdir(base):
            found += [os.path.join(base, n) for n in os.listdir(base)
                      if os.path.isdir(os.path.join(base, n))]
    runtime = os.path.join(cluster.agent.containerizer.runtime_dir, "containers")
    if os.path.isdir(runtime):
        found += [os.path.join(runtime, n) for n in os.listdir(runtime)]
    return found


def test_a_command_task_runs_in_its_own_pid_namespace_and_leaves_nothing(linux):
    """PID 1 is the container's init, the hostname is its own; afterwards no cgroup or
    runtime directory of it remains."""
    linux.run_task("ns", "echo pid=$$ host=$(hostname); cat /proc/1/comm; ls /proc | "
                         "grep -c '^[0-9]'", resources=[cpus(0.5), mem(64)])
    status = linux.wait_state("ns", "TASK_FINISHED")
    lines = linux.read_sandbox("ns").splitlines()
    assert lines[0].startswith("pid=2 host="), lines
    assert lines[0] != f"pid=2 host={os.uname().nodename}"
    assert int(lines[2]) <= 5
    assert status["container_status"]["container_id"]["value"]
    wait_for(lambda: not container_dirs(linux), what="the container's cgroups to go")


def test_a_task_past_its_memory_limit_fails_with_the_memory_reason(linux):
    """64 MB and a 128 MB allocation: TASK_FAILED, REASON_CONTAINER_LIMITATION_MEMORY."""
    linux.run_task("oom", "dd if=/dev/zero of=/dev/null bs=128M count=1",
                   resources=[cpus(0.5), mem(64)])
    status = linux.wait_state("oom", "TASK_FAILED")
    assert status["reason"] == "REASON_CONTAINER_LIMITATION_MEMORY", status
    assert "Memory limit exceeded" in status["message"]
    wait_for(lambda: not container_dirs(linux), what="the container's cgroups to go")


def test_cpu_shares_follow_the_cpus_given(linux):
    """cpus 0.5 (+ 0.1 for our executor) is cpu.shares 614 in the task's cgroup."""
    linux.run_task("cpu", "cat /sys/fs/cgroup/cpu$(grep ':cpu:' /proc/self/cgroup | "
                          "cut -d: -f3)/cpu.shares", resources=[cpus(0.5), mem(64)])
    linux.wait_state("cpu", "TASK_FINISHED")
    assert linux.read_sandbox("cpu").strip() == "614"


def test_a_killed_task_is_killed_and_its_container_cleaned_up(linux):
    """KILL: TASK_KILLED, and every process and cgroup of the container is gone."""
    linux.run_task("k", "sleep 1000", resources=[cpus(0.1), mem(64)])
    linux.wait_state("k", "TASK_RUNNING")
    linux.send(protocol.KillTask(framework_id="fw-1", task_id="k"))
    linux.wait_state("k", "TASK_KILLED")
    wait_for(lambda: not container_dirs(linux), what="the container's cgroups to go")


def test_statistics_come_from_the_cgroups(linux):
    """/monitor/statistics has the cgroup figures with Mesos's names."""
    linux.run_task("st", "sleep 1000", resources=[cpus(0.5), mem(128)])
    linux.wait_state("st", "TASK_RUNNING")

    def stats():
        entries = linux.get_json("/monitor/statistics")
        return entries and entries[0]["statistics"].get("mem_limit_bytes") and entries[0]

    entry = wait_for(stats, what="statistics")["statistics"]
    assert entry["mem_limit_bytes"] == (128 + 32) * 1024 * 1024
    assert entry["cpus_limit"] == pytest.approx(0.6)
    assert entry["processes"] >= 2
    assert "cpus_user_time_secs" in entry and "mem_rss_bytes" in entry
