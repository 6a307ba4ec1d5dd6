"""Health checks as Mesos runs them: the HealthCheck JSON, and one task's schedule (pure).

    TASK_RUNNING ──delay_seconds──> check ──result──interval_seconds──> check ──> ...
                                     └─ bounded by timeout_seconds (0: none); a timeout fails

- A failure while no check has passed yet and within `grace_period_seconds` of the task's
  start is ignored (`src/checks/health_checker.cpp`: `initializing`).
- `healthy` is reported on the first result that counts and on every change (Mesos's
  executors also repeat `healthy: false` after each further failure; we do not).
- `consecutive_failures` counted failures in a row kill the task.

The executor (agent/executors/command.py) does the I/O and passes the time in; the master
validates a task's check with `parse` (TASK_ERROR, as Mesos's master does). This module
imports nothing, so the executor's start-up stays cheap.
"""

from __future__ import annotations

KINDS = ("COMMAND", "HTTP", "TCP")
SCHEMES = ("http", "https")
#: Mesos's HealthCheck defaults (include/mesos/v1/mesos.proto)
DEFAULTS = {"delay_seconds": 15.0, "interval_seconds": 10.0, "timeout_seconds": 20.0,
            "consecutive_failures": 3, "grace_period_seconds": 10.0}


class HealthCheck:
    """A validated Mesos HealthCheck; `timeout` None means no limit (Mesos: 0)."""

    __slots__ = ("kind", "delay", "interval", "timeout", "consecutive_failures",
                 "grace_period", "command", "port", "path", "scheme", "ipv6")

    def __init__(self, kind: str, *, delay: float = 15.0, interval: float = 10.0,
                 timeout: float | None = 20.0, consecutive_failures: int = 3,
                 grace_period: float = 10.0, command: dict | None = None, port: int = 0,
                 path: str = "/", scheme: str = "http", ipv6: bool = False):
        self.kind = kind
        self.delay = delay
        self.interval = interval
        self.timeout = timeout
        self.consecutive_failures = consecutive_failures
        self.grace_period = grace_period
        self.command = command
        self.port = port
        self.path = path
        self.scheme = scheme
        self.ipv6 = ipv6

    @property
    def name(self) -> str:
        return f"{self.kind} health check"

    def __repr__(self) -> str:
        return f"HealthCheck({self.kind}, port={self.port}, every {self.interval:g}s)"


def _number(obj: dict, key: str) -> float:
    value = obj.get(key, DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"'{key}' must be a number, not {value!r}")
    if value < 0:
        raise ValueError(f"'{key}' must not be negative (it is {value})")
    return float(value)


def _port(obj, what: str) -> int:
    if not isinstance(obj, dict):
        raise ValueError(f"a {what} health check needs '{what.lower()}' (an object)")
    port = obj.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"'{what.lower()}.port' must be a port number (1-65535), "
                         f"not {port!r}")
    return port


def _ipv6(obj: dict) -> bool:
    protocol = obj.get("protocol", "IPv4")
    if protocol not in ("IPv4", "IPv6"):
        raise ValueError(f"'protocol' must be IPv4 or IPv6, not {protocol!r}")
    return protocol == "IPv6"


def _command(obj) -> dict:
    if not isinstance(obj, dict):
        raise ValueError("a COMMAND health check needs 'command' (a CommandInfo)")
    value = obj.get("value")
    if not isinstance(value, str) or not value:
        kind = "shell command" if obj.get("shell", True) else "executable path"
        raise ValueError(f"the health check's command needs 'value' (the {kind})")
    arguments = obj.get("arguments", [])
    if not isinstance(arguments, list) or not all(isinstance(a, str) for a in arguments):
        raise ValueError("the health check's 'command.arguments' must be a list of strings")
    environment = obj.get("environment") or {}
    variables = environment.get("variables", []) if isinstance(environment, dict) else None
    if not isinstance(variables, list) or not all(
            isinstance(v, dict) and isinstance(v.get("name"), str) for v in variables):
        raise ValueError("the health check's 'command.environment.variables' must be a list "
                         "of {name, value}")
    return obj


