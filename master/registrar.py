"""The master's durable registry: agents (admitted, unreachable, gone), frameworks, weights.

One interface, three backends:

    MemoryRegistry   forgets everything on restart (tests, `--registry in_memory`)
    SQLiteRegistry   a SQLite file in the work dir (the default without `--zk`)
    ZooKeeperRegistry znodes under `<zk path>_registry` (the default with `--zk`, so that
                     whichever master leads next reads what the last leader wrote)

A registry holds three kinds of record, each a key -> JSON-able value:

    agents      agent id     -> (state, AgentInfo)   state: admitted | unreachable | gone
    frameworks  framework id -> {"info": FrameworkInfo, "registered_time": secs}
    weights     role         -> weight

Contract (checked by tests/test_registry.py against every backend):
- `start()` returns a Deferred that fires once the backend can be read and written.
- `load()` returns a Deferred of the durable records, read afresh (a new leader calls it).
- `apply(ops)` makes a batch of `(op, kind, key, value)` (op "put" or "del") durable and
  only then updates the in-memory view (`records`); it returns None or a Deferred.
- `close()` releases the backend.

`Registrar` groups the writes of one reactor turn into one `apply()` (one fsync, one ZooKeeper
multi), and runs batches one after the other; each write's Deferred fires once it is durable.
"""

import json
import os
import sqlite3
import urllib.parse

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from master.mirror import RegistryMirror

log = Logger()

KINDS = ("agents", "frameworks", "weights")


def _encode(kind: str, value) -> str:
    return json.dumps(list(value) if kind == "agents" else value)


def _decode(kind: str, text):
    value = json.loads(text)
    return tuple(value) if kind == "agents" else value


class MemoryRegistry:
    """A registry that forgets everything on restart."""

    def __init__(self):
        self.records: dict[str, dict] = {kind: {} for kind in KINDS}

    @property
    def agents(self) -> dict:
        return self.records["agents"]

    def start(self) -> defer.Deferred:
        return defer.succeed(None)

    def load(self) -> defer.Deferred:
        return defer.succeed({kind: dict(values) for kind, values in self.records.items()})

    def apply(self, ops: list):
        self._apply_view(ops)

    def _apply_view(self, ops: list) -> None:
        for op, kind, key, value in ops:
            if op == "put":
                self.records[kind][key] = value
            else:
                self.records[kind].pop(key, None)

    def close(self) -> None:
        pass


class SQLiteRegistry(MemoryRegistry):
    """A registry in a SQLite file; every apply() is one durable transaction."""

    def __init__(self, path: str):
        super().__init__()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS records "
                        "(kind TEXT, key TEXT, value TEXT, PRIMARY KEY (kind, key))")
        old = self.db.execute("SELECT name FROM sqlite_master WHERE name = 'agents'").fetchone()
        if old:  # the layout before frameworks and weights were kept: move it over
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("INSERT OR REPLACE INTO records SELECT 'agents', id, "
                            "json_array(state, json(info)) FROM agents")
            self.db.execute("DROP TABLE agents")
            self.db.execute("COMMIT")
        self._read()

    def _read(self) -> None:
        self.records = {kind: {} for kind in KINDS}
        for kind, key, value in self.db.execute("SELECT kind, key, value FROM records"):
            if kind in self.records:
                self.records[kind][key] = _decode(kind, value)

    def load(self) -> defer.Deferred:
        self._read()
        return super().load()

    def apply(self, ops: list):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for op, kind, key, value in ops:
                if op == "put":
                    self.db.execute("INSERT OR REPLACE INTO records VALUES (?, ?, ?)",
                                    (kind, key, _encode(kind, value)))
                else:
                    self.db.execute("DELETE FROM records WHERE kind = ? AND key = ?",
                                    (kind, key))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self._apply_view(ops)

    def close(self) -> None:
        self.db.close()


#: A ZooKeeper request must stay under jute.maxbuffer (1 MiB by default): split big batches.
_MULTI_BYTES = 512 * 1024
_MULTI_OPS = 1000


