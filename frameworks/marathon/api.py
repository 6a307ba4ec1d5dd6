"""The /v2 REST API, as the marathon 0.13 client uses it (specs/marathon-api.md §1).

Served by agora.http (longest-prefix routing): one handler per top-level resource, which
parses the rest of the path itself, because app ids contain `/` and the client sends double
slashes (`/v2/apps//web`). Errors are JSON `{"message", "details"}`: 400 malformed JSON or
parameters, 404 unknown ids, 409 a locked app or an existing id, 422 an invalid definition
(with the path of every problem), 403 too many deployments, 503 while not ready.

Every change goes through the same path: compute the target Root -> Deployments.deploy
(plan, conflict check, store) -> answer with the deployment id once it is stored.
"""

from __future__ import annotations

import inspect
import json
import re

from twisted.logger import Logger

from agora.http import HTTPError, Request, Response, StreamingResponse, json_response
from frameworks.marathon import events, groups, ids, validation, views
from frameworks.marathon import instances as inst
from frameworks.marathon.constraints import PlacementStats
from frameworks.marathon.deployments import Locked, TooMany

log = Logger()

VERSION = "1.11.0"
_SLASHES = re.compile(r"/{2,}")


class MarathonError(HTTPError):
    """An error answered as Marathon does: JSON with `message` (and `details`, ...)."""

    def __init__(self, status: int, message: str, **extra):
        super().__init__(status, message)
        self.extra = extra

    def response(self) -> Response:
        return json_response({"message": self.message, **self.extra}, self.status)


def not_found(message: str) -> MarathonError:
    return MarathonError(404, message)


def body_json(request: Request):
    if not request.body.strip():
        raise MarathonError(400, "Invalid JSON", details=[{"path": "/", "errors": [
            "the request has no body; send a JSON object"]}])
    try:
        return json.loads(request.body)
    except ValueError as e:
        raise MarathonError(400, "Invalid JSON", details=[{"path": "/", "errors": [str(e)]}]) \
            from None


def flag(request: Request, name: str, default: bool = False) -> bool:
    values = request.query.get(name)
    if not values:
        return default
    value = values[-1].strip().lower()
    if value in ("true", "1", "yes", ""):
        return True
    if value in ("false", "0", "no"):
        return False
    raise MarathonError(400, f"Query parameter {name} must be true or false, got {values[-1]!r}")


def param(request: Request, name: str) -> str | None:
    values = request.query.get(name)
    return values[-1] if values else None


def embeds(request: Request) -> set[str]:
    """`embed` values without their prefixes: apps.tasks, app.tasks, group.apps.tasks..."""
    out = set()
    for value in request.query.get("embed", []) + request.query.get("embed[]", []):
        for prefix in ("group.apps.", "apps.", "app.", "group."):
            if value.startswith(prefix):
                value = value[len(prefix):]
                break
        out.add(value)
    if "failures" in out:
        out.update({"tasks", "lastTaskFailure", "deployments"})
    return out


def path_rest(request: Request, prefix: str) -> str:
    path = _SLASHES.sub("/", request.path)
    return path[len(prefix):] if path.startswith(prefix) else ""


def endpoint(fn):
    """Map the controller's exceptions to Marathon's answers."""
    async def handle(self, request: Request):
        try:
            result = fn(self, request)
            if inspect.isawaitable(result):
                result = await result
            return result
        except validation.Invalid as e:
            raise MarathonError(422, e.message, details=e.details) from None
        except ids.InvalidId as e:
            raise MarathonError(422, "Object is not valid",
                                details=[{"path": "/id", "errors": [str(e)]}]) from None
        except Locked as e:
            plan = e.plan_ids[0]
            raise MarathonError(
                409, "App is locked by one or more deployments. Override with the option "
                     f"'?force=true'. View details at '/v2/deployments/{plan}'.",
                deployments=[{"id": p} for p in e.plan_ids]) from None
        except TooMany as e:
            raise MarathonError(403, str(e)) from None
    handle.__name__ = fn.__name__
    return handle


