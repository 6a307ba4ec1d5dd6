"""Tests for agent.gc: Mesos's sandbox age rule (pure) and the collector on a fake clock.

The collector runs its removals through an injected `defer_to_thread`; with a `Clock` the
tests pass a synchronous one, so real directories are really deleted, in order, at once.
One test uses a real reactor and its thread pool, the default.
"""

from __future__ import annotations

import errno
import os
import threading

import pytest
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.threads import blockingCallFromThread

from agent import gc as gc_mod
from agent.gc import SandboxGC, gc_plan, max_age, remove_tree

DAY = 86400.0
WEEK = 7 * DAY


def synchronous(f, *args):
    """A defer_to_thread that runs f right away (for tests on a Clock)."""
    return maybeDeferred(f, *args)


def make_sandbox(root, name, files=2):
    """A run directory with a few files and a subdirectory."""
    path = root / "slaves" / "a" / "frameworks" / "f" / "executors" / name / "runs" / "c"
    (path / "sub").mkdir(parents=True)
    for i in range(files):
        (path / f"file{i}").write_bytes(b"x" * 100)
    (path / "sub" / "deep").write_bytes(b"y")
    return path


def collector(tmp_path, clock, **kwargs):
    removed = []
    kwargs.setdefault("disk_usage", lambda: 0.0)
    kwargs.setdefault("defer_to_thread", synchronous)
    gc = SandboxGC(clock, str(tmp_path), on_removed=removed.append, **kwargs)
    return gc, removed


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


# -- the rule -----------------------------------------------------------------------------------


def test_max_age_follows_mesos():
    """max age = delay * max(0, 1 - headroom - usage)."""
    assert max_age(WEEK, 0.0, 0.0) == WEEK
    assert max_age(WEEK, 0.0, 0.1) == pytest.approx(0.9 * WEEK)
    assert max_age(WEEK, 0.5, 0.1) == pytest.approx(0.4 * WEEK)
    assert max_age(WEEK, 0.9, 0.1) == 0.0
    assert max_age(WEEK, 0.95, 0.1) == 0.0


def test_plan_by_age_on_an_empty_disk():
    """With no disk pressure only sandboxes older than the (headroom-shortened) delay go."""
    now = 100 * DAY
    entries = [("/w/old", now - 8 * DAY), ("/w/edge", now - 0.9 * WEEK), ("/w/young", now - DAY)]
    assert gc_plan(entries, now, WEEK, 0.0, 0.0) == ["/w/old"]
    assert gc_plan(entries, now, WEEK, 0.0, 0.1) == ["/w/old", "/w/edge"]
    assert gc_plan([], now, WEEK, 0.0, 0.1) == []


def test_plan_shrinks_age_as_disk_fills_oldest_first():
    """A fuller disk collects younger sandboxes; past the watermark everything, oldest first."""
    now = 100 * DAY
    entries = [("/w/c", now - 1), ("/w/a", now - 3 * DAY), ("/w/b", now - 2 * DAY),
               ("/w/b2", now - 2 * DAY)]
    assert gc_plan(entries, now, WEEK, 0.5, 0.1) == ["/w/a"]  # max age 2.8 days
    assert gc_plan(entries, now, WEEK, 0.7, 0.1) == ["/w/a", "/w/b", "/w/b2"]  # 1.4 days
    assert gc_plan(entries, now, WEEK, 0.95, 0.1) == ["/w/a", "/w/b", "/w/b2", "/w/c"]


# -- the collector on a fake clock --------------------------------------------------------------


def test_aged_sandbox_is_removed_by_the_periodic_check(tmp_path):
    """start() checks every interval; a sandbox goes once it passes the max age, not before."""
    clock = Clock()
    gc, removed = collector(tmp_path, clock, delay=WEEK, headroom=0.0, interval=60)
    box = make_sandbox(tmp_path, "e1")
    gc.schedule(str(box))
    gc.start()
    clock.advance(WEEK - 60)
    assert box.exists() and removed == []
    clock.advance(60)
    assert not box.exists() and removed == [str(box)]
    assert gc.scheduled() == {}
    assert gc.metrics() == {"gc/path_removals_pending": 0.0, "gc/path_removals_succeeded": 1.0,
                            "gc/path_removals_failed": 0.0}
    assert result_of(gc.stop()) is None


