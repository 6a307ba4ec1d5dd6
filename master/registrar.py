"""The master's durable registry: which agents are admitted, unreachable or gone.

The embedded backend is a SQLite file in the work dir (`SQLiteRegistry`); `MemoryRegistry`
serves tests and `--registry in_memory`. Writes are durable before they are acknowledged:
`apply()` commits with `synchronous=FULL`. Writes that arrive in the same reactor turn are
grouped into one transaction by `Registrar`, so a storm of registrations costs one fsync.
"""

import json
import os
import sqlite3

from twisted.internet import defer


class MemoryRegistry:
    """A registry that forgets everything on restart."""

    def __init__(self):
        self.agents: dict[str, tuple[str, dict]] = {}

    def load(self) -> dict:
        return dict(self.agents)

    def apply(self, ops: list) -> None:
        for op, agent_id, state, info in ops:
            if op == "put":
                self.agents[agent_id] = (state, info)
            else:
                self.agents.pop(agent_id, None)

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
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS agents (id TEXT PRIMARY KEY, state TEXT, info TEXT)")
        self.agents = {row[0]: (row[1], json.loads(row[2]))
                       for row in self.db.execute("SELECT id, state, info FROM agents")}

    def apply(self, ops: list) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for op, agent_id, state, info in ops:
                if op == "put":
                    self.db.execute("INSERT OR REPLACE INTO agents VALUES (?, ?, ?)",
                                    (agent_id, state, json.dumps(info)))
                else:
                    self.db.execute("DELETE FROM agents WHERE id = ?", (agent_id,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        super().apply(ops)

    def close(self) -> None:
        self.db.close()


class Registrar:
    """Groups registry writes per reactor turn; each write's Deferred fires once durable."""

    def __init__(self, reactor, registry: MemoryRegistry):
        self.reactor = reactor
        self.registry = registry
        self._pending: list = []
        self._waiters: list = []
        self._call = None

    def agents(self) -> dict:
        """agent id -> (state, info) as last made durable."""
        return self.registry.agents

    def admit(self, agent_id: str, info: dict) -> defer.Deferred:
        return self._write(("put", agent_id, "admitted", info))

    def mark(self, agent_id: str, state: str, info: dict) -> defer.Deferred:
        """Record an agent as 'admitted', 'unreachable' or 'gone'."""
        return self._write(("put", agent_id, state, info))

    def remove(self, agent_id: str) -> defer.Deferred:
        return self._write(("del", agent_id, None, None))

    def _write(self, op) -> defer.Deferred:
        d = defer.Deferred()
        self._pending.append(op)
        self._waiters.append(d)
        if self._call is None:
            self._call = self.reactor.callLater(0, self._commit)
        return d

    def _commit(self) -> None:
        self._call = None
        ops, waiters = self._pending, self._waiters
        self._pending, self._waiters = [], []
        try:
            self.registry.apply(ops)
        except Exception as e:
            for d in waiters:
                d.errback(e)
            return
        for d in waiters:
            d.callback(None)
