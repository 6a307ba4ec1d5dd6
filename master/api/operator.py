"""`POST /api/v1` (also `/api/v1/operator`): the Mesos v1 operator API, read-only calls
plus the SUBSCRIBE event stream."""

import os
import time

from agora import mesos_json as mj
from agora import recordio
from agora.resources import Resources
from agora.http import HTTPError, Response, StreamingResponse, json_response
from master.api import views
from master.api.scheduler import redirect_to_leader
from master.master import CallError, Master


#: Calls any master answers itself; a follower redirects every other call to the leader.
_LOCAL_CALLS = frozenset(("GET_HEALTH", "GET_VERSION", "GET_FLAGS"))


class OperatorAPI:
    """The handler for `/api/v1`."""

    def __init__(self, master: Master, leader=None, read=None, write=None):
        self.master = master
        self.leader = leader  # callable -> (is_leader, "host:port" of the leader or None)
        # http_auth.Authenticators, if reading (GET_*, SUBSCRIBE) or other calls need one
        self.read, self.write = read, write

    def __call__(self, request):
        call = request.json()
        if not isinstance(call, dict) or not isinstance(call.get("type"), str):
            raise HTTPError(400, "Expecting 'type' to be present")
        kind = call["type"]
        authenticator = self.read if kind.startswith("GET_") or kind == "SUBSCRIBE" else \
            self.write
        if authenticator is not None:
            authenticator.principal(request)
        if kind not in _LOCAL_CALLS:
            redirect_to_leader(self.leader, request.path)
        if kind == "SUBSCRIBE":
            return StreamingResponse(start=self._subscribe)
        if kind == "UPDATE_WEIGHTS":
            try:
                d = self.master.update_weights(
                    (call.get("update_weights") or {}).get("weight_infos"))
            except CallError as e:
                raise HTTPError(e.status, e.message) from None
            return d.addCallback(lambda _: Response(status=200))
        action = _ACTIONS.get(kind)
        if action is not None:
            try:
                action(self.master, call.get(kind.lower()) or {})
            except CallError as e:
                raise HTTPError(e.status, e.message) from None
            return Response(status=200)
        build = getattr(self, "_" + kind.lower(), None) if kind.startswith("GET_") else None
        if build is None:
            raise HTTPError(400, f"Unsupported operator call '{kind}'")
        return json_response({"type": kind, kind.lower(): build()})

    def _subscribe(self, stream) -> None:
        m = self.master
        stream.write(recordio.encode_json(mj.event("SUBSCRIBED", {
            "get_state": views.v1_state(m), "heartbeat_interval_seconds": m.heartbeat_interval})))
        stream.write(recordio.encode_json(mj.event("HEARTBEAT")))
        m.operator_streams.add(stream)
        stream.on_close(lambda: m.operator_streams.discard(stream))

    def _get_health(self):
        return {"healthy": True}

    def _get_version(self):
        return {"version_info": {"version": mj.MESOS_VERSION}}

    def _get_state(self):
        return views.v1_state(self.master)

    def _get_agents(self):
        return views.v1_agents(self.master)

    def _get_frameworks(self):
        return views.v1_frameworks(self.master)

    def _get_tasks(self):
        return views.v1_state(self.master)["get_tasks"]

    def _get_executors(self):
        return views.v1_state(self.master)["get_executors"]

    def _get_roles(self):
        return {"roles": [{"name": r["name"], "weight": r["weight"],
                           "frameworks": [mj.ident(f) for f in r["frameworks"]],
                           "resources": r["resources"].to_json()}
                          for r in views.roles(self.master)]}

    def _get_weights(self):
        return {"weight_infos": [{"role": r, "weight": w}
                                 for r, w in sorted(self.master.allocator.weights().items())]}

    def _get_flags(self):
        return {"flags": [{"name": k, "value": str(v)} for k, v in self.master.flags.items()]}

    def _get_master(self):
        return {"master_info": self.master.info,
                "start_time": self.master.start_time, "elected_time": self.master.start_time}

    def _get_metrics(self):
        return {"metrics": [{"name": k, "value": v}
                            for k, v in metrics_snapshot(self.master).items()]}


def _agent(master: Master, body: dict):
    return master.agent_for_operator(mj.id_of(body, "agent_id", required=False))


def _drain(master: Master, body: dict) -> None:
    grace = body.get("max_grace_period")
    seconds = None
    if grace is not None:
        if not isinstance(grace, dict) or not isinstance(grace.get("nanoseconds"), int) \
                or grace["nanoseconds"] < 0:
            raise CallError(400, "'max_grace_period' must be {\"nanoseconds\": N} with N >= 0")
        seconds = grace["nanoseconds"] / 1e9
    master.drain_agent(_agent(master, body), seconds, bool(body.get("mark_gone", False)))


# Operator calls that change the cluster; they answer 200 with an empty body, as Mesos does.
_ACTIONS = {
    "DRAIN_AGENT": _drain,
    "DEACTIVATE_AGENT": lambda m, body: m.deactivate_agent(_agent(m, body)),
    "REACTIVATE_AGENT": lambda m, body: m.reactivate_agent(_agent(m, body)),
    "MARK_AGENT_GONE": lambda m, body: m.mark_gone(_agent(m, body)),
}


def metrics_snapshot(master: Master) -> dict:
    """Mesos-named master metrics."""
    m = master
    tasks = [t for fw in m.frameworks.values() for t in fw.tasks.values()]
    by_state: dict[str, int] = {}
    for t in tasks:
        by_state[t.state] = by_state.get(t.state, 0) + 1
    total = Resources.sum(a.total for a in m.agents.values())
    used = Resources.sum(r for a in m.agents.values() for r in a.used().values())
    out = {
        "master/elected": 1.0, "master/uptime_secs": m.now() - m.start_time,
        "master/frameworks_active": float(sum(f.connected for f in m.frameworks.values())),
        "master/frameworks_inactive": float(sum(not f.connected for f in m.frameworks.values())),
        "master/frameworks_connected": float(sum(f.connected for f in m.frameworks.values())),
        "master/frameworks_disconnected": float(sum(not f.connected
                                                    for f in m.frameworks.values())),
        "master/slaves_active": float(sum(a.connected for a in m.agents.values())),
        "master/slaves_connected": float(sum(a.connected for a in m.agents.values())),
        "master/slaves_disconnected": float(sum(not a.connected for a in m.agents.values())),
        "master/slaves_unreachable": float(len(m._unreachable)),
        "master/outstanding_offers": float(len(m.offers)),
        "master/tasks_staging": float(by_state.get("TASK_STAGING", 0)),
        "master/tasks_starting": float(by_state.get("TASK_STARTING", 0)),
        "master/tasks_running": float(by_state.get("TASK_RUNNING", 0)),
        "master/tasks_killing": float(by_state.get("TASK_KILLING", 0)),
        "system/cpus_total": float(os.cpu_count() or 1),
        "master/process_time_secs": time.process_time(),
    }
    for name in ("cpus", "mem", "disk", "gpus"):
        out[f"master/{name}_total"] = total.scalar(name)
        out[f"master/{name}_used"] = used.scalar(name)
        out[f"master/{name}_percent"] = (used.scalar(name) / total.scalar(name)
                                         if total.scalar(name) else 0.0)
    for key, value in m.metrics.items():
        out[f"master/{key}"] = float(value)
    return out
