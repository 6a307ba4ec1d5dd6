"""The v2 code of cgroups/cpu, cgroups/mem and cgroups/pids against a temporary directory laid
out like a cgroup2 tree: this host's cgroup2 mount offers only hugetlb, so cpu.weight, cpu.max,
memory.max, memory.events and pids.max do not exist on it. The kernel's files are stood in for
by plain files holding what the kernel would show; the mechanics that do exist for real on
the cgroup2 mount (create, attach, events, freeze, kill, device BPF) are tested in
test_cgroups_hierarchy.py and test_cgroups_isolators.py."""

from __future__ import annotations

import pytest
from agent_harness import agent_reactor, wait_for  # noqa: F401  (fixture)
from twisted.internet.threads import blockingCallFromThread

from agora.resources import Resources
from isolators.cgroups.cpu import CpuIsolator
from isolators.cgroups.hierarchy import Hierarchies
from isolators.cgroups.memory import MemoryIsolator
from isolators.cgroups.pids import PidsIsolator
from isolators.interface import ContainerConfig, Settings

MB = 1024 * 1024

#: A fresh v2 cgroup's files, as the kernel shows them (the ones the isolators touch).
FRESH = {
    "cgroup.procs": "", "cgroup.events": "populated 0\nfrozen 0\n",
    "cgroup.controllers": "cpu memory pids\n", "cgroup.subtree_control": "",
    "cpu.weight": "100\n", "cpu.max": "max 100000\n",
    "cpu.stat": "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n"
                "nr_periods 40\nnr_throttled 3\nthrottled_usec 250000\n",
    "memory.max": "max\n", "memory.high": "max\n", "memory.current": "31457280\n",
    "memory.peak": "67108864\n", "memory.swap.current": "4096\n", "memory.swap.max": "max\n",
    "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
    "memory.stat": "anon 20971520\nfile 8388608\nfile_mapped 1048576\nunevictable 0\n",
    "pids.max": "max\n", "pids.current": "3\n",
}


class FakeV2:
    """<tmp>/v2 with a root offering cpu, memory and pids, and container c1's files."""

    def __init__(self, tmp_path, root_enabled: str = ""):
        self.mount = tmp_path / "v2"
        self.mount.mkdir()
        (self.mount / "cgroup.controllers").write_text("cpu memory pids hugetlb\n")
        (self.mount / "cgroup.subtree_control").write_text(root_enabled)
        (self.mount / "agora").mkdir()
        (self.mount / "agora" / "cgroup.subtree_control").write_text("")
        self.dir = self.mount / "agora" / "c1"
        self.dir.mkdir()
        for name, text in FRESH.items():
            (self.dir / name).write_text(text)
        self.hierarchies = Hierarchies({}, str(self.mount), frozenset({"cpu", "memory", "pids"}))

    def read(self, name: str) -> str:
        return (self.dir / name).read_text()

    def settings(self, reactor=None, **flags):
        return Settings(str(self.mount), str(self.mount), {"cgroups_root": "agora", **flags},
                        reactor)


def config(fake, resources):
    return ContainerConfig("c1", str(fake.dir), Resources.parse(resources))


def test_v2_cpu_weight_max_and_times(tmp_path):
    """cpu.weight is runc's conversion of the shares; cpu.max caps only with CFS; cpu.stat: µs."""
    fake = FakeV2(tmp_path, root_enabled="cpu memory")
    cpu = CpuIsolator(fake.settings(), fake.hierarchies)
    info = cpu.prepare(config(fake, "cpus:1"))
    assert info.cgroups == (str(fake.dir),) and cpu.controllers == ("cpu",)
    assert fake.read("cpu.weight") == "39" and fake.read("cpu.max") == "max 100000"
    # Enabled already at the root, so only the agora level was written.
    assert (fake.mount / "cgroup.subtree_control").read_text() == "cpu memory"
    assert (fake.mount / "agora" / "cgroup.subtree_control").read_text() == "+cpu"
    assert cpu.usage("c1") == {"cpus_user_time_secs": 1.0, "cpus_system_time_secs": 0.5,
                               "cpus_nr_periods": 40, "cpus_nr_throttled": 3,
                               "cpus_throttled_time_secs": 0.25, "cpus_limit": 1.0}
    capped = CpuIsolator(fake.settings(cgroups_enable_cfs="true"), fake.hierarchies)
    capped.update("c1", Resources.parse("cpus:1.5"))
    assert fake.read("cpu.max") == "150000 100000" and fake.read("cpu.weight") == "59"


