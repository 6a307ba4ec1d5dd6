"""The scheduler and the deployment controller on a fake clock, with a fake driver that
records the calls a pymesos driver would make (offers and updates are fed in by hand)."""

import pytest
from twisted.internet import task

from agora.resources import Resources
from frameworks.marathon import instances as inst
from frameworks.marathon import validation
from frameworks.marathon.bus import EventBus
from frameworks.marathon.deployments import Deployments, Locked
from frameworks.marathon.scheduler import Options, Scheduler
from frameworks.marathon.state import State
from frameworks.marathon.store import MemoryBackend, Store


class FakeDriver:
    def __init__(self, reactor, target, master, framework):
        self.framework = framework
        self.calls = []

    def start(self):
        pass

    def gave_up(self):
        return False

    def stop(self):
        pass

    def call(self, method, *args, on_error=None):
        self.calls.append((method, args))

    def named(self, method):
        return [args for m, args in self.calls if m == method]


class Harness:
    def __init__(self, **options):
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.state = State(Store(self.clock, MemoryBackend()))
        self.bus = EventBus(self.clock)
        self.events = []
        self.bus.subscribe(object(), frozenset(), self.events.append)
        self.drivers = []

        def factory(*a):
            self.drivers.append(FakeDriver(*a))
            return self.drivers[-1]

        self.scheduler = Scheduler(self.clock, self.state, self.bus,
                                   Options(min_revive_interval=0.0, **options), "m:5050",
                                   driver_factory=factory)
        self.deployments = Deployments(self.clock, self.state, self.scheduler, self.bus)
        self.scheduler.start()
        self.scheduler.on_registered("fw-1", {"hostname": "m", "port": 5050})
        self.offers = 0

    @property
    def driver(self) -> FakeDriver:
        return self.drivers[-1]

    def settle(self, seconds: float = 0.0):
        for _ in range(20):
            self.clock.advance(0)
        if seconds:
            self.clock.advance(seconds)
            for _ in range(20):
                self.clock.advance(0)

    def deploy(self, raw, force=False):
        app = validation.normalize_app(raw)
        d = self.deployments.deploy(self.state.root.with_app(app), force=force)
        self.settle()
        return d

    def offer(self, host="h1", resources="cpus:4;mem:4096;ports:[31000-31099]"):
        self.offers += 1
        self.scheduler.on_offers([{
            "id": {"value": f"o{self.offers}"}, "agent_id": {"value": f"a-{host}"},
            "hostname": host, "url": {"address": {"ip": "10.0.0.1", "port": 5051}},
            "resources": Resources.parse(resources).to_json(), "attributes": []}])
        self.settle()

    def launched(self):
        return [t for args in self.driver.named("acceptOffers")
                for op in args[1] for t in op["launch"]["task_infos"]]

    def status(self, task_id, state, reason=None, **extra):
        s = {"task_id": {"value": task_id}, "state": state, "agent_id": {"value": "a-h1"},
             "uuid": "AAAAAAAAAAAAAAAAAAAAAA==", **extra}
        if reason:
            s["reason"] = reason
        self.scheduler.on_status(s)
        self.settle()

    def instances(self, app_id="/web"):
        return self.state.of_app(app_id)


def test_launch_ack_after_store_and_suppress_when_idle():
    """Offers launch the scheduled instances; updates are acknowledged; idle -> SUPPRESS."""
    h = Harness()
    h.deploy({"id": "/web", "cmd": "sleep 100", "instances": 3, "cpus": 0.5, "mem": 16})
    assert [i.condition for i in h.instances()] == [inst.SCHEDULED] * 3
    assert h.driver.named("reviveOffers")
    h.offer()
    tasks = h.launched()
    assert len(tasks) == 3 and all(i.condition == inst.PROVISIONED for i in h.instances())
    assert h.driver.named("suppressOffers")
    h.status(tasks[0]["task_id"]["value"], "TASK_RUNNING")
    assert h.driver.named("acknowledgeStatusUpdate")
    for t in tasks[1:]:
        h.status(t["task_id"]["value"], "TASK_RUNNING")
    assert not h.deployments.runs, "the deployment finished once all three ran"
    kinds = [e["eventType"] for e in h.events]
    assert "deployment_success" in kinds and kinds.count("status_update_event") == 3


def test_failed_task_is_rescheduled_after_its_backoff():
    """A failed task's instance keeps its id, waits backoffSeconds, then launches again."""
    h = Harness()
    h.deploy({"id": "/web", "cmd": "false", "instances": 1, "cpus": 0.1, "mem": 16,
              "backoffSeconds": 10, "backoffFactor": 2})
    h.offer()
    first = h.launched()[0]["task_id"]["value"]
    instance_id = h.instances()[0].id
    h.status(first, "TASK_FAILED", message="exit 1")
    i = h.instances()[0]
    assert i.id == instance_id and i.condition == inst.SCHEDULED
    assert h.state.failures["/web"]["state"] == "TASK_FAILED"
    h.offer()
    assert len(h.launched()) == 1, "nothing launched while backing off"
    h.settle(11)
    h.offer()
    second = h.launched()[-1]["task_id"]["value"]
    assert second != first and second.startswith(instance_id + "._app.2")
    h.status(second, "TASK_FAILED")
    assert h.state.delays["/web"].seconds == 20.0


