"""Real cgroups for tests: a unique cgroups_root per test, processes placed as the launcher does.

    from cgroup_harness import cgroup_env  # noqa: F401  (fixture)

`cgroup_env` skips unless we are root on a host with cgroup mounts; it gives the host's
Hierarchies, a unique `root` (`agora-test-<uuid>`), `flags` naming it, `start(argv, dirs)`
(a real child that joins each cgroup directory in `dirs` before it execs `argv`, as the
launcher's helper does), and at the end kills what it started and removes `root` from every
hierarchy.
"""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from isolators.cgroups.hierarchy import Cgroup, Hierarchies, discover
from tests.cluster import wait_for  # noqa: F401  (re-exported for the cgroup tests)

UNIFIED = "/sys/fs/cgroup/unified"


def _skip_reason(h: Hierarchies) -> str | None:
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    if not h.v1 and not h.v2:
        return "no cgroup hierarchy is mounted under /sys/fs/cgroup"
    return None


class CgroupEnv:
    def __init__(self, hierarchies: Hierarchies):
        self.hierarchies = hierarchies
        self.root = f"agora-test-{uuid.uuid4().hex[:12]}"
        self.flags = {"cgroups_root": self.root}
        self.procs: list[subprocess.Popen] = []

    def start(self, argv, dirs=(), **popen) -> subprocess.Popen:
        """A child that waits until its pid is in every cgroup of `dirs`, then execs argv."""
        proc = subprocess.Popen(["/bin/sh", "-c", 'read _ignored; exec "$@"', "sh", *argv],
                                stdin=subprocess.PIPE, **popen)
        self.procs.append(proc)
        for d in dirs:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(proc.pid))
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        proc.stdin = None  # (so communicate() does not flush it)
        return proc

    def _roots(self) -> list[Cgroup]:
        h = self.hierarchies
        mounts = [(m, 1) for m in sorted(set(h.v1.values()))] + ([(h.v2, 2)] if h.v2 else [])
        return [Cgroup(m, self.root, v) for m, v in mounts]

    def left(self) -> list[str]:
        """Every directory of this test's root still present, in any hierarchy."""
        return [cg.path for cg in self._roots() if cg.exists()]

    def containers_left(self) -> list[str]:
        """Every container cgroup still under this test's root, in any hierarchy."""
        return [child.path for cg in self._roots() for child in cg.children()]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for cg in self._roots():
            cg.destroy(10)


@pytest.fixture
def cgroup_env():
    """The host's hierarchies and a unique cgroups_root, removed everywhere at the end."""
    h = discover()
    reason = _skip_reason(h)
    if reason:
        pytest.skip(reason)
    env = CgroupEnv(h)
    yield env
    env.close()


def unified_v2() -> Hierarchies | None:
    """This host's cgroup2 mount as the only hierarchy (v1 left out), to drive the v2 code
    for real where the kernel offers it (cgroup.procs, events, freeze, kill, device BPF)."""
    h = discover()
    if h.v2 is None:
        return None
    return Hierarchies({}, h.v2, h.v2_controllers)
