"""Which master to talk to: a fixed `host:port`, or the leader elected in ZooKeeper.

    --master zk://h1:2181,h2:2181/agora ── Session ── Detector ── on_leader(host, port | None)
                                             └── lost / cannot connect: a new session, retried

`on_leader(host, port)` runs on the reactor thread whenever the leader changes, and
`(None, None)` while no leader is known; the agent's `MasterLink.set_master` follows it.
The session is started again (every `retry` seconds) when it cannot connect or is lost, so an
agent outlives a ZooKeeper outage.
"""

from __future__ import annotations

from typing import Callable

from twisted.logger import Logger

from agora import zookeeper

log = Logger()


def parse_master(text: str):
    """`zk://...` -> ZkUrl, `host[:port]` -> (host, port); ValueError says why not."""
    if "://" in text:
        return zookeeper.parse_url(text)
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, 5050
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT or {zookeeper.USAGE}, got {text!r}")
    return host, int(port)


class ZooKeeperMaster:
    """Follows the leading master in ZooKeeper and reports it through `on_leader`."""

    def __init__(self, reactor, url: zookeeper.ZkUrl,
                 on_leader: Callable[[str | None, int | None], None], *,
                 session_timeout: float = 10.0, retry: float = 1.0):
        self.reactor, self.url, self.on_leader = reactor, url, on_leader
        self.session_timeout, self.retry = session_timeout, retry
        self.session: zookeeper.Session | None = None
        self.detector: zookeeper.Detector | None = None
        self._running = False
        self._retry_call = None

    def start(self) -> None:
        self._running = True
        self._open()

    def stop(self):
        self._running = False
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        if self.detector is not None:
            self.detector.stop()
        if self.session is not None:
            return self.session.stop()
        from twisted.internet.defer import succeed
        return succeed(None)

    def _open(self) -> None:
        self._retry_call = None
        if not self._running:
            return
        session = self.session = zookeeper.Session(self.reactor, self.url.hosts,
                                                   timeout=self.session_timeout,
                                                   connect_timeout=max(self.retry, 5.0))
        session.add_listener(lambda state, reason: self._session_changed(session, state,
                                                                         reason))
        detector = self.detector = zookeeper.Detector(session, self.url.path,
                                                      on_change=self._changed, log=log)
        d = session.start()
        d.addCallback(lambda _: detector.start())
        d.addErrback(lambda f: self._failed(session, f.getErrorMessage()))

    def _failed(self, session, why: str) -> None:
        if session is not self.session or not self._running:
            return
        log.warn("ZooKeeper {url}: {why}; retrying in {t}s", url=str(self.url), why=why,
                 t=self.retry)
        session.stop()
        self._retry_call = self.reactor.callLater(self.retry, self._open)

    def _session_changed(self, session, state: str, reason: str | None) -> None:
        if state == zookeeper.LOST and session is self.session and self._running:
            self._failed(session, reason or "session lost")

    def _changed(self, info: dict | None) -> None:
        address = (info or {}).get("address") or {}
        if info is None:
            log.warn("No leading master in ZooKeeper {url}", url=str(self.url))
            self.on_leader(None, None)
            return
        # The IP, not the hostname: it is what the master listens on (docs/ha.md).
        self.on_leader(address.get("ip"), int(address.get("port")))
