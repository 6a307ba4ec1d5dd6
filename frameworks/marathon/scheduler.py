"""The Mesos side of Marathon: offers in, launches and kills out, status updates in.

    master ──pymesos (driver.Driver)──> Scheduler.on_offers ── constraints.place per app ──>
        instances Provisioned, stored ──> ACCEPT(LAUNCH)          (declined: refuse 120 s)
    master ──> on_status ── instance condition, stored ──> ACKNOWLEDGE
                   └─ terminal and still wanted: rescheduled (after the backoff)
    housekeeping (every second): unreachable -> inactive -> expunged, overdue launches,
        unconfirmed kills re-sent, backoff expiry; scale check and reconciliation periodically

Launch queue: an instance in condition Scheduled waits for an offer; its app's launch delay
(backoff.py) holds it back. Offers are suppressed when nothing waits and revived (at most
every `min_revive_interval`) when something does. Whatever changes an app's instances tells
`on_change(app_id)`, which the deployment controller (deployments.py) listens to.
"""

from __future__ import annotations

import random
import uuid

import attrs
from twisted.internet import defer, task
from twisted.logger import Logger

from frameworks.marathon import backoff, constraints, events, ids, taskinfo
from frameworks.marathon import instances as inst
from frameworks.marathon import views
from frameworks.marathon.instances import Instance
from frameworks.marathon.state import State

log = Logger()


@attrs.define
class Options:
    """Scheduler settings (the `agora marathon` flags), with Marathon's defaults."""

    framework_name: str = "marathon"
    user: str = "root"
    role: str = "*"
    failover_timeout: float = 604800.0
    max_instances_per_offer: int = 5
    decline_offer_duration: float = 120.0
    min_revive_interval: float = 5.0
    task_launch_timeout: float = 300.0
    task_launch_confirm_timeout: float = 300.0
    kill_retry_timeout: float = 30.0
    reconciliation_initial_delay: float = 15.0
    reconciliation_interval: float = 600.0
    scale_apps_interval: float = 300.0
    housekeeping_interval: float = 1.0
    hostname: str = "localhost"
    webui_url: str = ""
    principal: str = ""  # authenticates to the master (with `secret`) and goes in FrameworkInfo
    secret: str = attrs.field(default="", repr=False)


