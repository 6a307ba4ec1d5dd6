"""Running Marathon's own health checks (HTTP, HTTPS, TCP) and readiness checks.

A timer looks every `tick` seconds for running instances whose check is due (each check
every intervalSeconds per instance, the first as soon as the task runs), and probes them:

    HTTP   GET path over a plain TCP connection; 200-399 passes (health.http_ok)
    TCP    a connection that opens passes
    HTTPS  the same GET through the standard library's TLS in a thread (no certificate
           check, as Marathon); Twisted's TLS would need pyOpenSSL

The probe goes to the agent's IP (from the offer) and the instance's host port. Results go
through health.record: failures in the grace period are ignored, a change of health is
published and drives the app's deployment, and too many failures in a row kill the task
(the instance is then rescheduled). Readiness checks run only for new instances of apps in
a running Scale or Restart step, until they answer with one of httpStatusCodesForReady.
"""

from __future__ import annotations

from twisted.internet import defer, protocol, task, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.logger import Logger

from frameworks.marathon import events, groups, health
from frameworks.marathon import instances as inst
from frameworks.marathon.health import Health

log = Logger()

_MAX_RESPONSE_HEAD = 64 * 1024


class _Probe(protocol.Protocol):
    """Sends `request` (None: only connect) and reports the HTTP status (or True)."""

    def __init__(self, request: bytes | None, keep_body: bool = False):
        self.request = request
        self.keep_body = keep_body
        self.buffer = b""
        self.result: defer.Deferred = defer.Deferred()

    def connectionMade(self):
        if self.request is None:
            self._done((True, None, b"", ""))
            self.transport.loseConnection()
        else:
            self.transport.write(self.request)

    def dataReceived(self, data):
        self.buffer += data
        head, sep, body = self.buffer.partition(b"\r\n\r\n")
        if (sep and not self.keep_body) or len(self.buffer) > _MAX_RESPONSE_HEAD:
            self._parse()
            self.transport.loseConnection()

    def connectionLost(self, reason=None):
        if self.buffer:
            self._parse()
        self._done((False, None, b"", "connection closed before a response"))

    def _parse(self):
        head, _, body = self.buffer.partition(b"\r\n\r\n")
        line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            content_type = ""
            for h in head.split(b"\r\n")[1:]:
                name, _, value = h.decode("latin-1", "replace").partition(":")
                if name.strip().lower() == "content-type":
                    content_type = value.strip()
            self._done((int(parts[1]), content_type, body, None))
        else:
            self._done((False, None, b"", f"not an HTTP response: {line[:60]!r}"))

    def _done(self, value):
        if not self.result.called:
            self.result.callback(value)


