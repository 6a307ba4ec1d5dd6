"""Master election and detection in ZooKeeper, with the znode layout Mesos uses.

Every master contends by creating an EPHEMERAL|SEQUENTIAL znode `<path>/json.info_NNNNNNNNNN`
holding its MasterInfo JSON; the lowest name leads. Nothing else lives in `<path>`: pymesos
takes `min()` of the children and mesoshttp the first `json*` one, so the election is done
directly with these nodes, not with kazoo's Election/Lock recipes (their child names break
both clients). See specs/mesos-v1-wire.md §1.2.

    Session ── one kazoo client; its state (CONNECTED / SUSPENDED / lost) on the reactor
      ├── Contender ── our json.info_ znode; `on_leading(bool)`, `on_lost(reason)`
      └── Detector  ── the lowest json.info_ znode's MasterInfo; `on_change(info | None)`

kazoo blocks, so its calls run in the reactor's thread pool and its watch and state callbacks
(on kazoo's own threads) come back through `reactor.callFromThread`; all state lives on the
reactor thread. Children are read with their parent's `cversion`, so a late read never
replaces a newer one. A session that is
SUSPENDED (connection lost) may still be alive, so a Contender stops leading at once and
resumes only if the same session reconnects (our znode then still exists and no lower one can
have been made). The session is *lost* when ZooKeeper expires it, or when it has been
disconnected for longer than its timeout: by then the server has expired it too (or has no
quorum), and another master may lead.

The pure part (URL parsing, picking the leader among child names, reading MasterInfo) comes
first and needs neither kazoo nor Twisted; kazoo is imported only when a session starts, so
it is needed only by masters run with `--zk`.
"""

from __future__ import annotations

import json
from typing import Callable, Iterable

import attrs

#: The prefix of a master's znode (Mesos's MASTER_INFO_JSON_LABEL plus "_").
ZNODE_PREFIX = "json.info_"
DEFAULT_PORT = 2181
USAGE = "zk://HOST[:PORT][,HOST[:PORT]...]/PATH"


# --- pure ---------------------------------------------------------------------------------

@attrs.frozen
class ZkUrl:
    """A parsed `zk://` (or `zoo://`) URL: `hosts` as kazoo takes them, an absolute `path`."""

    hosts: str
    path: str

    def __str__(self) -> str:
        return f"zk://{self.hosts}{self.path}"


def parse_url(text: str) -> ZkUrl:
    """`zk://h1:2181,h2/agora` -> ZkUrl("h1:2181,h2:2181", "/agora"); ValueError says why not."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in ("zk", "zoo"):
        raise ValueError(f"expected {USAGE}, got {text!r}")
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        raise ValueError("credentials in ZooKeeper URLs are not supported")
    hosts = []
    for item in netloc.split(","):
        item = item.strip()
        host, colon, port = item.rpartition(":") if ":" in item else (item, "", "")
        if not host:
            raise ValueError(f"missing host in {text!r}; expected {USAGE}")
        if colon:
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"bad port {port!r} in {text!r}; expected {USAGE}")
        hosts.append(f"{host}:{int(port) if colon else DEFAULT_PORT}")
    segments = path.rstrip("/").split("/") if path.strip("/") else []
    if not slash or not segments:
        raise ValueError(f"missing znode path in {text!r}; expected {USAGE} "
                         "(e.g. zk://127.0.0.1:2181/agora)")
    for seg in segments:
        if seg in ("", ".", "..") or any(c.isspace() or c == "\0" for c in seg):
            raise ValueError(f"bad znode path /{path} in {text!r}")
    return ZkUrl(",".join(hosts), "/" + "/".join(segments))


def leader_child(children: Iterable[str]) -> str | None:
    """The leading master's znode: the lowest `json.info_` name (the sequence is zero-padded,
    so this is the lowest sequence). Other names are ignored (`log_replicas`, say)."""
    return min((c for c in children if c.startswith(ZNODE_PREFIX)), default=None)


def decode_master_info(data: bytes) -> dict:
    """MasterInfo from a znode's bytes; ValueError unless it is JSON with address.ip/port."""
    try:
        info = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    address = info.get("address") if isinstance(info, dict) else None
    if not isinstance(address, dict) or not address.get("ip") or \
            not isinstance(address.get("port"), int):
        raise ValueError("MasterInfo without 'address.ip' and 'address.port'")
    return info


