"""Images end to end: a pymesos framework launches tasks in Docker, OCI and AppC images
through a real master and a real agent with the linux launcher.

The images are real (tests/images.py builds a busybox image with umoci and serves it with a
real docker-registry, as archives and an OCI layout, and as an ACI over HTTP). Each task
shows, from inside its container, that it is PID 2 under our init in its own PID namespace,
its own hostname, the image's files and environment; limits, volumes, statistics and a CNI
address are checked too, and at the end nothing of any container is left on the host.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import uuid

import pytest

from agent.containerizer import agent_cgroups_root
from tests.cluster import AgentProcess, MasterProcess, container_cgroups, get_json, wait_for
from tests.images import busybox_images  # noqa: F401  (fixture)
from tests.schedulers import Recorder, start_driver, unique

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containers need root")

ISOLATION = ("filesystem/linux,namespaces/pid,namespaces/uts,namespaces/ipc,cgroups/cpu,"
             "cgroups/mem,cgroups/pids,network/cni,posix/rlimits")
SHOW = ("echo pid=$$; hostname; cat /etc/agora-image; echo env=$AGORA_IMAGE; "
        "echo procs=$(ls /proc | grep -c '^[0-9]'); pwd; echo $MESOS_SANDBOX; "
        "echo inside > $MESOS_SANDBOX/mark")
SUBNET = "10.251.9"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, busybox_images):  # noqa: F811
    """A master, an agent that can run every kind of image, a CNI network, and a pymesos
    framework; torn down (and checked clean) at the end."""
    images = busybox_images
    tmp = tmp_path_factory.mktemp("containers")
    bridge = "agc" + uuid.uuid4().hex[:8]
    cni = tmp / "cni"
    cni.mkdir()
    (cni / "agora.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "agora-net",
        "plugins": [{"type": "bridge", "bridge": bridge, "isGateway": False, "ipMasq": False,
                     "ipam": {"type": "host-local", "dataDir": str(tmp / "ipam"),
                              "ranges": [[{"subnet": f"{SUBNET}.0/24"}]]}}]}))
    master = MasterProcess(tmp)
    agent = AgentProcess(tmp, master.address, [
        "--resources", "cpus:4;mem:2048;disk:4096;ports:[31000-31100]",
        "--launcher", "linux", "--isolation", ISOLATION,
        "--docker-registry", images.docker_archive_dir,
        "--oci-image-dir", images.oci_image_dir, "--appc-store-dir", images.aci_store_dir,
        "--appc-simple-discovery-uri-prefix", images.aci_prefix,
        "--network-cni-config-dir", str(cni)])
    sched = Recorder(refuse=0.2, cpus=0.2, mem=64)
    driver = start_driver(sched, master.address, name="containers")
    assert sched.registered_event.wait(20), "pymesos did not subscribe"
    env = {"agent": agent, "master": master, "sched": sched, "driver": driver,
           "images": images, "tmp": tmp}
    try:
        yield env
    finally:
        driver.stop()
        driver.join()
        agent.stop()
        master.stop()
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def launch(env, shell: str, image: dict | None = None, container: dict | None = None,
           **extra) -> str:
    """Queue a task running `shell` (in `image`, or with `container`; `extra` TaskInfo
    fields win); returns its name."""
    name = unique("c")
    if container is None and image is not None:
        container = {"type": "MESOS", "mesos": {"image": image}}
    fields = dict(extra, **({"container": container} if container else {}))
    with env["sched"].lock:
        env["sched"].pending.append((name, shell, fields))
    env["driver"].reviveOffers()
    return name


def finished(env, name: str, state: str = "TASK_FINISHED", timeout: float = 60) -> dict:
    sched = env["sched"]
    wait_for(lambda: sched.last_state(name) in (state, "TASK_FAILED", "TASK_KILLED",
                                                  "TASK_ERROR", "TASK_LOST"), timeout,
             what=f"{name} to end (seen {sched.states(name)})")
    with sched.lock:
        status = [u for u in sched.updates if u["task_id"]["value"] == name][-1]
    assert status["state"] == state, (status, sandbox_file(env, name, "stderr"))
    return status


def sandbox_file(env, name: str, file: str = "stdout") -> str:
    pattern = os.path.join(env["agent"].work_dir, "slaves", "*", "frameworks", "*",
                           "executors", name, "runs", "latest", file)
    for path in glob.glob(pattern):
        with open(path) as f:
            return f.read()
    return ""


def shown(env, name: str) -> dict:
    """What SHOW printed, as key -> value (the lines without '=' by position)."""
    lines = sandbox_file(env, name).splitlines()
    keys = ["pid", "hostname", "marker", "env", "procs", "pwd", "sandbox"]
    return {k: (line.split("=", 1)[1] if "=" in line and k in ("pid", "env", "procs")
                else line) for k, line in zip(keys, lines)}


def check_shown(env, name: str) -> None:
    seen = shown(env, name)
    assert seen["pid"] == "2", seen  # PID 1 is the container's init
    assert seen["hostname"] and seen["hostname"] != os.uname().nodename
    assert seen["marker"] == "busybox"
    assert seen["env"] == "busybox"  # the image's Env
    assert int(seen["procs"]) <= 5  # nothing of the host's
    assert seen["pwd"] == "/srv"  # the image's WorkingDir
    assert seen["sandbox"] == "/mnt/mesos/sandbox"
    assert sandbox_file(env, name, "mark") == "inside\n"  # written through the mount


@pytest.mark.parametrize("form", ["v2s2", "oci", "list", "index"])
def test_docker_images_from_a_registry_run(cluster, form):
    """Docker schema2, OCI manifests, a manifest list and an OCI index from a real
    registry: each runs in its own container with the image's files and environment."""
    images = cluster["images"]
    ref = {"v2s2": images.v2s2_name, "oci": images.oci_name, "list": images.list_name,
           "index": images.index_name}[form]
    name = launch(cluster, SHOW, images.docker_image(ref))
    finished(cluster, name)
    check_shown(cluster, name)


