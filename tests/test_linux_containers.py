"""Tasks in Linux containers on a real agent: namespaces, cgroups limits, volumes, usage,
kills, and nothing left behind (no cgroup, mount, process or runtime directory)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

import pytest

from agent_harness import agent_reactor, make_cluster, wait_for  # noqa: F401  (fixtures)

from agora import protocol
from tests.cluster import REPO
from tests.images import busybox_images  # noqa: F401  (fixture)

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
    """Every directory the containerizer keeps for this agent's containers right now: its
    cgroups in every hierarchy, and their runtime directories."""
    found = []
    for root in cluster.agent.containerizer.launcher.roots:
        if os.path.isdir(root):
            found += [os.path.join(root, n) for n in os.listdir(root)
                      if os.path.isdir(os.path.join(root, n))]
    runtime = os.path.join(cluster.agent.containerizer.runtime_dir, "containers")
    if os.path.isdir(runtime):
        found += [os.path.join(runtime, n) for n in os.listdir(runtime)]
    cni = os.path.join(cluster.agent.containerizer.runtime_dir, "cni")
    if os.path.isdir(cni):
        found += [os.path.join(cni, n) for n in os.listdir(cni)]
    with open("/proc/self/mountinfo") as f:  # mounts (netns files, rootfs) on the host
        found += [line.split()[4] for line in f if cluster.work_dir in line.split()[4]]
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


@pytest.fixture
def cni_network(tmp_path):
    """A CNI bridge network (no gateway, no masquerade: nothing on the host's own stack
    changes but an unaddressed bridge, deleted at the end) named agora-test."""
    if not os.path.exists("/usr/lib/cni/bridge"):
        pytest.skip("containernetworking-plugins is not installed (scripts/test installs it)")
    bridge = "agt" + uuid.uuid4().hex[:8]
    config_dir = tmp_path / "cni"
    config_dir.mkdir()
    ipam_dir = tmp_path / "ipam"
    (config_dir / "10-agora-test.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "agora-test",
        "plugins": [{"type": "bridge", "bridge": bridge, "isGateway": False, "ipMasq": False,
                     "ipam": {"type": "host-local", "dataDir": str(ipam_dir),
                              "ranges": [[{"subnet": "10.251.7.0/24"}]]}}]}))
    yield str(config_dir), ipam_dir
    subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def test_a_cni_network_gives_the_task_an_address_it_reports(make_cluster, cni_network):
    """network/cni: the task sees eth0 with the address its status reports; DEL releases
    it and the namespace goes."""
    config_dir, ipam_dir = cni_network
    c = make_cluster(launcher="linux", isolation="filesystem/linux,network/cni,cgroups/mem",
                     container_flags={"image_providers": "",
                                      "network_cni_config_dir": config_dir})
    c.wait_registered()
    c.run_task("net", "ip -4 -o addr show eth0; ip -o link | grep -c ': '",
               resources=[cpus(0.1), mem(64)],
               container={"type": "MESOS", "network_infos": [{"name": "agora-test"}]})
    running = c.wait_state("net", "TASK_RUNNING")
    [info] = running["container_status"]["network_infos"]
    assert info["name"] == "agora-test"
    address = info["ip_addresses"][0]["ip_address"]
    assert address.startswith("10.251.7.")
    c.wait_state("net", "TASK_FINISHED")
    out = c.read_sandbox("net").splitlines()
    assert f"inet {address}/24" in out[0]
    assert out[1] == "2"  # lo and eth0: not the host's interfaces
    wait_for(lambda: not container_dirs(c), what="the container to be cleaned up")
    wait_for(lambda: not [n for n in os.listdir(ipam_dir / "agora-test")
                          if n.startswith("10.")], what="the address to be released")


def test_an_unknown_cni_network_fails_the_launch_with_the_known_ones(make_cluster,
                                                                     cni_network):
    """A task naming a network the config dir lacks: TASK_FAILED saying which exist."""
    config_dir, _ = cni_network
    c = make_cluster(launcher="linux", isolation="filesystem/linux,network/cni",
                     container_flags={"image_providers": "",
                                      "network_cni_config_dir": config_dir})
    c.run_task("nonet", "true", container={"type": "MESOS",
                                           "network_infos": [{"name": "nowhere"}]})
    status = c.wait_state("nonet", "TASK_FAILED")
    assert status["reason"] == "REASON_CONTAINER_LAUNCH_FAILED"
    assert "nowhere" in status["message"] and "agora-test" in status["message"]
    wait_for(lambda: not container_dirs(c), what="the container to be cleaned up")


def test_volumes_are_mounted_and_read_only_ones_refuse_writes(linux, tmp_path):
    """A host_path volume read-only in the sandbox, a sandbox_path volume read-write."""
    data = tmp_path / "shared"
    data.mkdir()
    (data / "hello").write_text("from the host\n")
    volumes = [{"container_path": "ro", "mode": "RO",
                "source": {"type": "HOST_PATH", "host_path": {"path": str(data)}}},
               {"container_path": "rw", "mode": "RW",
                "source": {"type": "SANDBOX_PATH", "sandbox_path": {"type": "SELF",
                                                                    "path": "store"}}}]
    linux.run_task("vol", "cat ro/hello; touch ro/x 2>/dev/null && echo bad || echo ro-ok; "
                          "echo kept > rw/f", resources=[cpus(0.1), mem(64)],
                   container={"type": "MESOS", "volumes": volumes})
    linux.wait_state("vol", "TASK_FINISHED")
    assert linux.read_sandbox("vol").splitlines() == ["from the host", "ro-ok"]
    assert open(os.path.join(linux.sandbox("vol"), "store", "f")).read() == "kept\n"
    assert not os.listdir(data) == ["hello", "x"]


def test_a_bad_volume_fails_the_launch_and_leaves_nothing(linux):
    """A volume escaping the sandbox: TASK_FAILED with the reason, nothing left."""
    volumes = [{"container_path": "../../escape", "mode": "RW",
                "source": {"type": "SANDBOX_PATH", "sandbox_path": {"path": "x"}}}]
    linux.run_task("badvol", "true", container={"type": "MESOS", "volumes": volumes})
    status = linux.wait_state("badvol", "TASK_FAILED")
    assert status["reason"] == "REASON_CONTAINER_LAUNCH_FAILED"
    assert "leaves the sandbox" in status["message"]
    wait_for(lambda: not container_dirs(linux), what="the container to be cleaned up")


# --- images on the agent, groups, custom executors ---------------------------------------


@pytest.fixture
def imaging(make_cluster, busybox_images, tmp_path):  # noqa: F811
    """An agent with images from `docker save` archives, devices, pids and disk isolation."""
    c = make_cluster(
        launcher="linux", executor_registration_timeout=2.0,
        isolation=ISOLATION + ",cgroups/devices,disk/du",
        container_flags={"docker_registry": busybox_images.docker_archive_dir,
                         "cgroups_pids_limit": 32, "enforce_container_disk_quota": True,
                         "container_disk_watch_interval": 0.2})
    c.wait_registered()
    c.images = busybox_images
    return c


def in_image(images) -> dict:
    return {"type": "MESOS", "mesos": {"image": images.docker_image(
        images.docker_archive_name)}}


def test_each_task_of_a_group_gets_its_own_image_or_none(imaging):
    """A task group: one task in the image, one on the host; they share the sandbox."""
    executor = {"executor_id": {"value": "grp"}, "type": "DEFAULT",
                "framework_id": {"value": "fw-1"}}
    tasks = [{"name": "boxed", "task_id": {"value": "boxed"}, "agent_id": {"value": "fake-S0"},
              "resources": [cpus(0.1), mem(32)], "container": in_image(imaging.images),
              "command": {"value": "cat /etc/agora-image > /mnt/mesos/sandbox/boxed.out"}},
             {"name": "host", "task_id": {"value": "host"}, "agent_id": {"value": "fake-S0"},
              "resources": [cpus(0.1), mem(32)],
              "command": {"value": "test -e /etc/agora-image || echo host > host.out"}}]
    imaging.send(protocol.RunTaskGroup(framework=imaging.framework(), executor=executor,
                                       task_group={"tasks": tasks}))
    imaging.wait_state("boxed", "TASK_FINISHED")
    imaging.wait_state("host", "TASK_FINISHED")
    assert imaging.read_sandbox("grp", "boxed.out") == "busybox\n"
    assert imaging.read_sandbox("grp", "host.out") == "host\n"


def test_a_custom_executor_with_an_image_runs_inside_it(imaging):
    """An ExecutorInfo's image is the executor's own root filesystem; one that never
    subscribes is killed after the registration timeout and cleaned up."""
    executor = {"executor_id": {"value": "boxex"}, "framework_id": {"value": "fw-1"},
                "container": in_image(imaging.images),
                "command": {"value": "cat /etc/agora-image > $MESOS_SANDBOX/seen; sleep 100"}}
    imaging.run_task("viaexec", None, executor=executor)
    status = imaging.wait_state("viaexec", "TASK_FAILED")
    assert status["reason"] == "REASON_EXECUTOR_REGISTRATION_TIMEOUT"
    assert imaging.read_sandbox("boxex", "seen") == "busybox\n"
    wait_for(lambda: not container_dirs(imaging), what="the container to be cleaned up")


def test_devices_outside_the_whitelist_are_refused(imaging):
    """cgroups/devices: /dev/null works, a disk's block device cannot be opened."""
    imaging.run_task("dev", "mknod /tmp/disk b 8 0; echo x > /dev/null && echo null-ok; "
                            "head -c 1 /tmp/disk 2>&1 || true",
                     resources=[cpus(0.1), mem(64)], container=in_image(imaging.images))
    imaging.wait_state("dev", "TASK_FINISHED")
    out = imaging.read_sandbox("dev")
    assert "null-ok" in out and "Operation not permitted" in out, out


