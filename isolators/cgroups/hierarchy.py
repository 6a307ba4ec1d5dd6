"""The host's cgroup hierarchies (v1 and v2), found once, and what can be done to one cgroup.

    discover(base)  ── /proc/self/mountinfo, read once per base ──> Hierarchies
    configured(flags)                                   -> (Hierarchies, cgroups_root)
    Hierarchies.version(controller)                     -> 1 | 2 | None
    Hierarchies.container(controller, root, container_id) -> Cgroup  <mount>/<root>/<id>
    membership(hierarchies, root, container_id)         -> Cgroup  (v1 freezer, else v2)
    Cgroup: create, attach, procs, members, read/write, freeze/thaw, kill, populated,
            children, remove, destroy, destroy_children (orphans)

A controller is on v1 when a v1 hierarchy (a `cgroup` mount at or under `base`) carries it;
it is on v2 when the cgroup2 mount's root lists it in `cgroup.controllers` and no v1 mount
carries it (a hybrid host lists a controller there even while v1 holds it). Freezing and
device control are built into v2 (`cgroup.freeze`, device BPF programs), so "freezer" and
"devices" count as v2 wherever a cgroup2 mount exists and no v1 hierarchy has them.

Everything here is plain file I/O with no Twisted; `kill`, `freeze`, `remove` and `destroy`
wait (bounded) for the kernel, so callers in a reactor run them in a thread.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import threading
import time

from isolators.cgroups.stats import parse_keyed

#: The v1 controllers we recognise in a `cgroup` mount's options.
V1_CONTROLLERS = frozenset({
    "blkio", "cpu", "cpuacct", "cpuset", "devices", "freezer", "hugetlb", "memory",
    "misc", "net_cls", "net_prio", "perf_event", "pids", "rdma",
})
#: What v2 does without a controller in cgroup.controllers.
V2_BUILTIN = frozenset({"freezer", "devices"})

DEFAULT_BASE = "/sys/fs/cgroup"
DEFAULT_ROOT = "agora"
#: How long kill/freeze/remove wait for the kernel before they give up (Mesos: 1 min).
DEFAULT_TIMEOUT = 60.0
_POLL = 0.005
_NAME = re.compile(r"^[A-Za-z0-9_.:@=+-]+$")


class CgroupError(Exception):
    """A cgroup could not be found, made, emptied or removed; the message says which."""


def parse_mountinfo(text: str) -> list[tuple[str, str, frozenset]]:
    """(mount point, fstype, super options) of every cgroup and cgroup2 mount in `text`.

    A line is `id parent major:minor root mountpoint options [optional...] - fstype source
    superoptions`; a mount point's spaces and the like come octal-escaped (`\\040`).
    """
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 2 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        options = frozenset(tail[2].split(",")) if len(tail) > 2 else frozenset()
        out.append((point, tail[0], options))
    return out


def _under(path: str, base: str) -> bool:
    base = base.rstrip("/")
    return path == (base or "/") or path.startswith(base + "/")


class Hierarchies:
    """Where each controller lives: `v1` maps a controller to its hierarchy's mount point;
    `v2` is the cgroup2 mount point (or None) and `v2_controllers` its root's controllers."""

    def __init__(self, v1: dict[str, str] | None = None, v2: str | None = None,
                 v2_controllers: frozenset = frozenset()):
        self.v1 = dict(v1 or {})
        self.v2 = v2
        self.v2_controllers = frozenset(v2_controllers)

    @classmethod
    def from_mounts(cls, mounts: list[tuple[str, str, frozenset]], base: str,
                    read_controllers=None) -> Hierarchies:
        """The hierarchies among `mounts` at or under `base`; `read_controllers(point)` gives
        a cgroup2 root's cgroup.controllers (read from the file by default)."""
        read_controllers = read_controllers or _read_controllers
        v1: dict[str, str] = {}
        v2 = None
        for point, fstype, options in mounts:
            if not _under(point, base):
                continue
            if fstype == "cgroup2":
                v2 = v2 or point
            else:
                for controller in options & V1_CONTROLLERS:
                    v1.setdefault(controller, point)
        return cls(v1, v2, read_controllers(v2) if v2 else frozenset())

    def __repr__(self) -> str:
        return (f"Hierarchies(v1={self.v1!r}, v2={self.v2!r}, "
                f"v2_controllers={sorted(self.v2_controllers)})")

    def version(self, controller: str) -> int | None:
        """1 or 2: the hierarchy that holds `controller` here; None if none does."""
        if controller in self.v1:
            return 1
        if self.v2 is not None and (controller in self.v2_controllers or controller in V2_BUILTIN):
            return 2
        return None

    def mount(self, controller: str) -> str:
        """The mount point of `controller`'s hierarchy; CgroupError if it has none."""
        version = self.version(controller)
        if version is None:
            raise CgroupError(
                f"cgroup controller {controller!r} is not available: v1 hierarchies "
                f"{sorted(set(self.v1.values())) or 'none'}, cgroup2 "
                f"{self.v2 or 'not mounted'} with controllers "
                f"{sorted(self.v2_controllers) or 'none'}")
        return self.v1[controller] if version == 1 else self.v2

    def cgroup(self, controller: str, relative: str) -> Cgroup:
        """The cgroup `relative` (e.g. 'agora/c1') in `controller`'s hierarchy."""
        return Cgroup(self.mount(controller), relative, self.version(controller))

    def container(self, controller: str, root: str, container_id: str) -> Cgroup:
        """A container's cgroup in `controller`'s hierarchy: <mount>/<root>/<container_id>."""
        return self.cgroup(controller, f"{check_root(root)}/{check_name(container_id)}")


