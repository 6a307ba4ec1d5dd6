"""disk/du: periodic measurement of sandbox + overlay upper dirs, usage, and quota enforcement."""

from __future__ import annotations

import pytest
from agent_harness import agent_reactor, wait_for  # noqa: F401  (fixture)
from twisted.internet import defer, task
from twisted.internet.threads import blockingCallFromThread

from agora.resources import Resources
from isolators import catalog
from isolators.disk import DiskIsolator, parse_du
from isolators.interface import ContainerConfig, ContainerState, Settings

MB = 1024 * 1024


def settings(reactor, tmp_path, **flags):
    return Settings(str(tmp_path), str(tmp_path), flags, reactor)


def config(tmp_path, resources="disk:2", cid="c1", scratch=()):
    return ContainerConfig(cid, str(tmp_path / "sandbox"), Resources.parse(resources),
                           scratch_dirs=tuple(scratch))


class Measure:
    """A measuring function the test answers by hand, to see when and how it is called."""

    def __init__(self):
        self.calls: list[tuple[tuple, defer.Deferred]] = []

    def __call__(self, paths):
        d = defer.Deferred()
        self.calls.append((paths, d))
        return d


def test_measures_every_interval_one_at_a_time(tmp_path):
    """Every container_disk_watch_interval, never two runs at once, stopping at cleanup."""
    clock, measure = task.Clock(), Measure()
    disk = DiskIsolator(settings(clock, tmp_path, container_disk_watch_interval="5"), measure)
    disk.prepare(config(tmp_path, scratch=["/up1"]))
    clock.advance(4.9)
    assert measure.calls == []
    clock.advance(0.1)
    assert [paths for paths, _ in measure.calls] == [(str(tmp_path / "sandbox"), "/up1")]
    clock.advance(30)  # the first run has not answered: no second one
    assert len(measure.calls) == 1
    measure.calls[0][1].callback(MB)
    assert disk.usage("c1") == {"disk_used_bytes": MB, "disk_limit_bytes": 2 * MB}
    clock.advance(5)
    assert len(measure.calls) == 2
    measure.calls[1][1].errback(RuntimeError("du: boom"))  # logged; measuring goes on
    clock.advance(5)
    assert len(measure.calls) == 3
    disk.cleanup("c1")
    disk.cleanup("c1")
    measure.calls[2][1].callback(5 * MB)  # an answer after cleanup is ignored
    clock.advance(60)
    assert len(measure.calls) == 3 and disk.usage("c1") == {}


def test_quota_enforced_only_when_asked(tmp_path):
    """Above the disk resource: a Limitation with Mesos's message if enforcing; else usage only."""
    clock = task.Clock()
    for enforce in (False, True):
        measure = Measure()
        disk = DiskIsolator(settings(clock, tmp_path, enforce_container_disk_quota=enforce,
                                     container_disk_watch_interval=1), measure)
        disk.prepare(config(tmp_path))
        fired = []
        disk.watch("c1").addCallback(fired.append)
        clock.advance(1)
        measure.calls[-1][1].callback(3 * MB)
        assert disk.usage("c1")["disk_used_bytes"] == 3 * MB
        if not enforce:
            assert fired == [] and disk.check("c1") is None
            continue
        assert fired and fired[0] == disk.check("c1")
        assert fired[0].reason == "REASON_CONTAINER_LIMITATION_DISK"
        assert fired[0].message == "Disk usage (3MB) exceeds quota (2MB)"
        assert fired[0].resources == Resources.parse("disk:2")
        late = []
        disk.watch("c1").addCallback(late.append)
        assert late == fired


def test_no_disk_resource_no_quota_and_update_sets_one(tmp_path):
    """Without `disk` there is no limit; update() brings one (as after recover)."""
    clock, measure = task.Clock(), Measure()
    disk = DiskIsolator(settings(clock, tmp_path, enforce_container_disk_quota=True,
                                 container_disk_watch_interval=1), measure)
    disk.recover([ContainerState("c1", 123, str(tmp_path))])
    clock.advance(1)
    assert measure.calls[0][0] == (str(tmp_path),)
    measure.calls[0][1].callback(10 * MB)
    assert disk.check("c1") is None and "disk_limit_bytes" not in disk.usage("c1")
    disk.update("c1", Resources.parse("disk:4"))
    assert disk.check("c1").message == "Disk usage (10MB) exceeds quota (4MB)"


def test_parse_du_sums_the_lines():
    """du -k -s prints '<KiB>\\t<path>' per argument; all are added, in bytes."""
    assert parse_du(b"12\t/a\n4\t/b with\ttab\n") == 16 * 1024
    assert parse_du(b"du: cannot read\n") == 0


def test_real_du_of_sandbox_and_upper_dir(agent_reactor, tmp_path):
    """The real du, run by the reactor: a 3 MB file in the upper dir breaks a 2 MB quota."""
    sandbox, upper = tmp_path / "sandbox", tmp_path / "upper"
    sandbox.mkdir()
    upper.mkdir()
    (sandbox / "small").write_bytes(b"x" * 1000)
    isolator, = catalog.load("disk/du", settings(agent_reactor, tmp_path,
                                                 container_disk_watch_interval=0.05,
                                                 enforce_container_disk_quota="true"))
    blockingCallFromThread(agent_reactor, isolator.prepare, config(tmp_path, scratch=[str(upper)]))
    fired = []
    blockingCallFromThread(agent_reactor,
                           lambda: isolator.watch("c1").addCallback(fired.append) and None)
    wait_for(lambda: isolator.usage("c1").get("disk_used_bytes"), what="a first measurement")
    assert fired == []
    with open(upper / "big", "wb") as f:
        f.write(b"y" * (3 * MB))
        f.flush()
    wait_for(lambda: fired, what="the quota to be exceeded")
    assert isolator.usage("c1")["disk_used_bytes"] >= 3 * MB
    assert fired[0].message.startswith("Disk usage (") and fired[0].message.endswith(
        ") exceeds quota (2MB)")
    blockingCallFromThread(agent_reactor, isolator.cleanup, "c1")


def test_bad_interval_is_refused(tmp_path):
    """A zero or non-numeric interval is a clear error at start."""
    with pytest.raises(ValueError, match="container_disk_watch_interval"):
        DiskIsolator(settings(None, tmp_path, container_disk_watch_interval="0"))
