"""Device access rules: the default set, Mesos's --allowed_devices, and their two encodings —
v1 devices.allow lines and a v2 BPF_PROG_TYPE_CGROUP_DEVICE program (pure: no I/O except the
stat that turns an allowed device's path into its numbers).

The program is built the way runc builds its device filter: it loads the access request
(r2 = device type, r3 = access bits, r4 = major, r5 = minor) from `struct bpf_cgroup_dev_ctx`,
then tries each allow rule in turn (any mismatch jumps to the next rule; a match returns 1),
and denies (returns 0) when none matched.
"""

from __future__ import annotations

import os
import stat as stat_module
import struct

import attrs

_TYPES = {"a": None, "b": 1, "c": 2}  # BPF_DEVCG_DEV_BLOCK = 1, BPF_DEVCG_DEV_CHAR = 2
_ACCESS = {"m": 1, "r": 2, "w": 4}  # BPF_DEVCG_ACC_MKNOD, _READ, _WRITE


@attrs.frozen
class DeviceRule:
    """Allow `access` (letters of 'rwm') to devices of `type` ('c', 'b' or 'a' for both)
    with numbers major:minor (None: any)."""

    type: str
    major: int | None
    minor: int | None
    access: str

    def v1(self) -> str:
        """The devices.allow line, e.g. 'c 1:3 rwm' or 'c 136:* rwm'."""
        star = lambda n: "*" if n is None else str(n)  # noqa: E731
        return f"{self.type} {star(self.major)}:{star(self.minor)} {self.access}"


def parse_rule(text: str) -> DeviceRule:
    """A rule from its devices.allow form: 'c 1:3 rwm', 'b *:* m', 'a'."""
    parts = text.split()
    if parts == ["a"]:
        return DeviceRule("a", None, None, "rwm")
    try:
        kind, numbers, access = parts
        major, minor = numbers.split(":")
        rule = DeviceRule(kind, None if major == "*" else int(major),
                          None if minor == "*" else int(minor), access)
    except ValueError:
        raise ValueError(f"device rule {text!r} is not like 'c 1:3 rwm'") from None
    if kind not in _TYPES or not access or set(access) - set("rwm"):
        raise ValueError(f"device rule {text!r}: type must be a, b or c and access of rwm")
    return rule


#: What every container may use: mknod of any node (opening it is still checked), and the
#: usual character devices (runc's defaults, which Mesos's list also holds).
DEFAULT_RULES = tuple(parse_rule(r) for r in (
    "c *:* m", "b *:* m",
    "c 1:3 rwm",    # /dev/null
    "c 1:5 rwm",    # /dev/zero
    "c 1:7 rwm",    # /dev/full
    "c 1:8 rwm",    # /dev/random
    "c 1:9 rwm",    # /dev/urandom
    "c 5:0 rwm",    # /dev/tty
    "c 5:1 rwm",    # /dev/console
    "c 5:2 rwm",    # /dev/ptmx
    "c 136:* rwm",  # /dev/pts/*
))


def allowed_devices(value, stat=os.stat) -> tuple[DeviceRule, ...]:
    """The rules of a Mesos --allowed_devices value (a DeviceWhitelist as JSON, parsed):

        {"allowed_devices": [{"device": {"path": "/dev/fuse"},
                              "access": {"read": true, "write": true, "mknod": false}}]}

    Each path is stat'ed for its type and numbers; ValueError says what is wrong.
    """
    if value is None:
        return ()
    entries = value.get("allowed_devices") if isinstance(value, dict) else None
    if not isinstance(entries, list):
        raise ValueError('allowed_devices must be {"allowed_devices": [{"device": {"path": ...}, '
                         '"access": {"read": ..., "write": ..., "mknod": ...}}, ...]}')
    rules = []
    for entry in entries:
        device = entry.get("device") if isinstance(entry, dict) else None
        path = device.get("path") if isinstance(device, dict) else None
        if not isinstance(path, str) or not path:
            raise ValueError(f"allowed_devices entry {entry!r} has no device.path")
        access_json = entry.get("access") or {}
        if not isinstance(access_json, dict):
            raise ValueError(f"allowed_devices entry for {path}: access must be an object")
        access = "".join(letter for letter, key in (("r", "read"), ("w", "write"), ("m", "mknod"))
                         if access_json.get(key) is True)
        if not access:
            raise ValueError(f"allowed_devices entry for {path} grants no access "
                             "(set read, write or mknod to true)")
        try:
            st = stat(path)
        except OSError as e:
            raise ValueError(f"allowed_devices: cannot stat {path}: {e.strerror}") from None
        if stat_module.S_ISCHR(st.st_mode):
            kind = "c"
        elif stat_module.S_ISBLK(st.st_mode):
            kind = "b"
        else:
            raise ValueError(f"allowed_devices: {path} is not a character or block device")
        rules.append(DeviceRule(kind, os.major(st.st_rdev), os.minor(st.st_rdev), access))
    return tuple(rules)


