"""The cgroups isolators on this host's real cgroups (v1 hierarchies; device BPF on the real
cgroup2 mount), with real processes placed in the prepared cgroups as the launcher places them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from agent_harness import agent_reactor  # noqa: F401  (fixture)
from cgroup_harness import cgroup_env, unified_v2, wait_for  # noqa: F401
from twisted.internet.threads import blockingCallFromThread

from agora.resources import Resources
from isolators import catalog
from isolators.cgroups import bpf
from isolators.cgroups.cpu import CpuIsolator
from isolators.cgroups.devices import DevicesIsolator
from isolators.cgroups.hierarchy import Cgroup, CgroupError, Hierarchies
from isolators.cgroups.memory import MemoryIsolator
from isolators.cgroups.notify import FileWatch
from isolators.cgroups.pids import PidsIsolator
from isolators.interface import ContainerConfig, ContainerState, Settings

MB = 1024 * 1024


@pytest.fixture
def make(cgroup_env, agent_reactor, tmp_path):
    """Build an isolator of a class with this test's cgroups_root plus `flags`."""
    def make(cls, hierarchies=None, **flags):
        settings = Settings(work_dir=str(tmp_path), runtime_dir=str(tmp_path),
                            flags={**cgroup_env.flags, **flags}, reactor=agent_reactor)
        return cls(settings, hierarchies)
    return make


def config(tmp_path, cid="c1", resources="cpus:0.5;mem:64"):
    return ContainerConfig(container_id=cid, directory=str(tmp_path),
                           resources=Resources.parse(resources))


def call(reactor, fn, *args):
    """Run a hook in the reactor thread; wait for its Deferred, if it returns one."""
    return blockingCallFromThread(reactor, fn, *args)


def on_limitation(reactor, isolator, cid) -> list:
    """Ask the isolator to watch `cid`; the list gets the Limitation when it fires."""
    fired: list = []

    def watch():
        d = isolator.watch(cid)
        assert d is not None
        d.addCallback(fired.append)
    call(reactor, watch)
    return fired


def need(cgroup_env, controller, version=1):
    if cgroup_env.hierarchies.version(controller) != version:
        pytest.skip(f"no v{version} {controller} hierarchy on this host")


# --- memory ------------------------------------------------------------------------------

def test_a_memory_breach_fires_watch_and_check(cgroup_env, make, agent_reactor, tmp_path):
    """64 MB limit, dd with a 128 MB buffer: OOM-killed; watch fires and check agrees."""
    need(cgroup_env, "memory")
    mem = make(MemoryIsolator)
    info = call(agent_reactor, mem.prepare, config(tmp_path))
    cg = mem.cgroup("memory", "c1")
    assert info.cgroups == (cg.path,)
    assert int(cg.read("memory.limit_in_bytes")) == 64 * MB
    assert int(cg.read("memory.soft_limit_in_bytes")) == 64 * MB
    fired = on_limitation(agent_reactor, mem, "c1")
    assert mem.check("c1") is None
    proc = cgroup_env.start(["dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"],
                            info.cgroups, stderr=subprocess.DEVNULL)
    assert proc.wait(30) == -9
    killed = time.monotonic()
    wait_for(lambda: fired, what="the OOM notification")
    latency = time.monotonic() - killed
    limitation = fired[0]
    assert limitation.reason == "REASON_CONTAINER_LIMITATION_MEMORY"
    assert limitation.resources == Resources.parse("mem:64")
    assert limitation.message.startswith("Memory limit exceeded: Requested: 64MB Maximum Used: ")
    assert "\n\nMEMORY STATISTICS: \n" in limitation.message and "total_rss" in limitation.message
    checked = mem.check("c1")
    assert checked is not None and checked.reason == limitation.reason
    # A second watch (e.g. after a restart) sees the OOM that already happened.
    assert on_limitation(agent_reactor, mem, "c1")
    call(agent_reactor, mem.cleanup, "c1")
    assert cgroup_env.containers_left() == []
    print(f"OOM notification seen {latency * 1000:.1f} ms after the killed dd was reaped")


