"""The Linux system calls Python lacks, through ctypes: inotify and bpf(2)."""

from __future__ import annotations

import ctypes
import os
import platform

_libc = ctypes.CDLL("libc.so.6", use_errno=True)  # not ctypes.util: ~8 ms to find it
_libc.syscall.restype = ctypes.c_long

IN_MODIFY = 0x2
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
#: bpf(2)'s number per machine (there is no glibc wrapper).
_NR_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351}


def _checked(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def inotify_init() -> int:
    """A non-blocking, close-on-exec inotify descriptor."""
    return _checked(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    """Watch `path` for the events in `mask`; returns the watch descriptor."""
    result = _libc.inotify_add_watch(fd, os.fsencode(path), ctypes.c_uint32(mask))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"inotify_add_watch: {os.strerror(err)}", path)
    return result


def bpf(cmd: int, attr) -> int:
    """bpf(cmd, attr, sizeof attr) with `attr` a ctypes buffer holding the packed union
    bpf_attr (what pointers it holds must stay alive; the kernel may write results back into
    it). Returns the call's result (a new fd for loads)."""
    number = _NR_BPF.get(platform.machine())
    if number is None:
        raise OSError(38, f"bpf(2) number unknown for {platform.machine()}")
    return _checked(_libc.syscall(ctypes.c_long(number), ctypes.c_int(cmd), attr,
                                  ctypes.c_uint(ctypes.sizeof(attr))), f"bpf({cmd})")