def test_v2_memory_max_high_swap_and_usage(tmp_path):
    """memory.max = the limit, memory.high = max, swap.max = 0 with cgroups_limit_swap;
    update only raises memory.max; usage from memory.current/stat/swap.current."""
    fake = FakeV2(tmp_path)
    (fake.dir / "memory.high").write_text("1000000\n")
    mem = MemoryIsolator(fake.settings(cgroups_limit_swap=True), fake.hierarchies)
    mem.prepare(config(fake, "mem:64"))
    assert (fake.mount / "cgroup.subtree_control").read_text() == "+memory"
    assert (fake.mount / "agora" / "cgroup.subtree_control").read_text() == "+memory"
    assert (fake.read("memory.max"), fake.read("memory.high"), fake.read("memory.swap.max")) \
        == (str(64 * MB), "max", "0")
    mem.update("c1", Resources.parse("mem:32"))
    assert fake.read("memory.max") == str(64 * MB)
    mem.update("c1", Resources.parse("mem:100"))
    assert fake.read("memory.max") == str(100 * MB)
    assert mem.usage("c1") == {
        "mem_total_bytes": 31457280, "mem_limit_bytes": 100 * MB, "mem_swap_bytes": 4096,
        "mem_rss_bytes": 20971520, "mem_anon_bytes": 20971520, "mem_cache_bytes": 8388608,
        "mem_file_bytes": 8388608, "mem_mapped_file_bytes": 1048576, "mem_unevictable_bytes": 0}


def test_v2_oom_kill_counter_fires_watch_through_inotify(tmp_path, agent_reactor):
    """memory.events' oom_kill rising wakes the inotify watch; check() reads the same counter;
    a change of the other counters alone (high, max) is no OOM for check()."""
    fake = FakeV2(tmp_path)
    mem = MemoryIsolator(fake.settings(agent_reactor), fake.hierarchies)
    mem.prepare(config(fake, "mem:64"))
    fired = []
    blockingCallFromThread(agent_reactor,
                           lambda: mem.watch("c1").addCallback(fired.append) and None)
    events = fake.dir / "memory.events"
    events.write_text("low 0\nhigh 5\nmax 9\noom 0\noom_kill 0\n")
    assert mem.check("c1") is None
    events.write_text("low 0\nhigh 5\nmax 12\noom 1\noom_kill 1\n")
    wait_for(lambda: fired, what="the watch to fire")
    assert fired[0].reason == "REASON_CONTAINER_LIMITATION_MEMORY"
    assert fired[0].message.startswith(
        "Memory limit exceeded: Requested: 64MB Maximum Used: 64MB\n\nMEMORY STATISTICS: \nanon ")
    assert mem.check("c1") == fired[0]
    blockingCallFromThread(agent_reactor, mem._watches["c1"].kernel.close)  # (no rmdir here)


@pytest.mark.parametrize("limit, expected", [(None, "max"), ("64", "64")])
def test_v2_pids_max(tmp_path, limit, expected):
    """pids.max on v2 is the same file as on v1: the flag's value or max."""
    fake = FakeV2(tmp_path)
    flags = {} if limit is None else {"cgroups_pids_limit": limit}
    pids = PidsIsolator(fake.settings(**flags), fake.hierarchies)
    pids.prepare(config(fake, "cpus:1"))
    assert fake.read("pids.max") == expected
    assert (fake.mount / "agora" / "cgroup.subtree_control").read_text() == "+pids"
    assert pids.usage("c1") == {"processes": 0, "threads": 3}