def test_a_docker_container_info_runs_in_our_containerizer(cluster):
    """ContainerInfo type DOCKER with an image: no Docker daemon, the same containers."""
    images = cluster["images"]
    name = launch(cluster, SHOW, container={"type": "DOCKER",
                                            "docker": {"image": images.v2s2_name}})
    finished(cluster, name)
    seen = shown(cluster, name)
    assert seen["pid"] == "2" and seen["marker"] == "busybox" and seen["env"] == "busybox"


@pytest.mark.parametrize("store", ["docker-archive", "oci-layout", "oci-archive", "appc",
                                   "appc-discovery"])
def test_local_stores_and_appc_discovery(cluster, store):
    """`docker save` archives, OCI layouts and archives, ACIs from a store and by simple
    discovery over HTTP (id verified)."""
    images = cluster["images"]
    image = {
        "docker-archive": images.docker_image(images.docker_archive_name),
        "oci-layout": {"type": "OCI", "oci": {"name": images.oci_layout_name}},
        "oci-archive": {"type": "OCI", "oci": {"name": images.oci_archive_name}},
        "appc": images.appc_image(),
        "appc-discovery": images.appc_image(),
    }[store]
    command = SHOW if not store.startswith("appc") else \
        "echo pid=$$; hostname; cat /etc/agora-image"
    name = launch(cluster, command, image)
    finished(cluster, name)
    seen = shown(cluster, name)
    assert seen["pid"] == "2" and seen["marker"] == "busybox", seen


def test_the_image_cmd_runs_when_the_command_has_no_value(cluster):
    """shell=false without a value: the image's Cmd runs (Mesos's rule)."""
    images = cluster["images"]
    name = launch(cluster, "unused", images.docker_image(images.v2s2_name),
                  command={"shell": False})
    finished(cluster, name)
    assert sandbox_file(cluster, name) == "busybox\n"


def test_a_task_past_its_memory_limit_fails_with_the_memory_reason(cluster):
    """A 128 MB allocation under 64 MB: TASK_FAILED with REASON_CONTAINER_LIMITATION_MEMORY."""
    images = cluster["images"]
    name = launch(cluster, "dd if=/dev/zero of=/dev/null bs=128M count=1",
                  images.docker_image(images.v2s2_name))
    status = finished(cluster, name, "TASK_FAILED")
    assert status["reason"] == "REASON_CONTAINER_LIMITATION_MEMORY"
    assert "Memory limit exceeded" in status["message"]


