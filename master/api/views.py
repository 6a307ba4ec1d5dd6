"""JSON views of the master's state, in the shapes of Mesos's legacy and v1 endpoints."""

import functools

from agora import mesos_json as mj
from agora.resources import Resources
from master.master import Master
from master.records import Agent, Framework, Task


@functools.lru_cache(maxsize=4096)
def legacy_resources(res: Resources) -> dict:
    """The `{"cpus": 4.0, "ports": "[31000-32000]"}` form of /master/state.

    Cached by value, so equal Resources share one dict (callers must not change it): a
    cluster's tasks and agents come in a few shapes, and building this form anew for each
    of 100,000 tasks was most of the time /master/state took.
    """
    out: dict = res.scalars()
    for name in sorted(res.names() - out.keys()):
        ranges = res.ranges(name)
        if ranges:
            out[name] = "[" + ", ".join(f"{b}-{e}" for b, e in ranges) + "]"
        else:
            out[name] = "{" + ", ".join(sorted(res.set_items(name))) + "}"
    for name in ("cpus", "mem", "disk", "gpus"):
        out.setdefault(name, 0.0)
    return out


def legacy_attributes(attributes: list) -> dict:
    out = {}
    for a in attributes:
        kind = a.get("type")
        if kind == "TEXT":
            out[a["name"]] = a.get("text", {}).get("value", "")
        elif kind == "SCALAR":
            out[a["name"]] = a.get("scalar", {}).get("value", 0.0)
        elif kind == "RANGES":
            out[a["name"]] = "[" + ", ".join(
                f"{r['begin']}-{r['end']}" for r in a.get("ranges", {}).get("range", [])) + "]"
        elif kind == "SET":
            out[a["name"]] = "{" + ", ".join(a.get("set", {}).get("item", [])) + "}"
    return out


def legacy_task(task: Task) -> dict:
    view = {
        "id": task.id, "name": task.name, "framework_id": task.framework_id,
        "executor_id": task.executor_id, "slave_id": task.agent_id, "state": task.state,
        "resources": legacy_resources(task.resources),
    }
    # A re-registered task has no history here, only its latest status.
    history = task.statuses or (
        [(task.state, task.status.get("timestamp"))] if task.status else [])
    view["statuses"] = [mj.status_view(s, t) for s, t in history]
    if history and task.status:  # the latest update's labels, health and container status
        view["statuses"][-1] = mj.status_view(*history[-1], task.status)
    for key in ("labels", "discovery", "container"):
        if key in task.info:
            view[key] = task.info[key]
    return view


def legacy_framework(master: Master, fw: Framework, tasks: bool = True) -> dict:
    """A framework as /master/state shows it; without its tasks and offers for
    /state-summary (`tasks=False`)."""
    used = Resources.sum(t.resources for t in fw.tasks.values() if not t.resources_recovered)
    offered = Resources.sum(master.offers[o].resources for o in fw.offers if o in master.offers)
    info = fw.info
    view = {
        "id": fw.id, "name": fw.name, "user": info.get("user", ""),
        "hostname": info.get("hostname", ""), "webui_url": info.get("webui_url", ""),
        "role": fw.roles[0] if fw.roles else "*", "roles": list(fw.roles),
        "principal": info.get("principal"), "checkpoint": bool(info.get("checkpoint", False)),
        "failover_timeout": fw.failover_timeout,
        "capabilities": sorted(c for c in fw.capabilities if c),
        "registered_time": fw.registered_time,
        "reregistered_time": fw.reregistered_time or fw.registered_time,
        "unregistered_time": fw.unregistered_time or 0,
        "active": fw.connected, "connected": fw.connected, "recovered": False,
        "resources": legacy_resources(used + offered), "used_resources": legacy_resources(used),
        "offered_resources": legacy_resources(offered),
        "executors": [],
        "labels": (info.get("labels") or {}).get("labels", []),
    }
    if tasks:
        view["tasks"] = [legacy_task(t) for t in fw.tasks.values()]
        view["unreachable_tasks"] = [legacy_task(t) for t in fw.unreachable_tasks.values()]
        view["completed_tasks"] = [legacy_task(t) for t in fw.completed_tasks]
        view["offers"] = [{"id": o, "framework_id": fw.id,
                           "slave_id": master.offers[o].agent_id,
                           "resources": legacy_resources(master.offers[o].resources)}
                          for o in fw.offers if o in master.offers]
    return view


