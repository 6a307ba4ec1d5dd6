"""Cgroup hierarchies and one cgroup's life, on the host's real v1 hierarchies and cgroup2 mount."""

from __future__ import annotations

import os
import subprocess

import pytest
from cgroup_harness import UNIFIED, cgroup_env, unified_v2, wait_for  # noqa: F401

from isolators.cgroups.hierarchy import (
    Cgroup, CgroupError, Hierarchies, check_root, configured, discover, membership,
    parse_mountinfo,
)

MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:40 / /mnt/other\\040cg rw - cgroup cgroup rw,pids
51 23 8:1 / / rw - ext4 /dev/vda1 rw
"""


def test_mountinfo_lists_cgroup_mounts_with_their_controllers():
    """Only cgroup/cgroup2 mounts are kept; escaped mount points are decoded."""
    mounts = parse_mountinfo(MOUNTINFO)
    points = [m[0] for m in mounts]
    assert points == ["/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/memory",
                      "/sys/fs/cgroup/freezer", "/sys/fs/cgroup/systemd",
                      "/sys/fs/cgroup/unified", "/mnt/other cg"]
    assert {"cpu", "cpuacct"} <= mounts[0][2] and mounts[4][1] == "cgroup2"


def test_a_controller_is_v2_only_when_listed_there_and_on_no_v1_mount():
    """Hybrid rule: v1 wins; v2 only for what its root lists; freezer/devices are v2 builtins."""
    h = Hierarchies.from_mounts(parse_mountinfo(MOUNTINFO), "/sys/fs/cgroup",
                                read_controllers=lambda _: frozenset({"hugetlb", "memory"}))
    assert h.version("memory") == 1 and h.mount("memory") == "/sys/fs/cgroup/memory"
    assert h.mount("cpu") == h.mount("cpuacct") == "/sys/fs/cgroup/cpu,cpuacct"
    assert h.version("hugetlb") == 2 and h.mount("hugetlb") == "/sys/fs/cgroup/unified"
    assert h.version("freezer") == 1
    assert h.version("devices") == 2  # no v1 devices mount: device BPF on the v2 tree
    assert h.version("pids") is None  # its only mount is outside the base
    with pytest.raises(CgroupError, match="'pids' is not available"):
        h.mount("pids")
    v1_only = Hierarchies.from_mounts(parse_mountinfo(MOUNTINFO), "/mnt")
    assert v1_only.version("pids") == 1 and v1_only.v2 is None
    assert v1_only.version("devices") is None


def test_membership_is_the_v1_freezer_or_else_the_v2_tree():
    """A container's membership cgroup: <freezer>/<root>/<id> on v1, <cgroup2>/<root>/<id> else."""
    hybrid = Hierarchies({"freezer": "/cg/freezer"}, "/cg/unified", frozenset())
    assert membership(hybrid, "agora", "c1").path == "/cg/freezer/agora/c1"
    assert membership(hybrid, "agora", "c1").version == 1
    pure = Hierarchies({}, "/cg", frozenset({"cpu", "memory"}))
    assert membership(pure, "agora/a0", "c1").path == "/cg/agora/a0/c1"
    with pytest.raises(CgroupError):
        membership(Hierarchies(), "agora", "c1")


def test_bad_names_are_refused():
    """A container id or root that would escape its directory is a ValueError, not a path."""
    h = Hierarchies({"freezer": "/cg/freezer"})
    for bad in ("..", "a/b", "", "x y"):
        with pytest.raises(ValueError):
            h.container("freezer", "agora", bad)
    with pytest.raises(ValueError):
        check_root("/")
    assert check_root("/agora/a0/") == "agora/a0"


def test_discovery_reads_the_mount_table_once():
    """discover() returns the same object on every call (MESOS-9081: no per-container scans)."""
    assert discover() is discover()
    assert configured({}) == (discover(), "agora")
    assert configured({"cgroups_root": "agora/a0", "cgroups_hierarchy": "/sys/fs/cgroup"})[1] \
        == "agora/a0"
    with pytest.raises(ValueError, match="cannot name a cgroup"):
        configured({"cgroups_root": "../up"})


def test_destroy_children_spares_the_kept(cgroup_env):
    """destroy_children removes every child but those kept (the launcher's orphan sweep)."""
    parent = Cgroup(membership(cgroup_env.hierarchies, cgroup_env.root, "x").mount,
                    cgroup_env.root, cgroup_env.hierarchies.version("freezer"))
    for name in ("a", "b", "c"):
        membership(cgroup_env.hierarchies, cgroup_env.root, name).create()
    victim = cgroup_env.start(["sleep", "100"], [membership(cgroup_env.hierarchies,
                                                             cgroup_env.root, "b").path])
    assert sorted(parent.destroy_children({"a"}, 10)) == ["b", "c"]
    assert [c.name for c in parent.children()] == ["a"] and victim.wait(10) == -9


