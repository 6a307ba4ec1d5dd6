"""Marathon's durable state: apps and their versions, groups, deployments, instances.

    Store ── group commit: every write of one reactor turn goes out as one batch, and each
      │      write's Deferred fires only once its batch is durable
      └── a backend: MemoryBackend (tests), SQLiteBackend (a file in the work dir, the
                     embedded default), ZooKeeperBackend (znodes, for several Marathons)

Records are JSON values under (kind, key). Kinds (specs/marathon-api.md §4.5 lists
Marathon's): `apps` (app id -> current app), `versions` (app id + version -> app, at most
`max_versions` per app), `groups` ("root" -> the group tree without its apps), `roots`
(version -> the tree with app versions, for group rollbacks), `deployments`, `instances`,
`meta` (framework id, event subscriptions). One record per app and per instance keeps every
value small (ZooKeeper's 1 MB node limit, §6 item 8).

Backend contract: `open()` (Deferred) makes it usable; `read()` (Deferred) returns
{kind: {key: value}} as last made durable; `write(batch)` makes a list of (kind, key, value
or None to delete) durable, returning None or a Deferred; `close()`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import urllib.parse

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

KINDS = ("apps", "versions", "groups", "roots", "deployments", "instances", "meta")


def version_key(app_id: str, version: str) -> str:
    return f"{app_id}@{version}"


class MemoryBackend:
    """Keeps everything in this process (lost when it exits)."""

    def __init__(self) -> None:
        self.data: dict[str, dict] = {kind: {} for kind in KINDS}

    def open(self):
        return defer.succeed(None)

    def read(self):
        return defer.succeed({kind: dict(records) for kind, records in self.data.items()})

    def write(self, batch: list) -> None:
        for kind, key, value in batch:
            if value is None:
                self.data[kind].pop(key, None)
            else:
                self.data[kind][key] = value

    def close(self) -> None:
        pass


class SQLiteBackend:
    """One SQLite file; each batch is one transaction, fsynced (synchronous=FULL)."""

    def __init__(self, path: str):
        self.path = path
        self.db: sqlite3.Connection | None = None

    def open(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS state (kind TEXT NOT NULL, "
                        "key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (kind, key))")
        return defer.succeed(None)

    def read(self):
        out: dict[str, dict] = {kind: {} for kind in KINDS}
        for kind, key, value in self.db.execute("SELECT kind, key, value FROM state"):
            out.setdefault(kind, {})[key] = json.loads(value)
        return defer.succeed(out)

    def write(self, batch: list) -> None:
        puts = [(kind, key, json.dumps(value, separators=(",", ":")))
                for kind, key, value in batch if value is not None]
        deletes = [(kind, key) for kind, key, value in batch if value is None]
        self.db.execute("BEGIN IMMEDIATE")
        try:
            # Deletes first: a batch never deletes what it also writes (the Store keeps
            # only the last write of a key).
            self.db.executemany("DELETE FROM state WHERE kind = ? AND key = ?", deletes)
            self.db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?, ?)", puts)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None


#: Keep each ZooKeeper transaction well under jute.maxbuffer (1 MiB).
_TX_BYTES = 512 * 1024
_TX_OPS = 500


class ZooKeeperBackend:
    """Znodes `<path>/<kind>/<quoted key>` holding JSON; a batch is one transaction (split
    when large), acknowledged by a quorum before its writes count as durable.

    `session` is a started `agora.zookeeper.Session`; blocking kazoo calls run in the
    reactor's thread pool through it.
    """

    def __init__(self, session, path: str):
        self.session = session
        self.path = path.rstrip("/")
        self.known: set[tuple[str, str]] = set()  # records that exist (create or set?)

    def _znode(self, kind: str, key: str) -> str:
        return f"{self.path}/{kind}/{urllib.parse.quote(key, safe='')}"

    def open(self):
        def ensure():
            for kind in KINDS:
                self.session.client.ensure_path(f"{self.path}/{kind}")
        return self.session.run(ensure)

    def read(self):
        return self.session.run(self._read)

    def _read(self) -> dict:  # in the thread pool
        client = self.session.client
        out: dict[str, dict] = {kind: {} for kind in KINDS}
        known = set()
        for kind in KINDS:
            parent = f"{self.path}/{kind}"
            client.sync(parent)
            children = client.get_children(parent)
            # Ask for every child at once, then collect: one round trip, not one each.
            pending = [(c, client.get_async(f"{parent}/{c}")) for c in children]
            for child, result in pending:
                try:
                    data, _ = result.get()
                except Exception as e:
                    if type(e).__name__ == "NoNodeError":
                        continue  # deleted since listed
                    raise
                key = urllib.parse.unquote(child)
                out[kind][key] = json.loads(data)
                known.add((kind, key))
        self.known = known
        return out

    def write(self, batch: list):
        return self.session.run(self._write, batch)

    def _write(self, batch: list) -> None:  # in the thread pool
        client = self.session.client
        tx, size, count = client.transaction(), 0, 0
        for kind, key, value in batch:
            node = self._znode(kind, key)
            if value is None:
                if (kind, key) not in self.known:
                    continue
                tx.delete(node)
                self.known.discard((kind, key))
            else:
                data = json.dumps(value, separators=(",", ":")).encode()
                if (kind, key) in self.known:
                    tx.set_data(node, data)
                else:
                    tx.create(node, data)
                    self.known.add((kind, key))
                size += len(data)
            count += 1
            if size > _TX_BYTES or count >= _TX_OPS:
                self._commit(tx)
                tx, size, count = client.transaction(), 0, 0
        if count:
            self._commit(tx)

    @staticmethod
    def _commit(tx) -> None:
        results = tx.commit()
        failed = [r for r in results if isinstance(r, Exception) and
                  type(r).__name__ != "RolledBackError"]
        if failed:
            raise RuntimeError(f"ZooKeeper transaction failed: {failed[0]!r}")

    def close(self) -> None:
        pass


class Store:
    """Durable records with group commit; `data` is what was last made durable."""

    def __init__(self, reactor, backend):
        self.reactor = reactor
        self.backend = backend
        self.data: dict[str, dict] = {kind: {} for kind in KINDS}
        self._pending: dict[tuple[str, str], object] = {}
        self._waiters: list[defer.Deferred] = []
        self._call = None
        self._busy = False

    @defer.inlineCallbacks
    def open(self):
        """Open the backend and read everything it holds."""
        yield self.backend.open()
        self.data = yield self.backend.read()
        return self.data

    def put(self, kind: str, key: str, value) -> defer.Deferred:
        return self._write(kind, key, value)

    def delete(self, kind: str, key: str) -> defer.Deferred:
        return self._write(kind, key, None)

    def get(self, kind: str, key: str, default=None):
        return self.data[kind].get(key, default)

    def flush(self) -> defer.Deferred:
        """Fires once every write made so far is durable."""
        if not self._pending and not self._busy:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)
        self._schedule()
        return d

    def _write(self, kind: str, key: str, value) -> defer.Deferred:
        if kind not in self.data:
            raise ValueError(f"unknown record kind {kind!r}")
        self._pending[(kind, key)] = value
        d = defer.Deferred()
        self._waiters.append(d)
        self._schedule()
        return d

    def _schedule(self) -> None:
        if self._call is None and not self._busy and (self._pending or self._waiters):
            self._call = self.reactor.callLater(0, self._commit)

    def _commit(self) -> None:
        self._call = None
        pending, waiters = self._pending, self._waiters
        self._pending, self._waiters = {}, []
        batch = [(kind, key, value) for (kind, key), value in pending.items()]
        self._busy = True
        d = defer.maybeDeferred(self.backend.write, batch) if batch else defer.succeed(None)

        def done(result):
            self._busy = False
            if isinstance(result, Failure):
                log.failure("Writing {n} records failed", failure=result, n=len(batch))
            else:
                for kind, key, value in batch:
                    if value is None:
                        self.data[kind].pop(key, None)
                    else:
                        self.data[kind][key] = value
            for w in waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(None)
            self._schedule()  # what was written while this batch was on its way

        d.addBoth(done)

    def close(self):
        return self.backend.close()
