"""What a container's first process does between fork and exec, and the init of a PID namespace.

The launch helper forks; the child runs `become(spec, ...)`, which never returns:

    wait for "go" (if asked) → join cgroups → setsid → unshare mnt/uts/ipc(/net), or setns
    into a prepared netns → make / private → bind the volumes on host paths (in the
    sandbox) → mount the rootfs (overlay or bind) on its mount point → bind the sandbox and
    the other volumes into it → /dev, /dev/pts, /dev/shm, /sys → pivot_root → /proc → hostname
    ├─ no PID namespace: rlimits → cwd → user → exec (the helper waits for it)
    └─ PID namespace (the helper made us PID 1 of a new one): fork the task (PID 2), which
       does rlimits → cwd → user → exec; we stay as its init: forward signals to its
       process group, reap orphans, report its wait status, and exit with it

A spec is a JSON-able dict (see `agent/containerizer/README.md`). Progress and errors go to
`report_fd`, one line each: `E <message>` (the launch failed; the process exits 127),
`R` (an init's task has exec'd) and `S <wait status>` (an init's task ended). Without an
init, the helper learns of the exec when `report_fd` closes (it is close-on-exec) and of the
exit from waitpid. Standard library only: this runs in a forked copy of the helper.
"""

from __future__ import annotations

import importlib
import os
import resource
import signal
import stat
import sys
import traceback

from agent.containerizer import syscalls as sc

SANDBOX_TARGET = "/mnt/mesos/sandbox"
#: Programs a spec may run in the forked process itself (`builtin`): name -> (module, function).
BUILTINS = {"command-executor": ("agent.executors.command", "main")}
#: Host device nodes bound into a container's /dev (no mknod needed, whatever the devices
#: cgroup says about creating nodes).
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
#: Signals an init passes on to its task; the rest it handles itself or cannot catch.
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2, signal.SIGWINCH, signal.SIGCONT)
#: Set to their defaults for a task: what we handle, and what Python ignores (SIGPIPE,
#: SIGXFSZ), which an exec would otherwise pass on as ignored.
RESET_SIGNALS = (*FORWARDED, signal.SIGPIPE, signal.SIGXFSZ)


class SetupError(Exception):
    """A step of the set-up failed; the message says which and why."""


def resolve_in_root(root: str, path: str) -> str:
    """`path` inside the directory tree `root`, symlinks followed as if `root` were `/`.

    Never leaves `root`: absolute links restart at `root`, `..` stops there. Components that
    do not exist yet are appended as they are.
    """
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            target = os.readlink(candidate)
        except OSError:  # not a symlink (or absent)
            resolved.append(part)
            continue
        hops += 1
        if hops > 40:
            raise SetupError(f"too many symbolic links under {path!r} in the container")
        if target.startswith("/"):
            resolved = []
        parts = [p for p in target.split("/") if p not in ("", ".")] + parts
    return os.path.join(root, *resolved)


def _mount_point(root: str | None, target: str, file: bool) -> str:
    """The host path of `target` (inside `root` if given), created as a dir or empty file."""
    path = resolve_in_root(root, target) if root else target
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
        if file:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644))
        else:
            os.mkdir(path, 0o755)
        return path
    if stat.S_ISDIR(st.st_mode) == file:
        kind = "a directory" if file else "not a directory"
        raise SetupError(f"cannot mount on {target}: it is {kind} in the container")
    return path


def _bind(source: str, root: str | None, target: str, read_only: bool) -> None:
    try:
        st = os.stat(source)
    except OSError as e:
        raise SetupError(f"volume source {source}: {e.strerror}") from None
    point = _mount_point(root, target, not stat.S_ISDIR(st.st_mode))
    sc.mount(source, point, None, sc.MS_BIND | sc.MS_REC)
    if read_only:
        sc.mount(None, point, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_REC)


def _mount_rootfs(rootfs: dict) -> str:
    """Mount the container's root filesystem on its mount point; returns that point."""
    target = rootfs["target"]
    if rootfs["kind"] == "overlay":
        # Overlay's options must fit in a page: layer paths are given relative to `base`.
        base = rootfs.get("base") or "/"
        os.chdir(base)
        data = (f"lowerdir={':'.join(rootfs['layers'])},upperdir={rootfs['upper']},"
                f"workdir={rootfs['work']}")
        if len(data) >= 4096:
            raise SetupError(f"the image has too many layers ({len(rootfs['layers'])}) for "
                             "one overlay mount; use the copy backend")
        sc.mount("overlay", target, "overlay", 0, data)
        os.chdir("/")
    elif rootfs["kind"] == "bind":
        sc.mount(rootfs["path"], target, None, sc.MS_BIND | sc.MS_REC)
    else:
        raise SetupError(f"unknown rootfs kind {rootfs['kind']!r}")
    return target