def test_memory_within_the_limit_and_its_usage(cgroup_env, make, agent_reactor, tmp_path):
    """A process under the limit is not limited; usage shows its RSS and the limits."""
    need(cgroup_env, "memory")
    mem = make(MemoryIsolator)
    info = call(agent_reactor, mem.prepare, config(tmp_path))
    fired = on_limitation(agent_reactor, mem, "c1")
    ok = cgroup_env.start(["dd", "if=/dev/zero", "of=/dev/null", "bs=16M", "count=4"],
                          info.cgroups, stderr=subprocess.DEVNULL)
    assert ok.wait(30) == 0
    hog = cgroup_env.start([sys.executable, "-S", "-c",
                            "import sys, time; x = bytearray(24 << 20); "
                            "print('ready', flush=True); time.sleep(100)"],
                           info.cgroups, stdout=subprocess.PIPE)
    assert hog.stdout.readline() == b"ready\n"
    stats = mem.usage("c1")
    assert stats["mem_limit_bytes"] == stats["mem_soft_limit_bytes"] == 64 * MB
    assert stats["mem_rss_bytes"] >= 24 * MB and stats["mem_anon_bytes"] == stats["mem_rss_bytes"]
    assert stats["mem_total_bytes"] >= stats["mem_rss_bytes"]
    assert {"mem_cache_bytes", "mem_file_bytes", "mem_mapped_file_bytes"} <= set(stats)
    assert mem.check("c1") is None and not fired
    call(agent_reactor, mem.cleanup, "c1")  # the hog still runs: cleanup kills it
    assert hog.wait(10) == -9
    assert cgroup_env.containers_left() == [] and not fired


def test_memory_update_only_raises_the_hard_limit(cgroup_env, make, agent_reactor, tmp_path):
    """As Mesos: at least 32 MB; update raises the hard limit, never lowers it; soft follows."""
    need(cgroup_env, "memory")
    mem = make(MemoryIsolator)
    call(agent_reactor, mem.prepare, config(tmp_path, resources="mem:16"))
    cg = mem.cgroup("memory", "c1")
    assert int(cg.read("memory.limit_in_bytes")) == 32 * MB
    mem.update("c1", Resources.parse("mem:128"))
    assert int(cg.read("memory.limit_in_bytes")) == 128 * MB
    mem.update("c1", Resources.parse("mem:48"))
    assert int(cg.read("memory.limit_in_bytes")) == 128 * MB
    assert int(cg.read("memory.soft_limit_in_bytes")) == 48 * MB
    call(agent_reactor, mem.cleanup, "c1")


def test_memory_with_swap_limited(cgroup_env, make, agent_reactor, tmp_path):
    """--cgroups_limit_swap sets memsw to the limit too, in an order the kernel accepts."""
    need(cgroup_env, "memory")
    mount = Cgroup(cgroup_env.hierarchies.mount("memory"), "", 1)
    if not mount.has("memory.memsw.limit_in_bytes"):
        pytest.skip("no swap accounting on this kernel")
    mem = make(MemoryIsolator, cgroups_limit_swap="true")
    call(agent_reactor, mem.prepare, config(tmp_path))
    cg = mem.cgroup("memory", "c1")
    assert int(cg.read("memory.memsw.limit_in_bytes")) == 64 * MB
    mem.update("c1", Resources.parse("mem:96"))
    assert int(cg.read("memory.memsw.limit_in_bytes")) == int(cg.read("memory.limit_in_bytes")) \
        == 96 * MB
    assert "mem_total_memsw_bytes" in mem.usage("c1")
    call(agent_reactor, mem.cleanup, "c1")


# --- cpu ---------------------------------------------------------------------------------

