"""Health checks: what each app asks for, and what one result means for an instance.

Marathon runs HTTP, HTTPS and TCP checks itself (health_checks.py does the I/O); COMMAND,
MESOS_HTTP, MESOS_HTTPS and MESOS_TCP checks go into the TaskInfo's `health_check` for the
executor to run (`mesos_health_check`), which reports back in TaskStatus.healthy. The rules
(specs/marathon-api.md §2.4):

- a failure is ignored while the instance has never passed and is within
  gracePeriodSeconds of starting to run;
- `maxConsecutiveFailures` failures in a row (when > 0) kill the instance;
- an instance is healthy when every check's last result is alive.

Pure: time is an argument.
"""

from __future__ import annotations

import attrs

from frameworks.marathon.validation import MARATHON_CHECKS, MESOS_CHECKS


@attrs.frozen
class Check:
    """One of an app's health checks (its canonical JSON, with its position)."""

    index: int
    protocol: str
    path: str = "/"
    port_index: int | None = None
    port: int | None = None
    grace: float = 300.0
    interval: float = 60.0
    timeout: float = 20.0
    max_failures: int = 3
    delay: float = 15.0
    ignore_1xx: bool = False
    command: str | None = None

    @property
    def by_marathon(self) -> bool:
        """Run by Marathon (HTTP, HTTPS, TCP) rather than by the executor."""
        return self.protocol in MARATHON_CHECKS

    def target_port(self, host_ports: list) -> int | None:
        """The port to probe: `port`, else the instance's host port at `portIndex`."""
        if self.port:
            return self.port
        if self.port_index is not None and self.port_index < len(host_ports):
            return host_ports[self.port_index]
        return None


def checks_of(app: dict) -> list[Check]:
    out = []
    for i, hc in enumerate(app.get("healthChecks") or ()):
        out.append(Check(i, hc["protocol"], hc.get("path", "/"), hc.get("portIndex"),
                         hc.get("port"), hc.get("gracePeriodSeconds", 300),
                         hc.get("intervalSeconds", 60), hc.get("timeoutSeconds", 20),
                         hc.get("maxConsecutiveFailures", 3), hc.get("delaySeconds", 15),
                         bool(hc.get("ignoreHttp1xx")), (hc.get("command") or {}).get("value")))
    return out


@attrs.define
class Health:
    """The results of one check for one instance."""

    alive: bool | None = None
    consecutive_failures: int = 0
    first_success: float | None = None
    last_success: float | None = None
    last_failure: float | None = None
    last_failure_cause: str | None = None


@attrs.frozen
class Outcome:
    """What one result means: a failure to report, a change of `alive`, a kill."""

    failed: bool = False
    changed: bool = False
    kill: bool = False


def record(health: Health, check: Check, ok: bool, cause: str | None, now: float,
           running_since: float | None) -> Outcome:
    """Take one result into `health` (in place) and say what follows from it."""
    if ok:
        changed = health.alive is not True
        health.alive = True
        health.consecutive_failures = 0
        health.last_success = now
        if health.first_success is None:
            health.first_success = now
        return Outcome(changed=changed)
    if health.first_success is None and running_since is not None and \
            now < running_since + check.grace:
        return Outcome()  # still in its grace period
    changed = health.alive is not False
    health.alive = False
    health.consecutive_failures += 1
    health.last_failure = now
    health.last_failure_cause = cause
    kill = check.max_failures > 0 and health.consecutive_failures >= check.max_failures
    return Outcome(failed=True, changed=changed, kill=kill)


def http_ok(status: int, check: Check) -> bool | None:
    """An HTTP(S) status as a check result: 200-399 pass; 1xx is no result with ignoreHttp1xx."""
    if 100 <= status < 200 and check.ignore_1xx:
        return None
    return 200 <= status < 400


def healthy(results: list[Health]) -> bool | None:
    """An instance's health from its checks: False if any failed last, True if all passed,
    None while some have no result yet."""
    if any(h.alive is False for h in results):
        return False
    if results and all(h.alive is True for h in results):
        return True
    return None


def result_json(health: Health, instance_id: str, task_id: str | None, fmt) -> dict:
    """A `healthCheckResults` entry (`fmt` formats timestamps)."""
    out = {"alive": bool(health.alive), "consecutiveFailures": health.consecutive_failures,
           "firstSuccess": fmt(health.first_success) if health.first_success else None,
           "lastFailure": fmt(health.last_failure) if health.last_failure else None,
           "lastSuccess": fmt(health.last_success) if health.last_success else None,
           "lastFailureCause": health.last_failure_cause, "instanceId": instance_id}
    if task_id:
        out["taskId"] = task_id
    return out


#: consecutive_failures for "never kill" (a uint32 in Mesos's proto).
NEVER = 2**31 - 1


def mesos_health_check(check: Check, host_ports: list) -> dict | None:
    """The TaskInfo `health_check` (Mesos HealthCheck JSON) for a check the executor runs;
    None for checks Marathon runs itself."""
    if check.by_marathon:
        return None
    out = {"delay_seconds": float(check.delay), "interval_seconds": float(check.interval),
           "timeout_seconds": float(check.timeout),
           # Marathon's 0 is "never kill"; Mesos wants >= 1: as good as never.
           "consecutive_failures": check.max_failures if check.max_failures > 0 else NEVER,
           "grace_period_seconds": float(check.grace)}
    if check.protocol == "COMMAND":
        out.update(type="COMMAND", command={"value": check.command or "", "shell": True})
    elif check.protocol in ("MESOS_HTTP", "MESOS_HTTPS"):
        out.update(type="HTTP", http={"port": check.target_port(host_ports) or 0,
                                      "path": check.path,
                                      "scheme": "https" if check.protocol == "MESOS_HTTPS"
                                      else "http"})
    elif check.protocol in MESOS_CHECKS:
        out.update(type="TCP", tcp={"port": check.target_port(host_ports) or 0})
    return out