class Scheduler:
    def __init__(self, reactor, state: State, bus, options: Options, master: str,
                 driver_factory=None, rng=None):
        self.reactor = reactor
        self.state = state
        self.bus = bus
        self.options = options
        self.master = master
        self.driver_factory = driver_factory
        self.rng = rng or random.Random()
        self.driver = None
        self.on_change = lambda app_id: None  # set by the deployment controller
        self.on_fatal = lambda why: None  # set by the service: it ends the process
        self.connected = False
        self.master_info: dict = {}
        self.stats: dict[str, constraints.PlacementStats] = {}
        self.waiting_since: dict[str, float] = {}  # app id -> first time an instance waited
        self.suppressed = False
        self._last_revive = -1e9
        self._revive_call = None
        self._timer = None
        self._last_scale_check = 0.0
        self._last_reconcile = None
        self._requests: dict[tuple[str, str], constraints.Request] = {}
        self.launched = 0
        self.updates = 0

    # -- lifecycle ------------------------------------------------------------------------

    def framework_info(self) -> dict:
        o = self.options
        info = {"user": o.user, "name": o.framework_name, "failover_timeout": o.failover_timeout,
                "checkpoint": True, "role": o.role, "hostname": o.hostname,
                "capabilities": [{"type": "PARTITION_AWARE"}]}
        if o.webui_url:
            info["webui_url"] = o.webui_url
        if o.principal:
            info["principal"] = o.principal
        if self.state.framework_id:
            info["id"] = {"value": self.state.framework_id}
        return info

    def start(self) -> None:
        if self.driver_factory is None:
            from frameworks.marathon.driver import Driver
            self.driver_factory = Driver
        o = self.options
        credentials = {"principal": o.principal, "secret": o.secret} if o.principal else {}
        self.driver = self.driver_factory(self.reactor, self, self.master, self.framework_info(),
                                          **credentials)
        self.driver.start()
        self._timer = task.LoopingCall(self.housekeeping)
        self._timer.clock = self.reactor
        self._timer.start(self.options.housekeeping_interval, now=False)

    def stop(self) -> None:
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        if self._revive_call is not None and self._revive_call.active():
            self._revive_call.cancel()
        if self.driver is not None:
            return self.driver.stop()
        return None

    def now(self) -> float:
        return self.reactor.seconds()

    # -- driver callbacks (reactor thread) -------------------------------------------------

    def on_registered(self, framework_id: str, master_info: dict) -> None:
        log.info("Registered with the master as framework {fid}", fid=framework_id)
        self.connected, self.master_info = True, master_info
        if self.state.framework_id != framework_id:
            self.state.set_framework_id(framework_id)
        now, master = self.now(), self._master_address()
        self.bus.publish("scheduler_registered_event",
                         lambda: events.scheduler_registered(now, framework_id, master))
        self._resume(now)

    def on_reregistered(self, master_info: dict) -> None:
        log.info("Re-registered with the master")
        self.connected, self.master_info = True, master_info
        now, master = self.now(), self._master_address()
        self.bus.publish("scheduler_reregistered_event",
                         lambda: events.scheduler_reregistered(now, master))
        self._resume(now)

    def _master_address(self) -> str:
        return f"{self.master_info.get('hostname')}:{self.master_info.get('port')}"

    def _resume(self, now: float) -> None:
        """(Re)registered: offers flow again; ask what became of every task."""
        self.suppressed = False
        self.reconcile()
        self._last_reconcile = now
        self.wake()

    def on_disconnected(self) -> None:
        if self.connected:
            log.warn("Disconnected from the master; pymesos reconnects")
        self.connected = False
        now = self.now()
        self.bus.publish("scheduler_disconnected_event",
                         lambda: events.scheduler_disconnected(now))

    def on_error(self, message: str) -> None:
        log.error("The master reported an error: {message}", message=message)

    def on_rescinded(self, offer_id: str) -> None:
        pass  # offers are answered at once, never held

    def on_message(self, executor_id, agent_id, data) -> None:
        now = self.now()
        self.bus.publish("framework_message_event", lambda: {
            "eventType": "framework_message_event", "timestamp": ids.format_timestamp(now),
            "slaveId": agent_id, "executorId": executor_id,
            "message": list(_b64decode(data))})

    def on_agent_lost(self, agent_id) -> None:
        log.info("Agent {agent} lost", agent=agent_id)

    def on_executor_lost(self, executor_id, agent_id) -> None:
        pass

    # -- offers ---------------------------------------------------------------------------

    def _request(self, app: dict) -> constraints.Request:
        key = (app["id"], app.get("version", ""))
        request = self._requests.get(key)
        if request is None:
            if len(self._requests) > 10000:
                self._requests.clear()
            request = self._requests[key] = constraints.Request.of_app(app)
        return request

    def launchable(self, now: float) -> dict[str, list[Instance]]:
        """Scheduled instances by app, apps in backoff left out."""
        out = {}
        for app_id, instances in self.state.by_app.items():
            app = self.state.app(app_id)
            if app is None:
                continue
            queue = [i for i in instances.values()
                     if i.condition == inst.SCHEDULED and i.goal == inst.RUNNING]
            if not queue:
                self.waiting_since.pop(app_id, None)
                continue
            self.waiting_since.setdefault(app_id, now)
            delay = self.state.delays.get(app_id)
            if delay is not None and delay.waiting(now):
                continue
            out[app_id] = queue
        return out

    def on_offers(self, offers: list) -> None:
        now = self.now()
        waiting = self.launchable(now)
        launches, declines = [], []
        placed_by_app: dict[str, constraints.Placed] = {}
        order = sorted(waiting)
        self.rng.shuffle(order)  # no app is always first in line
        max_per_offer = self.options.max_instances_per_offer
        for offer in offers:
            try:
                o = constraints.Offer.from_mesos(offer)
            except (KeyError, ValueError) as e:
                log.warn("Declining an offer we cannot read: {e}", e=e)
                declines.append(((offer.get("id") or {}) if isinstance(offer, dict) else {})
                                .get("value"))
                continue
            pool = constraints.Pool(o.resources)
            tasks, used_by = [], set()
            for app_id in order:
                queue = waiting.get(app_id)
                if not queue or len(tasks) >= max_per_offer:
                    continue
                app = self.state.app(app_id)
                request = self._request(app)
                placed = placed_by_app.get(app_id)
                if placed is None:
                    placed = placed_by_app[app_id] = constraints.Placed(
                        request.constraints, (i.attributes for i in self.state.of_app(app_id)
                                              if i.placed)) if request.constraints else \
                        constraints.Placed((), ())
                stats = self.stats.setdefault(app_id, constraints.PlacementStats())
                placed_here = 0
                while queue and len(tasks) < max_per_offer:
                    result = constraints.place(request, o, pool, placed, self.rng)
                    if isinstance(result, constraints.Rejection):
                        if not placed_here:
                            stats.rejected(result, o, now)
                        break
                    i = queue.pop()
                    tasks.append(self._provision(i, app, o, result, now))
                    placed.add(o.fields)
                    placed_here += 1
                if placed_here:
                    stats.used(now)
                    used_by.add(app_id)
            if tasks:
                launches.append((o.id, tasks, used_by))
            else:
                declines.append(o.id)
        if declines:
            self._call("declineOffer", [{"value": d} for d in declines if d],
                       {"refuse_seconds": self.options.decline_offer_duration})
        if launches:
            self.state.store.flush().addCallback(lambda _: self._accept(launches))
            for _, _, apps in launches:
                for app_id in apps:
                    self.on_change(app_id)
        if not any(waiting.values()) and not self._anything_waiting():
            self.suppress()

    def _provision(self, i: Instance, app: dict, o: constraints.Offer, placement, now: float) -> dict:
        i.incarnation += 1
        i.task_id = ids.task_id(i.id, i.incarnation)
        i.config_version = app.get("versionInfo", {}).get("lastConfigChangeAt") or app["version"]
        i.app_version = app["version"]
        i.agent_id, i.host, i.agent_ip = o.agent_id, o.hostname, o.ip
        i.attributes = dict(o.fields)
        i.ports = list(placement.ports)
        i.condition, i.since, i.staged_at = inst.PROVISIONED, now, now
        i.healthy, i.ready, i.started_at = None, False, None
        self.state.save(i)
        self.launched += 1
        return taskinfo.task_info(app, i.task_id, o.agent_id, o.hostname, placement.resources,
                                  i.ports)

    def _accept(self, launches: list) -> None:
        for offer_id, tasks, _ in launches:
            ops = [{"type": "LAUNCH", "launch": {"task_infos": tasks}}]
            ids_ = [t["task_id"]["value"] for t in tasks]
            self._call("acceptOffers", [{"value": offer_id}], ops, {"refuse_seconds": 0},
                       on_error=lambda e, ids_=ids_: self._launch_failed(ids_, e))

    def _launch_failed(self, task_ids: list, error) -> None:
        """An ACCEPT that did not reach the master: its instances wait for offers again."""
        now = self.now()
        for tid in task_ids:
            i = self.state.by_task.get(tid)
            if i is not None and i.condition == inst.PROVISIONED:
                self.state.forget_task(tid)
                i.reschedule(i.config_version, i.app_version, now)
                self.state.save(i)
                self.on_change(i.app_id)
        self.wake()

    def _call(self, method: str, *args, on_error=None) -> None:
        if self.driver is not None:
            self.driver.call(method, *args, on_error=on_error)

    def _anything_waiting(self) -> bool:
        return any(i.condition == inst.SCHEDULED and i.goal == inst.RUNNING
                   for i in self.state.instances.values())

    def suppress(self) -> None:
        if not self.suppressed:
            self.suppressed = True
            self._call("suppressOffers")

    def wake(self) -> None:
        """Something waits for offers: revive them (at most every min_revive_interval)."""
        if self._revive_call is not None and self._revive_call.active():
            return
        wait = self._last_revive + self.options.min_revive_interval - self.now()
        if wait > 0:
            self._revive_call = self.reactor.callLater(wait, self._revive)
        else:
            self._revive()

    def _revive(self) -> None:
        self._revive_call = None
        if not self._anything_waiting():
            return
        self._last_revive = self.now()
        self.suppressed = False
        self._call("reviveOffers")

    # -- status updates -------------------------------------------------------------------

    def on_status(self, status: dict) -> None:
        self.updates += 1
        now = self.now()
        task_id = (status.get("task_id") or {}).get("value")
        state = status.get("state", "")
        i = self.state.by_task.get(task_id)
        if i is None or i.task_id != task_id:
            self._unknown_task(status, task_id, state, now)
            return
        condition = inst.condition_of(state, status.get("reason"))
        message = status.get("message") or ""
        previous = i.condition
        if condition == inst.UNREACHABLE and previous == inst.UNREACHABLE_INACTIVE:
            condition = previous
        i.message = message
        if "healthy" in status and condition == inst.RUNNING_C:
            self._mesos_health(i, bool(status["healthy"]), now)
        if condition != previous:
            i.condition, i.since = condition, now
        if condition in (inst.STAGING, inst.STARTING) and i.staged_at is None:
            i.staged_at = now
        if condition == inst.RUNNING_C:
            if i.started_at is None:
                i.started_at = now
            i.unreachable_since = None
            delay = self.state.delays.get(i.app_id)
            if delay is not None:
                self.state.delays[i.app_id] = backoff.advanced(delay, now)
        if condition == inst.UNREACHABLE and i.unreachable_since is None:
            i.unreachable_since = now
        app = self.state.app(i.app_id)
        self.bus.publish("status_update_event",
                         lambda: events.status_update(now, i, state, message))
        self.bus.publish("instance_changed_event", lambda: events.instance_changed(now, i))
        if i.terminal:
            d = self._terminal(i, app, state, message, now)
        else:
            if condition == inst.UNREACHABLE:
                self._unreachable(i, app, now)
            d = self.state.save(i) if i.id in self.state.instances else defer.succeed(None)
        self._acknowledge(status, d)
        self.on_change(i.app_id)

    def _acknowledge(self, status: dict, stored: defer.Deferred) -> None:
        if status.get("uuid"):
            stored.addBoth(lambda _: self._call("acknowledgeStatusUpdate", status))

    def _unknown_task(self, status: dict, task_id, state: str, now: float) -> None:
        if task_id and not inst.is_terminal(inst.condition_of(state, status.get("reason"))) \
                and state != "TASK_UNKNOWN":
            log.info("Killing task {task} that no instance owns", task=task_id)
            self._call("killTask", {"value": task_id})
        elif task_id:
            try:
                app_id, instance_id = ids.parse_task_id(task_id)
            except ids.InvalidId:
                app_id, instance_id = "", task_id
            condition = inst.condition_of(state, status.get("reason"))
            self.bus.publish("unknown_instance_terminated_event",
                             lambda: events.unknown_instance_terminated(now, instance_id,
                                                                        app_id, condition))
        self._acknowledge(status, defer.succeed(None))

    def _terminal(self, i: Instance, app: dict | None, state: str, message: str,
                  now: float) -> defer.Deferred:
        if i.condition in inst.FAILURES and app is not None:
            self.state.set_failure(i.app_id, views.task_failure(i.app_id, i, state, message, now))
        if i.condition in inst.BACKOFF and app is not None and i.goal == inst.RUNNING:
            version = app.get("versionInfo", {}).get("lastConfigChangeAt") or app["version"]
            delay = backoff.failed(self.state.delays.get(i.app_id), app, version, now)
            self.state.delays[i.app_id] = delay
            self.reactor.callLater(delay.seconds, self.wake)  # offers again once it is over
        self.state.health.pop(i.id, None)
        self.state.forget_task(i.task_id)
        if i.goal == inst.RUNNING and app is not None:
            i.reschedule(app.get("versionInfo", {}).get("lastConfigChangeAt") or app["version"],
                         app["version"], now)
            d = self.state.save(i)
            self.wake()
            return d
        return self.state.expunge(i)

    def _mesos_health(self, i: Instance, healthy: bool, now: float) -> None:
        if i.healthy is not healthy:
            i.healthy = healthy
            self.bus.publish("health_status_changed_event",
                             lambda: events.health_status_changed(now, i, healthy))
            self.bus.publish("instance_health_changed_event",
                             lambda: events.instance_health_changed(now, i))

    # -- unreachable ----------------------------------------------------------------------

    def _unreachable(self, i: Instance, app: dict | None, now: float) -> None:
        strategy = (app or {}).get("unreachableStrategy", {})
        if strategy == "disabled" or i.unreachable_since is None:
            return
        since = now - i.unreachable_since
        if since >= strategy.get("expungeAfterSeconds", 0):
            log.info("Expunging unreachable instance {i}", i=i.id)
            i.goal = inst.DECOMMISSIONED
            if i.task_id:
                self._call("killTask", {"value": i.task_id})
            self.state.expunge(i)
        elif since >= strategy.get("inactiveAfterSeconds", 0) and \
                i.condition != inst.UNREACHABLE_INACTIVE:
            i.condition, i.since = inst.UNREACHABLE_INACTIVE, now

    # -- what the controller asks for -----------------------------------------------------

    def schedule(self, app: dict, count: int) -> None:
        """Add `count` new instances of `app`, waiting for offers."""
        if count <= 0:
            return
        now = self.now()
        version = app.get("versionInfo", {}).get("lastConfigChangeAt") or app["version"]
        for _ in range(count):
            i = Instance(ids.instance_id(app["id"], str(uuid.uuid4())), app["id"], version,
                         app["version"], since=now)
            self.state.add(i)
        self.wake()

    def decommission(self, i: Instance) -> None:
        """Kill an instance for good (it is expunged once its task is terminal)."""
        i.goal = inst.DECOMMISSIONED
        if not i.launched:
            self.state.expunge(i)
            return
        self.state.save(i)
        self.kill_task(i)

    def kill_task(self, i: Instance) -> None:
        """Kill the instance's current task; a wanted instance is then rescheduled."""
        if i.task_id is None:
            return
        i.kill_sent_at = self.now()
        if i.condition not in (inst.UNREACHABLE, inst.UNREACHABLE_INACTIVE):
            self._call("killTask", {"value": i.task_id})

    def reset_delay(self, app_id: str) -> bool:
        had = self.state.delays.pop(app_id, None) is not None
        self.wake()
        return had

    # -- housekeeping ---------------------------------------------------------------------

    def reconcile(self) -> None:
        """Ask the master for every task we know (explicit), then for all (implicit)."""
        known = [{"task_id": {"value": i.task_id}} for i in self.state.instances.values()
                 if i.task_id is not None and i.condition != inst.SCHEDULED]
        if known:
            self._call("reconcileTasks", known)
        self._call("reconcileTasks", [])

    def housekeeping(self) -> None:
        if self.driver.gave_up():
            self.on_fatal("the scheduler driver stopped: the master refused Marathon's "
                          "framework (its answer is logged above). A master that "
                          "authenticates frameworks needs --mesos-authentication-principal "
                          "and --mesos-authentication-secret-file")
            return
        now = self.now()
        o = self.options
        changed = set()
        for i in list(self.state.instances.values()):
            app = self.state.app(i.app_id)
            if i.condition in (inst.UNREACHABLE, inst.UNREACHABLE_INACTIVE):
                before = i.condition
                self._unreachable(i, app, now)
                if i.condition != before or i.id not in self.state.instances:
                    if i.id in self.state.instances:
                        self.state.save(i)
                    changed.add(i.app_id)
            elif i.condition == inst.PROVISIONED and \
                    now - i.since > o.task_launch_confirm_timeout:
                log.warn("Task {task} was never confirmed; killing it", task=i.task_id)
                self._call("killTask", {"value": i.task_id})
                self.state.forget_task(i.task_id)
                if i.goal == inst.RUNNING and app is not None:
                    i.reschedule(i.config_version, app["version"], now)
                    self.state.save(i)
                else:
                    self.state.expunge(i)
                changed.add(i.app_id)
            elif i.condition in (inst.STAGING, inst.STARTING) and i.staged_at is not None and \
                    now - i.staged_at > o.task_launch_timeout and i.kill_sent_at is None:
                log.warn("Task {task} did not start in time; killing it", task=i.task_id)
                self.kill_task(i)
            if i.goal != inst.RUNNING and i.kill_sent_at is not None and \
                    now - i.kill_sent_at > o.kill_retry_timeout and i.launched:
                self.kill_task(i)
        for app_id, delay in list(self.state.delays.items()):
            app = self.state.app(app_id)
            version = (app or {}).get("versionInfo", {}).get("lastConfigChangeAt")
            if backoff.expired(delay, app, version, now):
                del self.state.delays[app_id]
        if self.suppressed and self._anything_waiting():
            self.wake()
        if now - self._last_scale_check >= o.scale_apps_interval:
            self._last_scale_check = now
            changed.update(self.state.root.apps)
        if self.connected and self._last_reconcile is not None and \
                now - self._last_reconcile >= o.reconciliation_interval:
            self._last_reconcile = now
            self.reconcile()
        for app_id in changed:
            self.on_change(app_id)


def _b64decode(data) -> bytes:
    import base64
    try:
        return base64.b64decode(data)
    except Exception:
        return b""
