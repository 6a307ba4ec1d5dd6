"""A message link over TCP: batches outgoing messages per reactor turn, decodes incoming.

Used by both ends of the master-agent connection. The owner sets `on_message(msg)` and
`on_lost(reason)`; `send(msg)` queues a message and the queue is written as one batch at
the end of the current reactor turn, so a burst (e.g. 1,000 RunTasks) costs one write.
One timer per reactor writes every link's batch, not one timer per link: a master that
pings (or challenges) 10,000 agents in a turn would otherwise schedule 10,000.
"""

import weakref

from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from agora import protocol

log = Logger()


class _Flusher:
    """Flushes, once the reactor's current turn is over, every link that queued messages."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.links: list = []
        self.call = None

    def add(self, link: "Link") -> None:
        self.links.append(link)
        if self.call is None:
            self.call = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        self.call = None
        links, self.links = self.links, []
        for link in links:
            link.flush()


_flushers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # reactor -> _Flusher


def _flusher(reactor) -> _Flusher:
    flusher = _flushers.get(reactor)
    if flusher is None:
        flusher = _flushers[reactor] = _Flusher(reactor)
    return flusher


class Link(Protocol):
    """One end of a master-agent connection."""

    def __init__(self, reactor, send_prefix: bool = False):
        self.reactor = reactor
        self.send_prefix = send_prefix
        self.connected = False
        self._decoder = protocol.Decoder()
        self._queue = []
        self._flusher = _flusher(reactor)
        self._flushing = False  # in the flusher's list for this turn
        self._skip = 0 if send_prefix else len(protocol.PREFIX)

    def on_message(self, msg) -> None:
        """Set by the owner (or overridden): a message arrived."""

    def on_lost(self, reason) -> None:
        """Set by the owner (or overridden): the connection is gone."""

    def connectionMade(self):
        self.connected = True
        if self.send_prefix:
            self.transport.write(protocol.PREFIX)
        if hasattr(self.transport, "setTcpNoDelay"):  # not on in-memory test transports
            self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes):
        if self._skip:  # the server side sees the sniffed prefix first
            cut = min(self._skip, len(data))
            self._skip -= cut
            data = data[cut:]
            if not data:
                return
        try:
            messages = self._decoder.feed(data)
        except protocol.ProtocolError as e:
            log.warn("dropping link from {peer}: {error}", peer=self._peer(), error=e)
            self.transport.abortConnection()
            return
        for msg in messages:
            if not self.connected:
                return
            try:
                self.on_message(msg)
            except Exception:
                log.failure("error handling {msg}", msg=type(msg).__name__)

    def send(self, msg) -> None:
        if not self.connected:
            return
        self._queue.append(msg)
        if not self._flushing:
            self._flushing = True
            self._flusher.add(self)

    def flush(self) -> None:
        self._flushing = False
        if self._queue and self.connected:
            batch, self._queue = self._queue, []
            self.transport.write(protocol.encode(batch))

    def close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.connected = False
        self._queue = []  # the flusher may still call flush(): it finds nothing
        self.on_lost(reason)

    def _peer(self):
        try:
            p = self.transport.getPeer()
            return f"{p.host}:{p.port}"
        except Exception:
            return "?"