def check_name(name: str) -> str:
    """`name` if it is usable as one cgroup directory name; ValueError otherwise."""
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise ValueError(f"{name!r} cannot name a cgroup: use letters, digits and _.:@=+-")
    return name


def check_root(root: str) -> str:
    """`root` (the cgroups_root flag, e.g. 'agora' or 'agora/agent0') if every part is a
    usable name; ValueError otherwise."""
    if not isinstance(root, str) or not root.strip("/"):
        raise ValueError(f"cgroups_root {root!r} must name a directory, e.g. 'agora'")
    for part in root.strip("/").split("/"):
        check_name(part)
    return root.strip("/")


def _read_controllers(point: str) -> frozenset:
    try:
        with open(os.path.join(point, "cgroup.controllers")) as f:
            return frozenset(f.read().split())
    except OSError:
        return frozenset()


_discovered: dict[tuple[str, str], Hierarchies] = {}
_discover_lock = threading.Lock()


def discover(base: str = DEFAULT_BASE, mountinfo: str = "/proc/self/mountinfo") -> Hierarchies:
    """The cgroup hierarchies mounted at or under `base`, read from `mountinfo` once (later
    calls with the same arguments return the same object: no per-container scans)."""
    key = (base, mountinfo)
    with _discover_lock:
        found = _discovered.get(key)
        if found is None:
            with open(mountinfo) as f:
                found = Hierarchies.from_mounts(parse_mountinfo(f.read()), base)
            _discovered[key] = found
        return found


def configured(flags: dict) -> tuple[Hierarchies, str]:
    """The hierarchies and the cgroups root that the agent's flags name: `cgroups_hierarchy`
    (default /sys/fs/cgroup) and `cgroups_root` (default "agora")."""
    base = flags.get("cgroups_hierarchy") or DEFAULT_BASE
    return discover(base), check_root(flags.get("cgroups_root") or DEFAULT_ROOT)