def test_cpu_shares_are_set_and_statistics_are_served(cluster):
    """A running container's cpu.shares follow its cpus; /monitor/statistics has its
    cgroup figures."""
    images = cluster["images"]
    agent = cluster["agent"]
    name = launch(cluster, "sleep 1000", images.docker_image(images.v2s2_name))
    wait_for(lambda: cluster["sched"].last_state(name) == "TASK_RUNNING", 60,
             what="the task to run")
    try:
        with cluster["sched"].lock:
            running = [u for u in cluster["sched"].updates
                       if u["task_id"]["value"] == name and u["state"] == "TASK_RUNNING"][-1]
        cid = running["container_status"]["container_id"]["value"]
        root = agent_cgroups_root("agora", os.path.join(agent.work_dir, "run"))
        with open(f"/sys/fs/cgroup/cpu/{root}/{cid}/cpu.shares") as f:
            assert int(f.read()) == int(1024 * (0.2 + 0.1))  # the task's and our executor's

        def entry():
            stats = get_json(agent.url + "/monitor/statistics")
            return next((e["statistics"] for e in stats if e["executor_id"] == name), None)

        stats = wait_for(entry, what="statistics")
        assert stats["mem_limit_bytes"] == (64 + 32) * 1024 * 1024
        assert stats["cpus_limit"] == pytest.approx(0.3)
        assert stats["mem_rss_bytes"] > 0 and stats["processes"] >= 2
    finally:
        cluster["driver"].killTask({"value": name})
    finished(cluster, name, "TASK_KILLED")


def test_volumes_are_visible_in_the_container(cluster):
    """A host directory mounted read-only at an absolute path of the image's filesystem."""
    images = cluster["images"]
    data = cluster["tmp"] / f"data-{uuid.uuid4().hex[:6]}"
    data.mkdir()
    (data / "greeting").write_text("hello from the host\n")
    container = {"type": "MESOS", "mesos": {"image": images.docker_image(images.v2s2_name)},
                 "volumes": [{"container_path": "/data/host", "mode": "RO",
                              "source": {"type": "HOST_PATH",
                                         "host_path": {"path": str(data)}}}]}
    name = launch(cluster, "cat /data/host/greeting; touch /data/host/x 2>/dev/null && "
                           "echo writable || echo read-only", container=container)
    finished(cluster, name)
    assert sandbox_file(cluster, name).splitlines()[-2:] == ["hello from the host",
                                                            "read-only"]


def test_a_cni_network_address_is_reported(cluster):
    """network/cni: TASK_RUNNING's container_status names the address eth0 has inside."""
    images = cluster["images"]
    container = {"type": "MESOS", "mesos": {"image": images.docker_image(images.v2s2_name)},
                 "network_infos": [{"name": "agora-net"}]}
    name = launch(cluster, "ip -4 -o addr show eth0", container=container)
    status = finished(cluster, name)
    with cluster["sched"].lock:
        running = [u for u in cluster["sched"].updates
                   if u["task_id"]["value"] == name and u["state"] == "TASK_RUNNING"][-1]
    [info] = running["container_status"]["network_infos"]
    address = info["ip_addresses"][0]["ip_address"]
    assert address.startswith(SUBNET + ".")
    assert f"inet {address}/24" in sandbox_file(cluster, name)
    assert status["container_status"]["network_infos"] == running["container_status"][
        "network_infos"]
    # The master's /state shows it in the task's latest status, where Mesos-DNS reads it.
    state = get_json(cluster["master"].url + "/state")
    [task] = [t for f in state["frameworks"] + state["completed_frameworks"]
              for t in f["tasks"] + f["completed_tasks"] if t["id"] == name]
    assert task["statuses"][-1]["container_status"]["network_infos"] == \
        status["container_status"]["network_infos"]


def test_an_image_that_does_not_exist_fails_the_task_saying_so(cluster):
    """A missing image: TASK_FAILED, REASON_CONTAINER_LAUNCH_FAILED, naming it."""
    images = cluster["images"]
    name = launch(cluster, "true", images.docker_image(f"{images.registry}/no/such:image"))
    status = finished(cluster, name, "TASK_FAILED")
    assert status["reason"] == "REASON_CONTAINER_LAUNCH_FAILED"
    assert "no/such" in status["message"]


def test_nothing_of_any_container_is_left(cluster):
    """After every task above: no container cgroup, mount, process or runtime directory."""
    agent = cluster["agent"]

    def leftovers():
        found = container_cgroups(agent)
        runtime = os.path.join(agent.work_dir, "run", "containers")
        if os.path.isdir(runtime):
            found += os.listdir(runtime)
        with open("/proc/self/mountinfo") as f:
            found += [line.split()[4] for line in f if agent.work_dir in line]
        return found

    wait_for(lambda: not leftovers(), 20, what=f"nothing left (left: {leftovers()})")
