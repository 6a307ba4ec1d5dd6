"""What Marathon knows, in memory, and how each piece is kept in the store.

`State` holds the current Root (the latest target), every instance (by id, by app, by task
id), app versions, launch delays, the last task failure per app and health results. Changes
go through its methods so that the indexes and the store stay in step with the books; each
write returns a Deferred that fires once it is durable (store.Store's group commit).

Health results and launch delays live only in memory, as in Marathon.
"""

from __future__ import annotations

from twisted.internet import defer

from frameworks.marathon import ids
from frameworks.marathon.groups import Group, Root
from frameworks.marathon.instances import SCHEDULED, Instance
from frameworks.marathon.store import Store, version_key


class State:
    def __init__(self, store: Store, max_versions: int = 50):
        self.store = store
        self.max_versions = max_versions
        self.root = Root()
        self.instances: dict[str, Instance] = {}
        self.by_app: dict[str, dict[str, Instance]] = {}
        self.by_task: dict[str, Instance] = {}
        self.delays: dict = {}  # app id -> backoff.Delay
        self.failures: dict[str, dict] = {}  # app id -> lastTaskFailure JSON
        self.health: dict[str, list] = {}  # instance id -> [health.Health] per check
        self.readiness: dict[str, dict] = {}  # instance id -> readiness result JSON
        self.versions: dict[str, list[str]] = {}  # app id -> stored versions, oldest first
        self.framework_id: str | None = None
        self.subscriptions: list[str] = []

    # -- loading --------------------------------------------------------------------------

    def load(self) -> None:
        """Rebuild the books from what the store read (store.open())."""
        data = self.store.data
        tree = data["groups"].get("root") or {}
        group_map = {gid: Group(gid, tuple(g.get("dependencies") or ()), g.get("version", ""))
                     for gid, g in (tree.get("groups") or {}).items()}
        group_map.setdefault(ids.ROOT, Group(ids.ROOT))
        self.root = Root(dict(data["apps"]), group_map, tree.get("version", ""))
        self.versions = {}
        for key in data["versions"]:
            app_id, _, version = key.rpartition("@")
            self.versions.setdefault(app_id, []).append(version)
        for v in self.versions.values():
            v.sort()
        self.instances, self.by_app, self.by_task = {}, {}, {}
        for record in data["instances"].values():
            self._index(Instance.from_record(record))
        meta = data["meta"]
        self.framework_id = meta.get("framework-id")
        self.subscriptions = list(meta.get("subscriptions") or [])
        self.failures = {k[len("failure:"):]: v for k, v in meta.items()
                         if k.startswith("failure:")}

    # -- apps and groups ------------------------------------------------------------------

    def app(self, app_id: str) -> dict | None:
        return self.root.apps.get(app_id)

    def app_version(self, app_id: str, version: str) -> dict | None:
        """The app as it was at `version` (the current app if that is its version)."""
        app = self.root.apps.get(app_id)
        if app is not None and app.get("version") == version:
            return app
        return self.store.get("versions", version_key(app_id, version))

    def app_versions(self, app_id: str) -> list[str]:
        """Stored versions of an app, newest first."""
        return list(reversed(self.versions.get(app_id, [])))

    def root_versions(self) -> list[str]:
        return sorted(self.store.data["roots"], reverse=True)

    def root_at(self, version: str) -> Root | None:
        """The whole tree as it was at `version` (None if it is no longer stored)."""
        record = self.store.get("roots", version)
        if record is None:
            return None
        apps = {}
        for app_id, app_version in record["apps"].items():
            app = self.app_version(app_id, app_version)
            if app is None:
                return None
            apps[app_id] = app
        group_map = {gid: Group(gid, tuple(g.get("dependencies") or ()), g.get("version", ""))
                     for gid, g in record["groups"].items()}
        return Root(apps, group_map, version)

    def set_root(self, root: Root) -> defer.Deferred:
        """Make `root` current: write the apps that changed, their new versions, the tree."""
        old, self.root = self.root, root
        store, writes = self.store, []
        for app_id, app in root.apps.items():
            if old.apps.get(app_id) is app:
                continue
            writes.append(store.put("apps", app_id, app))
            versions = self.versions.setdefault(app_id, [])
            if app["version"] not in versions:
                versions.append(app["version"])
                versions.sort()
                writes.append(store.put("versions", version_key(app_id, app["version"]), app))
            while len(versions) > self.max_versions:
                writes.append(store.delete("versions", version_key(app_id, versions.pop(0))))
        for app_id in old.apps:
            if app_id not in root.apps:
                writes.append(store.delete("apps", app_id))
        tree = {gid: {"dependencies": list(g.dependencies), "version": g.version}
                for gid, g in root.groups.items()}
        writes.append(store.put("groups", "root", {"version": root.version, "groups": tree}))
        writes.append(store.put("roots", root.version, {
            "groups": tree, "apps": {a: app["version"] for a, app in root.apps.items()}}))
        for stale in sorted(store.data["roots"])[:-self.max_versions]:
            writes.append(store.delete("roots", stale))
        return defer.gatherResults(writes, consumeErrors=True)

    def forget_versions(self, app_id: str) -> None:
        """Drop the stored versions of an app that is gone."""
        for version in self.versions.pop(app_id, []):
            self.store.delete("versions", version_key(app_id, version))

    # -- instances ------------------------------------------------------------------------

    def _index(self, i: Instance) -> None:
        self.instances[i.id] = i
        self.by_app.setdefault(i.app_id, {})[i.id] = i
        if i.task_id is not None:
            self.by_task[i.task_id] = i

    def of_app(self, app_id: str) -> list[Instance]:
        return list(self.by_app.get(app_id, {}).values())

    def scheduled(self, app_id: str) -> list[Instance]:
        return [i for i in self.by_app.get(app_id, {}).values()
                if i.condition == SCHEDULED and i.goal == "Running"]

    def add(self, i: Instance) -> defer.Deferred:
        self._index(i)
        return self.save(i)

    def save(self, i: Instance) -> defer.Deferred:
        if i.task_id is not None:
            self.by_task[i.task_id] = i
        return self.store.put("instances", i.id, i.to_record())

    def forget_task(self, task_id: str | None) -> None:
        if task_id is not None:
            self.by_task.pop(task_id, None)

    def expunge(self, i: Instance) -> defer.Deferred:
        """Forget an instance for good."""
        self.instances.pop(i.id, None)
        app = self.by_app.get(i.app_id)
        if app is not None:
            app.pop(i.id, None)
            if not app:
                del self.by_app[i.app_id]
        self.forget_task(i.task_id)
        self.health.pop(i.id, None)
        self.readiness.pop(i.id, None)
        return self.store.delete("instances", i.id)

    # -- the rest -------------------------------------------------------------------------

    def set_framework_id(self, framework_id: str) -> defer.Deferred:
        self.framework_id = framework_id
        return self.store.put("meta", "framework-id", framework_id)

    def set_failure(self, app_id: str, failure: dict) -> None:
        self.failures[app_id] = failure
        self.store.put("meta", f"failure:{app_id}", failure)

    def forget_failure(self, app_id: str) -> None:
        if self.failures.pop(app_id, None) is not None:
            self.store.delete("meta", f"failure:{app_id}")

    def set_subscriptions(self, urls: list[str]) -> defer.Deferred:
        self.subscriptions = list(urls)
        return self.store.put("meta", "subscriptions", self.subscriptions)