def membership(hierarchies: Hierarchies, root: str, container_id: str) -> Cgroup:
    """The cgroup that holds every process of a container so it can be frozen and killed as
    a whole (setsid cannot escape it): the v1 freezer hierarchy when mounted, else the v2
    tree. Not created: call `.create()` before attaching."""
    return hierarchies.container("freezer", root, container_id)


class Cgroup:
    """One cgroup directory: `mount` is its hierarchy's mount point, `relative` its path in
    there, `version` 1 or 2. Reads and writes raise OSError naming the file."""

    def __init__(self, mount: str, relative: str, version: int):
        self.mount = mount
        self.relative = relative.strip("/")
        self.version = version
        self.path = os.path.join(mount, self.relative) if self.relative else mount

    def __repr__(self) -> str:
        return f"Cgroup({self.path!r}, v{self.version})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cgroup) and (self.path, self.version) == \
            (other.path, other.version)

    def __hash__(self) -> int:
        return hash((self.path, self.version))

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    # --- files -----------------------------------------------------------------------

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def has(self, name: str) -> bool:
        return os.path.exists(self.file(name))

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def read(self, name: str) -> str:
        with open(self.file(name)) as f:
            return f.read()

    def read_keyed(self, name: str) -> dict[str, int]:
        """A flat keyed file ('key value' lines: cpu.stat, memory.stat, cgroup.events...)."""
        return parse_keyed(self.read(name))

    def write(self, name: str, value: object) -> None:
        """Write `value` in one write(2) (the kernel parses each write on its own)."""
        path = self.file(name)
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)  # (as a shell's >)
        try:
            os.write(fd, str(value).encode())
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror} (writing {value!r})", path) from None
        finally:
            os.close(fd)

    # --- membership ------------------------------------------------------------------

    def create(self, controllers: tuple | frozenset = ()) -> Cgroup:
        """Make the directory (and its parents). On v2, first enable `controllers` in the
        cgroup.subtree_control of every ancestor from the root down, so they reach it."""
        if self.version == 2 and controllers:
            wanted = set(controllers) - V2_BUILTIN
            available = _read_controllers(self.mount)
            missing = wanted - available
            if missing:
                raise CgroupError(f"cgroup2 at {self.mount} does not offer {sorted(missing)} "
                                  f"(its cgroup.controllers: {sorted(available) or 'none'})")
            parts = self.relative.split("/")[:-1]
            for depth in range(len(parts) + 1):
                ancestor = os.path.join(self.mount, *parts[:depth])
                os.makedirs(ancestor, exist_ok=True)
                parent = Cgroup(ancestor, "", 2)
                enabled = set(parent.read("cgroup.subtree_control").split())
                need = sorted(wanted - enabled)
                if need:
                    parent.write("cgroup.subtree_control", " ".join("+" + c for c in need))
        os.makedirs(self.path, exist_ok=True)
        return self

    def attach(self, pid: int) -> None:
        """Move process `pid` (all its threads) into this cgroup."""
        self.write("cgroup.procs", pid)

    def procs(self) -> list[int]:
        """Pids of the processes directly in this cgroup ([] if it does not exist)."""
        try:
            return [int(p) for p in self.read("cgroup.procs").split()]
        except FileNotFoundError:
            return []

    def children(self) -> list[Cgroup]:
        """The cgroups directly below this one."""
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return []
        return [Cgroup(self.mount, f"{self.relative}/{e.name}".strip("/"), self.version)
                for e in entries if e.is_dir(follow_symlinks=False)]

    def members(self) -> list[int]:
        """Pids of the processes in this cgroup and in every cgroup below it."""
        out = self.procs()
        for child in self.children():
            out.extend(child.members())
        return out

    def populated(self) -> bool:
        """Whether any process is in this cgroup or below it."""
        if self.version == 2:
            try:
                return self.read_keyed("cgroup.events").get("populated", 0) == 1
            except FileNotFoundError:
                return False
        return bool(self.members())

    # --- freezing and killing --------------------------------------------------------

    @property
    def can_freeze(self) -> bool:
        return self.has("cgroup.freeze" if self.version == 2 else "freezer.state")

    def freeze(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Stop every process here and below; returns once the kernel says frozen."""
        self._set_frozen(True, timeout)

    def thaw(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Let the processes run again."""
        self._set_frozen(False, timeout)

    def _set_frozen(self, frozen: bool, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.version == 2:
                self.write("cgroup.freeze", 1 if frozen else 0)
                done = self.read_keyed("cgroup.events").get("frozen", 0) == int(frozen)
            else:
                # Written again on each pass: a v1 freeze can stall in FREEZING while a task
                # sleeps uninterruptibly, and a new write retries it.
                self.write("freezer.state", "FROZEN" if frozen else "THAWED")
                done = self.read("freezer.state").strip() == ("FROZEN" if frozen else "THAWED")
            if done:
                return
            if time.monotonic() > deadline:
                raise CgroupError(f"{self.path} did not {'freeze' if frozen else 'thaw'} "
                                  f"within {timeout}s")
            time.sleep(_POLL)

    def kill(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """SIGKILL every process here and below and wait until none is left.

        v2 with `cgroup.kill` (Linux 5.14) does it in one write. Otherwise each pass freezes
        the cgroup (where it can), signals every member, thaws, and looks again: processes
        forked meanwhile are caught by the next pass.
        """
        if not self.exists():
            return
        deadline = time.monotonic() + timeout
        if self.version == 2 and self.has("cgroup.kill"):
            self.write("cgroup.kill", 1)
            self._wait_empty(deadline, timeout)
            return
        while True:
            pids = self.members()
            if not pids:
                return
            frozen = False
            try:
                if self.can_freeze:
                    self.freeze(max(0.0, deadline - time.monotonic()))
                    frozen = True
                    pids = self.members()
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            finally:
                if frozen:
                    self.thaw(max(1.0, deadline - time.monotonic()))
            settle = min(deadline, time.monotonic() + 0.1)
            while self.members() and time.monotonic() < settle:
                time.sleep(_POLL)
            if time.monotonic() > deadline and self.members():
                raise CgroupError(f"{self.path}: processes {self.members()} survive SIGKILL "
                                  f"after {timeout}s")

    def _wait_empty(self, deadline: float, timeout: float) -> None:
        while self.populated():
            if time.monotonic() > deadline:
                raise CgroupError(f"{self.path}: processes {self.members()} survive "
                                  f"cgroup.kill after {timeout}s")
            time.sleep(_POLL)

    # --- removal ---------------------------------------------------------------------

    def remove(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """rmdir this cgroup, children first; retried while the kernel says EBUSY (a
        killed process may take a moment to leave). Gone already is fine."""
        deadline = time.monotonic() + timeout
        for child in self.children():
            child.remove(max(0.0, deadline - time.monotonic()))
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise CgroupError(f"cannot remove {self.path}: {e.strerror}"
                                      + (f" after {timeout}s" if e.errno == errno.EBUSY else "")
                                      ) from None
            time.sleep(_POLL)

    def destroy(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Kill every process here and below, then remove the cgroups. Idempotent."""
        deadline = time.monotonic() + timeout
        self.kill(timeout)
        self.remove(max(1.0, deadline - time.monotonic()))

    def destroy_children(self, keep=(), timeout: float = DEFAULT_TIMEOUT) -> list[str]:
        """Destroy every cgroup directly below this one whose name is not in `keep` (the
        orphans a previous agent left under cgroups_root); returns their names. Every one is
        tried; CgroupError names those that could not be destroyed."""
        destroyed, errors = [], []
        for child in self.children():
            if child.name in keep:
                continue
            try:
                child.destroy(timeout)
                destroyed.append(child.name)
            except (CgroupError, OSError) as e:
                errors.append(str(e))
        if errors:
            raise CgroupError("; ".join(errors))
        return destroyed
