"""A copy of the ZooKeeper registry's records, kept current by watches (a standby's pre-load).

A standby master mirrors the registry from the time it starts, so that once elected it waits
only for what changed since, not for a read of every record: reading 10,000 agents' znodes
one at a time took 6-7 s of a failover, and even pipelined, kazoo needs ~1 s for them.

    <path>/<kind>            child watch  -> list it again: new keys are read, gone ones drop
    <path>/<kind>/<key>      data watch   -> read it again (its value, or gone)

Every read is asynchronous (kazoo's `*_async`, pipelined on one session) and its result is
applied on the reactor thread in the order ZooKeeper answered, so a later read of a record
always wins over an earlier one. A reconnection loses the server's watches (kazoo does not
set them again), so the mirror then reads everything again.

`caught_up()` fires once the copy holds everything ZooKeeper had committed when it was
called. After a `sync`, every watch event sent before it has reached kazoo's connection
thread, which hands events to its one watch thread in order; a marker queued behind them
there says when they have all been passed to the reactor, and the reads they started (and
those started by a listing) are then waited for.
"""

from __future__ import annotations

import urllib.parse

from twisted.internet import defer

#: kazoo's errors for a request that the connection took with it.
_CONNECTION_ERRORS = frozenset({"ConnectionLoss", "ConnectionDropped", "SessionExpiredError",
                                "ConnectionClosedError"})


