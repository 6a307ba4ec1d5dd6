"""Mesos's unversioned endpoints: /master/state, /state-summary, /metrics/snapshot, ..."""

from agora import mesos_json as mj
from agora.http import HTTPError, Response, json_response
from master.api import views
from master.api.operator import metrics_snapshot
from master.master import Master


def routes(master: Master, leader=None) -> list:
    """(prefix, handler, methods) for every legacy endpoint, with and without `/master`."""

    def state(request):
        return json_response(views.legacy_state(master))

    def summary(request):
        return json_response(views.legacy_state(master, summary=True))

    def frameworks(request):
        return json_response({
            "frameworks": [views.legacy_framework(master, f) for f in master.frameworks.values()],
            "completed_frameworks": [views.legacy_framework(master, f)
                                     for f in master.completed_frameworks],
            "unregistered_frameworks": []})

    def agents(request):
        return json_response({"slaves": [views.legacy_agent(master, a)
                                         for a in master.agents.values()]})

    def tasks(request):
        items = [views.legacy_task(t) for f in master.frameworks.values()
                 for t in list(f.tasks.values()) + list(f.completed_tasks)]
        try:
            offset = int(request.query.get("offset", ["0"])[0])
            limit = int(request.query.get("limit", ["100"])[0])
        except ValueError:
            raise HTTPError(400, "'offset' and 'limit' must be integers") from None
        return json_response({"tasks": items[offset:offset + limit]})

    def roles(request):
        return json_response({"roles": [
            {"name": r["name"], "weight": r["weight"], "frameworks": r["frameworks"],
             "resources": views.legacy_resources(r["resources"])}
            for r in views.roles(master)]})

    def health(request):
        return Response(status=200)

    def redirect(request):
        where = f"{master.hostname}:{master.port}"
        if leader is not None:
            leading, where = leader()
            if not where:
                raise HTTPError(503, "No leader elected")
        return Response(status=307, headers=(("Location", f"//{where}"),))

    def flags(request):
        return json_response({"flags": {k: str(v) for k, v in master.flags.items()}})

    out = [("/metrics/snapshot", lambda r: json_response(metrics_snapshot(master)), None),
           ("/version", lambda r: json_response(version()), None)]
    for name, handler in (("state", state), ("state.json", state), ("state-summary", summary),
                          ("frameworks", frameworks), ("slaves", agents), ("tasks", tasks),
                          ("tasks.json", tasks), ("roles", roles), ("roles.json", roles),
                          ("health", health), ("redirect", redirect), ("flags", flags)):
        out.append((f"/master/{name}", handler, None))
        out.append((f"/{name}", handler, None))
    return out


def version() -> dict:
    """GET /version as Mesos answers it; pymesos needs a purely numeric `version`."""
    return {"version": mj.MESOS_VERSION, "build_date": "", "build_time": 0,
            "build_user": "", "git_sha": "", "git_branch": "", "git_tag": ""}
