"""Deployment planning: from one Root to another, and what each step should do right now.

`plan_deployment(original, target, instances, now)` returns a `Plan`: steps that run one
after the other, each a set of actions that run side by side (specs/marathon-api.md §3.1):

    step 1  StopApplication   for apps that are gone (dependents before what they depend on)
    step 2  StartApplication  for new apps (a no-op kept for compatibility)
    step 3+ Scale/Restart     for new and changed apps, in layers of the dependency graph:
                              what others depend on comes first

An action is carried out by asking, whenever something changes, what to do *now*: the
decision functions take the app, its instances and the time and return a `Decision` (which
instances to kill, how many to launch, whether the action is done). They hold no state of
their own, so an action resumes after a leader failover from the instances alone. The rolling
restart keeps to the app's upgradeStrategy (§3.3):

    N          = instances wanted
    minHealthy = ceil(N * minimumHealthCapacity)   never killed below this many healthy
    maxCap     = floor(N * (1 + maximumOverCapacity)), +1 when it equals minHealthy
                 never more than this many instances alive (old, new and dying)

Pure: no I/O. tests/test_marathon_planner.py checks both bounds with hypothesis.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import attrs

from frameworks.marathon import groups as groups_mod
from frameworks.marathon import instances as inst
from frameworks.marathon.groups import Root

START, SCALE, RESTART, STOP = ("StartApplication", "ScaleApplication", "RestartApplication",
                               "StopApplication")
_EPS = 1e-9


@attrs.frozen
class Action:
    """One thing a step does to one app."""

    kind: str
    app_id: str
    scale_to: int | None = None  # ScaleApplication: the instance count
    sentenced: tuple[str, ...] = ()  # ScaleApplication: instances to kill first


@attrs.frozen
class Plan:
    """A deployment: original -> target in steps of actions."""

    id: str
    version: str
    original: Root
    target: Root
    steps: tuple[tuple[Action, ...], ...]

    @property
    def affected(self) -> frozenset[str]:
        """The app ids the plan touches (deployments conflict when these intersect)."""
        return frozenset(a.app_id for step in self.steps for a in step)

    def to_record(self) -> dict:
        """What is stored: the steps, and the original and target of the affected apps only
        (never the whole tree: ZooKeeper nodes are small, §6 item 8)."""
        affected = self.affected
        return {
            "id": self.id, "version": self.version,
            "steps": [[attrs.asdict(a) for a in step] for step in self.steps],
            "original": {a: app for a, app in self.original.apps.items() if a in affected},
            "target": {a: app for a, app in self.target.apps.items() if a in affected},
        }

    @classmethod
    def from_record(cls, record: dict) -> Plan:
        steps = tuple(tuple(Action(**{**a, "sentenced": tuple(a.get("sentenced") or ())})
                            for a in step) for step in record["steps"])
        original = Root().with_apps(record.get("original", {}).values())
        target = Root().with_apps(record.get("target", {}).values())
        return cls(record["id"], record["version"], original, target, steps)


def needs_restart(old: dict, new: dict) -> bool:
    """Whether `old` -> `new` changes what runs (or a restart was asked for)."""
    return groups_mod.config_of(old) != groups_mod.config_of(new) or \
        groups_mod.config_version(old) != groups_mod.config_version(new)


def only_scale_change(old: dict, new: dict) -> bool:
    return not needs_restart(old, new) and old.get("instances") != new.get("instances")


def plan_deployment(original: Root, target: Root, instances: Mapping[str, Sequence] | None,
                    now: float, *, plan_id: str, to_kill: Mapping[str, Iterable[str]] | None
                    = None) -> Plan:
    """The plan that takes `original` to `target` (§3.1).

    `instances` maps app ids to their current instances: instance ids in `to_kill` (per app,
    from kill-and-scale) that are not among them are dropped. `now` is only recorded (the
    plan's version is the target's).
    """
    to_kill = {a: tuple(sorted(k)) for a, k in (to_kill or {}).items()}
    if instances is not None:
        for a, killed in list(to_kill.items()):
            known = {i.id for i in instances.get(a, ())}
            to_kill[a] = tuple(k for k in killed if k in known)
    steps: list[tuple[Action, ...]] = []
    removed = sorted(set(original.apps) - set(target.apps))
    for layer in reversed(_layers(original, removed)):
        steps.append(tuple(Action(STOP, a) for a in layer))
    added = sorted(set(target.apps) - set(original.apps))
    if added:
        steps.append(tuple(Action(START, a) for a in added))
    actions: dict[str, Action] = {}
    for a, app in target.apps.items():
        old = original.apps.get(a)
        sentenced = to_kill.get(a, ())
        if old is None:
            actions[a] = Action(SCALE, a, app["instances"])
        elif needs_restart(old, app) and app["instances"] > 0:
            actions[a] = Action(RESTART, a)
        elif only_scale_change(old, app) or sentenced or needs_restart(old, app):
            actions[a] = Action(SCALE, a, app["instances"], sentenced)
    for layer in _layers(target, sorted(actions)):
        steps.append(tuple(actions[a] for a in layer))
    return Plan(plan_id, target.version, original, target, tuple(s for s in steps if s))


def _layers(root: Root, app_ids: list[str]) -> list[list[str]]:
    """`app_ids` grouped by the length of their longest dependency path in `root`, shortest
    (what others depend on) first."""
    depth: dict[str, int] = {}

    def longest(a: str, seen: frozenset) -> int:
        if a in depth:
            return depth[a]
        deps = [d for d in root.dependencies_of(a) if d not in seen] if a in root.apps else []
        depth[a] = 1 + max((longest(d, seen | {a}) for d in deps), default=-1)
        return depth[a]

    layers: dict[int, list[str]] = {}
    for a in app_ids:
        layers.setdefault(longest(a, frozenset()), []).append(a)
    return [sorted(layers[k]) for k in sorted(layers)]


def revert(plan: Plan, current: Root) -> Root:
    """The root that undoes `plan` on `current`: affected apps back to their original
    definition (gone if the plan created them)."""
    root = current
    for a in plan.affected:
        old = plan.original.apps.get(a)
        root = root.with_app(old) if old is not None else root.without_app(a)
    return root


# --- decisions ---------------------------------------------------------------------------

@attrs.frozen
class Decision:
    """What to do now: kill these instances, launch this many new ones; or nothing, done."""

    kill: tuple[str, ...] = ()
    launch: int = 0
    done: bool = False


def has_checks(app: dict) -> bool:
    return bool(app.get("healthChecks"))


def has_readiness(app: dict) -> bool:
    return bool(app.get("readinessChecks"))


_WEIGHT = {inst.SCHEDULED: 0, inst.UNREACHABLE: 1, inst.PROVISIONED: 2, inst.STAGING: 2,
           inst.STARTING: 3, inst.RUNNING_C: 4}


def kill_order(app: dict, candidates: Iterable, sentenced: Iterable[str] = ()) -> list:
    """Instances in the order Marathon kills them: sentenced ones first, then by condition
    (Scheduled < Unreachable < Staging < Starting < Running), the youngest (or, with
    killSelection OLDEST_FIRST, the oldest) first within a condition; with GROUP_BY, from
    the biggest group first."""
    sentenced = set(sentenced)
    youngest = app.get("killSelection", "YOUNGEST_FIRST") == "YOUNGEST_FIRST"

    def key(i):
        when = i.started_at if i.condition == inst.RUNNING_C else (i.staged_at or i.since)
        when = when or 0.0
        return (i.id not in sentenced, _WEIGHT.get(i.condition, 5),
                -when if youngest else when, i.id)

    ordered = sorted(candidates, key=key)
    fields = [c[0] for c in app.get("constraints") or () if c[1] == "GROUP_BY"]
    if not fields:
        return ordered
    # GROUP_BY rebalances as it scales down (§3.2): after the sentenced ones, always take
    # the next victim from the group (of the first GROUP_BY field) with the most instances.
    field = fields[0]
    first = [i for i in ordered if i.id in sentenced]
    groups: dict = {}
    for i in ordered:
        if i.id not in sentenced:
            groups.setdefault(i.attributes.get(field), []).append(i)
    rest = []
    while groups:
        value = max(groups, key=lambda v: (len(groups[v]), str(v)))
        rest.append(groups[value].pop(0))
        if not groups[value]:
            del groups[value]
    return first + rest


def capacity(app: dict) -> tuple[int, int]:
    """(minHealthy, maxCap) of the app's upgradeStrategy (§3.3)."""
    n = app["instances"]
    strategy = app.get("upgradeStrategy") or {}
    min_healthy = math.ceil(n * strategy.get("minimumHealthCapacity", 1.0) - _EPS)
    max_cap = math.floor(n * (1 + strategy.get("maximumOverCapacity", 1.0)) + _EPS)
    if min_healthy == max_cap:
        max_cap += 1  # one extra instance, or the upgrade could never progress
    return min_healthy, max_cap


