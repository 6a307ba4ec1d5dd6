"""The JSON the /v2 API answers with: one allow-list serializer per client model.

The marathon 0.13 client builds its models with `cls(**json)`, so any key it does not know
fails the whole call (specs/marathon-api.md §0 rule 1, §1.3). Every response object is built
here, from our canonical apps, instances and plans, with exactly the keys listed there, and
timestamps as `YYYY-MM-DDTHH:MM:SS.sssZ`.

Pure: no I/O.
"""

from __future__ import annotations

from typing import Callable, Iterable

from frameworks.marathon import groups as groups_mod
from frameworks.marathon import health as health_mod
from frameworks.marathon import ids, instances as inst
from frameworks.marathon.groups import Root

ts = ids.format_timestamp

APP_KEYS = ("id", "cmd", "args", "user", "env", "instances", "cpus", "mem", "disk", "gpus",
            "executor", "constraints", "fetch", "backoffSeconds", "backoffFactor",
            "maxLaunchDelaySeconds", "container", "healthChecks", "readinessChecks",
            "dependencies", "upgradeStrategy", "labels", "acceptedResourceRoles", "version",
            "versionInfo", "killSelection", "unreachableStrategy",
            "taskKillGracePeriodSeconds", "requirePorts", "networks", "portDefinitions",
            "role", "secrets")
#: Collections Marathon leaves out when they are empty (§1.3 serialisation rules).
_OMIT_EMPTY = frozenset({"args", "constraints", "dependencies", "env", "fetch", "healthChecks",
                         "readinessChecks", "secrets"})


def app_json(app: dict) -> dict:
    """An App object as Marathon 1.11 prints it."""
    out = {}
    for k in APP_KEYS:
        if k not in app:
            continue
        v = app[k]
        if k in _OMIT_EMPTY and not v:
            continue
        out[k] = v
    return out


def app_info(app: dict, *, counts: dict, deployments: Iterable[str], tasks: list | None = None,
             last_failure: dict | None = None, readiness: list | None = None,
             task_stats: dict | None = None) -> dict:
    """AppInfo: the App plus counts, deployments and what `embed` asked for."""
    out = app_json(app)
    out.update(tasksStaged=counts.get("staged", 0), tasksRunning=counts.get("running", 0),
               tasksHealthy=counts.get("healthy", 0),
               tasksUnhealthy=counts.get("unhealthy", 0),
               deployments=[{"id": d} for d in deployments])
    if tasks is not None:
        out["tasks"] = tasks
    if last_failure is not None:
        out["lastTaskFailure"] = last_failure
    if readiness is not None:
        out["readinessCheckResults"] = readiness
    if task_stats is not None:
        out["taskStats"] = task_stats
    return out


def counts(app: dict, instances: Iterable[inst.Instance]) -> dict:
    """tasksStaged / Running / Healthy / Unhealthy of an app's instances."""
    staged = running = healthy = unhealthy = 0
    with_checks = bool(app.get("healthChecks"))
    for i in instances:
        if i.condition in (inst.PROVISIONED, inst.STAGING, inst.STARTING):
            staged += 1
        elif i.condition == inst.RUNNING_C:
            running += 1
            if with_checks:
                if i.healthy is True:
                    healthy += 1
                elif i.healthy is False:
                    unhealthy += 1
    return {"staged": staged, "running": running, "healthy": healthy, "unhealthy": unhealthy}


