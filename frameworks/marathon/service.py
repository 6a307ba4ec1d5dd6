"""One Marathon process: its HTTP port, its part in the election, and, while it leads, the
scheduler.

    MarathonService
      ├── HTTP (agora.http): the /v2 API; a follower proxies it to the leader
      │     (/v2/events is redirected there, /ping, /metrics and /v2/leader answer locally)
      ├── election (with --zk): agora.zookeeper Contender + Detector on <path>/leader
      └── Core, while leading: Store -> State -> Scheduler (pymesos) + Deployments +
          HealthCheckers + EventBus

Without ZooKeeper the process leads from the start and keeps its state in a SQLite file
in its work dir. With ZooKeeper every instance contends; the one elected reads the state
from ZooKeeper (`<path>/state`) and registers with the master under the stored framework id,
so the tasks the last leader launched carry on. A leader that loses its ZooKeeper session or
its candidacy stops serving and exits (as Marathon does: its supervisor restarts it).
"""

from __future__ import annotations

import io
import json
import os
import socket
import uuid

from twisted.internet import defer
from twisted.logger import Logger

from agora import http, zookeeper
from agora.http import Response
from agora.http_auth import Authenticator, Credentials
from frameworks.marathon.api import API, MarathonError
from frameworks.marathon.bus import EventBus
from frameworks.marathon.deployments import Deployments
from frameworks.marathon.health_checks import HealthCheckers
from frameworks.marathon.scheduler import Options, Scheduler
from frameworks.marathon.state import State
from frameworks.marathon.store import MemoryBackend, SQLiteBackend, Store, ZooKeeperBackend

log = Logger()

#: Served by every instance itself, leader or not.
LOCAL_PATHS = ("/ping", "/metrics", "/v2/leader")
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer",
                         "upgrade", "proxy-authorization", "proxy-authenticate", "host",
                         "content-length"})


class Core:
    """The leader's runtime: everything that exists only while this process leads."""

    def __init__(self, reactor, node: MarathonService, backend):
        self.reactor = reactor
        self.options = node.options
        self.store = Store(reactor, backend)
        self.state = State(self.store, node.max_versions)
        self.bus = EventBus(reactor)
        self.scheduler = Scheduler(reactor, self.state, self.bus, node.options, node.master,
                                   driver_factory=node.driver_factory)
        self.scheduler.on_fatal = node._terminate
        self.deployments = Deployments(reactor, self.state, self.scheduler, self.bus,
                                       node.max_running_deployments)
        self.checkers = HealthCheckers(reactor, self.state, self.scheduler, self.deployments,
                                       self.bus)

    def now(self) -> float:
        return self.reactor.seconds()

    @defer.inlineCallbacks
    def start(self):
        yield self.store.open()
        self.state.load()
        self.bus.callbacks = list(self.state.subscriptions)
        log.info("Loaded {apps} apps, {instances} instances, {deployments} deployments",
                 apps=len(self.state.root.apps), instances=len(self.state.instances),
                 deployments=len(self.store.data["deployments"]))
        self.deployments.resume()
        self.scheduler.start()
        self.checkers.start()

    def stop(self):
        self.checkers.stop()
        stopped = defer.maybeDeferred(self.scheduler.stop)
        d = self.store.flush()
        d.addBoth(lambda _: self.store.close())
        return defer.gatherResults([stopped, d], consumeErrors=True)


