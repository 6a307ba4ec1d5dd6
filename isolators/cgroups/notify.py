"""Kernel notifications about a cgroup, delivered through the reactor without polling.

    OomEventfd(reactor, cgroup, fire)  v1: an eventfd registered for memory.oom_control in
                                       cgroup.event_control; readable on OOM, and once more
                                       when the cgroup is removed
    FileWatch(reactor, path, fire)     inotify IN_MODIFY on a cgroup file (v2 memory.events,
                                       cgroup.events): kernfs signals each change of it

`fire()` runs in the reactor thread at each wake-up; the caller reads the files to see what
happened. `close()` stops watching (idempotent). Create and close them in the reactor thread.
"""

from __future__ import annotations

import os

from agora.fd_reader import FdReader
from isolators.cgroups import syscalls
from isolators.cgroups.hierarchy import Cgroup


class _Watch:
    def __init__(self, reactor, fd: int, fire, prefix: str):
        self.reactor = reactor
        self.fire = fire
        self._reader: FdReader | None = FdReader(fd, self._ready, prefix)
        reactor.addReader(self._reader)

    def _drain(self, fd: int) -> None:
        raise NotImplementedError

    def _ready(self) -> None:
        if self._reader is None:
            return
        self._drain(self._reader.fd)
        self.fire()

    @property
    def active(self) -> bool:
        return self._reader is not None

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            self.reactor.removeReader(reader)
            os.close(reader.fd)


class OomEventfd(_Watch):
    """v1 OOM notification of `cgroup` (a memory cgroup)."""

    def __init__(self, reactor, cgroup: Cgroup, fire):
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            control = os.open(cgroup.file("memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
            try:
                # The kernel takes its own reference: the control fd may be closed at once.
                cgroup.write("cgroup.event_control", f"{efd} {control}")
            finally:
                os.close(control)
        except BaseException:
            os.close(efd)
            raise
        super().__init__(reactor, efd, fire, "oom-eventfd")

    def _drain(self, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass


class FileWatch(_Watch):
    """Changes of the file `path` (a cgroup's memory.events or cgroup.events)."""

    def __init__(self, reactor, path: str, fire):
        fd = syscalls.inotify_init()
        try:
            syscalls.inotify_add_watch(fd, path, syscalls.IN_MODIFY)
        except BaseException:
            os.close(fd)
            raise
        super().__init__(reactor, fd, fire, "inotify")

    def _drain(self, fd: int) -> None:
        try:
            while os.read(fd, 4096):
                pass
        except BlockingIOError:
            pass
