"""The group tree: every app by path id, the groups above them, and how they depend.

A `Root` is one version of everything Marathon was asked to run. It is a value: each change
(an app created, a group replaced, a scale) makes a new Root, and a deployment plan is the
difference between two of them (planner.py). Apps are canonical app dicts
(validation.normalize_app) and are never changed in place.

    Root(version)
      groups: "/" -> Group, "/shop" -> Group(dependencies=("/db",)), ...
      apps:   "/shop/web" -> {...}, "/db/pg" -> {...}

Pure: no I/O.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import attrs

from frameworks.marathon import ids, validation


@attrs.frozen
class Group:
    """A group: its id, what it depends on (app or group ids), its version."""

    id: str
    dependencies: tuple[str, ...] = ()
    version: str = ""


@attrs.frozen
class Root:
    """Every app and group; `groups` holds "/" and every ancestor of every app."""

    apps: Mapping[str, dict] = attrs.field(factory=dict)
    groups: Mapping[str, Group] = attrs.field(factory=lambda: {ids.ROOT: Group(ids.ROOT)})
    version: str = ""

    # -- reading ------------------------------------------------------------------------

    def app(self, app_id: str) -> dict | None:
        return self.apps.get(app_id)

    def apps_within(self, group_id: str) -> list[str]:
        """Ids of the apps in `group_id` and every group below it, sorted."""
        return sorted(a for a in self.apps if ids.is_within(a, group_id) and a != group_id)

    def groups_within(self, group_id: str) -> list[str]:
        """Ids of the groups strictly below `group_id`, sorted."""
        return sorted(g for g in self.groups if g != group_id and ids.is_within(g, group_id))

    def children(self, group_id: str) -> tuple[list[str], list[str]]:
        """(app ids, group ids) directly inside `group_id`."""
        apps = sorted(a for a in self.apps if ids.parent(a) == group_id)
        groups = sorted(g for g in self.groups if g != ids.ROOT and ids.parent(g) == group_id)
        return apps, groups

    # -- changing -------------------------------------------------------------------------

    def with_app(self, app: dict) -> Root:
        """This root with `app` added or replaced (and any missing parent groups created)."""
        apps = dict(self.apps)
        apps[app["id"]] = app
        groups = dict(self.groups)
        for g in ids.ancestors(app["id"]):
            groups.setdefault(g, Group(g))
        return attrs.evolve(self, apps=apps, groups=groups)

    def with_apps(self, new_apps: Iterable[dict]) -> Root:
        root = self
        for app in new_apps:
            root = root.with_app(app)
        return root

    def without_app(self, app_id: str) -> Root:
        apps = dict(self.apps)
        apps.pop(app_id, None)
        return attrs.evolve(self, apps=apps)

    def without_group(self, group_id: str) -> Root:
        """This root without `group_id` and everything in it (the root group stays)."""
        apps = {a: v for a, v in self.apps.items() if not ids.is_within(a, group_id)}
        groups = {g: v for g, v in self.groups.items()
                  if g == ids.ROOT or not ids.is_within(g, group_id)}
        if group_id == ids.ROOT:
            groups[ids.ROOT] = Group(ids.ROOT)
        return attrs.evolve(self, apps=apps, groups=groups)

    def with_group(self, body: dict) -> Root:
        """This root with the subtree at `body["id"]` replaced by a normalized group body
        (validation.normalize_group): apps the body leaves out are gone."""
        gid = body["id"]
        root = self.without_group(gid)
        groups = dict(root.groups)
        for g in ids.ancestors(gid) if gid != ids.ROOT else []:
            groups.setdefault(g, Group(g))
        root = attrs.evolve(root, groups=groups)
        return root._insert(body)

    def _insert(self, body: dict) -> Root:
        groups = dict(self.groups)
        old = groups.get(body["id"])
        groups[body["id"]] = Group(body["id"], tuple(body.get("dependencies") or ()),
                                   old.version if old else "")
        root = attrs.evolve(self, groups=groups).with_apps(body.get("apps") or ())
        for child in body.get("groups") or ():
            root = root._insert(child)
        return root

    def scaled(self, group_id: str, factor: float) -> Root:
        """Every app in `group_id` with `instances` multiplied by `factor` (rounded up)."""
        import math

        apps = dict(self.apps)
        for a in self.apps_within(group_id):
            apps[a] = {**apps[a], "instances": int(math.ceil(apps[a]["instances"] * factor))}
        return attrs.evolve(self, apps=apps)

    # -- dependencies ---------------------------------------------------------------------

    def dependencies_of(self, app_id: str) -> set[str]:
        """The app ids `app_id` depends on: its own dependencies and those of every group
        above it, a dependency on a group meaning every app in it."""
        wanted = list(self.apps[app_id].get("dependencies") or ())
        for g in ids.ancestors(app_id):
            group = self.groups.get(g)
            if group is not None:
                wanted.extend(group.dependencies)
        out: set[str] = set()
        for dep in wanted:
            if dep in self.apps:
                out.add(dep)
            else:
                out.update(self.apps_within(dep))
        out.discard(app_id)
        return out

    def dependency_cycle(self) -> list[str] | None:
        """Some cycle among the apps' dependencies, or None."""
        graph = {a: self.dependencies_of(a) for a in self.apps}
        state: dict[str, int] = {}
        stack: list[str] = []

        def visit(a: str) -> list[str] | None:
            state[a] = 1
            stack.append(a)
            for d in sorted(graph[a]):
                if state.get(d) == 1:
                    return stack[stack.index(d):] + [d]
                if d not in state:
                    found = visit(d)
                    if found:
                        return found
            stack.pop()
            state[a] = 2
            return None

        for a in sorted(graph):
            if a not in state:
                found = visit(a)
                if found:
                    return found
        return None