def task_stats(app: dict, instances: list, now: float) -> dict:
    """The `taskStats` embed: counts and life times of running tasks."""
    def summary(selected: list) -> dict:
        c = counts(app, selected)
        lives = sorted(now - i.started_at for i in selected if i.started_at)
        life = {"averageSeconds": sum(lives) / len(lives) if lives else 0.0,
                "medianSeconds": lives[len(lives) // 2] if lives else 0.0}
        return {"stats": {"counts": c, "lifeTime": life}}

    version = groups_mod.config_version(app)
    out = {"totalSummary": summary(instances)}
    latest = [i for i in instances if i.config_version == version]
    if latest:
        out["withLatestConfig"] = summary(latest)
    outdated = [i for i in instances if i.config_version != version]
    if outdated:
        out["withOutdatedConfig"] = summary(outdated)
    return out


def task_json(i: inst.Instance, app: dict | None, results: list | None = None) -> dict:
    """A Task object (only launched instances have one)."""
    definitions = (app or {}).get("portDefinitions") or \
        ((app or {}).get("container") or {}).get("portMappings") or []
    out = {"id": i.task_id, "appId": i.app_id, "host": i.host or "",
           "slaveId": i.agent_id or "", "state": inst.mesos_state(i.condition),
           "ipAddresses": [{"ipAddress": i.agent_ip, "protocol": "IPv4"}] if i.agent_ip else [],
           "ports": list(i.ports),
           "servicePorts": [p.get("port", p.get("servicePort", 0)) for p in definitions],
           "localVolumes": [], "role": (app or {}).get("role", "*"),
           "version": i.app_version}
    if i.staged_at:
        out["stagedAt"] = ts(i.staged_at)
    if i.started_at:
        out["startedAt"] = ts(i.started_at)
    if results:
        out["healthCheckResults"] = results
    return out


def health_results(i: inst.Instance, healths: list) -> list:
    return [health_mod.result_json(h, i.id, i.task_id, ts) for h in healths]


def task_failure(app_id: str, i: inst.Instance, state: str, message: str, now: float) -> dict:
    """A lastTaskFailure object."""
    return {"appId": app_id, "host": i.host or "", "message": message or "",
            "taskId": i.task_id or "", "instanceId": i.id, "slaveId": i.agent_id or "",
            "state": state, "timestamp": ts(now), "version": i.app_version}


# --- groups ------------------------------------------------------------------------------

def group_json(root: Root, group_id: str, app_view: Callable[[dict], dict] = app_json,
               embed_apps: bool = True, embed_groups: bool = True) -> dict:
    """A Group (GroupInfo) object: id, apps, groups, pods, dependencies, version."""
    group = root.groups.get(group_id) or groups_mod.Group(group_id)
    app_ids, group_ids = root.children(group_id)
    return {"id": group_id,
            "apps": [app_view(root.apps[a]) for a in app_ids] if embed_apps else [],
            "groups": [group_json(root, g, app_view, embed_apps, embed_groups)
                       for g in group_ids] if embed_groups else [],
            "pods": [], "dependencies": list(group.dependencies),
            "version": group.version or root.version or ts(0)}


# --- deployments -------------------------------------------------------------------------

def action_json(action, readiness: list | None = None) -> dict:
    out = {"action": action.kind, "app": action.app_id}
    if readiness is not None:
        out["readinessCheckResults"] = readiness
    return out


def deployment_json(plan, current_step: int, readiness: dict | None = None) -> dict:
    """A Deployment as GET /v2/deployments lists it (`current_step` counts from 1)."""
    steps = plan.steps
    current = steps[current_step - 1] if 0 < current_step <= len(steps) else ()
    return {"id": plan.id, "version": plan.version,
            "affectedApps": sorted(plan.affected), "affectedPods": [],
            "steps": [{"actions": [action_json(a) for a in step]} for step in steps],
            "currentActions": [action_json(a, (readiness or {}).get(a.app_id, []))
                               for a in current],
            "currentStep": current_step, "totalSteps": len(steps)}


def plan_json(plan) -> dict:
    """The heavy plan of deployment events: with `original` and `target` groups (§5)."""
    return {"id": plan.id, "version": plan.version,
            "steps": [{"actions": [action_json(a) for a in step]} for step in plan.steps],
            "original": group_json(plan.original, ids.ROOT),
            "target": group_json(plan.target, ids.ROOT)}


def deployment_result(plan_id: str, version: str) -> dict:
    return {"deploymentId": plan_id, "version": version}


# --- queue -------------------------------------------------------------------------------

def queue_item(app: dict, count: int, delay_left: float, since: float, summary: dict,
               unused: list | None) -> dict:
    """A QueueItem (never with `role`: it breaks the 0.13 client)."""
    overdue = delay_left <= 0
    out = {"app": app_json(app), "count": count,
           "delay": {"timeLeftSeconds": round(delay_left, 3), "overdue": overdue},
           "since": ts(since), "processedOffersSummary": summary, "overdue": overdue}
    if unused is not None:
        out["lastUnusedOffers"] = unused
    return out


def offers_summary(stats, fmt=ts) -> dict:
    """processedOffersSummary of one app's constraints.PlacementStats."""
    return {"processedOffersCount": stats.processed, "unusedOffersCount": stats.unused,
            **({"lastUnusedOfferAt": fmt(stats.last_unused_at)} if stats.last_unused_at
               else {}),
            **({"lastUsedOfferAt": fmt(stats.last_used_at)} if stats.last_used_at else {}),
            "rejectSummaryLastOffers": stats.funnel(stats.last_round),
            "rejectSummaryLaunchAttempt": stats.funnel(stats.total, stats.processed)}


def unused_offers(stats) -> list:
    """lastUnusedOffers: the last offers an app could not use, each with its reason."""
    out = []
    for offer, rejection, when in stats.last:
        resources = []
        for r in offer.resources:
            item = {"name": r.name, "role": r.role}
            if r.type == "SCALAR":
                item["scalar"] = r.value
            elif r.type == "RANGES":
                item["ranges"] = [{"begin": b, "end": e} for b, e in r.value]
            else:
                item["set"] = sorted(r.value)
            resources.append(item)
        attributes = [{"name": k, "text": v} for k, v in sorted(offer.fields.items())
                      if k not in ("hostname", "@hostname")]
        out.append({"offer": {"id": offer.id, "hostname": offer.hostname,
                              "agentId": offer.agent_id, "resources": resources,
                              "attributes": attributes},
                    "reason": [rejection.reason], "detail": rejection.detail,
                    "timestamp": ts(when)})
    return out
