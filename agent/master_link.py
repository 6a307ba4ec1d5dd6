"""The agent's connection to the master: connect, answer the challenge, reconnect forever.

    connect ──> Challenge ──> (Re)RegisterAgent ──> AgentRegistered ──> registered
       ^                        │    ^                                      │
       │      no answer in 1 s ×2 … 10 s: send it again on the same link    │
       └──── backoff (0.1 s ×2 … 10 s, jittered) <── link lost / silent ────┘

The agent supplies the registration message (it knows whether it has an id and what runs);
this module owns the socket, the backoff, Ping/Pong, and the watchdog that drops a link on
which the master has gone silent. AgentRefused and ShutdownAgent end the reconnecting for
good: the agent is not wanted as it is, and retrying would only repeat the refusal.
"""

from __future__ import annotations

import random
from typing import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger

from agora import protocol
from agora.link import Link

log = Logger()

#: Send the registration again, on the same link, when it is not answered within this time:
#: at first after FIRST_REGISTRATION_TIMEOUT, doubled on each further attempt up to
#: REGISTRATION_TIMEOUT (the Mesos agent retries its (Re)RegisterSlave the same way). A
#: master that ignores us (a follower, or a new leader whose own watch has not fired yet)
#: then costs a second, not ten. A master whose Challenge says it leads will answer however
#: long its queue (a new leader taking 10,000 agents back): we wait REGISTRATION_TIMEOUT
#: for it rather than add copies to that queue, and keep our place in it rather than take
#: a new connection. The master answers a copy for a registration it is still working on
#: with nothing, and one for a link it has registered with AgentRegistered again, so a
#: repeated first registration cannot admit us twice. A link on which the master has not
#: sent its Challenge within REGISTRATION_TIMEOUT is dropped and made again.
REGISTRATION_TIMEOUT = 10.0
FIRST_REGISTRATION_TIMEOUT = 1.0
#: Drop a registered link after this many ping intervals without a word from the master.
MAX_SILENT_PINGS = 5
#: Told of a new leading master, connect to it after a random delay of up to this long, as
#: the Mesos agent does (its --registration_backoff_factor, 1 s): 10,000 agents told at
#: once would otherwise overflow the new leader's listen queue, and those whose SYN it
#: dropped wait 1 s or 3 s for the kernel to send it again.
NEW_MASTER_SPREAD = 1.0


class Backoff:
    """Exponential backoff with jitter: initial, ×factor, capped; pure apart from `rand`."""

    def __init__(self, initial: float = 0.1, factor: float = 2.0, cap: float = 10.0,
                 jitter: float = 0.25, rand: Callable[[], float] = random.random):
        self.initial, self.factor, self.cap, self.jitter = initial, factor, cap, jitter
        self.rand = rand
        self._next = initial

    def next(self) -> float:
        """The delay before the next attempt (and grow the one after)."""
        base = self._next
        self._next = min(self._next * self.factor, self.cap)
        return base * (1 - self.jitter + 2 * self.jitter * self.rand())

    def reset(self) -> None:
        self._next = self.initial


class _Factory(ClientFactory):
    noisy = False  # no "Starting factory" log line for every connection attempt

    def __init__(self, owner: MasterLink):
        self.owner = owner

    def buildProtocol(self, addr):
        link = Link(self.owner.reactor, send_prefix=True)
        self.owner._attach(link)
        return link

    def clientConnectionFailed(self, connector, reason):
        self.owner._connection_failed(reason)