class RegistryMirror:
    """The records under `path` (`records[kind][key] = decode(kind, bytes)`), followed.

    `session` is a started `agora.zookeeper.Session`; `kinds` the child znodes of `path`,
    which must exist. The mirror ends (`stop()`, or its session lost) for good.
    """

    def __init__(self, session, path: str, kinds, decode):
        self.session = session
        self.reactor = session.reactor
        self.client = session.client
        self.path = path.rstrip("/")
        self.kinds = tuple(kinds)
        self.decode = decode
        self.records: dict[str, dict] = {kind: {} for kind in self.kinds}
        self.stopped = False
        self._failure: Exception | None = None  # a record that could not be decoded
        self._outstanding = 0  # reads and listings issued, not yet applied
        self._reading: set = set()  # (kind, key) with a read outstanding
        self._stale = False  # watches or reads lost with the connection: read all again
        self._epoch = 0  # connections so far: a read's failure from an earlier one is moot
        self.reads = 0  # records read so far (each a round trip, pipelined)
        self._waiters: set = set()  # caught_up() Deferreds not fired yet
        self._marked: list = []  # ... past their marker: waiting for the reads
        self._after_reconnect: list = []  # ... to sync again once reconnected
        session.add_listener(self._session_changed)

    @property
    def alive(self) -> bool:
        return not self.stopped and self.session.state not in ("LOST", "CLOSED")

    def start(self) -> None:
        """Read every record and watch them all."""
        for kind in self.kinds:
            self._list(kind, everything=True)

    def stop(self) -> None:
        """Stop following; watches still set fire once more and are ignored."""
        self.stopped = True
        self._fail_waiters(RuntimeError("the registry mirror was stopped"))

    def caught_up(self) -> defer.Deferred:
        """Fires (with `records`) once they hold what ZooKeeper had committed by now."""
        d = defer.Deferred()
        self._waiters.add(d)
        self._barrier(d)
        return d

    # --- the barrier ---------------------------------------------------------------------

    def _barrier(self, d: defer.Deferred) -> None:
        if not self.alive:
            self._fail_waiters(RuntimeError(f"the registry's ZooKeeper session is "
                                            f"{self.session.state.lower()}"))
            return
        result = self.client.sync_async(self.path)
        result.rawlink(lambda r: self.reactor.callFromThread(self._synced, d, r))

    def _synced(self, d: defer.Deferred, result) -> None:
        if d not in self._waiters:
            return
        if not result.successful():
            if type(result.exception).__name__ not in _CONNECTION_ERRORS:
                self._waiters.discard(d)
                d.errback(RuntimeError(f"cannot sync with ZooKeeper: {result.exception!r}"))
            elif self._stale or self.session.state != "CONNECTED":
                self._after_reconnect.append(d)  # try again once it is back
            else:
                self._barrier(d)  # it is back already
            return
        from kazoo.protocol.states import Callback

        def marker():  # on kazoo's watch thread, behind every event read before the sync
            self.reactor.callFromThread(self._marker_reached, d)

        self.client.handler.dispatch_callback(Callback("watch", marker, ()))

    def _marker_reached(self, d: defer.Deferred) -> None:
        if d in self._waiters:
            self._marked.append(d)
            self._check()

    def _check(self) -> None:
        if self._outstanding or not self._marked:
            return
        if self._stale:  # wait for the reconnection's full read, after a new sync
            self._after_reconnect.extend(self._marked)
            self._marked = []
            return
        marked, self._marked = self._marked, []
        for d in marked:
            self._waiters.discard(d)
            if self._failure is not None:
                d.errback(self._failure)
            else:
                d.callback(self.records)

    def _fail_waiters(self, error: Exception) -> None:
        waiters = self._waiters
        self._waiters, self._marked, self._after_reconnect = set(), [], []
        for d in waiters:
            d.errback(error)

    # --- reads ---------------------------------------------------------------------------

    def _list(self, kind: str, everything: bool = False) -> None:
        if not self.alive:
            return
        self._outstanding += 1
        epoch = self._epoch
        result = self.client.get_children_async(f"{self.path}/{kind}",
                                                watch=self._children_changed)
        result.rawlink(lambda r: self.reactor.callFromThread(self._listed, kind, everything,
                                                             epoch, r))

    def _listed(self, kind: str, everything: bool, epoch: int, result) -> None:
        self._outstanding -= 1
        if self.stopped:
            return
        if not result.successful():
            self._lost_a_read(epoch, result.exception)
        else:
            keys = {urllib.parse.unquote(child) for child in result.value}
            view = self.records[kind]
            for key in [k for k in view if k not in keys]:
                del view[key]
            for key in keys:
                if (kind, key) not in self._reading and (everything or key not in view):
                    self._read(kind, key)
        self._check()

    def _read(self, kind: str, key: str) -> None:
        if not self.alive:
            return
        self._outstanding += 1
        self._reading.add((kind, key))
        self.reads += 1
        epoch = self._epoch
        znode = f"{self.path}/{kind}/{urllib.parse.quote(key, safe='')}"
        result = self.client.get_async(znode, watch=self._record_changed)
        result.rawlink(lambda r: self.reactor.callFromThread(self._got, kind, key, epoch, r))

    def _got(self, kind: str, key: str, epoch: int, result) -> None:
        self._outstanding -= 1
        self._reading.discard((kind, key))
        if self.stopped:
            return
        if result.successful():
            data, _ = result.value
            try:
                self.records[kind][key] = self.decode(kind, data)
            except ValueError as e:
                self._failure = ValueError(f"registry record {kind}/{key} is not valid: {e}")
        elif type(result.exception).__name__ == "NoNodeError":
            self.records[kind].pop(key, None)  # deleted since listed
        else:
            self._lost_a_read(epoch, result.exception)
        self._check()

    def _lost_a_read(self, epoch: int, error) -> None:
        if epoch != self._epoch:
            return  # the reconnection after it reads everything again anyway
        if type(error).__name__ in _CONNECTION_ERRORS:
            self._stale = True  # the reconnection reads it all again
        else:
            self._failure = RuntimeError(f"cannot read the registry: {error!r}")

    # --- watches (on kazoo's watch thread) ---------------------------------------------

    def _children_changed(self, event) -> None:
        if event.type == "CHILD" and not self.stopped:
            kind = event.path.rsplit("/", 1)[1]
            self.reactor.callFromThread(self._list, kind)

    def _record_changed(self, event) -> None:
        if event.type in ("CHANGED", "DELETED", "CREATED") and not self.stopped:
            kind, key = event.path[len(self.path) + 1:].split("/", 1)
            self.reactor.callFromThread(self._read, kind, urllib.parse.unquote(key))

    # --- the session -------------------------------------------------------------------

    def _session_changed(self, state: str, reason: str | None) -> None:
        if self.stopped:
            return
        if state == "SUSPENDED":
            self._stale = True
        elif state == "CONNECTED" and self._stale:
            self._stale = False
            self._epoch += 1
            self.start()
            waiters, self._after_reconnect = self._after_reconnect, []
            for d in waiters:
                self._barrier(d)
        elif state in ("LOST", "CLOSED"):
            self._fail_waiters(RuntimeError(f"the registry's ZooKeeper session was lost"
                                            f"{': ' + reason if reason else ''}"))
