"""The event bus: events go to `/v2/events` streams and to HTTP callback subscribers.

Events are built lazily: `publish(kind, build)` calls `build()` only when some subscriber
wants `kind`, so nobody pays for heavy deployment plans (whole group trees) when nobody
listens. A stream subscriber that stops reading is dropped by its Stream's backlog limit.
Callback subscribers (`/v2/eventSubscriptions`) get each event as a JSON POST; failures are
logged, never retried (as Marathon's HTTP callback subscriber).
"""

from __future__ import annotations

import json
from typing import Callable

from twisted.logger import Logger

from frameworks.marathon import events

log = Logger()


class EventBus:
    def __init__(self, reactor):
        self.reactor = reactor
        self.streams: dict[object, tuple[frozenset, Callable[[dict], None]]] = {}
        self.callbacks: list[str] = []
        self._agent = None
        self.published = 0

    def subscribe(self, token, filters: frozenset, deliver: Callable[[dict], None]) -> None:
        self.streams[token] = (filters, deliver)

    def unsubscribe(self, token) -> None:
        self.streams.pop(token, None)

    def wants(self, kind: str) -> bool:
        if self.callbacks and kind in events.KNOWN:
            return True
        return any(events.wanted(kind, f) for f, _ in self.streams.values())

    def publish(self, kind: str, build: Callable[[], dict]) -> None:
        if not self.wants(kind):
            return
        event = build()
        self.published += 1
        for filters, deliver in list(self.streams.values()):
            if events.wanted(kind, filters):
                try:
                    deliver(event)
                except Exception:
                    log.failure("Delivering {kind} failed", kind=kind)
        if self.callbacks and kind in events.KNOWN:
            body = json.dumps(event, separators=(",", ":")).encode()
            for url in list(self.callbacks):
                self._post(url, body)

    def _post(self, url: str, body: bytes) -> None:
        import io

        from twisted.web.client import Agent, FileBodyProducer, readBody
        from twisted.web.http_headers import Headers

        if self._agent is None:
            self._agent = Agent(self.reactor, connectTimeout=5)
        try:
            d = self._agent.request(b"POST", url.encode(), Headers(
                {b"Content-Type": [b"application/json"]}), FileBodyProducer(io.BytesIO(body)))
        except Exception as e:  # a URL Agent cannot use
            log.warn("Event callback {url} failed: {e}", url=url, e=e)
            return
        d.addCallback(readBody)
        d.addErrback(lambda f: log.warn("Event callback {url} failed: {why}", url=url,
                                        why=f.getErrorMessage()))

