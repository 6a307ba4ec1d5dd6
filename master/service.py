"""The master process: one port serving HTTP APIs and agent links, around a `Master`.

With `zk` the master is one of several: it contends in ZooKeeper (`Election`) and serves as
the leader only while it leads; a follower redirects API calls to the leader (307) and keeps
an empty state. A leader that loses its ZooKeeper session exits (docs/ha.md).
"""

import functools
import gc
import json
import os
import socket
import sys

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from agora import protocol
from agora import zookeeper
from agora.http import HTTPFactory, Router, json_response, listen
from agora.http_auth import Authenticator, Credentials
from agora.link import Link
from master.api import legacy, views
from master.api.operator import OperatorAPI, metrics_snapshot
from master.api.scheduler import SchedulerAPI
from master.master import Master
from master.registrar import MemoryRegistry, Registrar, SQLiteRegistry, ZooKeeperRegistry

log = Logger()

#: The exit status of a leader that lost its ZooKeeper session (Mesos exits with 1 too).
EXIT_LOST_LEADERSHIP = 1
#: The cyclic collector's thresholds in a master process. With Python's (700, 10, 10) a heap
#: that grows fast (a new leader taking back 10,000 agents and 100,000 tasks, ~1 GB) gets a
#: full collection each time it grows by a quarter: half of that failover's CPU time went to
#: the collector. Young collections of 50,000 objects (a few ms each) and a full one only
#: after 100 older ones cut it to a sixth; reference counting frees nearly all garbage anyway.
GC_THRESHOLDS = (50_000, 10, 100)
#: While the agents in the registry come back after a failover (at most this long), the
#: collector is off: what they bring lives as long as they do, and collecting as the heap
#: grows from nothing to a gigabyte walked each object twice (0.5-1 s of a 3 s failover).
#: Then one young collection, and gc.freeze() keeps later full collections off all of it.
GC_PAUSE_MAX = 60.0
GC_PAUSE_CHECK = 0.25
_REGISTRATIONS = (protocol.RegisterAgent, protocol.ReregisterAgent)


class AgentLinkFactory(Factory):
    """Builds the master's end of an agent connection (after the sniffed prefix).

    While `leading()` is false, registrations are dropped (as a Mesos follower does); the
    agent sends its registration again after its registration timeout. A leader that is
    still recovering its registry takes them once it has: `later(fn)` queues `fn` and says
    True then; one per link (the agent's copies of a queued registration are dropped).
    `answering()` says whether registrations will be answered (leading, or recovering):
    the Challenge tells the agent, which then waits for the answer instead of re-sending.
    """

    def __init__(self, master: Master, leading=lambda: True, later=lambda fn: False,
                 answering=None):
        self.master = master
        self.leading = leading
        self.later = later
        self.answering = answering or leading

    def buildProtocol(self, addr):
        return AgentLink(self)


class AgentLink(Link):
    """The master's end of one agent connection.

    Its handlers are methods, not closures over the link: a closed link holds no reference
    cycle, so reference counting frees it even after `gc.freeze()` made it permanent.
    """

    def __init__(self, factory: AgentLinkFactory):
        super().__init__(factory.master.reactor, send_prefix=False)
        self.factory = factory
        self.agent = None
        self.nonce = b""
        self.queued = False  # a registration waits for the registry to be recovered
        self.challenged_leading = False  # its Challenge said this master leads

    def connectionMade(self):
        super().connectionMade()
        self.challenged_leading = self.factory.answering()
        self.factory.master.agent_connected(self, leading=self.challenged_leading)

    def on_message(self, msg) -> None:
        factory, master = self.factory, self.factory.master
        if isinstance(msg, _REGISTRATIONS) and not factory.leading():
            if self.queued:
                master.metrics["dropped_registrations"] += 1
                return
            if factory.later(functools.partial(self._take_queued, msg)):
                self.queued = True
                return
            log.info("Ignoring {kind} from {peer}: this master is not the leader",
                     kind=type(msg).__name__, peer=self._peer())
            if self.challenged_leading:
                # It was told we lead, and would wait 10 s for an answer: tell it we do not
                # (it sends the registration again at once, then after 1 s, 2 s...).
                self.challenged_leading = False
                self.send(protocol.Challenge(nonce=self.nonce, master_id=master.id))
            return
        master.on_agent_message(self, msg)

    def _take_queued(self, msg) -> None:
        self.queued = False
        if self.connected:
            self.factory.master.on_agent_message(self, msg)

    def on_lost(self, reason) -> None:
        self.factory.master.agent_link_lost(self)