def test_cpu_shares_and_cfs_quota_throttle_a_busy_loop(cgroup_env, make, agent_reactor, tmp_path):
    """cpu.shares = 1024 * cpus; with CFS a 0.1-cpu quota throttles a busy loop; times move."""
    need(cgroup_env, "cpu")
    plain = make(CpuIsolator)
    call(agent_reactor, plain.prepare, config(tmp_path, "c0", "cpus:0.5"))
    assert plain.cgroup("cpu", "c0").read("cpu.shares").strip() == "512"
    assert plain.cgroup("cpu", "c0").read("cpu.cfs_quota_us").strip() == "-1"
    call(agent_reactor, plain.cleanup, "c0")

    cpu = make(CpuIsolator, cgroups_enable_cfs=True)
    info = call(agent_reactor, cpu.prepare, config(tmp_path, "c1", "cpus:0.1"))
    cg = cpu.cgroup("cpu", "c1")
    assert len(info.cgroups) == len(set(info.cgroups)) >= 1 and cg.path in info.cgroups
    assert (cg.read("cpu.shares").strip(), cg.read("cpu.cfs_period_us").strip(),
            cg.read("cpu.cfs_quota_us").strip()) == ("102", "100000", "10000")
    before = cpu.usage("c1")
    assert before["cpus_limit"] == 0.1 and before["cpus_nr_throttled"] == 0
    spin = cgroup_env.start(["/bin/sh", "-c", "while :; do :; done"], info.cgroups)
    after = wait_for(lambda: (lambda u: u if u["cpus_nr_throttled"] >= 2
                              and u["cpus_user_time_secs"] + u["cpus_system_time_secs"] > 0.02
                              else None)(cpu.usage("c1")),
                     what="the busy loop to be throttled")
    assert after["cpus_nr_periods"] >= after["cpus_nr_throttled"]
    assert after["cpus_throttled_time_secs"] > 0
    cpu.update("c1", Resources.parse("cpus:2"))
    assert (cg.read("cpu.shares").strip(), cg.read("cpu.cfs_quota_us").strip()) == \
        ("2048", "200000")
    assert cpu.usage("c1")["cpus_limit"] == 2
    call(agent_reactor, cpu.cleanup, "c1")
    assert spin.wait(10) == -9
    assert cgroup_env.containers_left() == []


# --- pids --------------------------------------------------------------------------------

def test_pids_max_stops_a_fork_bomb(cgroup_env, make, agent_reactor, tmp_path):
    """pids.max from cgroups_pids_limit: forks past it fail; usage counts processes."""
    need(cgroup_env, "pids")
    pids = make(PidsIsolator, cgroups_pids_limit=16)
    info = call(agent_reactor, pids.prepare, config(tmp_path))
    cg = pids.cgroup("pids", "c1")
    assert cg.read("pids.max").strip() == "16"
    bomb = cgroup_env.start(["/bin/sh", "-c", "i=0; while [ $i -lt 100 ]; do sleep 100 & "
                             "i=$((i+1)); done; echo done; sleep 100"],
                            info.cgroups, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: int(cg.read("pids.current")) >= 16, what="the bomb to hit the limit")
    events = cg.read_keyed("pids.events") if cg.has("pids.events") else {"max": 1}
    assert int(cg.read("pids.current")) == 16 and events["max"] >= 1
    usage = pids.usage("c1")
    # (a fork being refused is counted in pids.current for a moment)
    assert 10 <= usage["processes"] <= usage["threads"] <= 16
    call(agent_reactor, pids.cleanup, "c1")
    bomb.wait(10)
    assert b"fork" in bomb.stderr.read().lower()
    assert cgroup_env.containers_left() == []


def test_no_pids_limit_means_max(cgroup_env, make, agent_reactor, tmp_path):
    """Without cgroups_pids_limit the cgroup still exists (for counting) with pids.max = max."""
    need(cgroup_env, "pids")
    pids = make(PidsIsolator)
    call(agent_reactor, pids.prepare, config(tmp_path))
    assert pids.cgroup("pids", "c1").read("pids.max").strip() == "max"
    call(agent_reactor, pids.cleanup, "c1")