def leader_address(info: dict | None) -> str | None:
    """`host:port` to send clients to, as Mesos redirects: the hostname if set, else the IP."""
    if not info:
        return None
    address = info.get("address") or {}
    host = address.get("hostname") or info.get("hostname") or address.get("ip")
    port = address.get("port") or info.get("port")
    return f"{host}:{port}" if host and port else None


# --- ZooKeeper ------------------------------------------------------------------------------

CONNECTED, SUSPENDED, LOST, CLOSED = "CONNECTED", "SUSPENDED", "LOST", "CLOSED"


def _kazoo():
    try:
        import kazoo.client
        import kazoo.retry
    except ImportError:  # pragma: no cover - depends on the installation
        raise RuntimeError("ZooKeeper support needs kazoo: pip install 'kazoo>=2.9'") from None
    return kazoo


class Session:
    """One ZooKeeper session (a kazoo client), its state reported on the reactor thread.

    `state` is CONNECTED, SUSPENDED (disconnected; the session may still be alive), LOST
    (expired, or disconnected for longer than `timeout`: terminal, the client is closed) or
    CLOSED (stopped by us). Listeners get `listener(state, reason)` on every change.
    """

    def __init__(self, reactor, hosts: str, *, timeout: float = 10.0,
                 connect_timeout: float = 15.0):
        self.reactor = reactor
        self.hosts = hosts
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.state = "CONNECTING"
        self.client = None
        self.lost_reason: str | None = None
        self._listeners: list = []
        self._expiry = None

    def add_listener(self, listener: Callable[[str, str | None], None]) -> None:
        self._listeners.append(listener)

    def run(self, fn, *args, **kwargs):
        """Run a blocking kazoo call in the reactor's thread pool; a Deferred of its result."""
        from twisted.internet import threads
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn,
                                         *args, **kwargs)

    def start(self):
        """Connect; the Deferred fails if no server answers within `connect_timeout`."""
        kazoo = _kazoo()
        # Reconnect quickly (the default backoff grows to an hour); retry reads a few times,
        # never a sequential create (a retried one could leave a second znode behind).
        self.client = kazoo.client.KazooClient(
            hosts=self.hosts, timeout=self.timeout,
            connection_retry=kazoo.retry.KazooRetry(max_tries=-1, delay=0.1, backoff=2,
                                                    max_delay=1.0),
            command_retry=kazoo.retry.KazooRetry(max_tries=3, delay=0.1, backoff=2,
                                                 max_delay=1.0, ignore_expire=False))
        self.client.add_listener(self._kazoo_state)
        d = self.run(self.client.start, self.connect_timeout)

        def failed(f):
            self.state = CLOSED
            if f.check(self.client.handler.timeout_exception):
                raise ConnectionError(f"no ZooKeeper server at {self.hosts} answered within "
                                      f"{self.connect_timeout:g}s")
            return f

        # kazoo wakes start() before it tells listeners: do not wait for the listener.
        d.addCallbacks(lambda _: self._state_changed(CONNECTED), failed)
        return d

    def stop(self):
        """End the session (ZooKeeper deletes its ephemeral znodes at once)."""
        if self.state == CLOSED or self.client is None:
            self.state = CLOSED
            from twisted.internet import defer
            return defer.succeed(None)
        self.state = CLOSED
        self._cancel_expiry()
        return self.run(self._close_client)

    def _close_client(self) -> None:
        try:
            self.client.stop()
            self.client.close()
        except Exception:  # closing a broken client must not fail a stop
            pass

    def _kazoo_state(self, state) -> None:  # on a kazoo thread: never block here
        self.reactor.callFromThread(self._state_changed, str(state))

    def _state_changed(self, state: str) -> None:
        if self.state in (LOST, CLOSED) or self.state == state:
            return
        if state == CONNECTED:
            self._cancel_expiry()
            self._set(CONNECTED)
        elif state == SUSPENDED:
            if self.state == "CONNECTING":
                return
            # The server expires a session `timeout` after it last heard from us; past that,
            # or with no quorum to tell us so, another master may lead: give the session up.
            self._expiry = self.reactor.callLater(self.timeout, self._lose,
                                                  "disconnected from ZooKeeper for longer "
                                                  f"than the {self.timeout:g}s session timeout")
            self._set(SUSPENDED)
        elif state == LOST and self.state != "CONNECTING":
            self._lose("ZooKeeper session expired")

    def _lose(self, reason: str) -> None:
        if self.state in (LOST, CLOSED):
            return
        self._cancel_expiry()
        self.lost_reason = reason
        self._set(LOST, reason)
        self.run(self._close_client)  # kazoo would otherwise open a new session by itself

    def _set(self, state: str, reason: str | None = None) -> None:
        self.state = state
        for listener in list(self._listeners):
            listener(state, reason)

    def _cancel_expiry(self) -> None:
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None


