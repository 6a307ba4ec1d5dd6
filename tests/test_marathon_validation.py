"""App and group definitions: defaults, deprecated forms, 422 details; and every JSON shape we
serve, read back by the real marathon 0.13 client's models (which reject unknown keys)."""

import collections
import collections.abc

import pytest

from frameworks.marathon import events, groups, ids, planner, validation, views
from frameworks.marathon.groups import Root
from frameworks.marathon.instances import RUNNING_C, Instance

# marathon 0.13 uses collections.Iterable, gone since Python 3.10 (spec §0 rule 10).
collections.Iterable = collections.abc.Iterable


def errors(raw, **kw):
    with pytest.raises(validation.Invalid) as e:
        validation.normalize_app(raw, **kw)
    return {d["path"]: d["errors"] for d in e.value.details}


def test_defaults_are_marathons():
    """A minimal app gets Marathon 1.11's defaults (§2.1)."""
    app = validation.normalize_app({"id": "web", "cmd": "sleep 1"})
    assert app["id"] == "/web"
    assert (app["cpus"], app["mem"], app["disk"], app["instances"]) == (1.0, 128.0, 0.0, 1)
    assert app["portDefinitions"] == [{"port": 0, "protocol": "tcp", "name": "default"}]
    assert app["upgradeStrategy"] == {"minimumHealthCapacity": 1.0, "maximumOverCapacity": 1.0}
    assert app["unreachableStrategy"] == {"inactiveAfterSeconds": 0, "expungeAfterSeconds": 0}
    assert (app["backoffSeconds"], app["backoffFactor"], app["maxLaunchDelaySeconds"]) == \
        (1, 1.15, 300)
    assert app["killSelection"] == "YOUNGEST_FIRST" and app["networks"] == [{"mode": "host"}]
    assert validation.normalize_app({"id": "x", "cmd": "y", "portDefinitions": []})[
        "portDefinitions"] == []


def test_every_problem_is_reported_with_its_path():
    """Bad input: 422 details list every problem under its JSON path."""
    found = errors({"id": "Web_1", "cpus": 0, "mem": "lots", "instances": -1,
                    "upgradeStrategy": {"minimumHealthCapacity": 1.5},
                    "constraints": [["hostname", "NEAR"]],
                    "healthChecks": [{"protocol": "HTTP", "portIndex": 3}],
                    "portDefinitions": [{"port": 80, "name": "a"}, {"port": 80, "name": "a"}]})
    assert "invalid path segment" in found["/id"][0]
    assert found["/cpus"] == ["got 0, expected 0.001 or more"]
    assert found["/mem"] == ["expected a number, got 'lots'"]
    assert found["/instances"] == ["got -1, expected 0 or more"]
    assert "AppDefinition must either contain" in found["/"][0]
    assert found["/upgradeStrategy/minimumHealthCapacity"]
    assert "unknown constraint operator 'NEAR'" in found["/constraints(0)"][0]
    assert "must address an element" in found["/healthChecks(0)/portIndex"][0]
    assert found["/portDefinitions(1)/port"] == ["duplicate port 80"]
    assert found["/portDefinitions(1)/name"] == ["duplicate port name 'a'"]


def test_cmd_and_args_are_exclusive_and_reserved_ids_refused():
    """cmd with args, an id ending in /tasks, an unknown killSelection: all refused."""
    assert errors({"id": "a", "cmd": "x", "args": ["y"]})["/"]
    assert "may not end" in errors({"id": "/a/tasks", "cmd": "x"})["/id"][0]
    assert errors({"id": "a", "cmd": "x", "killSelection": "RANDOM"})["/killSelection"]
    assert "not supported" in errors({"id": "a", "cmd": "x", "residency": {}})["/residency"][0]
    assert errors({"id": "a", "cmd": "x", "env": {"K": {"secret": "s"}}})["/env/K"]


def test_deprecated_forms_are_translated():
    """ports -> portDefinitions, uris -> fetch, docker.network BRIDGE -> container/bridge."""
    app = validation.normalize_app({"id": "a", "cmd": "x", "ports": [0, 8080],
                                    "uris": ["http://h/x.tgz", "http://h/y.sh"]})
    assert [p["port"] for p in app["portDefinitions"]] == [0, 8080]
    assert app["fetch"][0] == {"uri": "http://h/x.tgz", "extract": True, "executable": False,
                               "cache": False}
    assert app["fetch"][1]["extract"] is False
    bridged = validation.normalize_app({
        "id": "b", "container": {"type": "DOCKER", "docker": {
            "image": "busybox", "network": "BRIDGE",
            "portMappings": [{"containerPort": 80, "hostPort": 0, "protocol": "tcp"}]}}})
    assert bridged["networks"] == [{"mode": "container/bridge"}]
    assert bridged["container"]["portMappings"][0]["containerPort"] == 80
    assert "portDefinitions" not in bridged and bridged["requirePorts"] is False