class API:
    """The handlers; `core` is the leader's runtime (service.Core), `node` this process."""

    def __init__(self, node):
        self.node = node

    @property
    def core(self):
        core = self.node.core
        if core is None:
            raise MarathonError(503, "Marathon is not ready: it is not leading (yet)")
        return core

    def routes(self, router) -> None:
        router.add("/v2/apps", self.apps)
        router.add("/v2/groups", self.groups)
        router.add("/v2/deployments", self.deployments)
        router.add("/v2/tasks", self.tasks)
        router.add("/v2/queue", self.queue)
        router.add("/v2/info", self.info)
        router.add("/v2/leader", self.leader)
        router.add("/v2/events", self.events)
        router.add("/v2/eventSubscriptions", self.subscriptions)
        router.add("/ping", self.ping)
        router.add("/metrics", self.metrics)

    # -- helpers ----------------------------------------------------------------------------

    def _info(self, app: dict, want: set[str], now: float) -> dict:
        core = self.core
        instances = core.state.of_app(app["id"])
        tasks = None
        if "tasks" in want:
            tasks = [self._task(i, app) for i in instances if i.launched]
        return views.app_info(
            app, counts=views.counts(app, instances),
            deployments=core.deployments.of_app(app["id"]), tasks=tasks,
            last_failure=core.state.failures.get(app["id"]) if "lastTaskFailure" in want
            else None,
            readiness=[r for i in instances if (r := core.state.readiness.get(i.id))]
            if "readiness" in want else None,
            task_stats=views.task_stats(app, instances, now) if "taskStats" in want else None)

    def _task(self, i: inst.Instance, app: dict | None) -> dict:
        results = self.core.state.health.get(i.id)
        return views.task_json(i, app, views.health_results(i, results) if results else None)

    def _deployed(self, plan, status: int = 200) -> Response:
        return json_response(views.deployment_result(plan.id, plan.version), status,
                             [("Marathon-Deployment-Id", plan.id)])

    def _post_event(self, request: Request, app: dict) -> None:
        core, now = self.core, self.core.now()
        core.bus.publish("api_post_event", lambda: events.api_post(
            now, request.peer[0], request.path, app))

    # -- /v2/apps ---------------------------------------------------------------------------

    @endpoint
    def apps(self, request: Request):
        rest = path_rest(request, "/v2/apps").strip("/")
        method = request.method
        if not rest:
            if method in ("GET", "HEAD"):
                return self._list_apps(request)
            if method == "POST":
                return self._create_app(request)
            if method in ("PUT", "PATCH"):
                return self._update_apps(request, create=method == "PUT")
            raise MarathonError(405, f"{method} is not allowed on /v2/apps")
        parts = rest.split("/")
        if parts[-1] == "restart" and method == "POST":
            return self._restart(request, "/" + "/".join(parts[:-1]))
        if parts[-1] == "tasks":
            return self._app_tasks(request, "/" + "/".join(parts[:-1]), None)
        if len(parts) >= 2 and parts[-2] == "tasks":
            return self._app_tasks(request, "/" + "/".join(parts[:-2]), parts[-1])
        if parts[-1] == "versions":
            return self._versions(request, "/" + "/".join(parts[:-1]), None)
        if len(parts) >= 2 and parts[-2] == "versions":
            return self._versions(request, "/" + "/".join(parts[:-2]), parts[-1])
        app_id = "/" + rest
        if method in ("GET", "HEAD"):
            return self._get_app(request, app_id)
        if method in ("PUT", "PATCH"):
            return self._put_app(request, app_id, create=method == "PUT")
        if method == "DELETE":
            return self._delete_app(request, app_id)
        raise MarathonError(405, f"{method} is not allowed on /v2/apps/{{id}}")

    def _list_apps(self, request: Request) -> Response:
        core, now = self.core, self.core.now()
        want = embeds(request)
        cmd, wanted_id, label = param(request, "cmd"), param(request, "id"), param(request, "label")
        selector = _label_selector(label) if label else None
        out = []
        for app_id in sorted(core.state.root.apps):
            app = core.state.root.apps[app_id]
            if cmd and cmd.lower() not in (app.get("cmd") or "").lower():
                continue
            if wanted_id and wanted_id.lower() not in app_id.lower():
                continue
            if selector and not selector(app.get("labels") or {}):
                continue
            out.append(self._info(app, want, now))
        return json_response({"apps": out})

    def _get_app(self, request: Request, app_id: str) -> Response:
        core, now = self.core, self.core.now()
        want = embeds(request) | {"tasks", "lastTaskFailure", "deployments"}
        if app_id.endswith("/*"):
            group = app_id[:-2] or ids.ROOT
            apps = [core.state.root.apps[a] for a in core.state.root.apps_within(group)]
            return json_response({"*": [self._info(a, want, now) for a in apps]})
        app = core.state.app(self._canonical(app_id))
        if app is None:
            raise not_found(f"App '{self._canonical(app_id)}' does not exist")
        return json_response({"app": self._info(app, want, now)})

    @staticmethod
    def _canonical(app_id: str) -> str:
        return ids.canonical(app_id)

    async def _create_app(self, request: Request) -> Response:
        core = self.core
        body = body_json(request)
        app = validation.normalize_app(body, role=core.options.role)
        root = core.state.root
        if app["id"] in root.apps:
            raise MarathonError(409, f"An app with id [{app['id']}] already exists.")
        if app["id"] in root.groups:
            raise MarathonError(409, f"A group with id [{app['id']}] already exists.")
        plan = await core.deployments.deploy(root.with_app(app), force=flag(request, "force"))
        stored = core.state.app(app["id"])
        self._post_event(request, stored)
        info = views.app_info(stored, counts={}, deployments=[plan.id])
        return json_response(info, 201, [("Marathon-Deployment-Id", plan.id),
                                         ("Location", f"/v2/apps{app['id']}")])

    async def _put_app(self, request: Request, app_id: str, create: bool) -> Response:
        core = self.core
        app_id = self._canonical(app_id)
        body = body_json(request)
        root = core.state.root
        existing = root.apps.get(app_id)
        if isinstance(body, dict) and body.get("id") is not None:
            try:
                if ids.canonical(body["id"]) != app_id:
                    raise validation.Invalid([{"path": "/id", "errors": [
                        f"the id in the body ({body['id']}) is not the id in the URL "
                        f"({app_id})"]}])
            except ids.InvalidId as e:
                raise validation.Invalid([{"path": "/id", "errors": [str(e)]}]) from None
        app = self._app_update(body, app_id, existing, flag(request, "partialUpdate", True))
        if existing is None and not create:
            raise not_found(f"App '{app_id}' does not exist")
        if existing is None and app_id in root.groups:
            raise MarathonError(409, f"A group with id [{app_id}] already exists.")
        plan = await core.deployments.deploy(root.with_app(app), force=flag(request, "force"))
        self._post_event(request, core.state.app(app_id))
        return self._deployed(plan, 201 if existing is None else 200)

    def _app_update(self, body, app_id: str, existing: dict | None, partial: bool) -> dict:
        core = self.core
        if validation.is_rollback(body):
            version = validation.check_rollback(body)
            old = core.state.app_version(app_id, version)
            if old is None:
                raise not_found(f"App '{app_id}' does not exist in version {version}")
            return old
        if isinstance(body, dict) and body.get("version") is not None and \
                set(k for k, v in body.items() if v is not None) - {"id", "version"} and \
                not _looks_fetched(body):
            raise validation.Invalid([{"path": "/", "errors": [
                "The 'version' field may only be combined with the 'id' field."]}])
        return validation.normalize_app(body, app_id=app_id, role=core.options.role,
                                        existing=existing if partial else None)

    async def _update_apps(self, request: Request, create: bool) -> Response:
        core = self.core
        body = body_json(request)
        if not isinstance(body, list):
            raise validation.Invalid([{"path": "/", "errors": ["expected a JSON array of apps"]}])
        root = core.state.root
        for n, item in enumerate(body):
            if not isinstance(item, dict) or not item.get("id"):
                raise validation.Invalid([{"path": f"({n})/id", "errors": ["every app needs an id"]}])
            app_id = ids.canonical(item["id"])
            existing = root.apps.get(app_id)
            if existing is None and not create:
                raise not_found(f"App '{app_id}' does not exist")
            try:
                app = self._app_update(item, app_id, existing, flag(request, "partialUpdate", True))
            except validation.Invalid as e:
                raise validation.Invalid([{**d, "path": f"({n}){d['path']}"} for d in e.details])
            root = root.with_app(app)
        plan = await core.deployments.deploy(root, force=flag(request, "force"))
        return self._deployed(plan)

    async def _delete_app(self, request: Request, app_id: str) -> Response:
        core = self.core
        app_id = self._canonical(app_id)
        app = core.state.app(app_id)
        if app is None:
            raise not_found(f"App '{app_id}' does not exist")
        plan = await core.deployments.deploy(core.state.root.without_app(app_id),
                                             force=flag(request, "force", True))
        self._post_event(request, app)
        return self._deployed(plan)

    async def _restart(self, request: Request, app_id: str) -> Response:
        core = self.core
        app_id = self._canonical(app_id)
        if core.state.app(app_id) is None:
            raise not_found(f"App '{app_id}' does not exist")
        plan = await core.deployments.deploy(core.state.root, restart=[app_id],
                                             force=flag(request, "force"))
        return self._deployed(plan)

    def _versions(self, request: Request, app_id: str, version: str | None) -> Response:
        core = self.core
        app_id = self._canonical(app_id)
        if request.method not in ("GET", "HEAD"):
            raise MarathonError(405, f"{request.method} is not allowed on versions")
        if core.state.app(app_id) is None and not core.state.app_versions(app_id):
            raise not_found(f"App '{app_id}' does not exist")
        if version is None:
            return json_response({"versions": core.state.app_versions(app_id)})
        app = core.state.app_version(app_id, version)
        if app is None:
            raise not_found(f"App '{app_id}' does not exist in version {version}")
        return json_response(views.app_json(app))

    # -- tasks ------------------------------------------------------------------------------

    def _app_tasks(self, request: Request, app_id: str, task_id: str | None):
        core = self.core
        if app_id.endswith("/*"):
            group = app_id[:-2] or ids.ROOT
            app_ids = core.state.root.apps_within(group)
        else:
            app_ids = [self._canonical(app_id)]
            if core.state.app(app_ids[0]) is None:
                raise not_found(f"App '{app_ids[0]}' does not exist")
        instances = [i for a in app_ids for i in core.state.of_app(a) if i.launched]
        if request.method in ("GET", "HEAD"):
            if task_id is not None:
                found = [i for i in instances if i.task_id == task_id]
                if not found:
                    raise not_found(f"Task '{task_id}' does not exist")
                return json_response({"task": self._task(found[0], core.state.app(found[0].app_id))})
            return json_response({"tasks": [self._task(i, core.state.app(i.app_id))
                                            for i in instances]})
        if request.method != "DELETE":
            raise MarathonError(405, f"{request.method} is not allowed on tasks")
        scale, wipe = flag(request, "scale"), flag(request, "wipe")
        if scale and wipe:
            raise MarathonError(400, "You cannot use scale and wipe at the same time.")
        if task_id is not None:
            chosen = [i for i in instances if i.task_id == task_id or i.id == task_id]
            if not chosen:
                raise not_found(f"Task '{task_id}' does not exist")
        else:
            host = param(request, "host")
            chosen = [i for i in instances if host is None or i.host == host]
        return self._kill(request, chosen, scale, wipe, single=task_id is not None)

    async def _kill(self, request: Request, chosen: list, scale: bool, wipe: bool,
                    single: bool, force: bool | None = None):
        core = self.core
        if scale:
            by_app: dict[str, list] = {}
            for i in chosen:
                by_app.setdefault(i.app_id, []).append(i.id)
            root = core.state.root
            for app_id, killed in by_app.items():
                app = root.apps[app_id]
                root = root.with_app({**app, "instances": max(0, app["instances"] - len(killed))})
            plan = await core.deployments.deploy(root, to_kill=by_app,
                                                 force=flag(request, "force") if force is None
                                                 else force)
            return self._deployed(plan)
        views_before = [self._task(i, core.state.app(i.app_id)) for i in chosen]
        for i in chosen:
            if wipe:
                core.scheduler.decommission(i)
            else:
                core.scheduler.kill_task(i)
        for app_id in {i.app_id for i in chosen}:
            core.deployments.touch(app_id)
        if single:
            return json_response({"task": views_before[0]})
        return json_response({"tasks": views_before})

    @endpoint
    def tasks(self, request: Request):
        core = self.core
        rest = path_rest(request, "/v2/tasks").strip("/")
        if rest == "delete" and request.method == "POST":
            body = body_json(request)
            task_ids = body.get("ids") if isinstance(body, dict) else None
            if not isinstance(task_ids, list) or not all(isinstance(t, str) for t in task_ids):
                raise MarathonError(400, "expected {\"ids\": [task id, ...]}")
            chosen = []
            for tid in task_ids:
                try:
                    ids.parse_task_id(tid)
                except ids.InvalidId as e:
                    raise MarathonError(400, str(e)) from None
                i = core.state.by_task.get(tid)
                if i is not None:
                    chosen.append(i)
            scale, wipe = flag(request, "scale"), flag(request, "wipe")
            if scale and wipe:
                raise MarathonError(400, "You cannot use scale and wipe at the same time.")
            return self._kill(request, chosen, scale, wipe, single=False,
                              force=flag(request, "force"))
        if rest or request.method not in ("GET", "HEAD"):
            raise not_found(f"{request.method} {request.path} is not a tasks endpoint")
        statuses = {s.lower() for s in request.query.get("status", []) +
                    request.query.get("status[]", [])}
        out = []
        for i in core.state.instances.values():
            if not i.launched:
                continue
            state = inst.mesos_state(i.condition)
            if statuses and state[len("TASK_"):].lower() not in statuses:
                continue
            out.append(self._task(i, core.state.app(i.app_id)))
        return json_response({"tasks": out})

    # -- /v2/groups -------------------------------------------------------------------------

    @endpoint
    def groups(self, request: Request):
        rest = path_rest(request, "/v2/groups").strip("/")
        parts = rest.split("/") if rest else []
        version = None
        versions = False
        if parts and parts[-1] == "versions":
            versions, parts = True, parts[:-1]
        elif len(parts) >= 2 and parts[-2] == "versions":
            version, parts = parts[-1], parts[:-2]
        gid = ids.canonical("/" + "/".join(parts))
        method = request.method
        if method in ("GET", "HEAD"):
            return self._get_group(request, gid, versions, version)
        if method == "POST":
            return self._create_group(request, gid, bool(parts))
        if method in ("PUT", "PATCH"):
            return self._put_group(request, gid, version)
        if method == "DELETE":
            return self._delete_group(request, gid)
        raise MarathonError(405, f"{method} is not allowed on /v2/groups")

    def _group_view(self, root, gid: str, request: Request) -> dict:
        want = embeds(request)
        now = self.core.now()
        if root is self.core.state.root:
            return views.group_json(root, gid, lambda a: self._info(a, want, now))
        return views.group_json(root, gid)

    def _get_group(self, request: Request, gid: str, versions: bool, version: str | None):
        core = self.core
        root = core.state.root
        if versions:
            return json_response(core.state.root_versions())
        if version is not None:
            old = core.state.root_at(version)
            if old is None or gid not in old.groups:
                raise not_found(f"Group '{gid}' does not exist in version {version}")
            return json_response(self._group_view(old, gid, request))
        if gid not in root.groups:
            raise not_found(f"Group '{gid}' does not exist")
        return json_response(self._group_view(root, gid, request))

    async def _create_group(self, request: Request, path_id: str, has_path: bool):
        core = self.core
        body = body_json(request)
        if not isinstance(body, dict):
            raise validation.Invalid([{"path": "/", "errors": ["expected a group object"]}])
        base = path_id if has_path else ids.ROOT
        gid = ids.canonical(body.get("id") or "", base) if body.get("id") else path_id
        root = core.state.root
        if gid == ids.ROOT or gid in root.groups and (
                root.apps_within(gid) or root.groups_within(gid) or has_path):
            raise MarathonError(409, f"Group {gid} is already created. Use PUT to change "
                                     "this group.")
        if gid in root.apps:
            raise MarathonError(409, f"An app with id [{gid}] already exists.")
        group = validation.normalize_group(body, group_id=gid, role=core.options.role)
        plan = await core.deployments.deploy(root.with_group(group), group_id=gid,
                                             force=flag(request, "force"))
        return self._deployed(plan, 201)

    async def _put_group(self, request: Request, gid: str, version: str | None):
        core = self.core
        root = core.state.root
        force = flag(request, "force")
        body = {} if version is not None else body_json(request)
        if not isinstance(body, dict):
            raise validation.Invalid([{"path": "/", "errors": ["expected a group object"]}])
        if version is not None or body.get("version") is not None:
            version = version or body["version"]
            old = core.state.root_at(version)
            if old is None or gid not in old.groups:
                raise not_found(f"Group '{gid}' does not exist in version {version}")
            subtree = _subtree(old, gid)
            target = root.with_group(subtree)
        elif body.get("scaleBy") is not None:
            factor = body["scaleBy"]
            if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor < 0:
                raise validation.Invalid([{"path": "/scaleBy", "errors": [
                    "expected a number >= 0"]}])
            if gid not in root.groups:
                raise not_found(f"Group '{gid}' does not exist")
            target = root.scaled(gid, factor)
        else:
            merged = _with_current_children(body, root, gid)
            group = validation.normalize_group(merged, group_id=gid, role=core.options.role)
            target = root.with_group(group)
        if flag(request, "dryRun"):
            plan = core.deployments.plan(target)
            return json_response({"steps": [{"actions": [views.action_json(a) for a in step]}
                                            for step in plan.steps]})
        created = gid not in root.groups
        plan = await core.deployments.deploy(target, group_id=gid, force=force)
        return self._deployed(plan, 201 if created else 200)

    async def _delete_group(self, request: Request, gid: str):
        core = self.core
        if gid not in core.state.root.groups:
            raise not_found(f"Group '{gid}' does not exist")
        plan = await core.deployments.deploy(core.state.root.without_group(gid), group_id=gid,
                                             force=flag(request, "force", True))
        return self._deployed(plan)

    # -- deployments, queue -----------------------------------------------------------------

    @endpoint
    def deployments(self, request: Request):
        core = self.core
        rest = path_rest(request, "/v2/deployments").strip("/")
        if not rest:
            if request.method not in ("GET", "HEAD"):
                raise MarathonError(405, f"{request.method} is not allowed on /v2/deployments")
            runs = sorted(core.deployments.runs.values(), key=lambda r: r.plan.version)
            return json_response([views.deployment_json(r.plan, max(1, r.step),
                                                        core.deployments.readiness(r))
                                  for r in runs])
        run = core.deployments.runs.get(rest)
        if run is None:
            raise not_found(f"DeploymentPlan {rest} does not exist")
        if request.method in ("GET", "HEAD"):
            return json_response(views.deployment_json(run.plan, max(1, run.step),
                                                       core.deployments.readiness(run)))
        if request.method != "DELETE":
            raise MarathonError(405, f"{request.method} is not allowed on a deployment")
        if flag(request, "force"):
            core.deployments.cancel(rest)
            return Response(202)
        return self._rollback(rest)

    async def _rollback(self, plan_id: str):
        plan = await self.core.deployments.rollback(plan_id)
        return self._deployed(plan)

    @endpoint
    def queue(self, request: Request):
        core = self.core
        rest = path_rest(request, "/v2/queue").strip("/")
        if rest:
            if request.method == "DELETE" and rest.endswith("/delay"):
                app_id = ids.canonical("/" + rest[:-len("/delay")])
                if not core.state.scheduled(app_id):
                    raise not_found(f"Application {app_id} not found in tasks queue.")
                core.scheduler.reset_delay(app_id)
                return Response(204)
            raise not_found(f"{request.method} {request.path} is not a queue endpoint")
        want_offers = "lastUnusedOffers" in request.query.get("embed", [])
        now = core.now()
        items = []
        for app_id in sorted(core.state.by_app):
            app = core.state.app(app_id)
            waiting = core.state.scheduled(app_id)
            if app is None or not waiting:
                continue
            delay = core.state.delays.get(app_id)
            left = delay.time_left(now) if delay is not None else 0.0
            stats = core.scheduler.stats.get(app_id) or PlacementStats()
            since = core.scheduler.waiting_since.get(app_id, now)
            items.append(views.queue_item(app, len(waiting), left, since,
                                          views.offers_summary(stats),
                                          views.unused_offers(stats) if want_offers else None))
        return json_response({"queue": items})

    # -- info, leader, ping, metrics ----------------------------------------------------------

    @endpoint
    def info(self, request: Request):
        node = self.node
        core = node.core
        o = node.options
        leader = node.leader_address()
        return json_response({
            "name": "marathon", "version": VERSION, "buildref": "agora",
            "elected": core is not None, "leader": leader,
            "frameworkId": core.state.framework_id if core is not None else None,
            "marathon_config": {
                "checkpoint": True, "executor": "//cmd", "failover_timeout": int(o.failover_timeout),
                "framework_name": o.framework_name, "ha": node.zk is not None,
                "hostname": o.hostname, "local_port_min": validation.SERVICE_PORTS[0],
                "local_port_max": validation.SERVICE_PORTS[1], "master": node.master,
                "mesos_role": o.role, "mesos_user": o.user, "webui_url": o.webui_url or None,
                "reconciliation_initial_delay": int(o.reconciliation_initial_delay * 1000),
                "reconciliation_interval": int(o.reconciliation_interval * 1000),
                "task_launch_timeout": int(o.task_launch_timeout * 1000),
                "task_launch_confirm_timeout": int(o.task_launch_confirm_timeout * 1000),
                "decline_offer_duration": int(o.decline_offer_duration * 1000),
                "max_instances_per_offer": o.max_instances_per_offer,
                "min_revive_offers_interval": int(o.min_revive_interval * 1000),
                "scale_apps_interval": int(o.scale_apps_interval * 1000), "features": []},
            "zookeeper_config": {"zk": str(node.zk) if node.zk else None,
                                 "zk_max_versions": node.max_versions,
                                 "zk_session_timeout": int(node.zk_session_timeout * 1000)},
            "http_config": {"http_port": node.port, "https_port": None, "assets_path": None},
            "event_subscriber": {"type": "http_callback",
                                 "http_endpoints": list(core.state.subscriptions)
                                 if core is not None else []},
        })

    @endpoint
    def leader(self, request: Request):
        node = self.node
        if request.method == "DELETE":
            if node.core is None:
                raise not_found("There is no leader")
            if node.zk is None:
                raise MarathonError(400, "This Marathon runs without --zk: there is no "
                                         "other one to take over, so it does not abdicate")
            node.abdicate()
            return json_response({"message": "Leadership abdicated"})
        leader = node.leader_address()
        if leader is None:
            raise not_found("There is no leader")
        return json_response({"leader": leader})

    def ping(self, request: Request) -> Response:
        if "application/json" in (request.header("accept") or ""):
            return json_response("pong")
        return Response(200, b"pong", (), "text/plain; charset=utf-8")

    def metrics(self, request: Request) -> Response:
        node = self.node
        core = node.core
        gauges = {}
        counters = {}
        if core is not None:
            state = core.state
            running = sum(1 for i in state.instances.values() if i.condition == inst.RUNNING_C)
            gauges = {"marathon.apps.active.gauge": {"value": len(state.root.apps)},
                      "marathon.groups.active.gauge": {"value": len(state.root.groups)},
                      "marathon.instances.running.gauge": {"value": running},
                      "marathon.instances.launch-queue.gauge": {"value": sum(
                          1 for i in state.instances.values()
                          if i.condition == inst.SCHEDULED)},
                      "marathon.deployments.active.gauge": {"value": len(core.deployments.runs)},
                      "marathon.http.event-streams.active.gauge": {
                          "value": len(core.bus.streams)}}
            counters = {"marathon.tasks.launched.counter": {"count": core.scheduler.launched},
                        "marathon.mesos.task-updates.counter": {"count": core.scheduler.updates},
                        "marathon.deployments.counter": {"count": core.deployments.completed},
                        "marathon.events.published.counter": {"count": core.bus.published}}
        gauges["marathon.leadership.elected.gauge"] = {"value": 1 if core is not None else 0}
        return json_response({"version": "4.0.0", "counters": counters, "gauges": gauges,
                              "histograms": {}, "meters": {}, "timers": {}})

    # -- events -------------------------------------------------------------------------------

    @endpoint
    def events(self, request: Request):
        core = self.core
        if request.method not in ("GET", "HEAD"):
            raise MarathonError(405, f"{request.method} is not allowed on /v2/events")
        filters = frozenset(request.query.get("event_type", []))
        unknown = filters - events.KNOWN - events.EXTRA
        if unknown:
            raise MarathonError(400, f"Unknown event types: {', '.join(sorted(unknown))}")
        remote = f"{request.peer[0]}:{request.peer[1]}"

        def start(stream):
            token = object()
            core.bus.subscribe(token, filters, lambda e: stream.write(events.frame(e)))
            # Comments keep proxies from holding the first bytes back.
            stream.write(b": connected\n\n")
            now = core.now()

            def closed():
                core.bus.unsubscribe(token)
                core.bus.publish("event_stream_detached",
                                 lambda: events.stream_detached(core.now(), remote))

            stream.on_close(closed)
            core.bus.publish("event_stream_attached",
                             lambda: events.stream_attached(now, remote))

        return StreamingResponse(start, 200, [("Cache-Control", "no-cache")],
                                 "text/event-stream")

    @endpoint
    async def subscriptions(self, request: Request):
        core = self.core
        url = param(request, "callbackUrl")
        if request.method in ("GET", "HEAD"):
            return json_response({"callbackUrls": list(core.state.subscriptions)})
        if request.method not in ("POST", "DELETE"):
            raise MarathonError(405, f"{request.method} is not allowed on subscriptions")
        if not url:
            raise MarathonError(400, "callbackUrl is required")
        if not url.startswith(("http://", "https://")):
            raise MarathonError(422, "callbackUrl must be an http:// or https:// URL")
        now = core.now()
        urls = [u for u in core.state.subscriptions if u != url]
        if request.method == "POST":
            urls.append(url)
            event = events.subscribe(now, request.peer[0], url)
        else:
            event = events.unsubscribe(now, request.peer[0], url)
        await core.state.set_subscriptions(urls)
        core.bus.callbacks = list(urls)
        core.bus.publish(event["eventType"], lambda: event)
        return json_response(event)