# --- the v2 program ------------------------------------------------------------------

_LDX_W = 0x61        # BPF_LDX | BPF_MEM | BPF_W     dst = *(u32 *)(src + off)
_AND32_K = 0x54      # BPF_ALU | BPF_AND | BPF_K     dst &= imm
_RSH32_K = 0x74      # BPF_ALU | BPF_RSH | BPF_K     dst >>= imm
_MOV32_X = 0xBC      # BPF_ALU | BPF_MOV | BPF_X     dst = src
_MOV64_K = 0xB7      # BPF_ALU64 | BPF_MOV | BPF_K   dst = imm
_JNE_K = 0x55        # BPF_JMP | BPF_JNE | BPF_K     if dst != imm: pc += off
_JNE_X = 0x5D        # BPF_JMP | BPF_JNE | BPF_X     if dst != src: pc += off
_EXIT = 0x95         # BPF_JMP | BPF_EXIT            return r0


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One `struct bpf_insn`: opcode, dst:4/src:4 registers, 16-bit offset, 32-bit immediate."""
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


_PROLOGUE = (
    _insn(_LDX_W, 2, 1, 0), _insn(_AND32_K, 2, imm=0xFFFF),  # r2 = access_type & 0xffff
    _insn(_LDX_W, 3, 1, 0), _insn(_RSH32_K, 3, imm=16),      # r3 = access_type >> 16
    _insn(_LDX_W, 4, 1, 4),                                  # r4 = major
    _insn(_LDX_W, 5, 1, 8),                                  # r5 = minor
)


def _rule_block(rule: DeviceRule) -> list[bytes]:
    """Instructions that return 1 when the request matches `rule`; any mismatch jumps past
    the block's end (to the next rule)."""
    body: list[tuple[bool, int, int, int, int]] = []  # (is a jump, code, dst, src, imm)
    kind = _TYPES[rule.type]
    if kind is not None:
        body.append((True, _JNE_K, 2, 0, kind))
    bits = sum(_ACCESS[a] for a in set(rule.access))
    if bits != 7:  # the request must hold no access bit the rule lacks
        body += [(False, _MOV32_X, 1, 3, 0), (False, _AND32_K, 1, 0, bits),
                 (True, _JNE_X, 1, 3, 0)]
    if rule.major is not None:
        body.append((True, _JNE_K, 4, 0, rule.major))
    if rule.minor is not None:
        body.append((True, _JNE_K, 5, 0, rule.minor))
    length = len(body) + 2  # then "r0 = 1; exit"
    out = [_insn(code, dst, src, length - (i + 1) if jump else 0, imm)
           for i, (jump, code, dst, src, imm) in enumerate(body)]
    return out + [_insn(_MOV64_K, 0, imm=1), _insn(_EXIT)]


def device_program(rules) -> bytes:
    """BPF instructions that allow exactly what `rules` allow and deny everything else."""
    insns = list(_PROLOGUE)
    for rule in rules:
        insns += _rule_block(rule)
    insns += [_insn(_MOV64_K, 0, imm=0), _insn(_EXIT)]
    return b"".join(insns)