def _populate_dev(root: str) -> None:
    dev = _mount_point(root, "/dev", False)
    sc.mount("tmpfs", dev, "tmpfs", sc.MS_NOSUID | sc.MS_NOEXEC, "mode=755,size=65536k")
    for name in DEVICES:  # (a fresh tmpfs: no link to resolve, nothing in the way)
        if os.path.exists(f"/dev/{name}"):
            target = os.path.join(dev, name)
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o666))
            sc.mount(f"/dev/{name}", target, None, sc.MS_BIND)
    os.mkdir(os.path.join(dev, "pts"), 0o755)
    sc.mount("devpts", os.path.join(dev, "pts"), "devpts", sc.MS_NOSUID | sc.MS_NOEXEC,
             "newinstance,ptmxmode=0666,mode=620")
    os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
    os.mkdir(os.path.join(dev, "shm"), 0o1777)
    sc.mount("shm", os.path.join(dev, "shm"), "tmpfs", sc.MS_NOSUID | sc.MS_NODEV,
             "mode=1777,size=65536k")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, os.path.join(dev, name))


def _pivot(root: str) -> None:
    os.chdir(root)
    sc.pivot_root(".", ".")
    sc.umount2(".", sc.MNT_DETACH)  # the old root, stacked on the new one
    os.chdir("/")


