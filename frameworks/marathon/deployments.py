"""Deployments: turning a new Root into plans, and driving every app toward its target.

    API change ──> Deployments.deploy(target) ── planner.plan_deployment ──> conflict check
        ──> the new root and the plan are stored ──> Run, step by step (events at each step)

The controller: whenever something happens to an app's instances (scheduler.on_change), the
app is marked dirty; once per reactor turn every dirty app is driven by the decision
function that currently owns it and the decision is applied (kill these, schedule that many):

    app in the current step of a running deployment   that action's decision (planner)
    app in a later step of a running deployment       nothing: it waits for its step
    app in no running deployment                      the scale check (keep_decision)

Decisions depend only on the instances, so a deployment resumes after a leader failover by
driving its current step again. Deployments whose apps intersect conflict: 409 unless
`force`, which cancels the older one where it stands.
"""

from __future__ import annotations

import time
import uuid

from twisted.internet import defer
from twisted.logger import Logger

from frameworks.marathon import events, groups, ids, planner
from frameworks.marathon.groups import Root
from frameworks.marathon.planner import RESTART, SCALE, START, STOP, Decision, Plan

log = Logger()


class Locked(Exception):
    """The change touches apps that running deployments are changing (HTTP 409)."""

    def __init__(self, plan_ids: list[str]):
        super().__init__("locked")
        self.plan_ids = plan_ids


class TooMany(Exception):
    """More deployments than --max-running-deployments (HTTP 403)."""


class Run:
    """A deployment being carried out: its plan and where it stands."""

    def __init__(self, plan: Plan, step: int = 0):
        self.plan = plan
        self.step = step  # 1-based once started; 0 before its first step
        self.done: set[str] = set()  # apps whose action in the current step is done
        self.started = False

    def action(self, app_id: str):
        if not self.started or not 0 < self.step <= len(self.plan.steps):
            return None
        for a in self.plan.steps[self.step - 1]:
            if a.app_id == app_id:
                return a
        return None

    def to_record(self) -> dict:
        return {**self.plan.to_record(), "step": self.step}


