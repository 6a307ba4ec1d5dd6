"""Sandboxes on a real agent: /files over each run, collection of finished runs, /monitor."""

from __future__ import annotations

import json
import os
import urllib.parse

from agent_harness import (  # noqa: F401  (fixtures)
    agent_reactor, cluster, make_cluster, wait_for)

from agora import protocol


def files(cluster, endpoint: str, path: str, **params):
    query = urllib.parse.urlencode({"path": path, **params})
    status, _, body = cluster.http("GET", f"/files/{endpoint}?{query}")
    return status, (json.loads(body) if status == 200 and endpoint != "download" else body)


def test_a_run_is_served_by_its_real_path_and_as_latest(cluster):
    """/files/browse and /files/read reach the sandbox both ways; read offset=-1 gives the size."""
    cluster.run_task("served", "echo hello-files; sleep 30")
    cluster.wait_state("served", "TASK_RUNNING")
    wait_for(lambda: cluster.read_sandbox("served") == "hello-files\n", what="the output")
    real = cluster.executor("served").directory
    latest = "/frameworks/fw-1/executors/served/runs/latest"
    for base in (real, latest):
        status, listing = files(cluster, "browse", base)
        assert status == 200
        assert {e["path"] for e in listing} >= {base + "/stdout", base + "/stderr"}
        status, end = files(cluster, "read", base + "/stdout", offset=-1)
        assert status == 200 and end == {"data": "", "offset": len("hello-files\n")}
        status, head = files(cluster, "read", base + "/stdout", offset=0, length=5)
        assert head == {"data": "hello", "offset": 0}
    assert files(cluster, "download", latest + "/stdout") == (200, b"hello-files\n")
    assert cluster.get_json("/files/debug")[latest] == os.path.realpath(real)


def test_paths_that_leave_the_sandbox_are_refused(cluster):
    """`..`, a path outside any sandbox and a symlink the task made to /etc: 4xx, never data."""
    cluster.run_task("escape", "ln -s /etc etc-link; ln -s /etc/passwd pw; sleep 30")
    cluster.wait_state("escape", "TASK_RUNNING")
    latest = "/frameworks/fw-1/executors/escape/runs/latest"
    wait_for(lambda: os.path.islink(os.path.join(cluster.sandbox("escape"), "pw")),
             what="the links")
    for path in (latest + "/../../../../../../etc/passwd", "/etc/passwd",
                 latest + "/etc-link/passwd", latest + "/pw", latest + "/etc-link"):
        for endpoint in ("read", "browse", "download"):
            status, body = files(cluster, endpoint, path, offset=0)
            assert 400 <= status < 500, (endpoint, path, status)
            assert b"root:" not in (body if isinstance(body, bytes) else b"")


def test_a_finished_sandbox_is_collected_when_the_disk_is_full(make_cluster):
    """With the disk past its headroom, a finished run goes at the next check, and with it
    its /files attachments and the then-empty executor and framework directories."""
    c = make_cluster(disk_usage=lambda: 0.95, disk_watch_interval=0.05)
    c.wait_registered()
    c.run_task("big", "head -c 5000000 /dev/zero > filler")
    c.wait_state("big", "TASK_FINISHED")
    frameworks = os.path.join(c.work_dir, "slaves", "fake-S0", "frameworks")
    wait_for(lambda: not os.listdir(frameworks), what="the framework's directories to go")
    metrics = c.get_json("/metrics/snapshot")
    assert metrics["gc/path_removals_succeeded"] >= 1.0
    assert metrics["gc/path_removals_pending"] == 0.0
    status, _ = files(c, "browse", "/frameworks/fw-1/executors/big/runs/latest")
    assert status == 404
    assert c.get_json("/files/debug") == {}