def test_disk_filling_collects_at_once_oldest_first(tmp_path):
    """With the disk 95% full every scheduled sandbox goes on the next check, oldest first."""
    clock = Clock()
    clock.advance(1000)
    gc, removed = collector(tmp_path, clock, disk_usage=lambda: 0.95)
    boxes = [make_sandbox(tmp_path, f"e{i}") for i in range(3)]
    gc.schedule(str(boxes[1]), at=900)
    gc.schedule(str(boxes[2]))  # now: the youngest
    gc.schedule(str(boxes[0]), at=500)
    assert result_of(gc.prune()) == [str(boxes[0]), str(boxes[1]), str(boxes[2])]
    assert removed == [str(boxes[0]), str(boxes[1]), str(boxes[2])]
    assert not any(b.exists() for b in boxes)


def test_unschedule_keeps_the_sandbox(tmp_path):
    """An unscheduled sandbox survives any age; unscheduling twice or unknown paths is False."""
    clock = Clock()
    gc, removed = collector(tmp_path, clock, disk_usage=lambda: 1.0)
    box = make_sandbox(tmp_path, "e1")
    gc.schedule(str(box))
    assert gc.unschedule(str(box)) is True
    assert gc.unschedule(str(box)) is False
    assert gc.unschedule(str(tmp_path / "never")) is False
    clock.advance(2 * WEEK)
    assert result_of(gc.prune()) == [] and box.exists() and removed == []


def test_schedule_refuses_paths_outside_the_work_dir(tmp_path):
    """The collector deletes nothing it was not given below its work dir."""
    gc, _ = collector(tmp_path / "work", Clock())
    for path in ("/", str(tmp_path), str(tmp_path / "work"), str(tmp_path / "work/../x"),
                 str(tmp_path / "workx" / "y")):
        with pytest.raises(ValueError):
            gc.schedule(path)


def test_failures_are_logged_and_never_raised(tmp_path):
    """A failing remover, disk probe or on_removed neither raises nor stops the others."""
    clock = Clock()
    calls = []

    def flaky(f, *args):
        calls.append(args[0])
        if args[0].endswith("e0/runs/c"):
            raise OSError(errno.EACCES, "denied")
        if args[0].endswith("e1/runs/c"):
            return fail(OSError(errno.EIO, "disk on fire"))
        return maybeDeferred(f, *args)

    def broken_usage():
        raise OSError("statvfs failed")

    def broken_callback(path):
        raise RuntimeError("callback bug")

    gc = SandboxGC(clock, str(tmp_path), delay=10, headroom=0.0, disk_usage=broken_usage,
                   on_removed=broken_callback, defer_to_thread=flaky)
    boxes = [make_sandbox(tmp_path, f"e{i}") for i in range(3)]
    for i, box in enumerate(boxes):
        gc.schedule(str(box), at=i)
    clock.advance(100)
    assert result_of(gc.prune()) == [str(boxes[2])]
    assert calls == [str(b) for b in boxes]
    assert boxes[0].exists() and boxes[1].exists() and not boxes[2].exists()
    assert gc.scheduled() == {}  # failures are dropped, as in Mesos
    assert gc.counters == {"succeeded": 1, "failed": 2}


def test_stop_waits_for_the_removal_in_progress_and_drops_the_queue(tmp_path):
    """stop() fires after the running removal; queued ones stay scheduled for the next start."""
    clock = Clock()
    pending: list[tuple[Deferred, tuple]] = []

    def slow(f, *args):
        d = Deferred()
        pending.append((d, args))
        return d

    gc, removed = collector(tmp_path, clock, disk_usage=lambda: 1.0, defer_to_thread=slow)
    a, b = str(make_sandbox(tmp_path, "a")), str(make_sandbox(tmp_path, "b"))
    gc.schedule(a, at=-2)
    gc.schedule(b, at=-1)
    pruned = gc.prune()
    assert [args for _, args in pending] == [(a,)]  # one at a time
    assert gc.unschedule(a) is False  # too late: it is being removed
    stopped = gc.stop()
    assert not stopped.called
    pending[0][0].callback(None)
    assert stopped.called and result_of(pruned) == [a]
    assert len(pending) == 1 and gc.scheduled() == {b: -1.0}


def test_unschedule_of_a_queued_path_takes_it_out_of_the_queue(tmp_path):
    """A path waiting behind a running removal can still be kept."""
    clock = Clock()
    pending = []
    gc, removed = collector(tmp_path, clock, disk_usage=lambda: 1.0,
                            defer_to_thread=lambda f, *a: pending.append(a) or Deferred())
    a, b = str(make_sandbox(tmp_path, "a")), str(make_sandbox(tmp_path, "b"))
    gc.schedule(a, at=-2)
    gc.schedule(b, at=-1)
    gc.prune()
    assert gc.unschedule(b) is True
    assert gc.scheduled() == {a: -2.0}