def _request(path: str, host: str, port: int) -> bytes:
    return (f"GET {path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"User-Agent: Marathon/1.11 (Agora)\r\nConnection: close\r\n\r\n").encode()


def _https_get(host: str, port: int, path: str, timeout: float):
    """(status, content type, body, None) of an HTTPS GET, certificates unchecked."""
    import http.client
    import ssl

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    try:
        conn.request("GET", path or "/", headers={"User-Agent": "Marathon/1.11 (Agora)"})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type") or "", r.read(65536), None
    finally:
        conn.close()


def probe(reactor, protocol_name: str, host: str, port: int, path: str, timeout: float,
          keep_body: bool = False) -> defer.Deferred:
    """Deferred of (status or True/False, content type, body, failure cause)."""
    if protocol_name in ("HTTPS",):
        d = threads.deferToThreadPool(reactor, reactor.getThreadPool(), _https_get, host,
                                      port, path, timeout)
        return d.addErrback(lambda f: (False, None, b"", f.getErrorMessage()))
    request = None if protocol_name == "TCP" else _request(path, host, port)
    p = _Probe(request, keep_body)
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    connecting = connectProtocol(endpoint, p)

    def failed(f):
        p._done((False, None, b"", f.getErrorMessage()))

    connecting.addErrback(failed)
    def timed_out():
        p._done((False, None, b"", f"no answer within {timeout:g}s"))
        if p.transport is not None:
            p.transport.abortConnection()
        else:
            connecting.cancel()

    timer = reactor.callLater(timeout, timed_out)

    def finished(value):
        if timer.active():
            timer.cancel()
        return value

    return p.result.addBoth(finished)


class HealthCheckers:
    def __init__(self, reactor, state, scheduler, deployments, bus, tick: float = 0.5,
                 max_in_flight: int = 100):
        self.reactor = reactor
        self.state = state
        self.scheduler = scheduler
        self.deployments = deployments
        self.bus = bus
        self.tick_seconds = tick
        self.max_in_flight = max_in_flight
        self._due: dict[tuple, float] = {}
        self._busy: set[tuple] = set()
        self._timer = None
        self.probes = 0

    def start(self) -> None:
        self._timer = task.LoopingCall(self.tick)
        self._timer.clock = self.reactor
        self._timer.start(self.tick_seconds, now=False)

    def stop(self) -> None:
        if self._timer is not None and self._timer.running:
            self._timer.stop()

    def tick(self) -> None:
        now = self.reactor.seconds()
        live = set()
        for app_id, app in self.state.root.apps.items():
            readiness = bool(app.get("readinessChecks")) and \
                self.deployments.in_readiness(app_id)
            if not app.get("healthChecks") and not readiness:
                continue
            for i in self.state.of_app(app_id):
                if i.condition != inst.RUNNING_C or not i.task_id:
                    continue
                spec = self.state.app_version(app_id, i.app_version) or app
                for check in health.checks_of(spec):
                    if check.by_marathon:
                        key = (i.task_id, check.index)
                        live.add(key)
                        self._maybe_probe(key, now, check.interval,
                                          lambda k=key, c=check, i=i: self._health(k, i, c))
                if readiness and not i.ready and \
                        i.config_version == groups.config_version(app):
                    key = (i.task_id, "ready")
                    live.add(key)
                    rc = app["readinessChecks"][0]
                    self._maybe_probe(key, now, rc["intervalSeconds"],
                                      lambda k=key, i=i, a=app: self._readiness(k, i, a))
        for key in list(self._due):
            if key not in live and key not in self._busy:
                del self._due[key]

    def _maybe_probe(self, key, now: float, interval: float, start) -> None:
        if key in self._busy or now < self._due.get(key, 0.0) or \
                len(self._busy) >= self.max_in_flight:
            return
        self._due[key] = now + interval
        self._busy.add(key)
        self.probes += 1
        d = start()
        d.addErrback(lambda f: log.failure("Health probe failed", failure=f))
        d.addBoth(lambda _: self._busy.discard(key))

    # -- health ---------------------------------------------------------------------------

    def _health(self, key, i: inst.Instance, check: health.Check) -> defer.Deferred:
        port = check.target_port(i.ports)
        host = i.agent_ip or i.host
        if port is None or not host:
            return defer.succeed(self._result(key, i, check, False, "no port to check"))
        d = probe(self.reactor, check.protocol, host, port, check.path, check.timeout)

        def got(value):
            status, _, _, cause = value
            if check.protocol == "TCP" or status is True or status is False:
                ok = status is True
            else:
                ok = health.http_ok(status, check)
                if ok is None:
                    return None
                cause = None if ok else f"HTTP {status}"
            self._result(key, i, check, ok, cause)

        return d.addCallback(got)

    def _result(self, key, i: inst.Instance, check: health.Check, ok: bool,
                cause: str | None) -> None:
        if i.task_id != key[0] or i.condition != inst.RUNNING_C or \
                i.id not in self.state.instances:
            return  # the task changed while we probed
        now = self.reactor.seconds()
        spec = self.state.app_version(i.app_id, i.app_version) or self.state.app(i.app_id) or {}
        checks = health.checks_of(spec)
        results = self.state.health.get(i.id)
        if results is None or len(results) != len(checks):
            results = self.state.health[i.id] = [Health() for _ in checks]
        if check.index >= len(results):
            return
        outcome = health.record(results[check.index], check, ok, cause, now, i.started_at)
        check_json = (spec.get("healthChecks") or [{}])[check.index]
        if outcome.failed:
            self.bus.publish("failed_health_check_event",
                             lambda: events.failed_health_check(now, i, check_json))
        if outcome.changed:
            alive = results[check.index].alive
            self.bus.publish("health_status_changed_event",
                             lambda: events.health_status_changed(now, i, bool(alive)))
        by_marathon = [r for c, r in zip(checks, results) if c.by_marathon]
        healthy = health.healthy(by_marathon)
        if healthy is not None and healthy != i.healthy:
            i.healthy = healthy
            self.bus.publish("instance_health_changed_event",
                             lambda: events.instance_health_changed(now, i))
            self.scheduler.on_change(i.app_id)
        if outcome.kill:
            reason = f"{check.protocol} health check failed " \
                     f"{results[check.index].consecutive_failures} times in a row"
            log.info("Killing unhealthy instance {i}: {reason}", i=i.id, reason=reason)
            self.bus.publish("unhealthy_instance_kill_event",
                             lambda: events.unhealthy_instance_kill(now, i, reason))
            self.scheduler.kill_task(i)

    # -- readiness ------------------------------------------------------------------------

    def _readiness(self, key, i: inst.Instance, app: dict) -> defer.Deferred:
        rc = app["readinessChecks"][0]
        definitions = app.get("portDefinitions") or \
            (app.get("container") or {}).get("portMappings") or []
        index = next((k for k, p in enumerate(definitions) if p.get("name") == rc["portName"]),
                     None)
        host = i.agent_ip or i.host
        if index is None or index >= len(i.ports) or not host:
            return defer.succeed(None)
        d = probe(self.reactor, rc["protocol"], host, i.ports[index], rc["path"],
                  rc["timeoutSeconds"], keep_body=rc.get("preserveLastResponse", False))

        def got(value):
            status, content_type, body, _ = value
            if i.task_id != key[0]:
                return
            ready = isinstance(status, int) and not isinstance(status, bool) and \
                status in rc["httpStatusCodesForReady"]
            result = {"name": rc["name"], "taskId": i.task_id, "ready": ready}
            if rc.get("preserveLastResponse") and isinstance(status, int):
                result["lastResponse"] = {"status": status, "contentType": content_type or "",
                                          "body": body.decode("utf-8", "replace")}
            self.state.readiness[i.id] = result
            if ready and not i.ready:
                i.ready = True
                self.scheduler.on_change(i.app_id)

        return d.addCallback(got)