# -- helpers ----------------------------------------------------------------------------------

def _looks_fetched(body: dict) -> bool:
    """A whole app the client fetched and PUTs back (it keeps `version` only if set)."""
    return any(k in body for k in ("tasks", "tasksRunning", "deployments", "versionInfo"))


def _subtree(root, gid: str) -> dict:
    """A normalized group body of `root`'s subtree at `gid`."""
    app_ids, group_ids = root.children(gid)
    group = root.groups.get(gid) or groups.Group(gid)
    return {"id": gid, "apps": [root.apps[a] for a in app_ids],
            "groups": [_subtree(root, g) for g in group_ids],
            "dependencies": list(group.dependencies)}


def _with_current_children(body: dict, root, gid: str) -> dict:
    """A PUT body that leaves out `apps` or `groups` keeps the current ones (recursively)."""
    app_ids, group_ids = root.children(gid)
    out = dict(body)
    if "apps" not in out:
        out["apps"] = [root.apps[a] for a in app_ids]
    if "groups" not in out:
        out["groups"] = [_subtree(root, g) for g in group_ids]
    else:
        merged = []
        for child in out["groups"] or []:
            if isinstance(child, dict) and child.get("id"):
                try:
                    cid = ids.canonical(child["id"], gid)
                except ids.InvalidId:
                    merged.append(child)
                    continue
                if cid in root.groups:
                    child = _with_current_children({**child, "id": cid}, root, cid)
            merged.append(child)
        out["groups"] = merged
    if "dependencies" not in out:
        out["dependencies"] = list((root.groups.get(gid) or groups.Group(gid)).dependencies)
    return out