class Election:
    """A master's candidacy in ZooKeeper: contend, follow whoever leads, and contend again
    (with a new session) when a follower's session is lost.

    `on_leading(bool)` follows the Contender (False at once when the session is suspended,
    True again if it reconnects); `on_deposed(reason)` is called once if the session is lost
    after this master has led: its state can no longer be trusted, and it must go.
    """

    def __init__(self, reactor, url: zookeeper.ZkUrl, info: dict, *,
                 session_timeout: float = 10.0, on_leading=lambda leading: None,
                 on_deposed=lambda reason: None, retry_delay: float = 1.0):
        self.reactor, self.url = reactor, url
        self.data = json.dumps(info).encode()
        self.session_timeout = session_timeout
        self.on_leading, self.on_deposed = on_leading, on_deposed
        self.retry_delay = retry_delay
        self.session = self.contender = self.detector = None
        self.has_led = False
        self._stopping = False
        self._retry_call = None

    @property
    def leading(self) -> bool:
        return self.contender is not None and self.contender.leading

    @property
    def leader(self) -> dict | None:
        """The leading master's MasterInfo as last detected (None: nobody or unknown)."""
        return self.detector.leader if self.detector is not None else None

    def start(self) -> defer.Deferred:
        """Contend; fails if ZooKeeper cannot be reached within the connect timeout."""
        d = self._contend()

        def failed(f):
            raise RuntimeError(f"cannot contend for leadership in {self.url}: "
                               f"{f.getErrorMessage() or f.type.__name__}")

        return d.addErrback(failed)

    def check(self) -> defer.Deferred:
        """Look at ZooKeeper now instead of waiting for the watches to fire."""
        session = self.session
        if self.contender is None or session is None or session.state != zookeeper.CONNECTED:
            return defer.succeed(None)
        d = defer.gatherResults([self.contender.check(), self.detector.check()],
                                consumeErrors=True)
        return d.addErrback(lambda f: None)  # then answer with what we knew

    def stop(self) -> defer.Deferred:
        """Withdraw (our znode goes at once, so a follower takes over without waiting)."""
        self._stopping = True
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        if self.session is None:
            return defer.succeed(None)
        session, contender = self.session, self.contender
        d = contender.stop() if contender is not None else defer.succeed(None)
        d.addBoth(lambda _: session.stop())
        return d

    def _contend(self) -> defer.Deferred:
        session = zookeeper.Session(self.reactor, self.url.hosts, timeout=self.session_timeout)
        contender = zookeeper.Contender(
            session, self.url.path, self.data,
            on_leading=lambda leading: self._leading_changed(contender, leading),
            on_lost=lambda reason: self._lost(contender, reason))
        detector = zookeeper.Detector(session, self.url.path, log=log)
        self.session, self.contender, self.detector = session, contender, detector
        d = session.start()
        d.addCallback(lambda _: detector.start())
        d.addCallback(lambda _: contender.start())

        def contending(znode):
            log.info("Contending for leadership in {url} as {znode}", url=self.url, znode=znode)

        def failed(f):
            session.stop()  # also ends a half-made candidacy: its znode goes with the session
            return f

        return d.addCallbacks(contending, failed)

    def _leading_changed(self, contender, leading: bool) -> None:
        if contender is not self.contender or self._stopping:
            return
        self.has_led = self.has_led or leading
        self.on_leading(leading)

    def _lost(self, contender, reason: str) -> None:
        if contender is not self.contender or self._stopping:
            return
        if self.has_led:
            self.on_deposed(reason)
            return
        log.warn("Lost candidacy as a follower ({reason}); contending again", reason=reason)
        self._retry()

    def _retry(self) -> None:
        self._retry_call = None
        if self._stopping:
            return
        d = self._contend()

        def again(f):
            log.warn("Cannot contend in ZooKeeper at {url} ({why}); retrying in {t}s",
                     url=self.url, why=f.getErrorMessage() or f.type.__name__,
                     t=self.retry_delay)
            if not self._stopping:
                self._retry_call = self.reactor.callLater(self.retry_delay, self._retry)

        d.addErrback(again)