class _ChildWatch:
    """Watches the children of `path`: `on_children(children)` runs on the reactor thread
    after every change, in ZooKeeper's order.

    Reads (after a watch event, after reconnecting, or asked for with `fetch`) run in the
    thread pool and can finish out of order; one older than what was already reported (by
    the parent's `cversion`) is dropped, so a slow read never overwrites a newer view.
    """

    def __init__(self, session: Session, path: str, on_children):
        self.session, self.path = session, path
        self.on_children = on_children
        self.stopped = False
        self._cversion = -1
        session.add_listener(self._session_changed)

    def fetch(self, sync: bool = False):
        """Read the children now (and re-arm the watch); the Deferred fires once
        `on_children` (and any Deferred it returns) is done. With `sync`, our server first
        catches up with the ensemble's leader, so the read is as new as any other client's."""
        from twisted.internet import defer

        if self.stopped or self.session.state != CONNECTED:
            return defer.succeed(None)
        return self.session.run(self._read, sync).addCallback(self._deliver)

    def _read(self, sync: bool = False):  # in the thread pool
        if sync:
            self.session.client.sync(self.path)
        children, stat = self.session.client.get_children(self.path, watch=self._event,
                                                          include_data=True)
        return children, stat.cversion

    def _deliver(self, read):
        children, cversion = read
        if self.stopped or cversion < self._cversion:
            return None
        self._cversion = cversion
        return self.on_children(list(children))

    def _event(self, event) -> None:  # a one-shot watch fired, on a kazoo thread
        self.session.reactor.callFromThread(self._refetch)

    def _refetch(self) -> None:
        # A failed read is retried when the session reconnects; a lost session ends it all.
        self.fetch().addErrback(lambda f: None)

    def _session_changed(self, state: str, reason: str | None) -> None:
        if state == CONNECTED:  # changes made while we were away, and a watch again
            self._refetch()
        elif state == LOST:
            self.stopped = True


class Contender:
    """Stands for election with one EPHEMERAL|SEQUENTIAL `json.info_` znode holding `data`.

    `on_leading(True)` once our znode is the lowest and the session is connected;
    `on_leading(False)` as soon as the session is SUSPENDED (we cannot know we still lead),
    and True again if the same session reconnects. `on_lost(reason)` once, when the
    candidacy is over for good: the session was lost, or our znode was deleted. Contend
    again with a new Session.
    """

    def __init__(self, session: Session, path: str, data: bytes, *,
                 on_leading: Callable[[bool], None] = lambda leading: None,
                 on_lost: Callable[[str], None] = lambda reason: None):
        self.session, self.path, self.data = session, path.rstrip("/"), data
        self.on_leading, self.on_lost = on_leading, on_lost
        self.znode: str | None = None  # our child's name, e.g. json.info_0000000003
        self.leading = False
        self.lost = False
        self._lowest = False
        self._watch: _ChildWatch | None = None
        session.add_listener(self._session_changed)

    def start(self):
        """Create our znode and watch the others; the Deferred fires with our znode's name."""
        d = self.session.run(self._create)

        def created(name):
            self.znode = name
            self._watch = _ChildWatch(self.session, self.path, self._children)
            return self._watch.fetch().addCallback(lambda _: name)

        return d.addCallback(created)

    def _create(self) -> str:
        client = self.session.client
        client.ensure_path(self.path)
        made = client.create(f"{self.path}/{ZNODE_PREFIX}", self.data, ephemeral=True,
                             sequence=True)
        return made.rsplit("/", 1)[1]

    def check(self):
        """Look at the candidates now rather than wait for the watch; Deferred[leading]."""
        if self._watch is None or self.lost:
            from twisted.internet import defer
            return defer.succeed(self.leading)
        return self._watch.fetch(sync=True).addCallback(lambda _: self.leading)

    def stop(self):
        """Withdraw: delete our znode (the session stays open)."""
        if self._watch is not None:
            self._watch.stopped = True
        self._lowest = False
        self._set_leading(False)
        name, self.znode = self.znode, None
        self.lost = True
        if name is None or self.session.state != CONNECTED:
            from twisted.internet import defer
            return defer.succeed(None)
        d = self.session.run(self.session.client.delete, f"{self.path}/{name}")
        d.addErrback(lambda f: None)  # already gone with its session: fine
        return d

    def _children(self, children: list) -> None:
        if self.lost or self.znode is None:
            return
        if self.znode not in children:
            self._lose(f"our znode {self.path}/{self.znode} was deleted")
            return
        self._lowest = leader_child(children) == self.znode
        self._set_leading(self._lowest and self.session.state == CONNECTED)

    def _session_changed(self, state: str, reason: str | None) -> None:
        if self.lost:
            return
        if state == LOST:
            self._lose(reason or "ZooKeeper session lost")
        else:
            self._set_leading(self._lowest and state == CONNECTED)

    def _lose(self, reason: str) -> None:
        self.lost = True
        if self._watch is not None:
            self._watch.stopped = True
        self._lowest = False
        self._set_leading(False)
        self.on_lost(reason)

    def _set_leading(self, leading: bool) -> None:
        if leading != self.leading:
            self.leading = leading
            self.on_leading(leading)


