"""Device BPF programs on v2 cgroups: load one (BPF_PROG_TYPE_CGROUP_DEVICE), attach it to a
cgroup directory, list what is attached. The kernel checks these programs on every device
open and mknod by a member of the cgroup, whatever cgroup.controllers lists and even while
the v1 devices controller is also in use; removing the cgroup detaches them.
"""

from __future__ import annotations

import ctypes
import os
import struct

from isolators.cgroups import syscalls

BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_QUERY = 16
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6  # attach type
BPF_F_ALLOW_MULTI = 2  # a parent's programs keep applying; ours are checked too
_LOG_SIZE = 1 << 16


def load_device_program(insns: bytes, name: bytes = b"agora_devices") -> int:
    """Load the program; returns its fd. OSError carries the verifier's log on refusal."""
    code = ctypes.create_string_buffer(insns, len(insns))
    license_ = ctypes.create_string_buffer(b"Apache-2.0")
    log = ctypes.create_string_buffer(_LOG_SIZE)
    # union bpf_attr, BPF_PROG_LOAD part: prog_type, insn_cnt, insns, license, log_level,
    # log_size, log_buf, kern_version, prog_flags, prog_name[16].
    attr = struct.pack("<IIQQIIQII16s", BPF_PROG_TYPE_CGROUP_DEVICE, len(insns) // 8,
                       ctypes.addressof(code), ctypes.addressof(license_), 1, _LOG_SIZE,
                       ctypes.addressof(log), 0, 0, name[:15])
    buf = ctypes.create_string_buffer(attr, len(attr))
    try:
        return syscalls.bpf(BPF_PROG_LOAD, buf)
    except OSError as e:
        detail = log.value.decode(errors="replace").strip()
        raise OSError(e.errno, f"loading the device BPF program failed: {e.strerror}"
                      + (f"; verifier: {detail}" if detail else "")) from None


def attach_device_program(cgroup_dir: str, prog_fd: int) -> None:
    """Attach the loaded program to the cgroup directory (with BPF_F_ALLOW_MULTI)."""
    dir_fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        attr = struct.pack("<IIII", dir_fd, prog_fd, BPF_CGROUP_DEVICE, BPF_F_ALLOW_MULTI)
        syscalls.bpf(BPF_PROG_ATTACH, ctypes.create_string_buffer(attr, len(attr)))
    finally:
        os.close(dir_fd)


def attached_device_programs(cgroup_dir: str) -> list[int]:
    """Ids of the device programs attached to the cgroup directory itself."""
    ids = (ctypes.c_uint32 * 64)()
    dir_fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # target_fd, attach_type, query_flags, attach_flags (out), prog_ids, prog_cnt (in/out)
        attr = struct.pack("<IIIIQI4x", dir_fd, BPF_CGROUP_DEVICE, 0, 0,
                           ctypes.addressof(ids), len(ids))
        buf = ctypes.create_string_buffer(attr, len(attr))
        syscalls.bpf(BPF_PROG_QUERY, buf)
    finally:
        os.close(dir_fd)
    count = struct.unpack_from("<I", buf.raw, 24)[0]
    return list(ids[:count])
