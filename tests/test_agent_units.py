"""Unit tests of the agent's pure parts: detection rules, sandbox layout, backoff, validation."""

from __future__ import annotations

import os

import pytest

from agora import mesos_json as mj
from agora.http import HTTPError
from agora.resources import Resources

from agent import detect, sandbox
from agent.executor_api import validate_status
from agent.master_link import Backoff


# --- resource detection -----------------------------------------------------------------


def test_memory_rule_leaves_a_gigabyte_or_half():
    """Mesos's rule: more than 2 GB keeps 1 GB back; smaller hosts keep half."""
    assert detect.default_mem_mb(8192) == 7168
    assert detect.default_mem_mb(2048) == 1024
    assert detect.default_mem_mb(1000) == 500


def test_disk_rule_leaves_five_gigabytes_or_half():
    """Mesos's rule: more than 10 GB free keeps 5 GB back; less keeps half."""
    assert detect.default_disk_mb(20480) == 15360
    assert detect.default_disk_mb(8000) == 4000


def test_default_resources_have_the_four_names_and_the_port_range():
    """A host's defaults are cpus, mem, disk and ports 31000-32000, all unreserved."""
    r = detect.default_resources(4, 8192, 20480)
    assert r.scalar("cpus") == 4 and r.scalar("mem") == 7168 and r.scalar("disk") == 15360
    assert r.ranges("ports") == ((31000, 32000),)
    assert all(item["role"] == "*" for item in r.to_json())


def test_resources_flag_replaces_a_name_entirely():
    """`--resources` wins per name, roles included; other names keep the detected value."""
    detected = detect.default_resources(8, 8192, 20480)
    merged = detect.merge_resources(detected, "cpus(ads):2;gpus:1")
    assert merged.scalar("cpus") == 2
    assert merged.reserved("ads").scalar("cpus") == 2
    assert merged.unreserved().scalar("cpus") == 0
    assert merged.scalar("gpus") == 1 and merged.scalar("mem") == 7168


def test_detect_resources_reads_this_host(tmp_path):
    """Detection on the real host gives positive cpus, mem and disk."""
    r = detect.detect_resources(str(tmp_path))
    assert r.scalar("cpus") == os.cpu_count()
    assert r.scalar("mem") > 0 and r.scalar("disk") > 0


def test_bad_resources_flag_is_an_error_with_a_hint():
    """A malformed `--resources` is refused with a message that says how to write it."""
    with pytest.raises(ValueError, match="cpus:4"):
        detect.merge_resources(Resources(), "cpus=four")


def test_attributes_become_text_or_scalar():
    """`rack:r1;level:3` is a TEXT and a SCALAR attribute in Mesos JSON."""
    assert detect.parse_attributes("rack:r1;level:3;set:{a,b};r:[1-3]") == [
        {"name": "rack", "type": "TEXT", "text": {"value": "r1"}},
        {"name": "level", "type": "SCALAR", "scalar": {"value": 3.0}},
        {"name": "set", "type": "SET", "set": {"item": ["a", "b"]}},
        {"name": "r", "type": "RANGES", "ranges": {"range": [{"begin": 1, "end": 3}]}},
    ]
    assert detect.attributes_view(detect.parse_attributes("rack:r1;level:3")) == {
        "rack": "r1", "level": 3.0}


def test_bad_attribute_is_an_error_with_a_hint():
    """An attribute without a value is refused with an example of the syntax."""
    with pytest.raises(ValueError, match="rack:r1"):
        detect.parse_attributes("rack")


# --- sandbox -----------------------------------------------------------------------------


def test_sandbox_has_the_mesos_layout_and_a_latest_link(tmp_path):
    """Runs live under slaves/…/executors/<id>/runs/<container>, `latest` points at the newest."""
    work = str(tmp_path)
    first = sandbox.create_run(work, "S0", "fw", "ex", "c1")
    assert first == os.path.join(work, "slaves/S0/frameworks/fw/executors/ex/runs/c1")
    second = sandbox.create_run(work, "S0", "fw", "ex", "c2")
    latest = sandbox.sandbox_path(work, "S0", "fw", "ex")
    assert os.path.realpath(latest) == os.path.realpath(second)
    assert os.path.isdir(first)


@pytest.mark.parametrize("bad", ["", "a/b", "..", ".", "latest"])
def test_ids_that_are_not_path_components_are_refused(tmp_path, bad):
    """An id that could escape the layout (or hide `latest`) is refused."""
    with pytest.raises(ValueError, match="cannot name a directory"):
        sandbox.create_run(str(tmp_path), "S0", "fw", bad if bad != "latest" else "ex",
                           bad)


# --- backoff ---------------------------------------------------------------------------


def test_backoff_doubles_to_the_cap_and_resets():
    """0.1 s, ×2 each time, capped at 10 s; reset starts over (no jitter here)."""
    b = Backoff(jitter=0.0)
    delays = [b.next() for _ in range(10)]
    assert delays[:4] == [0.1, 0.2, 0.4, 0.8]
    assert delays[-1] == 10.0 and max(delays) == 10.0
    b.reset()
    assert b.next() == 0.1


def test_backoff_jitter_stays_within_bounds():
    """Jitter spreads a delay by at most ±25 %."""
    low = Backoff(rand=lambda: 0.0).next()
    high = Backoff(rand=lambda: 1.0).next()
    assert low == pytest.approx(0.075) and high == pytest.approx(0.125)


# --- executor API validation ------------------------------------------------------------


def _status(**extra):
    status = {"task_id": {"value": "t"}, "state": "TASK_RUNNING",
              "uuid": mj.b64(mj.new_uuid()), "source": "SOURCE_EXECUTOR"}
    status.update(extra)
    return status


def test_a_good_status_passes():
    """A pymesos-style status (uuid, source, no agent_id) is valid."""
    status = _status()
    assert validate_status(status, "ex") is status


@pytest.mark.parametrize("change, message", [
    ({"uuid": "not base64!"}, "16 UUID bytes"),
    ({"uuid": mj.b64(b"short")}, "16 UUID bytes"),
    ({"state": "TASK_STAGING"}, "TASK_STAGING"),
    ({"state": "TASK_BOGUS"}, "not a task state"),
    ({"source": "SOURCE_AGENT"}, "SOURCE_EXECUTOR"),
    ({"executor_id": {"value": "other"}}, "not the caller"),
    ({"task_id": {}}, "task_id"),
])
def test_bad_statuses_are_400_with_the_reason(change, message):
    """Each Mesos rule on executor updates gives a 400 that names the problem."""
    with pytest.raises(HTTPError) as e:
        validate_status(_status(**change), "ex")
    assert e.value.status == 400 and message in e.value.message