def parse(obj) -> HealthCheck:
    """A HealthCheck from TaskInfo.health_check JSON; ValueError saying what is wrong (the
    checks of Mesos's `validateHealthCheck`, plus port numbers)."""
    if not isinstance(obj, dict):
        raise ValueError("'health_check' must be an object")
    kind = obj.get("type")
    if kind not in KINDS:
        raise ValueError(f"'type' must be one of {', '.join(KINDS)}, not {kind!r}")
    fields = {"delay": _number(obj, "delay_seconds"),
              "interval": _number(obj, "interval_seconds"),
              "grace_period": _number(obj, "grace_period_seconds")}
    timeout = _number(obj, "timeout_seconds")
    fields["timeout"] = timeout if timeout > 0 else None
    failures = obj.get("consecutive_failures", DEFAULTS["consecutive_failures"])
    if isinstance(failures, bool) or not isinstance(failures, int) or failures < 0:
        raise ValueError(f"'consecutive_failures' must be a whole number >= 0, "
                         f"not {failures!r}")
    fields["consecutive_failures"] = failures
    if kind == "COMMAND":
        return HealthCheck(kind, command=_command(obj.get("command")), **fields)
    if kind == "HTTP":
        http = obj.get("http")
        port = _port(http, "HTTP")
        scheme = http.get("scheme", "http")
        if scheme not in SCHEMES:
            raise ValueError(f"'http.scheme' must be http or https, not {scheme!r}")
        path = http.get("path", "")
        if not isinstance(path, str) or (path and not path.startswith("/")):
            raise ValueError(f"'http.path' must start with '/', not {path!r}")
        return HealthCheck(kind, port=port, path=path or "/", scheme=scheme,
                           ipv6=_ipv6(http), **fields)
    tcp = obj.get("tcp")
    return HealthCheck(kind, port=_port(tcp, "TCP"), ipv6=_ipv6(tcp), **fields)


class Verdict:
    """What a result means: `report` the health to send now (None: nothing new), `kill`
    the task, or `ignored` (inside the grace period)."""

    __slots__ = ("report", "kill", "ignored")

    def __init__(self, report: bool | None = None, kill: bool = False, ignored: bool = False):
        self.report = report
        self.kill = kill
        self.ignored = ignored

    def __eq__(self, other):
        return isinstance(other, Verdict) and \
            (self.report, self.kill, self.ignored) == (other.report, other.kill, other.ignored)

    def __repr__(self) -> str:
        return f"Verdict(report={self.report}, kill={self.kill}, ignored={self.ignored})"


class Health:
    """One task's health checking: when the next check is due, and what each result means.

    The caller wakes at `wake_at()`, starts a check when `due(now)` (and says so with
    `begin()`), and gives its outcome to `result`, which schedules the next one
    `interval` after it (Mesos's `scheduleNext`); `stop()` ends checking (the task is being
    killed or has ended).
    """

    def __init__(self, check: HealthCheck, started: float):
        self.check = check
        self.started = started  # when the task started running
        self.next_at = started + check.delay
        self.running = False  # a check is in flight
        self.stopped = False
        self.healthy: bool | None = None  # as last reported
        self.failures = 0  # counted failures in a row
        self.passed = False  # some check has passed: the grace period no longer applies
        self.last_failure = ""

    def wake_at(self) -> float | None:
        """When the next check is due (None while one runs, or once stopped)."""
        return None if self.stopped or self.running else self.next_at

    def due(self, now: float) -> bool:
        return not self.stopped and not self.running and now >= self.next_at

    def begin(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.stopped = True

    def result(self, ok: bool, message: str, now: float) -> Verdict:
        """Take one check's outcome (ended at `now`) and schedule the next."""
        self.running = False
        if self.stopped:
            return Verdict()  # stopped while the check ran
        self.next_at = now + self.check.interval
        if ok:
            self.passed = True
            self.failures = 0
            report = None if self.healthy is True else True
            self.healthy = True
            return Verdict(report)
        if not self.passed and now - self.started <= self.check.grace_period:
            return Verdict(ignored=True)
        self.failures += 1
        self.last_failure = message
        report = None if self.healthy is False else False
        self.healthy = False
        kill = self.failures >= self.check.consecutive_failures
        if kill:
            self.stop()
        return Verdict(report, kill)

    def kill_message(self, task_id: str) -> str:
        """The TASK_KILLED message after `result` said kill."""
        times = "once" if self.failures == 1 else f"{self.failures} times in a row"
        return (f"Task {task_id} killed: {self.check.name} failed {times}"
                f" (last: {self.last_failure})")