def _label_selector(text: str):
    """Marathon's label selector: `k`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`,
    comma = and; a backslash escapes."""
    clauses = []
    for part in _split_unescaped(text, ","):
        part = part.strip()
        m = re.fullmatch(r"(\S+)\s+(in|notin)\s+\((.*)\)", part)
        if m:
            values = {v.strip().replace("\\", "") for v in _split_unescaped(m.group(3), ",")}
            key, negate = m.group(1), m.group(2) == "notin"
            clauses.append(lambda labels, k=key, vs=values, n=negate:
                           (labels.get(k) in vs) != n if k in labels else n)
        elif "!=" in part:
            k, v = part.split("!=", 1)
            clauses.append(lambda labels, k=k.strip(), v=v.strip(): labels.get(k) != v)
        elif "==" in part:
            k, v = part.split("==", 1)
            clauses.append(lambda labels, k=k.strip(), v=v.strip(): labels.get(k) == v)
        elif part:
            clauses.append(lambda labels, k=part: k in labels)
    return lambda labels: all(c(labels) for c in clauses)


def _split_unescaped(text: str, sep: str) -> list[str]:
    """`text` split at `sep`, except where escaped with a backslash or inside parentheses."""
    out, cur, escaped, depth = [], [], False, 0
    for ch in text:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            depth += (ch == "(") - (ch == ")")
            cur.append(ch)
    out.append("".join(cur))
    return out