class MasterLink:
    """Keeps one registered link to the master alive.

    Callbacks: `registration(challenge) -> RegisterAgent | ReregisterAgent`,
    `on_registered(AgentRegistered)`, `on_message(msg)` for everything else the master sends,
    `on_disconnected()` when a registered link goes, `on_refused(message)` when the master
    refuses or removes the agent (no more reconnects after that).
    """

    def __init__(self, reactor, host: str | None, port: int | None, *,
                 registration: Callable[[protocol.Challenge], object],
                 on_registered: Callable[[protocol.AgentRegistered], None],
                 on_message: Callable[[object], None],
                 on_disconnected: Callable[[], None] = lambda: None,
                 on_refused: Callable[[str], None] = lambda message: None,
                 backoff: Backoff | None = None,
                 registration_timeout: float = REGISTRATION_TIMEOUT,
                 first_registration_timeout: float = FIRST_REGISTRATION_TIMEOUT,
                 new_master_spread: float = NEW_MASTER_SPREAD,
                 rand: Callable[[], float] = random.random):
        self.reactor = reactor
        self.host, self.port = host, port
        self.registration = registration
        self.on_registered = on_registered
        self.on_message = on_message
        self.on_disconnected = on_disconnected
        self.on_refused = on_refused
        self.backoff = backoff or Backoff()
        self.registration_timeout = registration_timeout
        self.first_registration_timeout = min(first_registration_timeout, registration_timeout)
        self.new_master_spread = new_master_spread
        self.rand = rand
        self._attempt_timeout = self.first_registration_timeout
        self.registered = False
        self.refused: str | None = None
        self._link: Link | None = None
        self._connector = None
        self._running = False
        self._retry_call = None
        self._timeout_call = None
        self._watchdog_call = None
        self._challenge: protocol.Challenge | None = None  # the current link's
        self._ping_interval = 0.0
        self._last_heard = 0.0
        self._stopped: Deferred | None = None

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._running = True
        self._connect()

    def set_master(self, host: str | None, port: int | None) -> None:
        """Follow a new leading master (None: no leader known): drop the link to the old
        one at once and connect to the new one within `new_master_spread` seconds (a random
        delay, so that all agents do not arrive at once). The agent then re-registers."""
        if (host, port) == (self.host, self.port):
            return
        log.info("Leading master is now {where}", where=f"{host}:{port}" if host else "unknown")
        self.host, self.port = host, port
        self.backoff.reset()
        self._attempt_timeout = self.first_registration_timeout
        self._cancel(self._retry_call)
        self._retry_call = None
        if host is not None and self._running:
            # Planned first: the old link's loss (or the old connection attempt's failure,
            # which stopConnecting reports at once) then finds it and plans nothing more.
            self._retry_call = self.reactor.callLater(self.new_master_spread * self.rand(),
                                                      self._connect)
        link = self._link
        if link is not None:
            link.transport.abortConnection()
        elif self._connector is not None and self._connector.state == "connecting":
            self._connector.stopConnecting()

    def stop(self) -> Deferred:
        """Close the link and stop reconnecting; fires when the connection is gone."""
        self._running = False
        self._cancel(self._retry_call)
        self._retry_call = None
        self._cancel_link_timers()
        if self._link is not None and self._link.connected:
            self._stopped = Deferred()
            self._link.close()
            return self._stopped
        if self._connector is not None and self._connector.state == "connecting":
            self._connector.stopConnecting()
        return succeed(None)

    def send(self, msg) -> bool:
        """Send to the master if registered; False (message dropped) otherwise."""
        if not self.registered or self._link is None:
            return False
        self._link.send(msg)
        return True

    # --- connection --------------------------------------------------------------------

    def _connect(self) -> None:
        self._retry_call = None
        if not self._running or self.host is None:
            return  # no master known yet: `set_master` connects
        self._connector = self.reactor.connectTCP(self.host, self.port, _Factory(self),
                                                  timeout=5)

    def _attach(self, link: Link) -> None:
        self._link = link
        self._challenge = None
        link.on_message = lambda msg, link=link: self._received(link, msg)
        link.on_lost = lambda reason, link=link: self._lost(link, reason)
        # A master that is busy (a new leader accepting 10,000 agents at once) may take more
        # than a second to challenge us; a new connection would only add to its queue.
        self._arm_timeout(link, self.registration_timeout)

    def _arm_timeout(self, link: Link, timeout: float) -> None:
        self._cancel(self._timeout_call)
        self._timeout_call = self.reactor.callLater(timeout, self._registration_timed_out,
                                                    link, timeout)

    def _arm_registration_timeout(self, link: Link) -> None:
        if self._challenge.leading:  # it will answer, however long its queue: wait for it
            self._arm_timeout(link, self.registration_timeout)
            return
        timeout = self._attempt_timeout
        self._attempt_timeout = min(timeout * 2, self.registration_timeout)
        self._arm_timeout(link, timeout)

    def _connection_failed(self, reason) -> None:
        self._connector = None
        self._retry(f"cannot connect: {reason.getErrorMessage()}")

    def _retry(self, why: str) -> None:
        if not self._running or self._retry_call is not None or self.host is None:
            return
        delay = self.backoff.next()
        log.info("Master {host}:{port}: {why}; retrying in {delay:.2f}s", host=self.host,
                 port=self.port, why=why, delay=delay)
        self._retry_call = self.reactor.callLater(delay, self._connect)

    def _received(self, link: Link, msg) -> None:
        if link is not self._link:
            return
        self._last_heard = self.reactor.seconds()
        kind = type(msg)
        if kind is protocol.Ping:
            link.send(protocol.Pong(seq=msg.seq))
        elif kind is protocol.Challenge:
            self._challenge = msg
            link.send(self.registration(msg))
            self._arm_registration_timeout(link)
        elif kind is protocol.AgentRegistered:
            self._cancel(self._timeout_call)
            self._timeout_call = None
            self.backoff.reset()
            self._attempt_timeout = self.first_registration_timeout
            self._ping_interval = msg.ping_interval or 0.0
            self._arm_watchdog()
            first = not self.registered
            self.registered = True
            if not first:
                log.info("Master re-confirmed the registration as {aid}", aid=msg.agent_id)
            self.on_registered(msg)
        elif kind is protocol.AgentRefused or kind is protocol.ShutdownAgent:
            what = "refused the agent" if kind is protocol.AgentRefused else "shut the agent down"
            log.critical("THE MASTER {what}: {message}. Not reconnecting.", what=what,
                         message=msg.message)
            self.refused = msg.message
            self._running = False
            link.close()
            self.on_refused(msg.message)
        elif self.registered:
            self.on_message(msg)
        else:
            log.warn("Dropping {kind} from the master before registration", kind=kind.__name__)

    def _lost(self, link: Link, reason) -> None:
        if link is not self._link:
            return
        self._link = None
        self._connector = None
        self._cancel_link_timers()
        was_registered, self.registered = self.registered, False
        if was_registered:
            self.on_disconnected()
        if self._stopped is not None:
            stopped, self._stopped = self._stopped, None
            stopped.callback(None)
        self._retry(f"link lost ({reason.getErrorMessage()})")

    def _registration_timed_out(self, link: Link, timeout: float) -> None:
        self._timeout_call = None
        if link is not self._link or self.registered:
            return
        if self._challenge is None:
            log.warn("Master {host}:{port} did not challenge us within {t}s; reconnecting",
                     host=self.host, port=self.port, t=timeout)
            link.transport.abortConnection()
            return
        log.info("Master {host}:{port} did not register us within {t}s; sending the "
                 "registration again", host=self.host, port=self.port, t=timeout)
        link.send(self.registration(self._challenge))  # what runs now, not what ran then
        self._arm_registration_timeout(link)

    # --- liveness ----------------------------------------------------------------------

    def _arm_watchdog(self) -> None:
        self._cancel(self._watchdog_call)
        self._watchdog_call = None
        if self._ping_interval > 0:
            self._watchdog_call = self.reactor.callLater(self._ping_interval, self._watch)

    def _watch(self) -> None:
        self._watchdog_call = None
        link = self._link
        if link is None:
            return
        silent = self.reactor.seconds() - self._last_heard
        if silent > self._ping_interval * MAX_SILENT_PINGS:
            log.warn("No word from the master for {s:.0f}s; reconnecting", s=silent)
            link.transport.abortConnection()
            return
        self._arm_watchdog()

    def _cancel_link_timers(self) -> None:
        self._cancel(self._timeout_call)
        self._cancel(self._watchdog_call)
        self._timeout_call = self._watchdog_call = None

    @staticmethod
    def _cancel(call) -> None:
        if call is not None and call.active():
            call.cancel()
