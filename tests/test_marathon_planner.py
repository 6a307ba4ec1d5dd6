"""The deployment planner: plans from one Root to another, and the decisions that carry out
each action, with property tests of the rolling restart's capacity bounds."""

import math
import random
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from frameworks.marathon import groups, instances as inst, planner, validation
from frameworks.marathon.groups import Root
from frameworks.marathon.instances import Instance

V1, V2 = "2024-01-01T00:00:00.000Z", "2024-01-01T00:01:00.000Z"


def app(app_id="/web", instances=3, version=V1, **extra):
    raw = {"id": app_id, "cmd": "sleep 1000", "instances": instances, "cpus": 0.1, "mem": 16,
           **extra}
    a = validation.normalize_app(raw)
    return {**a, "version": version,
            "versionInfo": {"lastScalingAt": version, "lastConfigChangeAt": version}}


def running(n, version=V1, healthy=True, app_id="/web", start=0):
    out = []
    for k in range(start, start + n):
        i = Instance(f"web.instance-{k}", app_id, version, version, condition=inst.RUNNING_C,
                     since=float(k), started_at=float(k), staged_at=float(k))
        i.task_id, i.agent_id, i.healthy = f"t{k}", "a", healthy
        out.append(i)
    return out


def test_planner_and_pure_modules_import_no_io_libraries():
    """planner, constraints, validation, groups, health, backoff stay pure (no Twisted etc.)."""
    import subprocess
    code = ("import sys; import frameworks.marathon.planner, frameworks.marathon.constraints, "
            "frameworks.marathon.validation, frameworks.marathon.health, "
            "frameworks.marathon.backoff, frameworks.marathon.views, frameworks.marathon.events, "
            "frameworks.marathon.taskinfo; "
            "bad = [m for m in ('twisted', 'kazoo', 'msgpack', 'pymesos') if m in sys.modules]; "
            "print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_new_app_starts_then_scales():
    """A new app is a StartApplication step, then a ScaleApplication to its instances."""
    target = Root().with_app(app())
    plan = planner.plan_deployment(Root(), target, {}, 0.0, plan_id="p")
    assert [[(a.kind, a.app_id, a.scale_to) for a in s] for s in plan.steps] == [
        [(planner.START, "/web", None)], [(planner.SCALE, "/web", 3)]]
    assert plan.affected == {"/web"}


def test_dependencies_order_steps_and_stops_go_in_reverse():
    """Dependencies come first when starting; dependents are stopped first."""
    db = app("/shop/db")
    web = app("/shop/web", dependencies=["db"])
    cache = app("/shop/cache", dependencies=["/shop/db"])
    front = app("/shop/front", dependencies=["/shop/web"])
    target = Root().with_apps([db, web, cache, front])
    plan = planner.plan_deployment(Root(), target, {}, 0.0, plan_id="p")
    layers = [[a.app_id for a in s] for s in plan.steps[1:]]
    assert layers == [["/shop/db"], ["/shop/cache", "/shop/web"], ["/shop/front"]]
    stop = planner.plan_deployment(target, Root(), {}, 0.0, plan_id="q")
    assert [[a.app_id for a in s] for s in stop.steps] == [
        ["/shop/front"], ["/shop/cache", "/shop/web"], ["/shop/db"]]
    assert all(a.kind == planner.STOP for s in stop.steps for a in s)


def test_group_dependencies_apply_to_every_app_in_the_group():
    """An app in a group that depends on another group waits for all of that group."""
    root = Root().with_apps([app("/db/pg"), app("/db/redis"), app("/web/front")])
    root = root.with_group({"id": "/web", "apps": [app("/web/front")], "groups": [],
                            "dependencies": ["/db"]})
    assert root.dependencies_of("/web/front") == {"/db/pg", "/db/redis"}
    plan = planner.plan_deployment(Root(), root, {}, 0.0, plan_id="p")
    assert [a.app_id for a in plan.steps[-1]] == ["/web/front"]


def test_dependency_cycle_is_rejected():
    """A dependency cycle is a validation error, not a plan that never finishes."""
    root = Root().with_apps([app("/a", dependencies=["/b"]), app("/b", dependencies=["/a"])])
    try:
        groups.check(root)
    except validation.Invalid as e:
        assert "cycle" in e.details[0]["errors"][0]
    else:
        raise AssertionError("no error for a cycle")


def test_change_kinds():
    """Only instances changed: Scale; anything else: Restart; nothing: no step; gone: Stop."""
    old = groups.versioned(Root(), Root().with_app(app()), V1)
    scaled = groups.versioned(old, old.with_app({**old.apps["/web"], "instances": 5}), V2)
    assert groups.config_version(scaled.apps["/web"]) == V1
    plan = planner.plan_deployment(old, scaled, {}, 0.0, plan_id="p")
    assert [(a.kind, a.scale_to) for s in plan.steps for a in s] == [(planner.SCALE, 5)]
    changed = groups.versioned(old, old.with_app({**old.apps["/web"], "cmd": "sleep 2"}), V2)
    assert groups.config_version(changed.apps["/web"]) == V2
    plan = planner.plan_deployment(old, changed, {}, 0.0, plan_id="p")
    assert [a.kind for s in plan.steps for a in s] == [planner.RESTART]
    same = groups.versioned(old, old, V2)
    assert planner.plan_deployment(old, same, {}, 0.0, plan_id="p").steps == ()
    restarted = groups.versioned(old, old, V2, restart=["/web"])
    assert [a.kind for s in planner.plan_deployment(old, restarted, {}, 0.0, plan_id="p").steps
            for a in s] == [planner.RESTART]


def test_kill_and_scale_sentences_the_named_instances():
    """kill?scale=true: a Scale action that kills the named instances first."""
    instances = running(3)
    old = groups.versioned(Root(), Root().with_app(app()), V1)
    target = groups.versioned(old, old.with_app({**old.apps["/web"], "instances": 2}), V2)
    plan = planner.plan_deployment(old, target, {"/web": instances}, 0.0, plan_id="p",
                                   to_kill={"/web": ["web.instance-0", "nope"]})
    action = plan.steps[0][0]
    assert action.sentenced == ("web.instance-0",)
    d = planner.scale_decision(target.apps["/web"], instances, action.sentenced)
    assert d.kill == ("web.instance-0",) and d.launch == 0


def test_scale_down_kills_youngest_first_or_oldest():
    """killSelection picks which running instances go; scheduled ones go before any."""
    instances = running(4)
    waiting = Instance("web.instance-w", "/web", V1, V1)
    d = planner.scale_decision(app(instances=2), instances + [waiting])
    assert d.kill == ("web.instance-w", "web.instance-3", "web.instance-2")
    d = planner.scale_decision(app(instances=3, killSelection="OLDEST_FIRST"), instances)
    assert d.kill == ("web.instance-0",)


def test_group_by_scale_down_takes_from_the_biggest_group():
    """GROUP_BY rebalances when scaling down: victims come from the biggest group first."""
    instances = running(6)
    for i, rack in zip(instances, ["r1", "r1", "r1", "r1", "r2", "r3"]):
        i.attributes = {"rack": rack}
    a = app(instances=3, constraints=[["rack", "GROUP_BY"]])
    d = planner.scale_decision(a, instances)
    left = [i.attributes["rack"] for i in instances if i.id not in d.kill]
    assert sorted(left) == ["r1", "r2", "r3"]


def test_scale_is_done_only_when_healthy_and_killed_ones_are_gone():
    """Done means the count is reached, all healthy, and every killed instance terminal."""
    a = app(instances=2, healthChecks=[{"protocol": "TCP"}])
    instances = running(2, healthy=None)
    assert not planner.scale_decision(a, instances).done
    for i in instances:
        i.healthy = True
    assert planner.scale_decision(a, instances).done
    dying = running(1, start=5)[0]
    dying.goal = inst.DECOMMISSIONED
    assert not planner.scale_decision(a, instances + [dying]).done


def test_unreachable_inactive_instances_are_replaced():
    """An instance given up on (UnreachableInactive) does not count: a new one is launched."""
    instances = running(3)
    instances[0].condition = inst.UNREACHABLE_INACTIVE
    assert planner.keep_decision(app(), instances).launch == 1


def test_stop_kills_everything_and_waits():
    """Stop kills every wanted instance and is done once all are terminal."""
    instances = running(2)
    d = planner.stop_decision(instances)
    assert set(d.kill) == {i.id for i in instances} and not d.done
    for i in instances:
        i.goal, i.condition = inst.DECOMMISSIONED, "Killed"
    assert planner.stop_decision(instances).done


def test_capacity_worked_examples():
    """The spec's examples: {1,1} -> (10, 20); {1,0} -> (10, 11); {0.5,0} -> (5, 10); {0,0} -> (0, 10)."""
    def cap(min_health, over, n=10):
        return planner.capacity(app(instances=n, upgradeStrategy={
            "minimumHealthCapacity": min_health, "maximumOverCapacity": over}))
    assert cap(1, 1) == (10, 20)
    assert cap(1, 0) == (10, 11)
    assert cap(0.5, 0) == (5, 10)
    assert cap(0, 0) == (0, 10)


def test_default_rolling_restart_starts_all_new_and_kills_one_per_healthy_new():
    """{1,1}: no kill at first, N new launched; each new healthy one lets one old go."""
    new_app = app(instances=4, version=V2)
    old = running(4)
    d = planner.restart_decision(new_app, old)
    assert d.kill == () and d.launch == 4
    new = running(1, version=V2, start=10)
    d = planner.restart_decision(new_app, old + new)
    assert len(d.kill) == 1 and d.kill[0].startswith("web.instance-")


# --- property tests of the rolling restart -----------------------------------------------

class Cluster:
    """A fake cluster to drive restart decisions: instances move on at random."""

    def __init__(self, spec, n_old, unhealthy_old, rng):
        self.app, self.rng = spec, rng
        self.instances = running(n_old)
        for i in self.instances[:unhealthy_old]:
            i.healthy = False
        self.next = 1000

    def alive(self):
        return [i for i in self.instances if not i.terminal]

    def healthy_wanted(self):
        return sum(1 for i in self.instances if i.goal == inst.RUNNING and
                   i.considered_healthy(True))

    def apply(self, d):
        killed_healthy = False
        for k in d.kill:
            i = next(i for i in self.instances if i.id == k)
            killed_healthy |= i.considered_healthy(True)
            i.goal = inst.DECOMMISSIONED
            if i.condition == inst.SCHEDULED:
                self.instances.remove(i)
        for _ in range(d.launch):
            self.next += 1
            self.instances.append(Instance(f"web.instance-{self.next}", "/web", V2, V2,
                                           since=float(self.next)))
        return killed_healthy

    def step(self, fail: bool):
        """One thing happens somewhere (a launch, a start, a health result, a kill ending)."""
        moving = [i for i in self.instances if not i.terminal and
                  (i.condition != inst.RUNNING_C or i.goal != inst.RUNNING or i.healthy is not True)]
        if not moving:
            return False
        i = self.rng.choice(moving)
        if i.goal != inst.RUNNING:
            i.condition = "Killed"
            self.instances.remove(i)
        elif i.condition == inst.SCHEDULED:
            i.condition, i.task_id = inst.STAGING, f"task-{i.id}"
        elif i.condition == inst.STAGING:
            i.condition, i.started_at = inst.RUNNING_C, float(self.next)
        elif fail and self.rng.random() < 0.3:
            i.reschedule(V2, V2, 0.0)  # failed: the same instance waits for an offer again
        else:
            i.healthy = True
        return True


strategies = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]) | st.floats(0.0, 1.0)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 12), min_health=strategies, over=strategies,
       unhealthy=st.integers(0, 3), seed=st.integers(0, 2 ** 32 - 1), fail=st.booleans())