class ZooKeeperRegistry(MemoryRegistry):
    """A registry in ZooKeeper: one znode per record, `<path>/<kind>/<quoted key>`, holding
    the value's JSON. A batch is one `multi` transaction (split if it would be too big), so
    it is on a quorum of servers before its writes are acknowledged.

    `path` must not be the election path (its only children may be `json.info_*`); the
    master uses `<election path>_registry`. `new_session()` makes an unstarted
    `agora.zookeeper.Session`; a session that ZooKeeper expired is replaced by a new one at
    the next `start()` or `load()` (a follower may outlive several before it leads), and,
    while the registry is mirrored, a second after it is lost.
    `on_session(state, reason)` hears the current session's state changes.

    From `start()` until `load()`, the records are mirrored (`master/mirror.py`): a standby
    master reads them all and follows every change, so `load()` on election waits only
    until the mirror has caught up, not for a read of every znode. Only the leader writes,
    so `load()` then stops mirroring; a later `load()` reads everything afresh.
    """

    #: Seconds between attempts to open a new session for the mirror after one was lost.
    RETRY_DELAY = 1.0

    def __init__(self, new_session, path: str, on_session=lambda state, reason: None):
        super().__init__()
        self.new_session = new_session
        self.on_session = on_session
        self.session = None
        self.path = path.rstrip("/")
        self.mirror: RegistryMirror | None = None
        self._mirroring = False  # between start() and load(): keep a mirror going
        self._retry_call = None

    def _connect(self) -> defer.Deferred:
        session = self.session
        if session is not None and session.state not in ("LOST", "CLOSED"):
            return defer.succeed(None)
        session = self.session = self.new_session()
        session.add_listener(lambda state, reason: session is self.session and
                             self._session_changed(state, reason))
        d = session.start()
        return d.addCallback(lambda _: session.run(self._ensure_paths))

    def _session_changed(self, state: str, reason: str | None) -> None:
        self.on_session(state, reason)
        if state == "LOST" and self._mirroring:
            self._retry_mirror()

    def _retry_mirror(self) -> None:
        if self._retry_call is not None and self._retry_call.active():
            return
        reactor = self.session.reactor

        def retry():
            self._retry_call = None
            if self._mirroring:
                self.start().addErrback(lambda f: self._mirroring and self._retry_mirror())

        self._retry_call = reactor.callLater(self.RETRY_DELAY, retry)

    def _znode(self, kind: str, key: str) -> str:
        return f"{self.path}/{kind}/{urllib.parse.quote(key, safe='')}"

    def start(self) -> defer.Deferred:
        """Connect, and start mirroring the records (the Deferred does not wait for that)."""
        self._mirroring = True
        return self._connect().addCallback(lambda _: self._mirror())

    def close(self):
        self._mirroring = False
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        if self.mirror is not None:
            self.mirror.stop()
        session, self.session = self.session, None
        return session.stop() if session is not None else None

    def _ensure_paths(self) -> None:  # in the thread pool
        for kind in KINDS:
            self.session.client.ensure_path(f"{self.path}/{kind}")

    def _mirror(self) -> RegistryMirror:
        """The running mirror of the current session (started if there is none)."""
        mirror = self.mirror
        if mirror is None or not mirror.alive or mirror.session is not self.session:
            if mirror is not None:
                mirror.stop()
            mirror = self.mirror = RegistryMirror(self.session, self.path, KINDS, _decode)
            mirror.start()
        return mirror

    def load(self) -> defer.Deferred:
        self._mirroring = False
        d = self._connect()
        d.addCallback(lambda _: self._mirror().caught_up())

        def loaded(records):
            self.mirror.stop()  # only the leader writes: from now on it knows every change
            self.records = records
            return MemoryRegistry.load(self)

        return d.addCallback(loaded)

    def apply(self, ops: list) -> defer.Deferred:
        # Only the batch's own keys matter (create or set?): not a set of every record.
        existing = {(kind, key) for _, kind, key, _ in ops if key in self.records.get(kind, {})}
        d = self.session.run(self._write, ops, existing)
        return d.addCallback(lambda _: self._apply_view(ops))

    def _write(self, ops: list, existing: set) -> None:  # in the thread pool
        existing = set(existing)
        batches, batch, size = [], [], 0
        for op, kind, key, value in ops:
            data = _encode(kind, value).encode() if op == "put" else b""
            if batch and (size + len(data) > _MULTI_BYTES or len(batch) >= _MULTI_OPS):
                batches.append(batch)
                batch, size = [], 0
            present = (kind, key) in existing
            if op == "put":
                batch.append(("set" if present else "create", kind, key, data))
                existing.add((kind, key))
            elif present:
                batch.append(("delete", kind, key, b""))
                existing.discard((kind, key))
            size += len(data)
        if batch:
            batches.append(batch)
        for batch in batches:
            self._commit(batch)

    def _commit(self, batch: list) -> None:
        client = self.session.client
        tx = client.transaction()
        for op, kind, key, data in batch:
            znode = self._znode(kind, key)
            if op == "create":
                tx.create(znode, data)
            elif op == "set":
                tx.set_data(znode, data)
            else:
                tx.delete(znode)
        results = tx.commit()
        if not any(isinstance(r, Exception) for r in results):
            return
        # Our view of what exists was wrong (another writer?): write one by one, idempotently.
        log.warn("Registry transaction failed ({why}); writing its records one by one",
                 why=next(r for r in results if isinstance(r, Exception)
                          and type(r).__name__ != "RolledBackError").__class__.__name__)
        from kazoo.exceptions import NodeExistsError, NoNodeError
        for op, kind, key, data in batch:
            znode = self._znode(kind, key)
            if op == "delete":
                try:
                    client.delete(znode)
                except NoNodeError:
                    pass
                continue
            try:
                client.create(znode, data)
            except NodeExistsError:
                client.set(znode, data)