def _mount_proc() -> None:
    os.makedirs("/proc", exist_ok=True)
    sc.mount("proc", "/proc", "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)


def prepare_namespaces(spec: dict) -> None:
    """Namespaces, mounts, root filesystem and hostname, in that order (see the module doc)."""
    namespaces = set(spec.get("namespaces") or ())
    flags = 0
    for name in namespaces - {"pid"}:
        if name == "net" and spec.get("netns"):
            continue
        flags |= sc.NAMESPACE_FLAGS[name][0]
    if flags:
        sc.unshare(flags)
    if spec.get("netns"):
        fd = os.open(spec["netns"], os.O_RDONLY | os.O_CLOEXEC)
        try:
            sc.setns(fd, sc.CLONE_NEWNET)
        finally:
            os.close(fd)
    if "mnt" not in namespaces:
        return
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    mounts = spec.get("mounts") or ()
    for m in mounts:  # host paths (in the sandbox) first: the sandbox's bind then has them
        if m.get("host"):
            _bind(m["source"], None, m["target"], bool(m.get("read_only")))
    rootfs = spec.get("rootfs")
    root = _mount_rootfs(rootfs) if rootfs else None
    for m in mounts:
        if not m.get("host"):
            _bind(m["source"], root, m["target"], bool(m.get("read_only")))
    if root is not None:
        _populate_dev(root)
        sys_dir = resolve_in_root(root, "/sys")
        if os.path.isdir(sys_dir):
            sc.mount("sysfs", sys_dir, "sysfs",
                     sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
        _pivot(root)
    if "pid" in namespaces:
        _mount_proc()  # we are PID 1 of the new namespace: this /proc shows only it
    if spec.get("hostname"):
        sc.sethostname(spec["hostname"])


def finish_and_exec(spec: dict, started_fd: int | None = None) -> None:
    """rlimits, working directory, user, then exec; raises on failure (never returns).

    A spec with `builtin` (our own executor) runs that program in this very process instead
    of exec'ing a new interpreter: it is already one, forked from the helper with our code
    imported, which saves the ~40 ms an interpreter takes to start. `started_fd` (the
    report pipe, closed by a successful exec) is then closed by hand."""
    process_settings(spec)
    env = spec.get("env") or {}
    if spec.get("builtin"):
        _run_builtin(spec["builtin"], env, started_fd)
    argv = spec["argv"]
    try:
        os.execve(program_path(spec), argv, env)
    except OSError as e:
        raise SetupError(f"cannot run {spec.get('program') or argv[0]!r}: {e.strerror}") \
            from None


def process_settings(spec: dict) -> None:
    """rlimits, working directory, then user (last: it drops the privileges the rest need)."""
    for name, soft, hard in spec.get("rlimits") or ():
        which = getattr(resource, f"RLIMIT_{name}", None)
        if which is None:
            raise SetupError(f"unknown rlimit {name}")
        infinity = resource.RLIM_INFINITY
        resource.setrlimit(which, (infinity if soft is None else soft,
                                   infinity if hard is None else hard))
    cwd = spec.get("cwd") or "/"
    try:
        os.chdir(cwd)
    except OSError as e:
        raise SetupError(f"working directory {cwd}: {e.strerror}") from None
    user = spec.get("user")
    if user:
        os.setgroups(list(user.get("groups") or ()))
        os.setgid(user["gid"])
        os.setuid(user["uid"])


def program_path(spec: dict) -> str:
    """The file to execute: `program` or argv[0], looked up in the spec's PATH without a
    slash; SetupError naming it if there is none."""
    program = spec.get("program") or spec["argv"][0]
    if "/" in program:
        return program
    path = (spec.get("env") or {}).get("PATH", os.defpath)
    for directory in path.split(os.pathsep):
        candidate = os.path.join(directory or ".", program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise SetupError(f"cannot run {program!r}: No such file or directory")


def _run_builtin(name: str, env: dict, started_fd: int | None) -> None:
    """Run one of BUILTINS as this process, then exit with its status (never returns)."""
    if name not in BUILTINS:
        raise SetupError(f"unknown builtin program {name!r}")
    module, function = BUILTINS[name]
    os.environ.clear()
    os.environ.update(env)
    program = getattr(importlib.import_module(module), function)
    if started_fd is not None:
        os.close(started_fd)  # as an exec would: the launcher now knows it runs
    code = 1
    try:
        code = program() or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 — say what went wrong, never unwind further
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    os._exit(code)


def _fork_task(spec: dict, report_fd: int) -> int:
    """The task as a fork of this process (for a builtin program, which must be a copy of
    the interpreter); exits reporting the error if it cannot start."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    task = os.fork()
    if task == 0:
        try:
            os.close(ready_r)
            os.close(report_fd)
            os.setpgid(0, 0)
            for sig in RESET_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            finish_and_exec(spec, ready_w)
        except (OSError, SetupError) as e:
            _report(ready_w, f"E {e}")
        except BaseException as e:  # noqa: BLE001
            _report(ready_w, f"E unexpected {type(e).__name__}: {e}")
        os._exit(127)
    os.close(ready_w)
    chunks = []
    while chunk := os.read(ready_r, 4096):
        chunks.append(chunk)
    os.close(ready_r)
    message = b"".join(chunks).decode("utf-8", "replace").strip()
    if message:
        _report(report_fd, message)
        os._exit(127)
    return task


def _report(fd: int, line: str) -> None:
    try:
        os.write(fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


def become(spec: dict, stdio: list[int], report_fd: int, go_fd: int | None,
           pid_namespace: bool) -> None:
    """The forked child's whole life: set up, then exec (or be the init). Never returns."""
    try:
        try:
            if go_fd is not None:
                if os.read(go_fd, 1) != b"g":
                    os._exit(125)  # the helper gave up on us
                os.close(go_fd)
            for fd, target in zip(stdio, (0, 1, 2)[3 - len(stdio):]):
                os.dup2(fd, target)
            if len(stdio) < 3:
                null = os.open("/dev/null", os.O_RDONLY)
                os.dup2(null, 0)
                os.close(null)
            for directory in spec.get("cgroups") or ():
                with open(os.path.join(directory, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
            if spec.get("session", True):
                os.setsid()
            prepare_namespaces(spec)
            if pid_namespace:
                _init(spec, report_fd)  # never returns
            finish_and_exec(spec, report_fd)
        except (OSError, SetupError) as e:
            _report(report_fd, f"E {e}")
            os._exit(127)
    except BaseException as e:  # noqa: BLE001 — a forked child must never unwind into the helper
        _report(report_fd, f"E unexpected {type(e).__name__}: {e}")
        os._exit(127)


def _init(spec: dict, report_fd: int) -> None:
    """PID 1 of the container: start the task, forward signals, reap, exit with its status."""
    # Handlers first: a signal to PID 1 without a handler is dropped by the kernel, and one
    # may come as soon as the launcher hears we run. What comes before the fork is kept.
    task = 0
    early: list[int] = []

    def forward(sig, _frame):
        if not task:
            early.append(sig)
            return
        try:
            os.killpg(task, sig)
        except OSError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    if spec.get("builtin"):
        task = _fork_task(spec, report_fd)
    else:
        # posix_spawn (vfork underneath) rather than fork: no copy of this interpreter's
        # page tables, ~1.5 ms less a launch. The init takes the task's cwd, rlimits and
        # user itself first: it needs none of its privileges any more.
        try:
            process_settings(spec)
            argv = spec["argv"]
            try:
                task = os.posix_spawn(program_path(spec), argv, spec.get("env") or {},
                                      setpgroup=0, setsigmask=(), setsigdef=RESET_SIGNALS)
            except OSError as e:
                raise SetupError(f"cannot run {spec.get('program') or argv[0]!r}: "
                                 f"{e.strerror}") from None
        except (OSError, SetupError) as e:
            _report(report_fd, f"E {e}")
            os._exit(127)
    _report(report_fd, "R")
    for sig in early:
        forward(sig, None)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(0)
        except InterruptedError:
            continue
        if pid == task:
            _report(report_fd, f"S {status}")
            os._exit(0)  # the kernel kills whatever is left in the namespace