class Detector:
    """Follows the leading master: `leader` is its MasterInfo (a dict) or None, and
    `on_change(info)` is called whenever that changes.

    The last known leader is kept while the session is SUSPENDED and cleared when it is lost.
    A leading znode whose data is not MasterInfo counts as no leader (and is logged).
    """

    def __init__(self, session: Session, path: str, *,
                 on_change: Callable[[dict | None], None] = lambda info: None, log=None):
        self.session, self.path = session, path.rstrip("/")
        self.on_change = on_change
        self.leader: dict | None = None
        self._log = log
        self._child: str | None = None  # the leading child as last seen
        self._read: str | None = None  # the child whose data `leader` is
        self._watch: _ChildWatch | None = None
        session.add_listener(self._session_changed)

    def start(self):
        """Watch `path` (created if missing); the Deferred fires with the current leader."""
        def watch(_):
            self._watch = _ChildWatch(self.session, self.path, self._children)
            return self._watch.fetch()

        d = self.session.run(self.session.client.ensure_path, self.path)
        return d.addCallback(watch).addCallback(lambda _: self.leader)

    def check(self):
        """Look now rather than wait for the watch; Deferred[the leader's MasterInfo]."""
        if self._watch is None:
            from twisted.internet import defer
            return defer.succeed(self.leader)
        return self._watch.fetch(sync=True).addCallback(lambda _: self.leader)

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.stopped = True

    def _children(self, children: list):
        child = self._child = leader_child(children)
        if child is None:
            self._read = None
            self._set(None)
            return None
        if child == self._read:
            return None
        d = self.session.run(self.session.client.get, f"{self.path}/{child}")
        return d.addCallbacks(lambda got: self._got(child, got[0]),
                              lambda f: self._unreadable(child, f))

    def _got(self, child: str, data: bytes) -> None:
        if child != self._child:
            return  # superseded while we read it
        self._read = child
        try:
            info = decode_master_info(data)
        except ValueError as e:
            self._warn(f"{self.path}/{child} does not hold MasterInfo: {e}")
            info = None
        self._set(info)

    def _unreadable(self, child: str, failure) -> None:
        from kazoo.exceptions import NoNodeError

        # A vanished znode is followed by a watch event; other errors by a reconnection.
        if not failure.check(NoNodeError):
            self._warn(f"cannot read {self.path}/{child}: {failure.getErrorMessage()}")

    def _set(self, info: dict | None) -> None:
        if info != self.leader:
            self.leader = info
            self.on_change(info)

    def _warn(self, message: str) -> None:
        if self._log is not None:
            self._log.warn("ZooKeeper master detection: {message}", message=message)

    def _session_changed(self, state: str, reason: str | None) -> None:
        if state == LOST:
            self.stop()
            self._read = self._child = None
            self._set(None)