def test_invalid_settings_are_refused(tmp_path):
    """Negative delays, non-positive intervals and headroom outside [0, 1] are errors."""
    for kwargs in ({"delay": -1}, {"interval": 0}, {"headroom": 1.5}, {"headroom": -0.1}):
        with pytest.raises(ValueError):
            SandboxGC(Clock(), str(tmp_path), **kwargs)


def test_default_disk_usage_reads_statvfs(tmp_path):
    """The default probe reports a used fraction of the work dir's filesystem."""
    assert 0.0 <= gc_mod.disk_usage(str(tmp_path)) <= 1.0


# -- removing trees -----------------------------------------------------------------------------


def test_remove_tree_handles_read_only_dirs_and_does_not_follow_links(tmp_path):
    """Read-only and unreadable directories are deleted; symlinked targets outside survive."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep")
    box = make_sandbox(tmp_path, "e1")
    os.symlink(str(outside), box / "link")
    locked = box / "locked"
    locked.mkdir()
    (locked / "f").write_bytes(b"f")
    os.chmod(locked, 0o500)
    hidden = box / "sub" / "hidden"
    hidden.mkdir()
    (hidden / "g").write_bytes(b"g")
    os.chmod(hidden, 0o000)
    remove_tree(str(box))
    assert not box.exists()
    assert (outside / "keep").read_bytes() == b"keep"
    remove_tree(str(box))  # already gone: fine


def test_locked_directories_are_opened_up_for_the_second_pass(tmp_path):
    """Directories without owner rwx get it (root skips the check, so test the fix itself)."""
    box = make_sandbox(tmp_path, "e1")
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o500)
    os.symlink(str(outside), box / "link")
    os.chmod(box / "sub", 0o000)
    os.chmod(box, 0o500)
    gc_mod._make_owner_writable(str(box))
    assert os.stat(box).st_mode & 0o777 == 0o700
    assert os.stat(box / "sub").st_mode & 0o777 == 0o700
    assert os.stat(outside).st_mode & 0o777 == 0o500  # a link's target is not touched


def test_remove_tree_retries_after_opening_up_and_reports_leftovers(tmp_path, monkeypatch):
    """A first pass that leaves files is followed by a second; leftovers after it are an error."""
    box = make_sandbox(tmp_path, "e1")
    real_rmtree = gc_mod._rmtree
    passes = []

    def first_fails(path, errors):
        passes.append(path)
        if len(passes) == 1:
            errors.append(f"{path}/file0: Permission denied")
        else:
            real_rmtree(path, errors)

    monkeypatch.setattr(gc_mod, "_rmtree", first_fails)
    remove_tree(str(box))
    assert len(passes) == 2 and not box.exists()
    box = make_sandbox(tmp_path, "e2")
    monkeypatch.setattr(gc_mod, "_rmtree",
                        lambda path, errors: errors.append(f"{path}/x: Permission denied"))
    with pytest.raises(OSError) as e:
        remove_tree(str(box))
    assert e.value.errno == errno.ENOTEMPTY and "Permission denied" in str(e.value)


def test_remove_tree_refuses_a_tree_with_a_mount_inside(tmp_path, monkeypatch):
    """A mount point below the sandbox stops the deletion (EBUSY) and leaves everything."""
    box = make_sandbox(tmp_path, "e1")
    monkeypatch.setattr(gc_mod, "_mounts_under", lambda path: [path + "/volume"])
    with pytest.raises(OSError) as e:
        remove_tree(str(box))
    assert e.value.errno == errno.EBUSY and (box / "file0").exists()


@pytest.mark.skipif(not os.path.exists("/proc/self/mountinfo"), reason="needs /proc/self/mountinfo")
def test_mounts_under_reads_mountinfo():
    """/proc is a mount point, and it is found as being at or below /proc."""
    assert "/proc" in gc_mod._mounts_under("/proc")


# -- the default: a real reactor's thread pool --------------------------------------------------


def test_removal_runs_in_the_reactor_thread_pool(tmp_path):
    """By default removals run off the reactor thread and on_removed comes back on it."""
    from twisted.internet.epollreactor import EPollReactor

    reactor = EPollReactor()
    thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                              daemon=True)
    thread.start()
    try:
        seen = []
        gc = SandboxGC(reactor, str(tmp_path), disk_usage=lambda: 1.0,
                       on_removed=lambda p: seen.append((p, threading.current_thread())))
        box = make_sandbox(tmp_path, "e1")
        blockingCallFromThread(reactor, gc.schedule, str(box))
        assert blockingCallFromThread(reactor, gc.prune) == [str(box)]
        assert not box.exists() and seen == [(str(box), thread)]
    finally:
        reactor.callFromThread(reactor.stop)
        thread.join(5)