def _serving_test(app: dict, new: bool = True):
    """Whether an instance serves: running, healthy if the app has checks, and ready if it
    has a readiness check (for new instances). The app is looked at once, not per instance."""
    checks, ready = has_checks(app), new and has_readiness(app)
    running = inst.RUNNING_C

    def serving(i) -> bool:
        return i.condition == running and (not checks or i.healthy is True) and \
            (not ready or i.ready)

    return serving


def scale_decision(app: dict, instances: Sequence, sentenced: Iterable[str] = ()) -> Decision:
    """ScaleApplication: reach `app["instances"]` instances, killing `sentenced` ones first;
    done once that many are healthy (and ready) and every killed one is terminal."""
    n = app["instances"]
    sentenced = set(sentenced)
    serving = _serving_test(app)
    active, dying, up, doomed = [], False, 0, 0
    # One pass over the instances: this runs after every change to a big app.
    for i in instances:
        if i.goal == inst.RUNNING:
            if i.condition != inst.UNREACHABLE_INACTIVE:
                active.append(i)
                if serving(i):
                    up += 1
                if sentenced and i.id in sentenced:
                    doomed += 1
        elif not dying and i.condition not in inst.TERMINAL:
            dying = True
    excess = max(len(active) - n, doomed, 0)
    kill = tuple(i.id for i in kill_order(app, active, sentenced)[:excess]) if excess else ()
    launch = max(0, n - (len(active) - len(kill)))
    done = not kill and not launch and not dying and up >= n
    return Decision(kill, launch, done)