def test_a_finished_sandbox_is_kept_while_the_disk_has_room(make_cluster):
    """On a mostly empty disk a finished run is only scheduled (for gc_delay * 0.8 here)."""
    c = make_cluster(disk_usage=lambda: 0.1, disk_watch_interval=0.05)
    c.wait_registered()
    c.run_task("kept", "echo still-here")
    c.wait_state("kept", "TASK_FINISHED")
    wait_for(lambda: c.get_json("/metrics/snapshot")["gc/path_removals_pending"] == 1.0,
             what="the run to be scheduled")
    assert c.read_sandbox("kept") == "still-here\n"
    assert files(c, "read", "/frameworks/fw-1/executors/kept/runs/latest/stdout",
                 offset=0)[1]["data"] == "still-here\n"


def test_a_new_run_of_an_executor_is_not_collected_with_the_old_one(make_cluster):
    """Removing an old run of an executor id that runs again leaves the new run alone."""
    c = make_cluster(disk_usage=lambda: 0.95, disk_watch_interval=0.05)
    c.wait_registered()
    executor = {"executor_id": {"value": "again"}, "command": {"value": "exit 0"}}
    c.run_task("first", None, executor=executor)
    c.wait_state("first", "TASK_FAILED")  # the executor exits without subscribing
    executor = {"executor_id": {"value": "again"}, "command": {"value": "sleep 30"}}
    c.run_task("second", None, executor=executor)
    c.executor_pid("again")
    wait_for(lambda: c.get_json("/metrics/snapshot")["gc/path_removals_succeeded"] >= 1.0,
             what="the first run to be collected")
    runs = os.path.join(c.work_dir, "slaves", "fake-S0", "frameworks", "fw-1", "executors",
                        "again", "runs")
    assert sorted(os.listdir(runs)) == sorted(["latest", c.executor("again").container_id])
    assert files(c, "browse", "/frameworks/fw-1/executors/again/runs/latest")[0] == 200


def test_monitor_statistics_show_running_executors_with_usage_and_limits(cluster):
    """/monitor/statistics: one entry per running executor, /proc usage, resource limits."""
    resources = [{"name": "cpus", "type": "SCALAR", "scalar": {"value": 0.5}},
                 {"name": "mem", "type": "SCALAR", "scalar": {"value": 64}}]
    cluster.run_task("busy", "sleep 30", resources=resources)
    cluster.wait_state("busy", "TASK_RUNNING")
    for path in ("/monitor/statistics", "/monitor/statistics.json"):
        [entry] = cluster.get_json(path)
        assert entry["executor_id"] == "busy" and entry["framework_id"] == "fw-1"
        assert entry["source"] == "busy" and entry["executor_name"].startswith("Command")
        stats = entry["statistics"]
        assert stats["processes"] >= 2 and stats["threads"] >= 2  # executor + sh/sleep
        assert stats["mem_rss_bytes"] > 0 and stats["timestamp"] > 0
        assert stats["cpus_user_time_secs"] >= 0 and stats["cpus_system_time_secs"] >= 0
        assert stats["cpus_limit"] == 0.5 and stats["mem_limit_bytes"] == 64 * 1024 * 1024
    cluster.send(protocol.KillTask(framework_id="fw-1", task_id="busy"))
    cluster.wait_state("busy", "TASK_KILLED")
    wait_for(lambda: cluster.get_json("/monitor/statistics") == [],
             what="the executor to leave the list")


def test_the_usage_function_can_be_replaced(make_cluster):
    """A containerizer's own usage function feeds /monitor/statistics (the cgroups seam)."""
    seen = []

    def usage(containers):
        seen.append([c.container_id for c in containers])
        return {c.container_id: {"mem_rss_bytes": 42, "processes": 7} for c in containers}

    c = make_cluster(usage=usage)
    c.wait_registered()
    c.run_task("u", "sleep 30")
    c.wait_state("u", "TASK_RUNNING")
    [entry] = c.get_json("/monitor/statistics")
    assert entry["statistics"]["mem_rss_bytes"] == 42
    assert entry["statistics"]["processes"] == 7
    assert seen == [[c.executor("u").container_id]]