def test_rolling_restart_stays_within_capacity_and_finishes(n, min_health, over, unhealthy,
                                                            seed, fail):
    """Never more than maxCap alive, never a healthy instance killed below minHealthy, and
    the restart finishes once instances stop failing."""
    rng = random.Random(seed)
    spec = app(instances=n, version=V2,
               upgradeStrategy={"minimumHealthCapacity": min_health, "maximumOverCapacity": over},
               healthChecks=[{"protocol": "TCP"}])
    min_healthy, max_cap = planner.capacity(spec)
    assert min_healthy == math.ceil(n * min_health - 1e-9)
    c = Cluster(spec, n, min(unhealthy, n), rng)
    for round_ in range(2000):
        d = planner.restart_decision(spec, c.instances)
        if d.done:
            break
        killed_healthy = c.apply(d)
        assert len(c.alive()) <= max_cap, (len(c.alive()), max_cap)
        if killed_healthy:
            assert c.healthy_wanted() >= min_healthy
        if not c.step(fail and round_ < 200):
            d = planner.restart_decision(spec, c.instances)
            assert d.done or d.kill or d.launch, "stuck: nothing moves and nothing to do"
    else:
        raise AssertionError("the restart did not finish")
    assert sum(1 for i in c.instances if i.config_version == V2 and i.goal == inst.RUNNING) == n
    assert all(i.config_version == V2 for i in c.instances if not i.terminal)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 15), have=st.integers(0, 15), seed=st.integers(0, 1000))
def test_scale_reaches_its_count_without_overshoot(n, have, seed):
    """A scale never plans more than N active instances and always converges to N."""
    spec = app(instances=n)
    instances = running(have)
    rng = random.Random(seed)
    for _ in range(100):
        d = planner.scale_decision(spec, instances)
        for k in d.kill:
            i = next(i for i in instances if i.id == k)
            i.goal = inst.DECOMMISSIONED
        for j in range(d.launch):
            x = Instance(f"web.instance-n{rng.random()}", "/web", V1, V1)
            instances.append(x)
        assert sum(1 for i in instances if i.active) == n
        if d.done:
            break
        for i in list(instances):
            if i.goal != inst.RUNNING:
                instances.remove(i)
            elif i.condition == inst.SCHEDULED:
                i.condition, i.started_at = inst.RUNNING_C, 1.0
    assert planner.scale_decision(spec, instances).done