def test_the_pids_limit_stops_a_fork_storm(imaging):
    """cgroups/pids with --cgroups-pids-limit 32: 100 sleepers cannot all start (the shell
    fails to fork and gives up)."""
    imaging.run_task("forks", "for i in $(seq 100); do sleep 5 & done; wait",
                     resources=[cpus(0.1), mem(64)], container=in_image(imaging.images))
    imaging.wait_state("forks", "TASK_FAILED", timeout=30)
    assert "can't fork" in imaging.read_sandbox("forks", "stderr")


def test_rlimits_from_the_container_info_apply(imaging):
    """posix/rlimits: RLMT_NOFILE reaches the task."""
    container = dict(in_image(imaging.images), rlimit_info={"rlimits": [
        {"type": "RLMT_NOFILE", "soft": 200, "hard": 300}]})
    imaging.run_task("rl", "ulimit -n; ulimit -H -n", resources=[cpus(0.1), mem(64)],
                     container=container)
    imaging.wait_state("rl", "TASK_FINISHED")
    assert imaging.read_sandbox("rl").split() == ["200", "300"]


def test_a_task_past_its_disk_quota_fails_with_the_disk_reason(imaging):
    """disk/du with enforcement: 3 MB written against disk:1 is
    REASON_CONTAINER_LIMITATION_DISK."""
    imaging.run_task("du", "dd if=/dev/zero of=/mnt/mesos/sandbox/big bs=1M count=3; sleep 30",
                     resources=[cpus(0.1), mem(64), {"name": "disk", "type": "SCALAR",
                                                     "scalar": {"value": 1}}],
                     container=in_image(imaging.images))
    status = imaging.wait_state("du", "TASK_FAILED", timeout=20)
    assert status["reason"] == "REASON_CONTAINER_LIMITATION_DISK"
    wait_for(lambda: not container_dirs(imaging), what="the container to be cleaned up")


