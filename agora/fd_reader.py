"""A file descriptor the reactor watches for readability, calling back when it is readable.

For kernel notifications that arrive on a descriptor (a pidfd when a process exits, an
eventfd when a cgroup hits OOM, inotify when a cgroup file changes): the reactor's
epoll wakes us, so nothing polls.

    reader = FdReader(fd, ready, "oom")
    reactor.addReader(reader)   ...   reactor.removeReader(reader); os.close(fd)
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IReadDescriptor
from zope.interface import implementer


@implementer(IReadDescriptor)
class FdReader:
    """Calls `ready()` (in the reactor thread) each time `fd` becomes readable."""

    def __init__(self, fd: int, ready: Callable[[], None], prefix: str = "fd"):
        self.fd = fd
        self.ready = ready
        self.prefix = prefix

    def fileno(self) -> int:
        return self.fd

    def doRead(self):
        self.ready()

    def connectionLost(self, reason):
        pass

    def logPrefix(self) -> str:
        return self.prefix