def test_unknown_tasks_are_killed_and_kills_keep_or_drop_instances():
    """A running task no instance owns is killed; kill_task replaces, decommission removes."""
    h = Harness()
    h.status("ghost.instance-1._app.1", "TASK_RUNNING")
    assert h.driver.named("killTask")[-1] == ({"value": "ghost.instance-1._app.1"},)
    h.deploy({"id": "/web", "cmd": "x", "instances": 2, "cpus": 0.1, "mem": 16})
    h.offer()
    for t in h.launched():
        h.status(t["task_id"]["value"], "TASK_RUNNING")
    a, b = h.instances()
    h.scheduler.kill_task(a)
    h.status(a.task_id, "TASK_KILLED")
    assert a.id in h.state.instances and a.condition == inst.SCHEDULED
    h.scheduler.decommission(b)
    h.status(b.task_id, "TASK_KILLED")
    assert b.id not in h.state.instances
    # The scale check that follows a terminal update puts a new instance in b's place.
    assert [i.condition for i in h.instances()] == [inst.SCHEDULED] * 2


def test_unreachable_instances_are_replaced_after_inactive_and_expunged_after_expunge():
    """unreachableStrategy: inactive after N s (replaced), expunged after M s (killed)."""
    h = Harness()
    h.deploy({"id": "/web", "cmd": "x", "instances": 1, "cpus": 0.1, "mem": 16,
              "unreachableStrategy": {"inactiveAfterSeconds": 5, "expungeAfterSeconds": 20}})
    h.offer()
    tid = h.launched()[0]["task_id"]["value"]
    h.status(tid, "TASK_RUNNING")
    h.status(tid, "TASK_UNREACHABLE")
    assert h.instances()[0].condition == inst.UNREACHABLE and len(h.instances()) == 1
    h.settle(6)
    conditions = sorted(i.condition for i in h.instances())
    assert conditions == [inst.SCHEDULED, inst.UNREACHABLE_INACTIVE]
    h.settle(15)
    assert [i.condition for i in h.instances()] == [inst.SCHEDULED]
    assert ({"value": tid},) in h.driver.named("killTask")


def test_lost_task_reasons_map_to_conditions():
    """TASK_LOST is Unreachable when the agent is disconnected, Gone otherwise (§4.1)."""
    assert inst.condition_of("TASK_LOST", "REASON_AGENT_DISCONNECTED") == inst.UNREACHABLE
    assert inst.condition_of("TASK_LOST", "REASON_TASK_UNKNOWN") == "Unknown"
    assert inst.condition_of("TASK_LOST", "REASON_EXECUTOR_TERMINATED") == "Gone"


def test_conflicting_deployments_need_force_and_force_cancels():
    """A second change to an app under deployment is 409 unless forced."""
    h = Harness()
    h.deploy({"id": "/web", "cmd": "x", "instances": 2, "cpus": 0.1, "mem": 16})
    first = list(h.deployments.runs)
    with pytest.raises(Locked) as e:
        h.deploy({"id": "/web", "cmd": "y", "instances": 2, "cpus": 0.1, "mem": 16})
    assert e.value.plan_ids == first
    h.deploy({"id": "/web", "cmd": "y", "instances": 2, "cpus": 0.1, "mem": 16}, force=True)
    assert list(h.deployments.runs) != first and len(h.deployments.runs) == 1


def test_offers_that_do_not_fit_are_declined_and_counted():
    """An offer too small is declined with refuse_seconds and counted under its reason."""
    h = Harness(decline_offer_duration=120)
    h.deploy({"id": "/big", "cmd": "x", "instances": 1, "cpus": 8, "mem": 16})
    h.offer(resources="cpus:2;mem:4096")
    declined = h.driver.named("declineOffer")
    assert declined and declined[-1][1] == {"refuse_seconds": 120}
    stats = h.scheduler.stats["/big"]
    assert stats.total["InsufficientCpus"] == 1 and stats.unused == 1


def test_restart_resumes_from_the_store():
    """A deployment in the store is resumed by a new leader reading the same store."""
    h = Harness()
    h.deploy({"id": "/web", "cmd": "x", "instances": 2, "cpus": 0.1, "mem": 16})
    h.offer()
    backend = h.state.store.backend
    clock = task.Clock()
    state = State(Store(clock, backend))
    state.store.open()
    state.load()
    assert [i.condition for i in state.of_app("/web")] == [inst.PROVISIONED] * 2
    assert len(state.store.data["deployments"]) == 1 and "/web" in state.root.apps