def check(root: Root) -> None:
    """validation.Invalid if `root` cannot be deployed: a dependency cycle, an app id that is
    also a group id."""
    problems = []
    clash = sorted(set(root.apps) & set(root.groups))
    for c in clash:
        problems.append({"path": "/", "errors": [f"{c} is both an app and a group"]})
    cycle = root.dependency_cycle()
    if cycle:
        problems.append({"path": "/dependencies",
                         "errors": ["dependency cycle: " + " -> ".join(cycle)]})
    if problems:
        raise validation.Invalid(problems)


# --- versions and service ports ---------------------------------------------------------

def config_of(app: dict) -> dict:
    """What a restart is needed for: the app without instances and versions."""
    return {k: v for k, v in app.items() if k not in ("instances", "version", "versionInfo")}


def config_version(app: dict) -> str:
    """The version of the app's configuration (versionInfo.lastConfigChangeAt)."""
    info = app.get("versionInfo") or {}
    return info.get("lastConfigChangeAt") or app.get("version") or ""


def versioned(original: Root, target: Root, version: str, restart: Iterable[str] = ()) -> Root:
    """`target` with versions set: apps that are new or changed in any way get `version`,
    and `versionInfo.lastConfigChangeAt` too unless only `instances` changed; apps named in
    `restart` count as changed in configuration. Service ports 0 are assigned (§2.2)."""
    restart = set(restart)
    used = _service_ports(target)
    apps = {}
    for app_id, app in target.apps.items():
        old = original.apps.get(app_id)
        app = _assign_service_ports(app, old, used)
        if old is None or app_id in restart or config_of(old) != config_of(app):
            app = {**app, "version": version,
                   "versionInfo": {"lastScalingAt": version, "lastConfigChangeAt": version}}
        elif old.get("instances") != app.get("instances"):
            info = old.get("versionInfo") or {}
            app = {**app, "version": version,
                   "versionInfo": {"lastScalingAt": version,
                                   "lastConfigChangeAt": info.get("lastConfigChangeAt", version)}}
        else:
            app = {**app, "version": old.get("version", version),
                   "versionInfo": old.get("versionInfo") or
                   {"lastScalingAt": version, "lastConfigChangeAt": version}}
        apps[app_id] = app
    groups = {}
    for gid, group in target.groups.items():
        old = original.groups.get(gid)
        changed = old is None or old.dependencies != group.dependencies or \
            sorted(target.apps_within(gid)) != sorted(original.apps_within(gid)) or \
            any(apps[a] is not original.apps.get(a) and
                apps[a].get("version") == version for a in target.apps_within(gid))
        groups[gid] = attrs.evolve(group, version=version if changed or not group.version
                                   else group.version)
    return Root(apps, groups, version)


def _service_ports(root: Root) -> set[int]:
    used = set()
    for app in root.apps.values():
        for p in _ports_of(app):
            if p.get("port" if "port" in p else "servicePort"):
                used.add(p.get("port") or p.get("servicePort"))
    return used


def _ports_of(app: dict) -> list:
    if "portDefinitions" in app:
        return app["portDefinitions"]
    return (app.get("container") or {}).get("portMappings") or []


def _assign_service_ports(app: dict, old: dict | None, used: set[int]) -> dict:
    ports = _ports_of(app)
    key = "port" if "portDefinitions" in app else "servicePort"
    if not any(p.get(key) == 0 for p in ports):
        return app
    old_ports = _ports_of(old) if old else []
    new_ports = []
    candidate = validation.SERVICE_PORTS[0]
    for i, p in enumerate(ports):
        if p.get(key) == 0:
            keep = old_ports[i].get(key) if i < len(old_ports) else 0
            if keep:
                p = {**p, key: keep}
            else:
                while candidate in used and candidate <= validation.SERVICE_PORTS[1]:
                    candidate += 1
                if candidate > validation.SERVICE_PORTS[1]:
                    raise validation.Invalid([{"path": "/portDefinitions", "errors": [
                        "no service port left in 10000-20000"]}])
                used.add(candidate)
                p = {**p, key: candidate}
        new_ports.append(p)
    if key == "port":
        return {**app, "portDefinitions": new_ports}
    return {**app, "container": {**app["container"], "portMappings": new_ports}}