def test_v1_freezer_cgroup_life(cgroup_env):
    """create, attach, procs, freeze/thaw, kill a forking tree, remove: nothing is left."""
    h = cgroup_env.hierarchies
    if h.version("freezer") != 1:
        pytest.skip("no v1 freezer hierarchy on this host")
    cg = membership(h, cgroup_env.root, "c1").create()
    # A tree that keeps forking while it is killed.
    proc = cgroup_env.start(["/bin/sh", "-c", "while :; do sleep 30 & sleep 0.01; done"], [cg.path])
    assert proc.pid in cg.procs()
    wait_for(lambda: len(cg.members()) >= 3, what="the tree to fork")
    assert cg.populated()
    cg.freeze(5)
    assert cg.read("freezer.state").strip() == "FROZEN"
    cg.thaw(5)
    assert cg.read("freezer.state").strip() == "THAWED"
    cg.kill(10)
    assert cg.members() == [] and not cg.populated()
    assert proc.wait(5) == -9
    Cgroup(cg.mount, cgroup_env.root, 1).remove(5)
    assert cgroup_env.left() == []


def test_v1_kill_without_a_freezer_and_remove_retries(cgroup_env):
    """In a v1 hierarchy with no freezer, kill signals until empty; remove refuses a busy cgroup."""
    h = cgroup_env.hierarchies
    if h.version("memory") != 1:
        pytest.skip("no v1 memory hierarchy on this host")
    cg = h.container("memory", cgroup_env.root, "c1").create()
    child = Cgroup(cg.mount, cg.relative + "/nested", 1).create()
    cgroup_env.start(["sleep", "100"], [cg.path])
    assert len(cg.members()) == 1 and not cg.can_freeze
    with pytest.raises(CgroupError, match="cannot remove"):
        cg.remove(0.2)
    assert cg.exists() and not child.exists()  # children first, as far as it could
    child.create()
    cgroup_env.start(["sleep", "100"], [child.path])
    assert len(cg.members()) == 2
    cg.destroy(10)
    assert not cg.exists()
    cg.destroy(1)  # idempotent


@pytest.fixture
def v2():
    h = unified_v2()
    if h is None or os.geteuid() != 0:
        pytest.skip("needs root and a cgroup2 mount")
    return h


def test_v2_create_enables_controllers_from_the_root_down(cgroup_env, v2):
    """Real cgroup2: create() writes +controller into each ancestor's cgroup.subtree_control."""
    if "hugetlb" not in v2.v2_controllers:
        pytest.skip("the cgroup2 root offers no controller to enable here")
    root = Cgroup(v2.v2, "", 2)
    enabled_before = "hugetlb" in root.read("cgroup.subtree_control").split()
    try:
        cg = v2.cgroup("hugetlb", f"{cgroup_env.root}/c1").create(("hugetlb",))
        parent = Cgroup(v2.v2, cgroup_env.root, 2)
        assert "hugetlb" in parent.read("cgroup.subtree_control").split()
        assert "hugetlb" in cg.read("cgroup.controllers").split()
        assert any(name.startswith("hugetlb.") for name in os.listdir(cg.path))
        with pytest.raises(CgroupError, match="does not offer"):
            v2.cgroup("hugetlb", f"{cgroup_env.root}/c2").create(("no_such",))
        parent.destroy(5)
    finally:
        if not enabled_before:
            try:  # leave the host's root as we found it (EBUSY: someone else now uses it)
                root.write("cgroup.subtree_control", "-hugetlb")
            except OSError:
                pass


def test_v2_cgroup_life(cgroup_env, v2):
    """Real v2: attach, cgroup.events populated, cgroup.freeze + frozen 1, cgroup.kill, remove."""
    cg = v2.container("freezer", cgroup_env.root, "c1").create()
    proc = cgroup_env.start(["/bin/sh", "-c", "sleep 100 & sleep 100"], [cg.path])
    wait_for(lambda: len(cg.procs()) >= 2, what="both sleeps")
    assert cg.populated() and cg.read_keyed("cgroup.events")["populated"] == 1
    cg.freeze(5)
    assert cg.read_keyed("cgroup.events")["frozen"] == 1
    cg.thaw(5)
    assert cg.read_keyed("cgroup.events")["frozen"] == 0
    if not cg.has("cgroup.kill"):
        pytest.skip("this kernel has no cgroup.kill")
    cg.kill(5)
    assert not cg.populated() and proc.wait(5) == -9
    cg.remove(5)
    Cgroup(cg.mount, cgroup_env.root, 2).remove(5)
    assert cgroup_env.left() == []


class _WithoutCgroupKill(Cgroup):
    """A v2 cgroup as a kernel before 5.14 shows it: no cgroup.kill."""

    def has(self, name):
        return name != "cgroup.kill" and super().has(name)


def test_v2_kill_by_freezing_when_cgroup_kill_is_missing(cgroup_env, v2):
    """Real v2 without cgroup.kill: freeze, SIGKILL each member, thaw, until empty."""
    cg = v2.container("freezer", cgroup_env.root, "c1").create()
    cg = _WithoutCgroupKill(cg.mount, cg.relative, 2)
    cgroup_env.start(["/bin/sh", "-c", "while :; do sleep 30 & sleep 0.01; done"], [cg.path])
    wait_for(lambda: len(cg.members()) >= 3, what="the tree to fork")
    cg.destroy(10)
    assert not cg.exists()


def test_attach_of_a_gone_process_says_so(cgroup_env):
    """Attaching a pid that does not exist raises ProcessLookupError naming the file."""
    cg = membership(cgroup_env.hierarchies, cgroup_env.root, "c1").create()
    dead = subprocess.Popen(["true"])
    dead.wait()
    with pytest.raises(ProcessLookupError, match="cgroup.procs"):
        cg.attach(dead.pid)
    cg.remove(5)
