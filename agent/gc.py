"""Garbage collection of finished sandboxes, with Mesos's rule for a filling disk.

A sandbox is *scheduled* when its executor run ends and removed once it is older than the
*max allowed age*, which shrinks as the work dir's disk fills (Mesos's `Slave::age`):

    max_age = delay * max(0, 1 - headroom - disk_usage)

with `delay` = `--gc_delay` (1 week) and `headroom` = `--gc_disk_headroom` (0.1). The check
runs every `interval` (`--disk_watch_interval`, 1 minute). So, as in Mesos:

- an empty disk keeps sandboxes for 0.9 of the delay (6.3 days by default), a half-full one for
  0.4 of it; at or past `1 - headroom` used (90%), every scheduled sandbox goes at once;
- removal is oldest first, one sandbox at a time, off the reactor thread;
- sizes are never measured: the rule needs only ages and the disk's usage, so the collector
  never walks a sandbox except to delete it.

`gc_plan` is the rule, pure. `SandboxGC` holds the schedule and does the removals:
`remove_tree` deletes past errors (read-only directories included) and refuses a tree with
a mount point inside it (a volume's contents must not go with the sandbox; Mesos unmounts
first, here the isolator that mounted it must). A failed removal is logged and dropped from
the schedule, as in Mesos; nothing here raises into the agent.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import sys
from typing import Callable, Iterable

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

__all__ = ["gc_plan", "max_age", "disk_usage", "remove_tree", "SandboxGC",
           "DEFAULT_DELAY", "DEFAULT_HEADROOM", "DEFAULT_INTERVAL"]

log = Logger()

DEFAULT_DELAY = 7 * 86400.0  # --gc_delay=1weeks
DEFAULT_HEADROOM = 0.1  # --gc_disk_headroom
DEFAULT_INTERVAL = 60.0  # --disk_watch_interval=1mins


def max_age(delay: float, disk_usage: float, headroom: float) -> float:
    """How old (seconds) a scheduled sandbox may get at this disk usage (Mesos's rule)."""
    return delay * max(0.0, 1.0 - headroom - disk_usage)


def gc_plan(entries: Iterable[tuple[str, float]], now: float, delay: float,
            disk_usage: float, headroom: float) -> list[str]:
    """The paths to remove now, oldest first (ties by path).

    `entries` are `(path, scheduled_at)`; a path goes once `now - scheduled_at` reaches
    `max_age(delay, disk_usage, headroom)`.
    """
    limit = max_age(delay, disk_usage, headroom)
    due = sorted((at, path) for path, at in entries if now - at >= limit)
    return [path for _, path in due]


def disk_usage(path: str) -> float:
    """Used fraction of the filesystem holding `path`, as Mesos's `fs::usage` counts it."""
    st = os.statvfs(path)
    if st.f_blocks == 0:
        return 0.0
    return (st.f_blocks - st.f_bfree) / st.f_blocks


def remove_tree(path: str) -> None:
    """Delete `path` and all below it, past errors; OSError if something is left.

    Blocking: run it in a thread. Symlinks are removed, never followed. Refuses (EBUSY) when a
    mount point lies at or below `path`.
    """
    mounts = _mounts_under(os.path.realpath(path))
    if mounts:
        raise OSError(errno.EBUSY, f"{len(mounts)} mount point(s) inside, e.g. {mounts[0]}; "
                                   "not deleting through them", path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return  # already gone (a parent collected first, say)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    errors: list[str] = []
    _rmtree(path, errors)
    if os.path.lexists(path):
        # Tasks leave read-only directories behind; open them up and try once more.
        _make_owner_writable(path)
        errors.clear()
        _rmtree(path, errors)
    if os.path.lexists(path):
        raise OSError(errno.ENOTEMPTY, "could not delete everything: " + "; ".join(errors[:3]),
                      path)


class SandboxGC:
    """Removes scheduled sandboxes under `work_dir` by the rule in `gc_plan`.

    `clock` is the reactor (an IReactorTime; the default remover also uses its thread pool).
    `disk_usage()` returns the used fraction of the work dir's filesystem; `on_removed(path)`
    is called in the reactor thread after each successful removal. `defer_to_thread(f, *args)`
    runs blocking work and returns a Deferred (default: the reactor's thread pool; tests pass
    a synchronous one with a `Clock`).
    """

    def __init__(self, clock, work_dir: str, *, delay: float = DEFAULT_DELAY,
                 headroom: float = DEFAULT_HEADROOM, interval: float = DEFAULT_INTERVAL,
                 disk_usage: Callable[[], float] | None = None,
                 on_removed: Callable[[str], None] | None = None,
                 defer_to_thread: Callable[..., Deferred] | None = None) -> None:
        if delay < 0 or interval <= 0 or not 0.0 <= headroom <= 1.0:
            raise ValueError("need delay >= 0, interval > 0 and 0 <= headroom <= 1; got "
                             f"delay={delay}, interval={interval}, headroom={headroom}")
        self.clock = clock
        self.work_dir = os.path.abspath(work_dir)
        self.delay = delay
        self.headroom = headroom
        self.interval = interval
        self._disk_usage = disk_usage or (lambda: _usage_of(self.work_dir))
        self._on_removed = on_removed or (lambda path: None)
        self._defer_to_thread = defer_to_thread or self._reactor_thread
        self._scheduled: dict[str, float] = {}
        self._queue: list[str] = []  # planned for removal, oldest first
        self._waiting: dict[str, Deferred] = {}  # queued or being removed -> fires when done
        self._current: str | None = None  # being removed right now
        self._loop: LoopingCall | None = None
        self.counters = {"succeeded": 0, "failed": 0}

    # --- the schedule -----------------------------------------------------------------------

    def schedule(self, path: str, at: float | None = None) -> None:
        """Collect `path` by the rule, counting its age from `at` (default: now).

        Call it when an executor run ends; on recovery, pass the directory's mtime as `at`
        (Mesos does the same). Scheduling again moves the time. ValueError for a path
        outside the work dir.
        """
        path = self._inside(path)
        self._scheduled[path] = self.clock.seconds() if at is None else float(at)

    def unschedule(self, path: str) -> bool:
        """Keep `path` after all (it is being reused); False if it was not scheduled or its
        removal has already started."""
        path = os.path.abspath(path)
        if path not in self._scheduled or path == self._current:
            return False
        del self._scheduled[path]
        if path in self._waiting:
            self._queue.remove(path)
            self._waiting.pop(path).callback(None)
        return True

    def scheduled(self) -> dict[str, float]:
        """Path -> when it was scheduled (seconds), for views and tests."""
        return dict(self._scheduled)

    def metrics(self) -> dict[str, float]:
        """Mesos's agent gauges and counters for the collector."""
        return {"gc/path_removals_pending": float(len(self._scheduled)),
                "gc/path_removals_succeeded": float(self.counters["succeeded"]),
                "gc/path_removals_failed": float(self.counters["failed"])}

    # --- collecting -------------------------------------------------------------------------

    def prune(self) -> Deferred:
        """Remove what the rule says is due now; fires with the paths removed. Never fails."""
        try:
            usage = float(self._disk_usage())
        except Exception:
            log.failure("Cannot tell how full the work dir's disk is; collecting by age only")
            usage = 0.0
        candidates = ((p, at) for p, at in self._scheduled.items() if p not in self._waiting)
        plan = gc_plan(candidates, self.clock.seconds(), self.delay, usage, self.headroom)
        if not plan:
            return succeed([])
        log.info("Collecting {n} sandbox(es) (disk {pct:.0f}% used, max age {age:.0f}s)",
                 n=len(plan), pct=100 * usage, age=max_age(self.delay, usage, self.headroom))
        waits = []
        for path in plan:
            self._waiting[path] = Deferred()
            self._queue.append(path)
            waits.append(self._waiting[path])
        self._next()
        d = DeferredList(waits)
        d.addCallback(lambda results: [path for ok, path in results if ok and path])
        return d

    def start(self) -> None:
        """Check now and then every `interval` seconds."""
        if self._loop is None:
            self._loop = LoopingCall(self.prune)  # waits for a prune to end before the next
            self._loop.clock = self.clock
            self._loop.start(self.interval, now=True)

    def stop(self) -> Deferred:
        """Stop checking and drop queued removals; fires once a removal in progress ends."""
        if self._loop is not None:
            if self._loop.running:
                self._loop.stop()
            self._loop = None
        current = self._waiting.get(self._current) if self._current else None
        for path in self._queue:
            self._waiting.pop(path).callback(None)  # still scheduled: the next start picks it up
        self._queue = []
        if current is None:
            return succeed(None)
        done = Deferred()
        current.addBoth(lambda result: (done.callback(None), result)[1])
        return done

    def _next(self) -> None:
        if self._current is not None or not self._queue:
            return
        path = self._current = self._queue.pop(0)
        try:
            d = self._defer_to_thread(remove_tree, path)
        except Exception as e:
            d = Deferred()
            d.errback(e)
        d.addCallbacks(self._removed, self._failed, callbackArgs=(path,), errbackArgs=(path,))

    def _removed(self, _, path: str) -> None:
        self.counters["succeeded"] += 1
        log.info("Removed sandbox {path}", path=path)
        try:
            self._on_removed(path)
        except Exception:
            log.failure("on_removed({path}) failed", path=path)
        self._done(path, path)

    def _failed(self, failure, path: str) -> None:
        self.counters["failed"] += 1
        log.warn("Failed to remove sandbox {path}: {error}", path=path,
                 error=failure.getErrorMessage())
        self._done(path, None)

    def _done(self, path: str, result: str | None) -> None:
        self._scheduled.pop(path, None)
        self._current = None
        waiting = self._waiting.pop(path, None)
        if waiting is not None:
            waiting.callback(result)
        self._next()

    def _inside(self, path: str) -> str:
        path = os.path.abspath(path)
        if not path.startswith(self.work_dir.rstrip("/") + "/"):
            raise ValueError(f"refusing to collect {path!r}: it is not below the work dir "
                             f"{self.work_dir!r}")
        return path

    def _reactor_thread(self, f, *args) -> Deferred:
        return deferToThreadPool(self.clock, self.clock.getThreadPool(), f, *args)


def _usage_of(path: str) -> float:
    # (Inside SandboxGC.__init__ the `disk_usage` parameter hides the function.)
    return disk_usage(path)


def _rmtree(path: str, errors: list[str]) -> None:
    def record(function, failed_path, exc):
        if isinstance(exc, tuple):  # Python < 3.12 passes exc_info
            exc = exc[1]
        if not isinstance(exc, FileNotFoundError):
            errors.append(f"{failed_path}: {exc}")

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=record)
    else:
        shutil.rmtree(path, onerror=record)


def _make_owner_writable(top: str) -> None:
    """Give the owner rwx on every directory below `top` (symlinks untouched)."""
    def fix(directory: str) -> None:
        try:
            st = os.lstat(directory)
            if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o700 != 0o700:
                os.chmod(directory, stat.S_IMODE(st.st_mode) | 0o700)
        except OSError:
            pass

    fix(top)
    for dirpath, dirnames, _ in os.walk(top):  # top-down: a directory is fixed before entered
        for name in dirnames:
            fix(os.path.join(dirpath, name))


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _mounts_under(path: str) -> list[str]:
    """Mount points at or below `path` (from /proc/self/mountinfo; [] where there is none)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    prefix = path.rstrip("/") + "/"
    found = []
    for line in lines:
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        target = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
        if target == path or target.startswith(prefix):
            found.append(target)
    return found