class Registrar:
    """Groups registry writes per reactor turn; each write's Deferred fires once durable."""

    def __init__(self, reactor, registry: MemoryRegistry):
        self.reactor = reactor
        self.registry = registry
        self._pending: list = []
        self._waiters: list = []
        self._call = None
        self._busy = False

    def agents(self) -> dict:
        """agent id -> (state, info) as last made durable."""
        return self.registry.agents

    def frameworks(self) -> dict:
        """framework id -> {"info", "registered_time"} as last made durable."""
        return self.registry.records["frameworks"]

    def admit(self, agent_id: str, info: dict) -> defer.Deferred:
        return self._write(("put", "agents", agent_id, ("admitted", info)))

    def mark(self, agent_id: str, state: str, info: dict) -> defer.Deferred:
        """Record an agent as 'admitted', 'unreachable' or 'gone'."""
        return self._write(("put", "agents", agent_id, (state, info)))

    def remove(self, agent_id: str) -> defer.Deferred:
        return self._write(("del", "agents", agent_id, None))

    def put_framework(self, framework_id: str, info: dict,
                      registered_time: float) -> defer.Deferred:
        return self._write(("put", "frameworks", framework_id,
                            {"info": info, "registered_time": registered_time}))

    def remove_framework(self, framework_id: str) -> defer.Deferred:
        return self._write(("del", "frameworks", framework_id, None))

    def set_weight(self, role: str, weight: float) -> defer.Deferred:
        return self._write(("put", "weights", role, weight))

    def _write(self, op) -> defer.Deferred:
        d = defer.Deferred()
        self._pending.append(op)
        self._waiters.append(d)
        self._schedule()
        return d

    def _schedule(self) -> None:
        if self._call is None and not self._busy and self._pending:
            self._call = self.reactor.callLater(0, self._commit)

    def _commit(self) -> None:
        self._call = None
        ops, waiters = self._pending, self._waiters
        self._pending, self._waiters = [], []
        self._busy = True
        d = defer.maybeDeferred(self.registry.apply, ops)

        def done(result):
            self._busy = False
            self._schedule()  # the writes that came while this batch was on its way
            for w in waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(None)

        d.addBoth(done)