def test_partial_update_keeps_what_the_body_leaves_out():
    """PUT merges into the stored app; read-only keys from a GET are ignored."""
    stored = validation.normalize_app({"id": "a", "cmd": "x", "mem": 64, "instances": 2})
    body = {"cmd": "y", "tasks": [{"id": "t"}], "tasksRunning": 2, "deployments": [],
            "versionInfo": {"lastScalingAt": "x"}, "lastTaskFailure": {"x": 1}}
    app = validation.normalize_app(body, app_id="/a", existing=stored)
    assert (app["cmd"], app["mem"], app["instances"]) == ("y", 64.0, 2)
    assert validation.is_rollback({"version": "v"}) and validation.is_rollback(
        {"id": "/a", "version": "v"})
    assert not validation.is_rollback({"version": "v", "cmd": "x"})


def test_groups_resolve_ids_relative_to_their_parent():
    """Nested ids and dependencies are relative to the enclosing group."""
    g = validation.normalize_group({"id": "shop", "apps": [
        {"id": "db", "cmd": "x"}, {"id": "web", "cmd": "x", "dependencies": ["db"]}],
        "groups": [{"id": "tools", "apps": [{"id": "cron", "cmd": "x"}]}]})
    assert g["id"] == "/shop"
    assert [a["id"] for a in g["apps"]] == ["/shop/db", "/shop/web"]
    assert g["apps"][1]["dependencies"] == ["/shop/db"]
    assert g["groups"][0]["apps"][0]["id"] == "/shop/tools/cron"
    with pytest.raises(validation.Invalid) as e:
        validation.normalize_group({"id": "g", "apps": [{"id": "a", "cpus": -1}]})
    assert {d["path"] for d in e.value.details} >= {"/apps(0)/cpus", "/apps(0)"}


def test_ids_and_timestamps():
    """Path ids, task ids in every form, and the only timestamp form the client reads."""
    assert ids.canonical("../db", "/shop/web") == "/shop/db"
    with pytest.raises(ids.InvalidId):
        ids.canonical("..", "/")
    t = ids.task_id(ids.instance_id("/shop/web", "1234-ab"), 3)
    assert t == "shop_web.instance-1234-ab._app.3"
    assert ids.parse_task_id(t) == ("/shop/web", "shop_web.instance-1234-ab")
    assert ids.parse_task_id("shop_web.marathon-1234._app.1")[0] == "/shop/web"
    assert ids.parse_task_id("web.1234abcd")[0] == "/web"
    with pytest.raises(ids.InvalidId):
        ids.parse_task_id("nodots")
    assert ids.format_timestamp(0.5) == "1970-01-01T00:00:00.500Z"
    assert ids.parse_timestamp("1970-01-01T00:00:01.250Z") == 1.25
    assert ids.next_version(0.5, "1970-01-01T00:00:00.500Z") == "1970-01-01T00:00:00.501Z"


# --- our JSON, read by the real client ---------------------------------------------------

def deployed_root():
    app = validation.normalize_app({
        "id": "/shop/web", "cmd": "x", "instances": 2, "labels": {"a": "b"},
        "healthChecks": [{"protocol": "HTTP"}, {"protocol": "COMMAND", "command": {"value": "true"}}],
        "constraints": [["hostname", "UNIQUE"]], "fetch": [{"uri": "http://x/y"}],
        "readinessChecks": [{"portName": "default"}], "dependencies": ["/db"],
        "container": {"type": "MESOS", "docker": {"image": "busybox"},
                      "volumes": [{"containerPath": "/d", "hostPath": "/tmp", "mode": "RO"}]}})
    db = validation.normalize_app({"id": "/db", "cmd": "x", "unreachableStrategy": "disabled"})
    root = groups.versioned(Root(), Root().with_apps([app, db]), "2024-01-01T00:00:00.000Z")
    return root


def instance():
    i = Instance("shop_web.instance-1", "/shop/web", "v", "2024-01-01T00:00:00.000Z",
                 condition=RUNNING_C, staged_at=1.0, started_at=2.0)
    i.task_id, i.agent_id, i.host, i.agent_ip, i.ports = "shop_web.instance-1._app.1", "S0", \
        "h1", "10.0.0.1", [31000]
    return i