def _exit(code: int) -> None:
    """End the process now: no reactor shutdown, which could wait on ZooKeeper or clients."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


class MasterService:
    """Starts and stops a master listening on `ip:port` (port 0 picks a free one).

    With `zk` (a `zk://hosts/path` URL) it contends for leadership there with sessions of
    `zk_session_timeout` seconds, and `abort(status)` ends the process when it loses the
    leadership (replaceable for tests). `registry` is "zk" (the default with `zk`: znodes
    under `<path>_registry`), "sqlite" (the default without: `<work_dir>/registry.sqlite`)
    or "in_memory". The master recovers from the registry when it starts leading.

    `authenticate` names which HTTP APIs need one of `credentials` (as Mesos's
    `--authenticate_http_*` flags): "frameworks" (the scheduler API), "readonly" (state
    endpoints and the operator API's GET_* calls and SUBSCRIBE), "readwrite" (the operator
    API's other calls). `/health`, `/redirect` and `/version` stay open.
    """

    def __init__(self, reactor, *, ip: str = "127.0.0.1", port: int = 5050,
                 work_dir: str | None = None, registry: str | None = None,
                 hostname: str | None = None, secret: bytes | None = None,
                 zk: str | None = None, zk_session_timeout: float = 10.0,
                 credentials: Credentials | None = None, authenticate: frozenset = frozenset(),
                 abort=_exit, **options):
        self.reactor = reactor
        self.zk = zookeeper.parse_url(zk) if zk else None
        self.zk_session_timeout = zk_session_timeout
        self.abort = abort
        self.election: Election | None = None
        self._master_started = False
        self.ip, self.requested_port = ip, port
        self.work_dir = work_dir
        if registry is None:
            registry = "zk" if self.zk is not None else "sqlite"
        if registry == "zk":
            if self.zk is None:
                raise ValueError("--registry zk needs --zk")
            backend = ZooKeeperRegistry(
                lambda: zookeeper.Session(reactor, self.zk.hosts, timeout=zk_session_timeout),
                registry_path(self.zk), on_session=self._registry_session_changed)
        elif registry == "sqlite" and work_dir:
            backend = SQLiteRegistry(os.path.join(work_dir, "registry.sqlite"))
        else:
            backend = MemoryRegistry()
        self.registry = backend
        self._recovered = False
        self._after_recovery_calls: list = []
        self._gc_call = None
        flags = {"ip": ip, "port": port, "work_dir": work_dir or "", "registry": registry,
                 **{k: v for k, v in options.items()}}
        if self.zk is not None:
            flags.update(zk=str(self.zk), zk_session_timeout=zk_session_timeout)
        self.master = Master(reactor, ip=ip, port=port, hostname=hostname or _hostname(ip),
                             registrar=Registrar(reactor, backend), secret=secret, flags=flags,
                             **options)
        leader = self.leader if self.zk is not None else None
        confirmed = self._confirmed if self.zk is not None else (lambda handler: handler)
        if authenticate and credentials is None:
            raise ValueError("authenticating HTTP requests needs credentials")
        auth = Authenticator(credentials, "mesos") if credentials is not None else None
        frameworks, readonly, readwrite = (auth if kind in authenticate else None
                                           for kind in ("frameworks", "readonly", "readwrite"))
        self.router = Router()
        self.router.add("/api/v1/scheduler",
                        confirmed(SchedulerAPI(self.master, leader, frameworks)),
                        methods=("POST",))
        self.router.add("/api/v1", confirmed(OperatorAPI(self.master, leader, readonly,
                                                         readwrite)),
                        methods=("POST",))
        # A follower's /state names the real leader; its metrics say it is not elected.
        own = {"state": self._state(False), "state.json": self._state(False),
               "state-summary": self._state(True)}
        for prefix, handler, methods in legacy.routes(self.master, leader):
            name = prefix.rsplit("/", 1)[1]
            if prefix == "/metrics/snapshot":
                handler = self._metrics
            elif name == "redirect":
                handler = confirmed(handler)
            handler = own.get(name, handler)
            # pymesos asks for /version without credentials (and works without the answer)
            if readonly is not None and name not in ("health", "redirect", "version"):
                handler = readonly.guard(handler)
            self.router.add(prefix, handler, methods=methods)
        self.port = None
        self._listening = None

    @property
    def leading(self) -> bool:
        """Whether this master serves as the leader (elected, and recovered the registry)."""
        if self.zk is None:
            return True
        return self.election is not None and self.election.leading and self._recovered

    def leader(self) -> tuple[bool, str | None]:
        """(whether this master leads, "host:port" of the leader or None if unknown)."""
        if self.leading:
            return True, f"{self.master.hostname}:{self.master.port}"
        return False, zookeeper.leader_address(self._leader_info())

    def _confirmed(self, handler):
        """`handler`, run on a follower only after a fresh look at who leads.

        A client that a ZooKeeper watch has just sent here (this master is about to lead)
        may be faster than our own watches: without this, we would redirect it to the
        leader that has just gone, and pymesos would then retry that dead address for good.
        """
        def confirmed(request):
            if self.leading or self.election is None:
                return handler(request)
            return self.election.check().addCallback(lambda _: handler(request))

        return confirmed

    def _leader_info(self) -> dict | None:
        info = self.election.leader if self.election is not None else None
        if info is None or info.get("id") == self.master.id:
            return None  # ourselves, before our Contender has caught up with the Detector
        return info

    def start(self) -> defer.Deferred:
        gc.set_threshold(*GC_THRESHOLDS)
        links = AgentLinkFactory(self.master, lambda: self.leading, self._after_recovery,
                                 answering=self._answering)
        factory = HTTPFactory(self.router, sniffers=[(protocol.PREFIX, links)],
                              reactor=self.reactor)
        self._listening = listen(self.reactor, self.requested_port, factory, interface=self.ip)
        self.port = self._listening.getHost().port
        self.master.port = self.port
        self.master.flags["port"] = self.port
        log.info("Master {id} listening on http://{ip}:{port}", id=self.master.id, ip=self.ip,
                 port=self.port)
        d = self.registry.start()

        def registry_failed(f):
            raise RuntimeError(f"cannot open the registry: "
                               f"{f.getErrorMessage() or f.type.__name__}")

        d.addErrback(registry_failed)
        if self.zk is None:
            d.addCallback(lambda _: self._start_master())
            return d.addCallback(lambda _: self)
        self.election = Election(self.reactor, self.zk, self.master.info,
                                 session_timeout=self.zk_session_timeout,
                                 on_leading=self._leading_changed, on_deposed=self._deposed)
        d.addCallback(lambda _: self.election.start())
        return d.addCallback(lambda _: self)

    def stop(self) -> defer.Deferred:
        if self._gc_call is not None:
            self._resume_gc()
        d = self.election.stop() if self.election is not None else defer.succeed(None)
        d.addErrback(lambda f: log.failure("Leaving the ZooKeeper election failed", f))
        d.addBoth(lambda _: self.master.stop())
        if self._listening:
            d.addBoth(lambda _: self._listening.stopListening())
        d.addBoth(lambda _: self.registry.close())
        return d

    def _start_master(self) -> defer.Deferred:
        """Recover from the registry, then lead (once)."""
        if self._master_started:
            return defer.succeed(None)
        self._master_started = True
        d = self.registry.load()

        def loaded(records):
            self.master.recover(records)
            self._pause_gc_while_agents_return()
            self.master.start()
            self._recovered = True
            calls, self._after_recovery_calls = self._after_recovery_calls, []
            for fn in calls:
                fn()

        def failed(f):
            log.failure("Cannot recover from the registry; exiting", f)
            self._deposed(f"registry unreadable: {f.getErrorMessage()}")

        d.addCallback(loaded)
        if self.zk is not None:
            d.addErrback(failed)
        return d

    def _pause_gc_while_agents_return(self) -> None:
        if not self.master.awaited_agents or not gc.isenabled():
            return
        gc.disable()
        until = self.reactor.seconds() + GC_PAUSE_MAX

        def check():
            self._gc_call = None
            if self.master.awaited_agents and self.reactor.seconds() < until:
                self._gc_call = self.reactor.callLater(GC_PAUSE_CHECK, check)
                return
            self._resume_gc()

        self._gc_call = self.reactor.callLater(GC_PAUSE_CHECK, check)

    def _resume_gc(self) -> None:
        if self._gc_call is not None and self._gc_call.active():
            self._gc_call.cancel()
        self._gc_call = None
        gc.collect(0)  # everything made while paused is young: drop its cyclic garbage
        gc.freeze()
        gc.enable()

    def _leading_changed(self, leading: bool) -> None:
        if leading and not self._master_started:
            log.info("Elected as the leading master ({url})", url=self.zk)
            self._start_master()
        elif leading:
            log.info("ZooKeeper connection is back, same session: leading again")
        elif self._master_started:
            log.warn("Lost the ZooKeeper connection: not serving as the leader until the "
                     "session reconnects (or exiting once it is lost, in at most {t}s)",
                     t=self.zk_session_timeout)

    def _answering(self) -> bool:
        """Whether agent registrations get answered: leading, or elected and recovering."""
        return self.leading or self._recovering()

    def _recovering(self) -> bool:
        return (self.election is not None and self.election.leading and not self._recovered
                and self._master_started)

    def _after_recovery(self, fn) -> bool:
        """Queue `fn` if this master is elected but still reading its registry."""
        if not self._recovering():
            return False
        self._after_recovery_calls.append(fn)
        return True

    def _registry_session_changed(self, state: str, reason: str | None) -> None:
        if state == zookeeper.LOST and self._master_started:
            self._deposed(f"the registry's ZooKeeper session was lost ({reason})")

    def _deposed(self, reason: str) -> None:
        log.critical("Lost leadership: {reason}. Exiting with status {status}; restart this "
                     "master (a supervisor should) and it will contend again as a follower",
                     reason=reason, status=EXIT_LOST_LEADERSHIP)
        try:
            self.master.stop()  # closes scheduler and operator streams and agent links
        finally:
            self.abort(EXIT_LOST_LEADERSHIP)

    def _state(self, summary: bool):
        def handler(request):
            state = views.legacy_state(self.master, summary=summary)
            if not self.leading:  # as a Mesos follower: no elected_time; the leader if known
                state.pop("elected_time", None)
                info = self._leader_info()
                if info is None:
                    state.pop("leader", None)
                    state.pop("leader_info", None)
                else:
                    state["leader"], state["leader_info"] = info.get("pid", ""), info
            return json_response(state)

        return handler

    def _metrics(self, request):
        metrics = metrics_snapshot(self.master)
        metrics["master/elected"] = 1.0 if self.leading else 0.0
        return json_response(metrics)


def registry_path(url: zookeeper.ZkUrl) -> str:
    """Where the ZooKeeper registry lives: beside the election path, never inside it (only
    `json.info_*` znodes may be there, docs/ha.md)."""
    return url.path + "_registry"


def _hostname(ip: str) -> str:
    return ip if ip not in ("0.0.0.0", "") else socket.gethostname()