class Deployments:
    def __init__(self, reactor, state, scheduler, bus, max_running: int = 100):
        self.reactor = reactor
        self.state = state
        self.scheduler = scheduler
        self.bus = bus
        self.max_running = max_running
        self.runs: dict[str, Run] = {}
        self.by_app: dict[str, str] = {}  # app id -> id of the run that affects it
        self._dirty: set[str] = set()
        self._call = None
        self._pause = 0.0  # before the next pass of the controller (see _drive_dirty)
        scheduler.on_change = self.touch
        self.completed = 0

    def now(self) -> float:
        return self.reactor.seconds()

    # -- starting -------------------------------------------------------------------------

    def resume(self) -> None:
        """Carry on with the deployments the store holds (after a restart or failover)."""
        for record in sorted(self.state.store.data["deployments"].values(),
                             key=lambda r: r["version"]):
            try:
                plan = Plan.from_record(record)
            except (KeyError, TypeError, ValueError) as e:
                log.warn("Dropping a stored deployment we cannot read: {e}", e=e)
                continue
            run = Run(plan, max(1, record.get("step", 1)))
            self._register(run)
            self._start_step(run, run.step, announce=True)
        for app_id in list(self.state.root.apps) + list(self.state.by_app):
            self.touch(app_id)

    def plan(self, target: Root, *, restart=(), to_kill=None) -> Plan:
        """The plan from the current root to `target` (versions set, checked)."""
        now = self.now()
        version = ids.next_version(now, self.state.root.version)
        target = groups.versioned(self.state.root, target, version, restart)
        groups.check(target)
        apps = set(target.apps) | set(self.state.root.apps)
        return planner.plan_deployment(self.state.root, target,
                                       {a: self.state.of_app(a) for a in apps}, now,
                                       plan_id=str(uuid.uuid4()), to_kill=to_kill)

    def deploy(self, target: Root, *, force: bool = False, restart=(), to_kill=None,
               group_id: str = ids.ROOT) -> defer.Deferred:
        """Make `target` the root and start its plan; a Deferred of the Plan, fired once
        both are stored. Raises Locked, TooMany, validation.Invalid."""
        plan = self.plan(target, restart=restart, to_kill=to_kill)
        return self.start(plan, force=force, group_id=group_id)

    def start(self, plan: Plan, *, force: bool = False,
              group_id: str = ids.ROOT) -> defer.Deferred:
        conflicts = sorted({self.by_app[a] for a in plan.affected if a in self.by_app})
        if conflicts and not force:
            raise Locked(conflicts)
        if len(self.runs) - len(conflicts) >= self.max_running:
            raise TooMany(f"{len(self.runs)} deployments are running; at most "
                          f"{self.max_running} may (--max-running-deployments)")
        for plan_id in conflicts:
            self.cancel(plan_id)
        run = Run(plan)
        self._register(run)  # locks its apps at once, so the scale check leaves them alone
        writes = [self.state.set_root(plan.target),
                  self.state.store.put("deployments", plan.id, run.to_record())]
        now = self.now()
        self.bus.publish("group_change_success",
                         lambda: events.group_change_success(now, group_id, plan.version))

        def stored(_):
            if plan.id in self.runs:
                self._start_step(run, 1, announce=True)
            return plan

        return defer.gatherResults(writes, consumeErrors=True).addCallback(stored)

    def _register(self, run: Run) -> None:
        self.runs[run.plan.id] = run
        for a in run.plan.affected:
            self.by_app[a] = run.plan.id

    def _unregister(self, run: Run) -> None:
        self.runs.pop(run.plan.id, None)
        for a in run.plan.affected:
            if self.by_app.get(a) == run.plan.id:
                del self.by_app[a]
        self.state.store.delete("deployments", run.plan.id)

    def cancel(self, plan_id: str) -> bool:
        """Stop a deployment where it stands (its apps go back to the scale check)."""
        run = self.runs.get(plan_id)
        if run is None:
            return False
        self._unregister(run)
        for a in run.plan.affected:
            self.touch(a)
        return True

    def rollback(self, plan_id: str) -> defer.Deferred:
        """Undo a running deployment with a new, forced one (DELETE /v2/deployments/{id})."""
        run = self.runs[plan_id]
        target = planner.revert(run.plan, self.state.root)
        return self.deploy(target, force=True)

    # -- stepping -------------------------------------------------------------------------

    def _start_step(self, run: Run, step: int, announce: bool) -> None:
        run.step, run.started, run.done = step, True, set()
        plan, now = run.plan, self.now()
        if step > len(plan.steps):
            self._finish(run)
            return
        self.state.store.put("deployments", plan.id, run.to_record())
        if announce:
            self.bus.publish("deployment_info", lambda: events.deployment_info(now, plan, step))
        for action in plan.steps[step - 1]:
            app = self.state.app(action.app_id)
            if action.kind == RESTART:
                self.state.delays.pop(action.app_id, None)  # a restart begins afresh
            if action.kind in (SCALE, RESTART) and app is not None:
                for check in app.get("healthChecks") or ():
                    self.bus.publish("add_health_check_event",
                                     lambda c=check, a=app: events.add_health_check(now, a, c))
            self.touch(action.app_id)

    def _step_done(self, run: Run) -> None:
        plan, step, now = run.plan, run.step, self.now()
        self.bus.publish("deployment_step_success",
                         lambda: events.deployment_step(now, plan, step, True))
        self._start_step(run, step + 1, announce=True)

    def _finish(self, run: Run) -> None:
        plan, now = run.plan, self.now()
        self._unregister(run)
        self.completed += 1
        log.info("Deployment {id} done", id=plan.id)
        self.bus.publish("deployment_success", lambda: events.deployment_success(now, plan))
        for a in plan.affected:
            self.touch(a)

    # -- the controller -------------------------------------------------------------------

    def touch(self, app_id: str) -> None:
        self._dirty.add(app_id)
        if self._call is None:
            self._call = self.reactor.callLater(self._pause, self._drive_dirty)

    def _drive_dirty(self) -> None:
        self._call = None
        started = time.perf_counter()
        while self._dirty:
            app_id = self._dirty.pop()
            try:
                self._drive(app_id)
            except Exception:
                log.failure("Driving {app} failed", app=app_id)
        # A pass costs about as much as the apps' instances; when it is slow (big apps),
        # let changes pile up for a while before the next one, so that updates are not
        # waiting behind passes that each look at a single change.
        took = time.perf_counter() - started
        self._pause = min(0.1, 5 * took) if took > 0.002 else 0.0

    def _drive(self, app_id: str) -> None:
        app = self.state.app(app_id)
        instances = self.state.of_app(app_id)
        run_id = self.by_app.get(app_id)
        run = self.runs.get(run_id) if run_id else None
        action = run.action(app_id) if run is not None else None
        if run is not None and action is None:
            return  # its step has not come yet
        if action is None:
            if app is None:
                if not instances:
                    return
                decision = planner.stop_decision(instances)  # orphans of a gone app
            else:
                decision = planner.keep_decision(app, instances)
        elif action.kind == START:
            decision = Decision(done=True)
        elif action.kind == STOP or app is None:
            decision = planner.stop_decision(instances)
        elif action.kind == SCALE:
            decision = planner.scale_decision(app, instances, action.sentenced)
        else:
            decision = planner.restart_decision(app, instances)
        self._apply(app, decision)
        if action is not None and decision.done and app_id not in run.done:
            self._action_done(run, action)

    def _apply(self, app: dict | None, decision: Decision) -> None:
        for instance_id in decision.kill:
            i = self.state.instances.get(instance_id)
            if i is not None:
                self.scheduler.decommission(i)
        if decision.launch and app is not None:
            self.scheduler.schedule(app, decision.launch)

    def _action_done(self, run: Run, action) -> None:
        run.done.add(action.app_id)
        if action.kind == STOP:
            self._stopped(action.app_id, run.plan.original.apps.get(action.app_id) or {})
        step = run.plan.steps[run.step - 1]
        if all(a.app_id in run.done for a in step):
            self._step_done(run)

    def _stopped(self, app_id: str, old: dict) -> None:
        now = self.now()
        for check in old.get("healthChecks") or ():
            self.bus.publish("remove_health_check_event",
                             lambda c=check: events.remove_health_check(now, app_id, c))
        self.state.delays.pop(app_id, None)
        self.state.forget_failure(app_id)
        self.scheduler.stats.pop(app_id, None)
        if app_id not in self.state.root.apps:
            self.state.forget_versions(app_id)
        self.bus.publish("app_terminated_event", lambda: events.app_terminated(now, app_id))

    # -- reading --------------------------------------------------------------------------

    def of_app(self, app_id: str) -> list[str]:
        run_id = self.by_app.get(app_id)
        return [run_id] if run_id else []

    def readiness(self, run: Run) -> dict:
        """readinessCheckResults of the run's current actions, by app id."""
        out = {}
        for a in run.plan.steps[run.step - 1] if 0 < run.step <= len(run.plan.steps) else ():
            out[a.app_id] = [r for i in self.state.of_app(a.app_id)
                             if (r := self.state.readiness.get(i.id)) is not None]
        return out

    def in_readiness(self, app_id: str) -> bool:
        """Whether the app's new instances are being checked for readiness now."""
        run_id = self.by_app.get(app_id)
        run = self.runs.get(run_id) if run_id else None
        action = run.action(app_id) if run else None
        return action is not None and action.kind in (SCALE, RESTART)