class MarathonService:
    def __init__(self, reactor, *, master: str, port: int = 8080, ip: str = "127.0.0.1",
                 hostname: str | None = None, work_dir: str = ".", zk: str | None = None,
                 zk_session_timeout: float = 10.0, store: str | None = None,
                 options: Options | None = None, max_versions: int = 50,
                 max_running_deployments: int = 100, driver_factory=None,
                 http_credentials: Credentials | None = None):
        self.reactor = reactor
        # Asks every request but /ping for one of `http_credentials`, if given.
        self.authenticator = (Authenticator(http_credentials, "marathon")
                              if http_credentials is not None else None)
        self.master = master
        self.port = port
        self.ip = ip
        self.hostname = hostname or socket.gethostname()
        self.work_dir = work_dir
        self.zk = zookeeper.parse_url(zk) if zk else None
        self.zk_session_timeout = zk_session_timeout
        self.store_kind = store or ("zk" if zk else "sqlite")
        self.options = options or Options()
        self.max_versions = max_versions
        self.max_running_deployments = max_running_deployments
        self.driver_factory = driver_factory
        self.id = str(uuid.uuid4())
        self.core: Core | None = None
        self.leading = False
        self.leader_info: dict | None = None
        self.exit_code = 0
        self._listener = None
        self._session = None
        self._contender = None
        self._detector = None
        self._agent = None
        self._stopping = False
        self.router = http.Router()
        self.api = API(self)
        self.api.routes(_Guard(self.router, self))

    # -- lifecycle ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def start(self):
        factory = http.HTTPFactory(self.router, reactor=self.reactor, server_name="Marathon")
        self._listener = http.listen(self.reactor, self.port, factory, self.ip)
        self.port = self._listener.getHost().port
        if self.options.webui_url == "":
            self.options.webui_url = f"http://{self.hostname}:{self.port}"
        if self.zk is None:
            yield self._lead()
            return
        self._session = zookeeper.Session(self.reactor, self.zk.hosts,
                                          timeout=self.zk_session_timeout)
        self._session.add_listener(self._session_changed)
        yield self._session.start()
        data = json.dumps({"id": self.id, "hostname": self.hostname, "port": self.port,
                           "address": {"hostname": self.hostname, "ip": self.ip,
                                       "port": self.port}}).encode()
        election = self.zk.path + "/leader"
        self._detector = zookeeper.Detector(self._session, election, on_change=self._leader_is,
                                            log=log)
        self._contender = zookeeper.Contender(self._session, election, data,
                                              on_leading=self._on_leading,
                                              on_lost=self._candidacy_lost)
        yield self._detector.start()
        yield self._contender.start()

    def stop(self):
        self._stopping = True
        ds = []
        if self.core is not None:
            ds.append(self.core.stop())
            self.core = None
        if self._listener is not None:
            ds.append(defer.maybeDeferred(self._listener.stopListening))
        if self._session is not None:
            ds.append(self._session.stop())
        return defer.DeferredList(ds)

    def _backend(self):
        if self.store_kind == "memory":
            return MemoryBackend()
        if self.store_kind == "zk":
            return ZooKeeperBackend(self._session, self.zk.path + "/state")
        return SQLiteBackend(os.path.join(self.work_dir, "marathon.sqlite"))

    @defer.inlineCallbacks
    def _lead(self):
        self.leading = True
        log.info("Elected leader; starting the scheduler")
        core = Core(self.reactor, self, self._backend())
        yield core.start()
        if self.leading and not self._stopping:
            self.core = core
        else:
            core.stop()

    # -- election -------------------------------------------------------------------------

    def _on_leading(self, leading: bool) -> None:
        if leading and not self.leading:
            self._lead().addErrback(lambda f: self._terminate(
                f"could not start leading: {f.getErrorMessage()}"))
        elif not leading and self.leading:
            self._terminate("lost leadership")

    def _candidacy_lost(self, reason: str) -> None:
        if self.leading:
            self._terminate(f"lost leadership ({reason})")
        elif not self._stopping:
            self._terminate(f"left the election ({reason})")

    def _session_changed(self, state: str, reason: str | None) -> None:
        if state == zookeeper.LOST and not self._stopping:
            self._terminate(f"ZooKeeper session lost ({reason})")

    def _leader_is(self, info: dict | None) -> None:
        self.leader_info = info

    def _terminate(self, why: str) -> None:
        if self._stopping:
            return
        log.error("Terminating: {why}", why=why)
        self.leading = False
        self.exit_code = 1
        core, self.core = self.core, None
        if core is not None:
            core.stop()
        if self.reactor.running:
            self.reactor.stop()

    def abdicate(self) -> None:
        """DELETE /v2/leader: give leadership up (this process then exits)."""
        self.reactor.callLater(0.5, self._terminate, "abdicated")

    def leader_address(self) -> str | None:
        if self.zk is None or self.leading:
            return f"{self.hostname}:{self.port}"
        return zookeeper.leader_address(self.leader_info)

    # -- followers ------------------------------------------------------------------------

    def serve(self, handler, request):
        """Answer `request` here if we lead (or it is local), else from the leader."""
        path = request.path
        if self.core is not None or self.leading or path.startswith(LOCAL_PATHS) or \
                self.zk is None:
            return handler(request)
        return self._forward(request)

    async def _forward(self, request):
        leader = await self._wait_for_leader()
        if leader is None:
            raise MarathonError(503, "Could not determine the current leader")
        me = f"{self.hostname}:{self.port}"
        via = request.header("x-marathon-via") or ""
        if me in via.split(","):
            raise MarathonError(502, f"Proxy loop: {via}")
        if request.path.startswith("/v2/events"):
            return Response(302, b"", [("Location", f"http://{leader}{request.raw_target}")])
        return await self._proxy(request, leader, via + ("," if via else "") + me)

    async def _wait_for_leader(self):
        for _ in range(12):
            leader = zookeeper.leader_address(self.leader_info)
            if leader is not None and leader != f"{self.hostname}:{self.port}":
                return leader
            d = defer.Deferred()
            self.reactor.callLater(0.25, d.callback, None)
            await d
        return None

    async def _proxy(self, request, leader: str, via: str):
        from twisted.web.client import Agent, FileBodyProducer, readBody
        from twisted.web.http_headers import Headers

        if self._agent is None:
            self._agent = Agent(self.reactor, connectTimeout=5)
        headers = Headers()
        for name, value in request.headers.items():
            if name not in _HOP_BY_HOP:
                headers.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
        headers.addRawHeader(b"X-Marathon-Via", via.encode())
        body = FileBodyProducer(io.BytesIO(request.body)) if request.body else None
        url = f"http://{leader}{request.raw_target or request.path}".encode()
        try:
            response = await self._agent.request(request.method.encode(), url, headers, body)
            data = await readBody(response)
        except Exception as e:
            raise MarathonError(502, f"Could not reach the leader {leader}: {e}") from None
        out = [("X-Marathon-Leader", f"http://{leader}")]
        content_type = None
        for name, values in response.headers.getAllRawHeaders():
            lname = name.decode("latin-1").lower()
            if lname == "content-type":
                content_type = values[-1].decode("latin-1")
            elif lname in ("marathon-deployment-id", "location"):
                out.append((name.decode("latin-1"), values[-1].decode("latin-1")))
        return Response(response.code, data, out, content_type)


class _Guard:
    """Registers every route through `node.serve`, so followers forward what they get."""

    def __init__(self, router, node: MarathonService):
        self.router, self.node = router, node

    def add(self, prefix: str, handler, methods=None) -> None:
        node = self.node

        def serve(request):
            return node.serve(handler, request)

        if node.authenticator is not None and prefix != "/ping":
            serve = node.authenticator.guard(serve)  # here, before a follower forwards it
        self.router.add(prefix, serve, methods)