def restart_decision(app: dict, instances: Sequence) -> Decision:
    """RestartApplication: replace every instance of an older configuration within the
    app's capacity bounds (module docstring); done when N new instances serve and no old
    one is left."""
    n = app["instances"]
    version = groups_mod.config_version(app)
    min_healthy, max_cap = capacity(app)
    serving_old, serving_new = _serving_test(app, new=False), _serving_test(app)
    old, dying, new, healthy, new_up = [], 0, [], 0, 0
    for i in instances:
        if i.goal != inst.RUNNING:
            if i.condition not in inst.TERMINAL:
                dying += 1
        elif i.condition == inst.UNREACHABLE_INACTIVE:
            continue
        elif i.config_version == version:
            new.append(i)
            if serving_new(i):
                healthy += 1
                new_up += 1
        else:
            old.append(i)
            if serving_old(i):
                healthy += 1
    excess = max(0, len(old) - n)  # scaled down too: those old ones go at once
    budget = max(excess, healthy - min_healthy)
    kill = []
    if budget > 0 and old:
        order = sorted(kill_order(app, old), key=serving_old)
        kill = [i.id for i in order[:min(budget, len(old))]]
    # An old instance that failed is rescheduled with the new configuration, so there may
    # be more new ones than wanted: the surplus goes (those not yet launched first).
    if len(new) > n:
        kill.extend(i.id for i in kill_order(app, new)[:len(new) - n])
    launch = min(max(0, n - len(new)), max(0, max_cap - len(old) - dying - len(new)))
    done = not old and not dying and len(new) == n and new_up >= n
    return Decision(tuple(kill), launch, done)


def stop_decision(instances: Sequence) -> Decision:
    """StopApplication: kill every instance; done once all are terminal."""
    kill = tuple(i.id for i in instances if i.goal == inst.RUNNING)
    done = not kill and all(i.terminal for i in instances)
    return Decision(kill, 0, done)


def keep_decision(app: dict, instances: Sequence) -> Decision:
    """The scale check outside deployments: as many active instances as wanted."""
    d = scale_decision(app, instances)
    return Decision(d.kill, d.launch, False)