def test_a_third_party_isolator_is_found_through_its_entry_point(make_cluster, tmp_path,
                                                                monkeypatch):
    """examples/custom_isolator.py installed as a distribution with an `agora.isolators`
    entry point: --isolation names it, its env reaches the task, its hooks run."""
    site = tmp_path / "site"
    dist = site / "agora_stamp-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: agora-stamp\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[agora.isolators]\nexample/stamp = custom_isolator:StampIsolator\n")
    shutil.copy(os.path.join(REPO, "examples", "custom_isolator.py"), site)
    monkeypatch.syspath_prepend(str(site))
    c = make_cluster(launcher="linux", isolation="filesystem/linux,example/stamp",
                     container_flags={"image_providers": ""})
    c.run_task("stamped", "echo $AGORA_STAMP", resources=[cpus(0.1), mem(32)])
    c.wait_state("stamped", "TASK_FINISHED")
    cid = c.read_sandbox("stamped").strip()
    journal = os.path.join(c.agent.containerizer.runtime_dir, "stamp.journal")
    wait_for(lambda: f"cleanup {cid}" in open(journal).read(), what="the cleanup hook")
    lines = open(journal).read().splitlines()
    assert lines[0] == "recover" and lines[1].startswith(f"prepare {cid} cpus:0.2")