# --- devices -----------------------------------------------------------------------------

def _device_probe(cgroup_env, dirs, tmp_path, nodes):
    """Open each node from inside the cgroups; returns what the shell printed per node."""
    script = "; ".join(f"if head -c0 {n} 2>/dev/null; then echo ok; else echo denied; fi"
                       for n in nodes)
    proc = cgroup_env.start(["/bin/sh", "-c", script], dirs, stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=10)
    return out.decode().split()


def _nodes(tmp_path):
    """A block node like /dev/sda (8:0) and a character node of /dev/fuse's numbers."""
    disk, fuse = str(tmp_path / "sda-like"), str(tmp_path / "fuse-like")
    os.mknod(disk, 0o600 | 0o060000, os.makedev(8, 0))
    os.mknod(fuse, 0o600 | 0o020000, os.makedev(10, 229))
    return disk, fuse


def _open_errno(path):
    try:
        os.close(os.open(path, os.O_RDONLY))
        return 0
    except OSError as e:
        return e.errno


@pytest.mark.parametrize("version", [1, 2])
def test_devices_whitelist_denies_a_disk_and_allows_null(cgroup_env, make, agent_reactor,
                                                         tmp_path, version):
    """Default whitelist: /dev/null and /dev/zero open, an 8:0 block node is EPERM (v1
    devices.allow; v2 a BPF program on the real cgroup2 mount); allowed_devices adds one."""
    hierarchies = None
    if version == 1:
        need(cgroup_env, "devices")
    else:
        hierarchies = unified_v2()
        if hierarchies is None:
            pytest.skip("no cgroup2 mount")
    disk, fuse = _nodes(tmp_path)
    assert _open_errno(disk) != 1  # outside the container the node is not refused (ENXIO)
    plain = make(DevicesIsolator, hierarchies)
    info = call(agent_reactor, plain.prepare, config(tmp_path, "c1"))
    cg = plain.cgroup("devices", "c1")
    assert cg.version == version and info.cgroups == (cg.path,)
    if version == 1:
        assert "c 1:3 rwm" in cg.read("devices.list").splitlines()
    else:
        assert len(bpf.attached_device_programs(cg.path)) == 1
    assert _device_probe(cgroup_env, info.cgroups, tmp_path,
                         ["/dev/null", "/dev/zero", disk, fuse]) == ["ok", "ok", "denied", "denied"]

    allowed = json.dumps({"allowed_devices": [
        {"device": {"path": fuse}, "access": {"read": True, "write": True, "mknod": False}}]})
    more = make(DevicesIsolator, hierarchies, allowed_devices=allowed)
    info2 = call(agent_reactor, more.prepare, config(tmp_path, "c2"))
    assert _device_probe(cgroup_env, info2.cgroups, tmp_path,
                         ["/dev/null", disk, fuse]) == ["ok", "denied", "ok"]
    for cid in ("c1", "c2"):
        call(agent_reactor, plain.cleanup, cid)
    assert cgroup_env.containers_left() == []


def test_bad_allowed_devices_stop_the_isolator(cgroup_env, make, tmp_path):
    """An allowed_devices value that is wrong fails at start with a message saying why."""
    need(cgroup_env, "devices")
    for value, message in (("{", "not valid JSON"), ('{"allowed_devices": [{}]}', "device.path"),
                           (json.dumps({"allowed_devices": [{"device": {"path": str(tmp_path)},
                                                             "access": {"read": True}}]}),
                            "not a character or block device")):
        with pytest.raises(ValueError, match=message):
            make(DevicesIsolator, allowed_devices=value)


# --- recovery, cleanup, errors -----------------------------------------------------------

ALL = (CpuIsolator, MemoryIsolator, PidsIsolator, DevicesIsolator)