def test_app_task_group_and_deployment_views_parse_in_the_client():
    """AppInfo, Task, Group and Deployment JSON have only keys the 0.13 models accept."""
    from marathon.models import (MarathonApp, MarathonDeployment, MarathonGroup, MarathonTask)
    from marathon.models.queue import MarathonQueueItem
    root = deployed_root()
    app = root.apps["/shop/web"]
    i = instance()
    task = views.task_json(i, app, [views.health_mod.result_json(
        views.health_mod.Health(alive=True, first_success=3.0, last_success=3.0), i.id,
        i.task_id, ids.format_timestamp)])
    info = views.app_info(app, counts=views.counts(app, [i]), deployments=["d1"], tasks=[task],
                          last_failure=views.task_failure("/shop/web", i, "TASK_FAILED", "x", 4.0),
                          readiness=[], task_stats=views.task_stats(app, [i], 10.0))
    parsed = MarathonApp.from_json(info)
    assert parsed.tasks[0].host == "h1" and parsed.tasks_running == 1
    assert parsed.version_info.last_config_change_at.year == 2024
    assert MarathonTask.from_json(task).started_at is not None
    group = MarathonGroup.from_json(views.group_json(root, "/"))
    assert [g.id for g in group.groups] == ["/shop"]
    plan = planner.plan_deployment(Root(), root, {}, 0.0, plan_id="d1")
    d = MarathonDeployment.from_json(views.deployment_json(plan, 1))
    assert d.total_steps == len(plan.steps) and d.affected_apps == ["/db", "/shop/web"]
    from frameworks.marathon.constraints import PlacementStats
    item = views.queue_item(app, 1, 2.5, 1.0, views.offers_summary(PlacementStats()), [])
    assert MarathonQueueItem.from_json(item).delay.time_left_seconds == 2.5


def test_events_parse_in_the_clients_event_factory():
    """Every event we send is one the 0.13 EventFactory knows, heavy plans included."""
    from marathon.models.events import EventFactory
    root = deployed_root()
    plan = planner.plan_deployment(Root(), root, {}, 0.0, plan_id="d1")
    i = instance()
    now = 5.0
    built = [events.api_post(now, "1.2.3.4", "/v2/apps", root.apps["/db"]),
             events.status_update(now, i, "TASK_RUNNING", "ok"),
             events.instance_changed(now, i), events.instance_health_changed(now, i),
             events.unknown_instance_terminated(now, "x.instance-1", "/x", "Killed"),
             events.app_terminated(now, "/db"),
             events.add_health_check(now, root.apps["/shop/web"], {"protocol": "HTTP"}),
             events.remove_health_check(now, "/db", {"protocol": "HTTP"}),
             events.failed_health_check(now, i, {"protocol": "HTTP"}),
             events.health_status_changed(now, i, True),
             events.unhealthy_instance_kill(now, i, "failed"),
             events.group_change_success(now, "/", "v"), events.deployment_info(now, plan, 1),
             events.deployment_step(now, plan, 1, True), events.deployment_step(now, plan, 2, False),
             events.deployment_success(now, plan), events.deployment_failed(now, plan, "x"),
             events.stream_attached(now, "1.2.3.4:5"), events.subscribe(now, "ip", "http://x")]
    factory = EventFactory()
    for e in built:
        assert e["eventType"] in events.KNOWN
        parsed = factory.process(e)
        assert parsed.event_type == e["eventType"]
    info = factory.process(events.deployment_info(now, plan, 1))
    assert info.plan.original is not None and info.plan.target is not None
    assert events.frame(built[0]).startswith(b"event: api_post_event\ndata: {")
    assert not events.wanted("scheduler_registered_event", frozenset())
    assert events.wanted("scheduler_registered_event", frozenset({"scheduler_registered_event"}))


def test_label_selectors():
    """GET /v2/apps?label=...: k, k==v, k!=v, k in (a,b), k notin (a,b), comma = and."""
    from frameworks.marathon.api import _label_selector
    labels = {"team": "web", "tier": "front", "odd": "a,b"}
    assert _label_selector("team")(labels)
    assert _label_selector("team==web,tier!=back")(labels)
    assert not _label_selector("team==web,tier==back")(labels)
    assert _label_selector("tier in (front, back)")(labels)
    assert not _label_selector("tier notin (front,back)")(labels)
    assert _label_selector("missing notin (x)")(labels)
    assert _label_selector(r"odd==a\,b")(labels)