def legacy_agent(master: Master, agent: Agent) -> dict:
    used = Resources.sum(agent.used().values())
    offered = Resources.sum(master.offers[o].resources for o in agent.offers if o in master.offers)
    return {
        "id": agent.id, "pid": agent.pid, "hostname": agent.hostname, "port": agent.port,
        "registered_time": agent.registered_time,
        "reregistered_time": agent.reregistered_time,
        "resources": legacy_resources(agent.total), "used_resources": legacy_resources(used),
        "offered_resources": legacy_resources(offered),
        "reserved_resources": {}, "unreserved_resources": legacy_resources(agent.total.unreserved()),
        "attributes": legacy_attributes(agent.attributes), "active": agent.connected,
        "version": mj.MESOS_VERSION, "capabilities": [],
    }


def legacy_state(master: Master, summary: bool = False) -> dict:
    """/master/state (or /state-summary when `summary`)."""
    info = master.info
    agents = list(master.agents.values())
    state = {
        "version": mj.MESOS_VERSION, "id": master.id, "pid": info["pid"],
        "hostname": master.hostname, "start_time": master.start_time,
        "elected_time": master.start_time, "leader": info["pid"], "leader_info": info,
        "activated_slaves": sum(a.connected for a in agents),
        "deactivated_slaves": sum(not a.connected for a in agents),
        "unreachable_slaves": len(master._unreachable),
        "flags": {k: str(v) for k, v in master.flags.items()},
        "cluster": master.flags.get("cluster", ""),
    }
    if summary:
        state["slaves"] = [legacy_agent(master, a) for a in agents]
        state["frameworks"] = [legacy_framework(master, f, tasks=False)
                               for f in master.frameworks.values()]
        return state
    state["slaves"] = [legacy_agent(master, a) for a in agents]
    state["frameworks"] = [legacy_framework(master, f) for f in master.frameworks.values()]
    state["completed_frameworks"] = [legacy_framework(master, f)
                                     for f in master.completed_frameworks]
    state["orphan_tasks"] = []
    state["unregistered_frameworks"] = []
    return state


def v1_state(master: Master) -> dict:
    """The `get_state` payload of the v1 operator API."""
    tasks, completed, unreachable = [], [], []
    for fw in list(master.frameworks.values()) + master.completed_frameworks:
        tasks.extend(master.task_view(t) for t in fw.tasks.values())
        completed.extend(master.task_view(t) for t in fw.completed_tasks)
        unreachable.extend(master.task_view(t) for t in fw.unreachable_tasks.values())
    executors = [{"executor_info": ex.info, "agent_id": mj.ident(a.id)}
                 for a in master.agents.values() for exs in a.executors.values()
                 for ex in exs.values()]
    return {
        "get_tasks": {"tasks": tasks, "completed_tasks": completed,
                      "unreachable_tasks": unreachable},
        "get_executors": {"executors": executors},
        "get_frameworks": v1_frameworks(master),
        "get_agents": v1_agents(master),
    }


def v1_frameworks(master: Master) -> dict:
    return {"frameworks": [master._framework_view(f) for f in master.frameworks.values()],
            "completed_frameworks": [master._framework_view(f)
                                     for f in master.completed_frameworks]}


def v1_agents(master: Master) -> dict:
    return {"agents": [master.agent_view(a) for a in master.agents.values()],
            "recovered_agents": [dict(info, id=mj.ident(aid))
                                 for aid, info in master.recovering_agents().items()]}


def roles(master: Master) -> list:
    """Known roles with their weights, frameworks and allocated resources."""
    weights = master.allocator.weights()
    out: dict[str, dict] = {"*": {"name": "*", "weight": weights.get("*", 1.0),
                                  "frameworks": [], "resources": Resources()}}
    for fw in master.frameworks.values():
        for role in fw.roles:
            entry = out.setdefault(role, {"name": role, "weight": weights.get(role, 1.0),
                                          "frameworks": [], "resources": Resources()})
            entry["frameworks"].append(fw.id)
        used = Resources.sum(t.resources for t in fw.tasks.values() if not t.resources_recovered)
        if fw.roles:
            out[fw.roles[0]]["resources"] = out[fw.roles[0]]["resources"] + used
    return list(out.values())
