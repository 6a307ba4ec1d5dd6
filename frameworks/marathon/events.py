"""The event bus's messages, exactly as the marathon 0.13 client knows them (§5).

Each builder returns one event dict with `eventType` and `timestamp`. `KNOWN` lists the
types the 0.13 client can parse: an unknown type ends its `event_stream()` generator, so
the others (`scheduler_*`) go only to subscribers that ask for them by name. `frame` renders
one event for `text/event-stream`.

Pure: no I/O.
"""

from __future__ import annotations

import json

from frameworks.marathon import ids, instances as inst
from frameworks.marathon import views

KNOWN = frozenset({
    "api_post_event", "status_update_event", "framework_message_event", "subscribe_event",
    "unsubscribe_event", "add_health_check_event", "remove_health_check_event",
    "failed_health_check_event", "health_status_changed_event", "unhealthy_task_kill_event",
    "group_change_success", "group_change_failed", "deployment_success", "deployment_failed",
    "deployment_info", "deployment_step_success", "deployment_step_failure",
    "event_stream_attached", "event_stream_detached", "app_terminated_event",
    "instance_changed_event", "unknown_instance_terminated_event",
    "unhealthy_instance_kill_event", "instance_health_changed_event", "pod_created_event",
    "pod_updated_event", "pod_deleted_event",
})
#: Sent only to subscribers that name them in ?event_type= (not known to the 0.13 client).
EXTRA = frozenset({"scheduler_registered_event", "scheduler_reregistered_event",
                   "scheduler_disconnected_event"})


def _event(kind: str, now: float, **fields) -> dict:
    return {"eventType": kind, "timestamp": ids.format_timestamp(now), **fields}


def frame(event: dict) -> bytes:
    """One SSE frame: `event: <type>` and a single-line `data:` JSON."""
    data = json.dumps(event, separators=(",", ":"), ensure_ascii=True)
    return f"event: {event['eventType']}\ndata: {data}\n\n".encode("ascii")


def wanted(event_type: str, filters: frozenset[str]) -> bool:
    """Whether a subscriber with `filters` (empty: everything known) gets `event_type`."""
    if filters:
        return event_type in filters
    return event_type in KNOWN


def api_post(now: float, client_ip: str, uri: str, app: dict) -> dict:
    return _event("api_post_event", now, clientIp=client_ip, uri=uri,
                  appDefinition=views.app_json(app))


def status_update(now: float, i: inst.Instance, state: str, message: str) -> dict:
    return _event("status_update_event", now, slaveId=i.agent_id or "", taskId=i.task_id or "",
                  taskStatus=state, message=message or "", appId=i.app_id, host=i.host or "",
                  ipAddresses=[{"ipAddress": i.agent_ip, "protocol": "IPv4"}]
                  if i.agent_ip else [],
                  ports=list(i.ports), version=i.app_version)


def instance_changed(now: float, i: inst.Instance) -> dict:
    return _event("instance_changed_event", now, instanceId=i.id, condition=i.condition,
                  runSpecId=i.app_id, agentId=i.agent_id or "", host=i.host or "",
                  runSpecVersion=i.app_version)


def instance_health_changed(now: float, i: inst.Instance) -> dict:
    return _event("instance_health_changed_event", now, instanceId=i.id, runSpecId=i.app_id,
                  runSpecVersion=i.app_version, healthy=i.healthy)


def unknown_instance_terminated(now: float, instance_id: str, app_id: str,
                                condition: str) -> dict:
    return _event("unknown_instance_terminated_event", now, instanceId=instance_id,
                  runSpecId=app_id, condition=condition)


def app_terminated(now: float, app_id: str) -> dict:
    return _event("app_terminated_event", now, appId=app_id)


def add_health_check(now: float, app: dict, check: dict) -> dict:
    return _event("add_health_check_event", now, appId=app["id"], version=app["version"],
                  healthCheck=check)


def remove_health_check(now: float, app_id: str, check: dict) -> dict:
    return _event("remove_health_check_event", now, appId=app_id, healthCheck=check)


def failed_health_check(now: float, i: inst.Instance, check: dict) -> dict:
    return _event("failed_health_check_event", now, appId=i.app_id, taskId=i.id,
                  instanceId=i.id, healthCheck=check)


def health_status_changed(now: float, i: inst.Instance, alive: bool) -> dict:
    return _event("health_status_changed_event", now, appId=i.app_id, instanceId=i.id,
                  version=i.app_version, alive=alive)


def unhealthy_instance_kill(now: float, i: inst.Instance, reason: str) -> dict:
    return _event("unhealthy_instance_kill_event", now, appId=i.app_id, taskId=i.task_id or "",
                  instanceId=i.id, version=i.app_version, reason=reason, host=i.host or "",
                  slaveId=i.agent_id or "")


def group_change_success(now: float, group_id: str, version: str) -> dict:
    return _event("group_change_success", now, groupId=group_id, version=version)


def group_change_failed(now: float, group_id: str, version: str, reason: str) -> dict:
    return _event("group_change_failed", now, groupId=group_id, version=version, reason=reason)


def deployment_info(now: float, plan, step: int) -> dict:
    """`step` counts from 1."""
    current = plan.steps[step - 1] if 0 < step <= len(plan.steps) else ()
    return _event("deployment_info", now, plan=views.plan_json(plan),
                  currentStep={"actions": [views.action_json(a) for a in current]})


def deployment_step(now: float, plan, step: int, ok: bool) -> dict:
    current = plan.steps[step - 1] if 0 < step <= len(plan.steps) else ()
    return _event("deployment_step_success" if ok else "deployment_step_failure", now,
                  plan=views.plan_json(plan),
                  currentStep={"actions": [views.action_json(a) for a in current]})


def deployment_success(now: float, plan) -> dict:
    return _event("deployment_success", now, id=plan.id, plan=views.plan_json(plan))


def deployment_failed(now: float, plan, reason: str) -> dict:
    return _event("deployment_failed", now, id=plan.id, plan=views.plan_json(plan),
                  reason=reason)


def stream_attached(now: float, remote: str) -> dict:
    return _event("event_stream_attached", now, remoteAddress=remote)


def stream_detached(now: float, remote: str) -> dict:
    return _event("event_stream_detached", now, remoteAddress=remote)


def subscribe(now: float, client_ip: str, url: str) -> dict:
    return _event("subscribe_event", now, clientIp=client_ip, callbackUrl=url)


def unsubscribe(now: float, client_ip: str, url: str) -> dict:
    return _event("unsubscribe_event", now, clientIp=client_ip, callbackUrl=url)


def scheduler_registered(now: float, framework_id: str, master: str) -> dict:
    return _event("scheduler_registered_event", now, frameworkId=framework_id, master=master)


def scheduler_reregistered(now: float, master: str) -> dict:
    return _event("scheduler_reregistered_event", now, master=master)


def scheduler_disconnected(now: float) -> dict:
    return _event("scheduler_disconnected_event", now)
