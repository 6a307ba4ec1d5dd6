"""The master process: one port serving HTTP APIs and agent links, around a `Master`."""

import os
import socket

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from agora import protocol
from agora.http import HTTPFactory, Router, listen
from agora.link import Link
from master.api import legacy
from master.api.operator import OperatorAPI
from master.api.scheduler import SchedulerAPI
from master.master import Master
from master.registrar import MemoryRegistry, Registrar, SQLiteRegistry

log = Logger()


class AgentLinkFactory(Factory):
    """Builds the master's end of an agent connection (after the sniffed prefix)."""

    def __init__(self, master: Master):
        self.master = master

    def buildProtocol(self, addr):
        link = Link(self.master.reactor, send_prefix=False)
        link.agent = None
        link.nonce = b""
        master = self.master
        link.on_message = lambda msg: master.on_agent_message(link, msg)
        link.on_lost = lambda reason: master.agent_link_lost(link)
        made = link.connectionMade

        def connection_made():
            made()
            master.agent_connected(link)

        link.connectionMade = connection_made
        return link


class MasterService:
    """Starts and stops a master listening on `ip:port` (port 0 picks a free one)."""

    def __init__(self, reactor, *, ip: str = "127.0.0.1", port: int = 5050,
                 work_dir: str | None = None, registry: str = "sqlite",
                 hostname: str | None = None, secret: bytes | None = None, **options):
        self.reactor = reactor
        self.ip, self.requested_port = ip, port
        self.work_dir = work_dir
        if registry == "sqlite" and work_dir:
            backend = SQLiteRegistry(os.path.join(work_dir, "registry.sqlite"))
        else:
            backend = MemoryRegistry()
        self.registry = backend
        flags = {"ip": ip, "port": port, "work_dir": work_dir or "", "registry": registry,
                 **{k: v for k, v in options.items()}}
        self.master = Master(reactor, ip=ip, port=port, hostname=hostname or _hostname(ip),
                             registrar=Registrar(reactor, backend), secret=secret, flags=flags,
                             **options)
        self.router = Router()
        self.router.add("/api/v1/scheduler", SchedulerAPI(self.master), methods=("POST",))
        self.router.add("/api/v1", OperatorAPI(self.master), methods=("POST",))
        for prefix, handler, methods in legacy.routes(self.master):
            self.router.add(prefix, handler, methods=methods)
        self.port = None
        self._listening = None

    def start(self) -> defer.Deferred:
        factory = HTTPFactory(self.router, sniffers=[(protocol.PREFIX,
                                                       AgentLinkFactory(self.master))],
                              reactor=self.reactor)
        self._listening = listen(self.reactor, self.requested_port, factory, interface=self.ip)
        self.port = self._listening.getHost().port
        self.master.port = self.port
        self.master.flags["port"] = self.port
        self.master.start()
        log.info("Master {id} listening on http://{ip}:{port}", id=self.master.id, ip=self.ip,
                 port=self.port)
        return defer.succeed(self)

    def stop(self) -> defer.Deferred:
        self.master.stop()
        d = defer.maybeDeferred(self._listening.stopListening) if self._listening else \
            defer.succeed(None)
        d.addBoth(lambda _: self.registry.close())
        return d


def _hostname(ip: str) -> str:
    return ip if ip not in ("0.0.0.0", "") else socket.gethostname()