def test_recover_destroys_orphans_and_keeps_the_listed(cgroup_env, make, agent_reactor, tmp_path):
    """After a restart: listed containers keep cgroups and processes; orphans are killed and go."""
    first = [make(cls) for cls in ALL]
    dirs = {}
    for cid in ("keep", "orphan"):
        dirs[cid] = sum((call(agent_reactor, iso.prepare, config(tmp_path, cid)).cgroups
                         for iso in first), ())
    kept = cgroup_env.start(["sleep", "100"], dirs["keep"])
    orphan = cgroup_env.start(["/bin/sh", "-c", "sleep 100 & sleep 100"], dirs["orphan"])
    wait_for(lambda: len(Cgroup(dirs["orphan"][0], "", 1).procs()) >= 3, what="the orphan tree")
    again = [make(cls) for cls in ALL]  # a new agent run
    for iso in again:
        call(agent_reactor, iso.recover, [ContainerState("keep", kept.pid, str(tmp_path))])
    assert orphan.wait(10) == -9
    assert kept.poll() is None
    assert all(os.path.isdir(d) for d in dirs["keep"])
    assert not any(os.path.isdir(d) for d in dirs["orphan"])
    assert again[1].usage("keep")["mem_limit_bytes"] == 64 * MB
    assert again[0].usage("keep")["cpus_limit"] == 0.5  # read back from cpu.shares
    for iso in reversed(again):
        call(agent_reactor, iso.cleanup, "keep")
    assert kept.wait(10) == -9
    assert cgroup_env.containers_left() == []


def test_cleanup_leaves_nothing_even_while_processes_run(cgroup_env, make, agent_reactor, tmp_path):
    """All four isolators, a running tree inside: cleanup kills it and removes every cgroup;
    cleanup of a container never prepared, or twice, is fine."""
    isolators = catalog.load("cgroups/cpu,cgroups/mem,cgroups/pids,cgroups/devices",
                             Settings(str(tmp_path), str(tmp_path), cgroup_env.flags,
                                      agent_reactor))
    assert [type(i) for i in isolators] == list(ALL)
    dirs = sum((call(agent_reactor, iso.prepare, config(tmp_path)).cgroups
                for iso in isolators), ())
    assert len(dirs) == len(set(dirs)) >= 4
    tree = cgroup_env.start(["/bin/sh", "-c", "sleep 100 & sleep 100 & wait"], dirs)
    for iso in reversed(isolators):
        call(agent_reactor, iso.cleanup, "c1")
        call(agent_reactor, iso.cleanup, "c1")
        call(agent_reactor, iso.cleanup, "never-prepared")
    assert tree.wait(10) == -9
    assert cgroup_env.containers_left() == []


def test_a_missing_controller_is_a_clear_error(tmp_path):
    """An isolator whose controller is not mounted refuses to start, naming it."""
    settings = Settings(str(tmp_path), str(tmp_path), {}, None)
    with pytest.raises(CgroupError, match="'memory' is not available"):
        MemoryIsolator(settings, Hierarchies({}, None))
    with pytest.raises(ValueError, match="cgroups_pids_limit"):
        PidsIsolator(Settings(str(tmp_path), str(tmp_path), {"cgroups_pids_limit": "-3"}, None),
                     Hierarchies({"pids": "/x"}))


def test_inotify_sees_a_real_cgroup_file_change(cgroup_env, agent_reactor):
    """FileWatch (used on v2 memory.events) wakes on the real cgroup2 cgroup.events."""
    h = unified_v2()
    if h is None:
        pytest.skip("no cgroup2 mount")
    cg = h.container("freezer", cgroup_env.root, "c1").create()
    woke = []
    watch = call(agent_reactor, FileWatch, agent_reactor, cg.file("cgroup.events"),
                 lambda: woke.append(cg.populated()))
    proc = cgroup_env.start(["sleep", "100"], [cg.path])
    wait_for(lambda: True in woke, what="populated 1")
    proc.kill()
    proc.wait()
    wait_for(lambda: woke[-1] is False, what="populated 0")
    call(agent_reactor, watch.close)
    cg.remove(5)
