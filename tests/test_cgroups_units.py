"""Pure parts of the cgroups isolators: limit conversions, statistics, flags, device rules and
the device BPF program (run here by a small interpreter of the instructions it uses)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isolators.cgroups import limits, stats
from isolators.cgroups.device_rules import (
    DEFAULT_RULES, DeviceRule, allowed_devices, device_program, parse_rule,
)
from isolators.flags import flag_bool, flag_count, flag_float, flag_json

MB = 1024 * 1024


def test_cpu_conversions_follow_mesos_and_runc():
    """Shares 1024/cpu (min 2), runc's weight formula, CFS quota with a 1 ms floor."""
    assert [limits.cpu_shares(c) for c in (0.5, 1, 0.001, 4)] == [512, 1024, 2, 4096]
    assert [limits.cpu_weight(s) for s in (2, 1024, 262144)] == [1, 39, 10000]
    assert limits.cfs_quota_us(0.25) == 25_000 and limits.cfs_quota_us(0.001) == 1_000
    assert limits.cpu_max(2, True) == "200000 100000" and limits.cpu_max(2, False) == "max 100000"
    assert limits.memory_limit_bytes(16) == 32 * MB and limits.memory_limit_bytes(100) == 100 * MB


def test_bytes_print_as_mesos_prints_them():
    """The largest unit that loses nothing, as in Mesos's limitation messages."""
    assert [limits.format_bytes(n) for n in (0, 1023, 1536 * 1024, 64 * MB, 2 << 30)] == \
        ["0B", "1023B", "1536KB", "64MB", "2GB"]
    assert limits.megabytes(64 * MB) == "64" and limits.megabytes(MB + MB // 2) == "1.5"


def test_statistics_use_mesos_names():
    """v1 ticks and ns, v2 µs; memory.stat totals on v1 (plain keys when there are none)."""
    assert stats.cpu_v1({"user": 250, "system": 50}, {"nr_periods": 4, "nr_throttled": 1,
                                                      "throttled_time": 2_000_000_000}, 100) == {
        "cpus_user_time_secs": 2.5, "cpus_system_time_secs": 0.5, "cpus_nr_periods": 4,
        "cpus_nr_throttled": 1, "cpus_throttled_time_secs": 2.0}
    assert stats.memory(1, {"rss": 5, "total_rss": 7, "cache": 1})["mem_rss_bytes"] == 7
    assert stats.memory(1, {"cache": 1})["mem_file_bytes"] == 1
    assert stats.parse_keyed("a 1\nb x\nc 3\n") == {"a": 1, "c": 3}


def test_flags_accept_parsed_and_text_values_and_refuse_others(tmp_path):
    """Flags from the command line or from text; a bad value names the flag."""
    assert flag_bool({"f": "True"}, "f", False) is True and flag_bool({}, "f", True) is True
    assert flag_float({"f": "2.5"}, "f", 1.0) == 2.5 and flag_count({"f": "max"}, "f") is None
    assert flag_count({"f": 8}, "f") == 8
    path = tmp_path / "d.json"
    path.write_text('{"allowed_devices": []}')
    assert flag_json({"f": f"file://{path}"}, "f") == {"allowed_devices": []}
    for call, value in ((flag_bool, "maybe"), (flag_float, "0"), (flag_count, 1.5),
                        (flag_json, "{oops")):
        with pytest.raises(ValueError, match="flag f"):
            call({"f": value}, "f", *(() if call in (flag_count, flag_json) else (None,)))


def test_device_rules_parse_and_print():
    """devices.allow lines both ways; bad lines are refused."""
    assert parse_rule("c 136:* rwm") == DeviceRule("c", 136, None, "rwm")
    assert parse_rule("a").v1() == "a *:* rwm"
    assert [r.v1() for r in DEFAULT_RULES[:3]] == ["c *:* m", "b *:* m", "c 1:3 rwm"]
    for bad in ("c 1:3", "x 1:3 rwm", "c 1:3 rwx", "c one:3 r"):
        with pytest.raises(ValueError):
            parse_rule(bad)


def test_allowed_devices_json_resolves_paths():
    """Mesos's DeviceWhitelist JSON: paths stat'ed for type and numbers; access booleans."""
    nodes = {"/dev/fuse": (0o020600, os.makedev(10, 229)),
             "/dev/sdb": (0o060600, os.makedev(8, 16))}

    def stat(path):
        if path not in nodes:
            raise FileNotFoundError(2, "No such file or directory")
        return type("Stat", (), {"st_mode": nodes[path][0], "st_rdev": nodes[path][1]})

    rules = allowed_devices({"allowed_devices": [
        {"device": {"path": "/dev/fuse"}, "access": {"read": True, "write": True}},
        {"device": {"path": "/dev/sdb"}, "access": {"read": True, "mknod": True}}]}, stat)
    assert [r.v1() for r in rules] == ["c 10:229 rw", "b 8:16 rm"]
    with pytest.raises(ValueError, match="grants no access"):
        allowed_devices({"allowed_devices": [{"device": {"path": "/dev/fuse"}, "access": {}}]},
                        stat)
    with pytest.raises(ValueError, match="cannot stat /dev/nope"):
        allowed_devices({"allowed_devices": [{"device": {"path": "/dev/nope"},
                                              "access": {"read": True}}]}, stat)
    with pytest.raises(ValueError, match="must be"):
        allowed_devices(["/dev/fuse"], stat)


def run_program(program: bytes, kind: int, access: int, major: int, minor: int) -> int:
    """Interpret the device program on one request (struct bpf_cgroup_dev_ctx)."""
    ctx = struct.pack("<III", (access << 16) | kind, major, minor)
    regs = [0] * 11
    pc, steps = 0, 0
    while True:
        code, reg, off, imm = struct.unpack_from("<BBhi", program, pc * 8)
        dst, src = reg & 0xF, reg >> 4
        assert off >= 0, "a backward jump"
        pc, steps = pc + 1, steps + 1
        if code == 0x61:
            assert src == 1
            regs[dst] = struct.unpack_from("<I", ctx, off)[0]
        elif code == 0x54:
            regs[dst] &= imm & 0xFFFFFFFF
        elif code == 0x74:
            regs[dst] = (regs[dst] & 0xFFFFFFFF) >> imm
        elif code == 0xBC:
            regs[dst] = regs[src] & 0xFFFFFFFF
        elif code == 0xB7:
            regs[dst] = imm
        elif code == 0x55:
            pc += off if regs[dst] != imm else 0
        elif code == 0x5D:
            pc += off if regs[dst] != regs[src] else 0
        elif code == 0x95:
            return regs[0]
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
        assert pc * 8 < len(program) and steps < 10_000


def allowed_by(rules, kind, access, major, minor) -> bool:
    letters = {1: "m", 2: "r", 4: "w"}
    wanted = {letters[b] for b in (1, 2, 4) if access & b}
    return any((r.type == "a" or {"b": 1, "c": 2}[r.type] == kind)
               and r.major in (None, major) and r.minor in (None, minor)
               and wanted <= set(r.access) for r in rules)


rule_strategy = st.builds(
    DeviceRule, st.sampled_from("abc"), st.one_of(st.none(), st.integers(0, 3)),
    st.one_of(st.none(), st.integers(0, 3)),
    st.sampled_from(["r", "w", "m", "rw", "rm", "wm", "rwm"]))


@settings(max_examples=200, deadline=None)
@given(st.lists(rule_strategy, max_size=6), st.sampled_from([1, 2]), st.integers(1, 7),
       st.integers(0, 4), st.integers(0, 4))
def test_the_device_program_allows_exactly_what_the_rules_allow(rules, kind, access, major, minor):
    """For any rules and request, the program's verdict is the rules' verdict (deny by default)."""
    assert run_program(device_program(rules), kind, access, major, minor) == \
        int(allowed_by(rules, kind, access, major, minor))


def test_the_default_program_on_known_devices():
    """The default whitelist allows /dev/null rw and pts, denies a disk read, allows mknod."""
    program = device_program(DEFAULT_RULES)
    char, block, r, w, m = 2, 1, 2, 4, 1
    assert run_program(program, char, r | w, 1, 3) == 1
    assert run_program(program, char, r, 136, 7) == 1
    assert run_program(program, block, r, 8, 0) == 0
    assert run_program(program, block, m, 8, 0) == 1
    assert run_program(program, char, r, 10, 229) == 0


def test_pure_modules_import_no_twisted():
    """limits, stats, device_rules and hierarchy stay free of Twisted."""
    code = ("import sys; import isolators.cgroups.limits, isolators.cgroups.stats, "
            "isolators.cgroups.device_rules, isolators.cgroups.hierarchy, isolators.flags; "
            "bad = [m for m in ('twisted', 'kazoo', 'msgpack') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
