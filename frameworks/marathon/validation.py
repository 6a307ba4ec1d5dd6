"""App and group definitions as users send them -> the canonical form we store and serve.

`normalize_app(raw, ...)` checks a Marathon app JSON (specs/marathon-api.md §2) and returns the
canonical app: every default applied, deprecated fields translated (`ports`, `uris`,
`docker.network`, `docker.portMappings`, `ipAddress`), ids made absolute. Anything wrong is
collected, not stopped at: `Invalid.details` is the list Marathon answers with 422,
`[{"path": "/upgradeStrategy/minimumHealthCapacity", "errors": ["..."]}]`. Unknown and
read-only keys (`tasks`, `deployments`, `versionInfo`, ...) are ignored, because the client
PUTs back what it GETs (§0 rule 11).

`normalize_group(raw, ...)` does the same for a group body (`/v2/groups`): nested groups and
their apps, ids relative to the enclosing group.

Pure: no I/O.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

from frameworks.marathon import ids

DEFAULTS = {
    "cpus": 1.0, "mem": 128.0, "disk": 0.0, "gpus": 0, "instances": 1, "executor": "",
    "backoffSeconds": 1, "backoffFactor": 1.15, "maxLaunchDelaySeconds": 300,
    "killSelection": "YOUNGEST_FIRST", "requirePorts": False,
}
KILL_SELECTIONS = ("YOUNGEST_FIRST", "OLDEST_FIRST")
PROTOCOLS = ("tcp", "udp", "udp,tcp")
HEALTH_PROTOCOLS = ("HTTP", "HTTPS", "TCP", "COMMAND", "MESOS_HTTP", "MESOS_HTTPS", "MESOS_TCP")
MARATHON_CHECKS = ("HTTP", "HTTPS", "TCP")
MESOS_CHECKS = ("MESOS_HTTP", "MESOS_HTTPS", "MESOS_TCP")
CONSTRAINT_OPERATORS = ("UNIQUE", "CLUSTER", "GROUP_BY", "LIKE", "UNLIKE", "MAX_PER", "IS")
NETWORK_MODES = ("host", "container", "container/bridge")
PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
EXECUTOR = re.compile(r"^(//cmd)|(/?[^/]+(/[^/]+)*)|$")
#: Where service ports are assigned from (Marathon's --local_port_min/max).
SERVICE_PORTS = (10000, 20000)
_ONLY_ID_AND_VERSION = "The 'version' field may only be combined with the 'id' field."


class Invalid(ValueError):
    """A definition that cannot be accepted; `details` as Marathon's 422 body lists them."""

    def __init__(self, details: list[dict], message: str = "Object is not valid"):
        super().__init__(f"{message}: " + "; ".join(
            f"{d['path']}: {', '.join(d['errors'])}" for d in details))
        self.message = message
        self.details = details


class _Errors:
    def __init__(self) -> None:
        self.by_path: dict[str, list[str]] = {}

    def add(self, path: str, message: str) -> None:
        self.by_path.setdefault(path or "/", []).append(message)

    def details(self) -> list[dict]:
        return [{"path": p, "errors": e} for p, e in self.by_path.items()]

    def raise_if_any(self) -> None:
        if self.by_path:
            raise Invalid(self.details())


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Reader:
    """Typed reads of one JSON object's fields, recording errors under `path`."""

    def __init__(self, obj: dict, path: str, errors: _Errors):
        self.obj, self.path, self.errors = obj, path, errors

    def at(self, key: str) -> str:
        return f"{self.path}/{key}"

    def has(self, key: str) -> bool:
        return self.obj.get(key) is not None

    def fail(self, key: str, message: str) -> None:
        self.errors.add(self.at(key) if key else self.path, message)

    def number(self, key: str, default=None, minimum=None, maximum=None, integer=False):
        value = self.obj.get(key)
        if value is None:
            return default
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
            math.isfinite(value)
        if ok and integer and not float(value).is_integer():
            ok = False
        if not ok:
            self.fail(key, f"expected {'a whole number' if integer else 'a number'}, got "
                           f"{_describe(value)}")
            return default
        if minimum is not None and value < minimum:
            self.fail(key, f"got {value}, expected {minimum} or more")
        if maximum is not None and value > maximum:
            self.fail(key, f"got {value}, expected {maximum} or less")
        return int(value) if integer else float(value)

    def string(self, key: str, default=None, non_empty=False, choices=None, max_length=None):
        value = self.obj.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            self.fail(key, f"expected a string, got {_describe(value)}")
            return default
        if non_empty and not value:
            self.fail(key, "must not be empty")
        if choices is not None and value not in choices:
            self.fail(key, f"got {value!r}, expected one of {', '.join(choices)}")
            return default
        if max_length is not None and len(value) > max_length:
            self.fail(key, f"is longer than {max_length} characters")
        return value

    def boolean(self, key: str, default=None):
        value = self.obj.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {_describe(value)}")
            return default
        return value

    def object(self, key: str, default=None):
        value = self.obj.get(key)
        if value is None:
            return default
        if not isinstance(value, dict):
            self.fail(key, f"expected a JSON object, got {_describe(value)}")
            return default
        return value

    def array(self, key: str, default=None):
        value = self.obj.get(key)
        if value is None:
            return default
        if not isinstance(value, list):
            self.fail(key, f"expected a JSON array, got {_describe(value)}")
            return default
        return value

    def strings(self, key: str, default=None):
        items = self.array(key)
        if items is None:
            return default
        out = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                out.append(item)
            else:
                self.errors.add(f"{self.at(key)}({i})", f"expected a string, got {_describe(item)}")
        return out

    def string_map(self, key: str):
        value = self.object(key)
        if value is None:
            return {}
        out = {}
        for k, v in value.items():
            if isinstance(v, str):
                out[k] = v
            else:
                self.errors.add(f"{self.at(key)}/{k}", f"expected a string, got {_describe(v)}")
        return out


# --- apps --------------------------------------------------------------------------------

def is_rollback(raw: dict) -> bool:
    """Whether an app body asks for a stored version: `{"version": v}` (plus at most `id`)."""
    return isinstance(raw, dict) and raw.get("version") is not None and \
        set(k for k, v in raw.items() if v is not None) <= {"id", "version"}


def check_rollback(raw: dict) -> str:
    """The version a rollback body names; Invalid if `version` comes with other fields."""
    if not is_rollback(raw):
        raise Invalid([{"path": "/", "errors": [_ONLY_ID_AND_VERSION]}])
    version = raw["version"]
    if not isinstance(version, str):
        raise Invalid([{"path": "/version", "errors": ["expected a timestamp string"]}])
    return version


def normalize_app(raw: Any, *, base: str = ids.ROOT, app_id: str | None = None,
                  role: str = "*", path: str = "", existing: dict | None = None) -> dict:
    """The canonical app for `raw`, or Invalid.

    `base` is the group relative ids resolve against; `app_id` overrides the body's id (the
    id in the URL of a PUT); `existing` is the stored app a PUT partially updates: fields the
    body leaves out keep its values. `role` is the Mesos role this Marathon runs as.
    """
    errors = _Errors()
    if not isinstance(raw, dict):
        raise Invalid([{"path": path or "/", "errors": ["expected a JSON object"]}])
    if existing is not None:
        merged = _as_input(existing)
        # A partial update replaces the fields it names; a new way of saying the same thing
        # (portDefinitions vs ports, fetch vs uris) replaces the old one too.
        for old, new in (("ports", "portDefinitions"), ("uris", "fetch")):
            if raw.get(old) is not None:
                merged.pop(new, None)
        if raw.get("cmd") is not None:
            merged.pop("args", None)
        if raw.get("args") is not None:
            merged.pop("cmd", None)
        merged.update({k: v for k, v in raw.items() if v is not None or k in ("cmd", "args")})
        raw = {k: v for k, v in merged.items() if v is not None}
    app = _App(raw, path, errors, base, role, app_id).build()
    errors.raise_if_any()
    return app


def _as_input(app: dict) -> dict:
    """A stored canonical app as a body again (for partial updates)."""
    body = copy.deepcopy(app)
    for key in ("version", "versionInfo"):
        body.pop(key, None)
    return body


class _App:
    def __init__(self, raw: dict, path: str, errors: _Errors, base: str, role: str,
                 app_id: str | None):
        self.raw, self.path, self.errors = raw, path, errors
        self.r = _Reader(raw, path, errors)
        self.base, self.role, self.app_id = base, role, app_id
        # Set by _container, read by _networks (the deprecated docker.* forms).
        self.legacy_network: str | None = None
        self.legacy_port_mappings: list | None = None
        self.port_mappings_raw: list | None = None
        self.port_mappings_where = self.r.at("container/portMappings")

    def build(self) -> dict:
        r = self.r
        app: dict = {"id": self._id()}
        cmd = r.string("cmd")
        args = r.strings("args")
        container = self._container()
        if cmd is not None and not cmd:
            r.fail("cmd", "must not be empty")
        if cmd is not None and args:
            r.fail("", "AppDefinition must either contain one of 'cmd' or 'args', not both.")
        if not cmd and not args and container is None:
            r.fail("", "AppDefinition must either contain one of 'cmd' or 'args', and/or a "
                       "'container'.")
        if cmd:
            app["cmd"] = cmd
        if args:
            app["args"] = args
        user = r.string("user")
        if user is not None:
            app["user"] = user
        app["env"] = self._env()
        app["instances"] = r.number("instances", DEFAULTS["instances"], minimum=0, integer=True)
        app["cpus"] = r.number("cpus", DEFAULTS["cpus"], minimum=0.001)
        app["mem"] = r.number("mem", DEFAULTS["mem"], minimum=0)
        app["disk"] = r.number("disk", DEFAULTS["disk"], minimum=0)
        app["gpus"] = r.number("gpus", DEFAULTS["gpus"], minimum=0, integer=True)
        if app["gpus"]:
            r.fail("gpus", "Feature gpu_resources is not enabled: Agora agents offer no GPUs.")
        executor = r.string("executor", DEFAULTS["executor"])
        if not EXECUTOR.fullmatch(executor or ""):
            r.fail("executor", "must be empty, //cmd, or the path of an executor")
        app["executor"] = executor
        app["constraints"] = self._constraints()
        app["fetch"] = self._fetch()
        app["backoffSeconds"] = r.number("backoffSeconds", DEFAULTS["backoffSeconds"],
                                         minimum=0)
        app["backoffFactor"] = r.number("backoffFactor", DEFAULTS["backoffFactor"],
                                        minimum=1.0)
        app["maxLaunchDelaySeconds"] = r.number("maxLaunchDelaySeconds",
                                                DEFAULTS["maxLaunchDelaySeconds"], minimum=0)
        networks = self._networks(container)
        if container is not None:
            app["container"] = container
        port_definitions = self._port_definitions(networks)
        ports = port_definitions if networks[0]["mode"] == "host" else \
            (container or {}).get("portMappings") or []
        app["healthChecks"] = self._health_checks(ports)
        app["readinessChecks"] = self._readiness_checks(ports)
        app["dependencies"] = self._dependencies(app["id"])
        app["upgradeStrategy"] = self._upgrade_strategy()
        app["labels"] = r.string_map("labels")
        roles = self._accepted_roles()
        if roles is not None:
            app["acceptedResourceRoles"] = roles
        app["killSelection"] = r.string("killSelection", DEFAULTS["killSelection"],
                                        choices=KILL_SELECTIONS)
        app["unreachableStrategy"] = self._unreachable_strategy()
        grace = r.number("taskKillGracePeriodSeconds", minimum=0, integer=True)
        if grace is not None:
            app["taskKillGracePeriodSeconds"] = grace
        require_ports = r.boolean("requirePorts", DEFAULTS["requirePorts"])
        app["requirePorts"] = require_ports if networks[0]["mode"] == "host" else False
        app["networks"] = networks
        if networks[0]["mode"] == "host":
            app["portDefinitions"] = port_definitions
        app["role"] = self._role()
        self._secrets()
        if r.has("residency"):
            r.fail("residency", "resident apps (persistent volumes) are not supported")
        return app

    # -- pieces -------------------------------------------------------------------------

    def _id(self) -> str:
        r = self.r
        raw_id = self.app_id if self.app_id is not None else self.raw.get("id")
        if raw_id is None:
            r.fail("id", "An app needs an id (e.g. \"id\": \"/web\")")
            return "/unnamed"
        try:
            app_id = ids.canonical(raw_id, self.base)
        except ids.InvalidId as e:
            r.fail("id", str(e))
            return "/invalid"
        if app_id == ids.ROOT:
            r.fail("id", "the root group / cannot be an app")
        elif app_id.rsplit("/", 1)[1] in ids.RESERVED:
            r.fail("id", f"an app id may not end with {', '.join(sorted(ids.RESERVED))}")
        return app_id

    def _env(self) -> dict:
        value = self.r.object("env")
        out = {}
        for k, v in (value or {}).items():
            if isinstance(v, str):
                out[k] = v
            elif isinstance(v, dict) and "secret" in v:
                self.errors.add(self.r.at(f"env/{k}"),
                                "Feature secrets is not enabled: no secret store is configured")
            else:
                self.errors.add(self.r.at(f"env/{k}"),
                                f"expected a string or {{\"secret\": name}}, got {_describe(v)}")
        return out

    def _secrets(self) -> None:
        secrets = self.r.object("secrets")
        if secrets:
            self.r.fail("secrets", "Feature secrets is not enabled: no secret store is "
                                   "configured")

    def _constraints(self) -> list:
        items = self.r.array("constraints", [])
        out, seen = [], set()
        for i, item in enumerate(items):
            where = f"{self.r.at('constraints')}({i})"
            problems = constraint_errors(item)
            for p in problems:
                self.errors.add(where, p)
            if problems:
                continue
            key = tuple(item)
            if key in seen:
                self.errors.add(where, "duplicate constraint")
                continue
            seen.add(key)
            out.append(list(item))
        return out

    def _fetch(self) -> list:
        r = self.r
        fetch = r.array("fetch")
        uris = r.strings("uris")
        if fetch is not None and uris:
            r.fail("uris", "give either 'fetch' or the deprecated 'uris', not both")
        if fetch is None:
            fetch = [{"uri": u, "extract": _extractable(u)} for u in uris or []]
        out = []
        for i, item in enumerate(fetch):
            where = f"{r.at('fetch')}({i})"
            if not isinstance(item, dict):
                self.errors.add(where, f"expected an object with a 'uri', got {_describe(item)}")
                continue
            fr = _Reader(item, where, self.errors)
            uri = fr.string("uri", non_empty=True, max_length=1024)
            if uri is None:
                fr.fail("uri", "is required")
                continue
            entry = {"uri": uri, "extract": fr.boolean("extract", True),
                     "executable": fr.boolean("executable", False),
                     "cache": fr.boolean("cache", False)}
            dest = fr.string("destPath")
            if dest is not None:
                entry["destPath"] = dest
            out.append(entry)
        return out

    def _container(self) -> dict | None:
        r = self.r
        raw = r.object("container")
        if raw is None:
            return None
        where = r.at("container")
        cr = _Reader(raw, where, self.errors)
        kind = cr.string("type", "DOCKER", choices=("DOCKER", "MESOS"))
        container: dict = {"type": kind}
        docker = cr.object("docker")
        if docker is not None:
            dr = _Reader(docker, f"{where}/docker", self.errors)
            image = dr.string("image", non_empty=True)
            if image is None:
                dr.fail("image", "is required (e.g. \"image\": \"busybox:latest\")")
            out = {"image": image or "", "forcePullImage": dr.boolean("forcePullImage", False)}
            if kind == "DOCKER":
                privileged = dr.boolean("privileged", False)
                if privileged:
                    dr.fail("privileged", "privileged containers are not supported: Agora runs "
                                          "DOCKER apps in its unified containerizer")
                parameters = dr.array("parameters", [])
                if parameters:
                    dr.fail("parameters", "docker parameters are not supported: Agora runs "
                                          "DOCKER apps in its unified containerizer")
                out["privileged"] = False
                out["parameters"] = []
            container["docker"] = out
            network = dr.string("network", choices=("BRIDGE", "HOST", "USER", "NONE"))
            self.legacy_network = network
            self.legacy_port_mappings = dr.array("portMappings")
        elif kind == "DOCKER":
            cr.fail("docker", "a DOCKER container needs 'docker': {\"image\": ...}")
        container["volumes"] = self._volumes(cr, where)
        mappings = cr.array("portMappings")
        legacy = self.legacy_port_mappings
        if mappings is not None and legacy is not None:
            cr.fail("portMappings", "give container.portMappings or the deprecated "
                                    "container.docker.portMappings, not both")
        self.port_mappings_raw = mappings if mappings is not None else legacy
        self.port_mappings_where = f"{where}/portMappings" if mappings is not None \
            else f"{where}/docker/portMappings"
        return container

    def _volumes(self, cr: _Reader, where: str) -> list:
        out = []
        for i, v in enumerate(cr.array("volumes", [])):
            vwhere = f"{where}/volumes({i})"
            if not isinstance(v, dict):
                self.errors.add(vwhere, "expected a volume object")
                continue
            vr = _Reader(v, vwhere, self.errors)
            if vr.has("persistent") or vr.has("external"):
                self.errors.add(vwhere, "persistent and external volumes are not supported")
                continue
            if vr.has("secret"):
                self.errors.add(vwhere, "Feature secrets is not enabled: no secret store is "
                                        "configured")
                continue
            container_path = vr.string("containerPath", non_empty=True)
            host_path = vr.string("hostPath", non_empty=True)
            if container_path is None:
                vr.fail("containerPath", "is required")
            if host_path is None:
                vr.fail("hostPath", "is required for a host volume")
            mode = vr.string("mode", "RW", choices=("RO", "RW"))
            if container_path and host_path:
                out.append({"containerPath": container_path, "hostPath": host_path,
                            "mode": mode})
        return out

    def _networks(self, container: dict | None) -> list:
        r = self.r
        raw = r.array("networks")
        legacy = self.legacy_network
        ip_address = r.object("ipAddress")
        if legacy and raw:
            self.errors.add(r.at("container/docker/network"),
                            "the deprecated docker.network may not be combined with networks")
        if raw is None or not raw:
            if legacy in ("BRIDGE",):
                raw = [{"mode": "container/bridge"}]
            elif legacy == "USER" or ip_address is not None:
                name = (ip_address or {}).get("networkName")
                raw = [{"mode": "container", **({"name": name} if name else {})}]
            else:
                raw = [{"mode": "host"}]
        out = []
        for i, n in enumerate(raw):
            where = f"{r.at('networks')}({i})"
            if not isinstance(n, dict):
                self.errors.add(where, "expected a network object")
                continue
            nr = _Reader(n, where, self.errors)
            mode = nr.string("mode", "container", choices=NETWORK_MODES)
            entry = {"mode": mode}
            name = nr.string("name")
            if name:
                entry["name"] = name
            elif mode == "container":
                nr.fail("name", "a container network needs a name")
            labels = nr.string_map("labels")
            if labels:
                entry["labels"] = labels
            out.append(entry)
        if not out:
            out = [{"mode": "host"}]
        modes = {n["mode"] for n in out}
        if "host" in modes and len(out) > 1:
            r.fail("networks", "host networking may not be combined with other networks")
        if "container/bridge" in modes and len(out) > 1:
            r.fail("networks", "bridge networking may not be combined with other networks")
        if out[0]["mode"] != "host" and container is None:
            r.fail("networks", "container networking needs a 'container'")
        mappings = self.port_mappings_raw
        if out[0]["mode"] == "host":
            if mappings:
                self.errors.add(self.port_mappings_where,
                                "portMappings are not allowed with host-networking")
        elif container is not None:
            container["portMappings"] = self._port_mappings(mappings, out[0]["mode"])
        return out

    def _port_mappings(self, mappings, mode: str) -> list:
        where = self.port_mappings_where
        if mappings is None:
            return [{"containerPort": 0, "hostPort": 0, "servicePort": 0, "protocol": "tcp",
                     "name": "default"}] if mode == "container/bridge" else []
        out, names = [], set()
        for i, m in enumerate(mappings):
            mwhere = f"{where}({i})"
            if not isinstance(m, dict):
                self.errors.add(mwhere, "expected a port mapping object")
                continue
            mr = _Reader(m, mwhere, self.errors)
            entry = {"containerPort": mr.number("containerPort", 0, 0, 65535, integer=True)}
            host_port = mr.number("hostPort", 0 if mode == "container/bridge" else None, 0,
                                  65535, integer=True)
            if host_port is not None:
                entry["hostPort"] = host_port
            entry["servicePort"] = mr.number("servicePort", 0, 0, 65535, integer=True)
            entry["protocol"] = mr.string("protocol", "tcp", choices=PROTOCOLS)
            name = mr.string("name")
            if name is not None:
                if not PORT_NAME.match(name):
                    mr.fail("name", "a port name is lowercase letters, digits and hyphens")
                elif name in names:
                    mr.fail("name", f"duplicate port name {name!r}")
                names.add(name)
                entry["name"] = name
            labels = mr.string_map("labels")
            if labels:
                entry["labels"] = labels
            out.append(entry)
        return out

    def _port_definitions(self, networks: list) -> list:
        r = self.r
        raw = r.array("portDefinitions")
        ports = r.array("ports")
        if raw is not None and ports is not None and self.raw.get("portDefinitions") and ports:
            r.fail("ports", "give either 'portDefinitions' or the deprecated 'ports', not both")
        if raw is None and ports is not None:
            raw = [{"port": p} for p in ports]
        if networks[0]["mode"] != "host":
            return []
        if raw is None:
            raw = [{"port": 0, "name": "default"}]
        out, names, numbers = [], set(), set()
        for i, p in enumerate(raw):
            where = f"{r.at('portDefinitions')}({i})"
            if not isinstance(p, dict):
                self.errors.add(where, f"expected a port definition object, got {_describe(p)}")
                continue
            pr = _Reader(p, where, self.errors)
            port = pr.number("port", 0, 0, 65535, integer=True)
            entry = {"port": port, "protocol": pr.string("protocol", "tcp", choices=PROTOCOLS)}
            if port and port in numbers:
                pr.fail("port", f"duplicate port {port}")
            numbers.add(port)
            name = pr.string("name")
            if name is not None:
                if not PORT_NAME.match(name):
                    pr.fail("name", "a port name is lowercase letters, digits and hyphens")
                elif name in names:
                    pr.fail("name", f"duplicate port name {name!r}")
                names.add(name)
                entry["name"] = name
            labels = pr.string_map("labels")
            if labels:
                entry["labels"] = labels
            out.append(entry)
        return out

    def _health_checks(self, ports: list) -> list:
        out = []
        mesos_checks = 0
        for i, hc in enumerate(self.r.array("healthChecks", [])):
            where = f"{self.r.at('healthChecks')}({i})"
            if not isinstance(hc, dict):
                self.errors.add(where, "expected a health check object")
                continue
            hr = _Reader(hc, where, self.errors)
            protocol = hr.string("protocol", "HTTP", choices=HEALTH_PROTOCOLS) or "HTTP"
            check = {"protocol": protocol,
                     "gracePeriodSeconds": hr.number("gracePeriodSeconds", 300, 0, integer=True),
                     "intervalSeconds": hr.number("intervalSeconds", 60, 1, integer=True),
                     "timeoutSeconds": hr.number("timeoutSeconds", 20, 1, integer=True),
                     "maxConsecutiveFailures": hr.number("maxConsecutiveFailures", 3, 0,
                                                         integer=True)}
            if protocol in MESOS_CHECKS or protocol == "COMMAND":
                check["delaySeconds"] = hr.number("delaySeconds", 15, 0, integer=True)
            if protocol in MESOS_CHECKS:
                mesos_checks += 1
            if protocol == "COMMAND":
                command = hc.get("command")
                value = command.get("value") if isinstance(command, dict) else command
                if not isinstance(value, str) or not value:
                    hr.fail("command", "a COMMAND check needs \"command\": {\"value\": \"...\"}")
                check["command"] = {"value": value if isinstance(value, str) else ""}
            else:
                if protocol in ("HTTP", "HTTPS", "MESOS_HTTP", "MESOS_HTTPS"):
                    check["path"] = hr.string("path", "/")
                    if protocol in ("HTTP", "HTTPS"):
                        check["ignoreHttp1xx"] = hr.boolean("ignoreHttp1xx", False)
                port = hr.number("port", None, 0, 65535, integer=True)
                index = hr.number("portIndex", None, 0, integer=True)
                if port is not None and index is not None:
                    hr.fail("port", "give either port or portIndex, not both")
                if port is None and index is None:
                    if ports:
                        index = 0
                    else:
                        hr.fail("portIndex", "Health check port indices must address an "
                                             "element of the ports array or container port "
                                             "mappings.")
                if index is not None:
                    if index >= len(ports):
                        hr.fail("portIndex", "Health check port indices must address an "
                                             "element of the ports array or container port "
                                             "mappings.")
                    check["portIndex"] = index
                if port is not None:
                    check["port"] = port
                check["ipProtocol"] = hr.string("ipProtocol", "IPv4", choices=("IPv4", "IPv6"))
            out.append(check)
        if mesos_checks > 1:
            self.r.fail("healthChecks", "An app may have at most one Mesos health check "
                                        "(MESOS_HTTP, MESOS_HTTPS or MESOS_TCP)")
        return out

    def _readiness_checks(self, ports: list) -> list:
        checks = self.r.array("readinessChecks", [])
        if len(checks) > 1:
            self.r.fail("readinessChecks", "An app may have at most one readiness check")
        out = []
        names = [p.get("name") for p in ports]
        for i, rc in enumerate(checks[:1]):
            where = f"{self.r.at('readinessChecks')}({i})"
            if not isinstance(rc, dict):
                self.errors.add(where, "expected a readiness check object")
                continue
            rr = _Reader(rc, where, self.errors)
            check = {"name": rr.string("name", "readinessCheck"),
                     "protocol": rr.string("protocol", "HTTP", choices=("HTTP", "HTTPS")),
                     "path": rr.string("path", "/"),
                     "portName": rr.string("portName", "http-api"),
                     "intervalSeconds": rr.number("intervalSeconds", 30, 1, integer=True),
                     "timeoutSeconds": rr.number("timeoutSeconds", 10, 1, integer=True),
                     "httpStatusCodesForReady": rc.get("httpStatusCodesForReady") or [200],
                     "preserveLastResponse": rr.boolean("preserveLastResponse", False)}
            if check["portName"] not in names:
                rr.fail("portName", f"must name one of the app's ports "
                                    f"({', '.join(str(n) for n in names if n) or 'none named'})")
            if check["timeoutSeconds"] >= check["intervalSeconds"]:
                rr.fail("timeoutSeconds", "must be smaller than intervalSeconds")
            codes = check["httpStatusCodesForReady"]
            if not isinstance(codes, list) or not all(
                    isinstance(c, int) and 100 <= c < 600 for c in codes):
                rr.fail("httpStatusCodesForReady", "expected a list of HTTP status codes")
            out.append(check)
        return out

    def _dependencies(self, app_id: str) -> list:
        out = []
        for i, dep in enumerate(self.r.strings("dependencies", [])):
            try:
                out.append(ids.canonical(dep, ids.parent(app_id)))
            except ids.InvalidId as e:
                self.errors.add(f"{self.r.at('dependencies')}({i})", str(e))
        return sorted(set(out))

    def _upgrade_strategy(self) -> dict:
        raw = self.r.object("upgradeStrategy", {})
        ur = _Reader(raw, self.r.at("upgradeStrategy"), self.errors)
        strategy = {"minimumHealthCapacity": ur.number("minimumHealthCapacity", 1.0, 0, 1),
                    "maximumOverCapacity": ur.number("maximumOverCapacity", 1.0, 0, 1)}
        labels = self.raw.get("labels")
        if isinstance(labels, dict) and labels.get("MARATHON_SINGLE_INSTANCE_APP") == "true":
            if strategy["minimumHealthCapacity"] or strategy["maximumOverCapacity"]:
                ur.fail("", "a single-instance app needs minimumHealthCapacity and "
                            "maximumOverCapacity of 0")
        return strategy

    def _unreachable_strategy(self):
        value = self.raw.get("unreachableStrategy")
        if value == "disabled":
            return "disabled"
        if value is None:
            return {"inactiveAfterSeconds": 0, "expungeAfterSeconds": 0}
        if not isinstance(value, dict):
            self.r.fail("unreachableStrategy", "expected \"disabled\" or {inactiveAfterSeconds, "
                                               "expungeAfterSeconds}")
            return {"inactiveAfterSeconds": 0, "expungeAfterSeconds": 0}
        ur = _Reader(value, self.r.at("unreachableStrategy"), self.errors)
        inactive = ur.number("inactiveAfterSeconds",
                             ur.number("unreachableInactiveAfterSeconds", 0, 0), 0)
        expunge = ur.number("expungeAfterSeconds",
                            ur.number("unreachableExpungeAfterSeconds", 0, 0), 0)
        if expunge < inactive:
            ur.fail("expungeAfterSeconds", "must be at least inactiveAfterSeconds")
        return {"inactiveAfterSeconds": _plain(inactive), "expungeAfterSeconds": _plain(expunge)}

    def _accepted_roles(self):
        roles = self.r.strings("acceptedResourceRoles")
        if roles is None:
            return None
        if not roles:
            self.r.fail("acceptedResourceRoles", "must not be empty (leave it out to accept "
                                                 "every role)")
        if len(set(roles)) != len(roles):
            self.r.fail("acceptedResourceRoles", "must not repeat a role")
        allowed = {"*", self.role}
        bad = [x for x in roles if x not in allowed]
        if bad:
            self.r.fail("acceptedResourceRoles",
                        f"roles {', '.join(bad)} are not allowed: use '*' or {self.role!r}, "
                        "the role this Marathon registered with")
        return roles

    def _role(self) -> str:
        role = self.r.string("role", self.role)
        if role != self.role:
            self.r.fail("role", f"got {role!r}: apps run as the role this Marathon registered "
                                f"with, {self.role!r}")
        return self.role


def _plain(number: float):
    return int(number) if float(number).is_integer() else number


def _extractable(uri: str) -> bool:
    return uri.endswith((".tgz", ".tar.gz", ".tbz2", ".tar.bz2", ".txz", ".tar.xz", ".zip"))


def constraint_errors(item: Any) -> list[str]:
    """What is wrong with one `[field, OPERATOR(, value)]` constraint (empty if nothing)."""
    if not isinstance(item, list) or not 2 <= len(item) <= 3 or \
            not all(isinstance(x, str) for x in item):
        return ["a constraint is [field, operator] or [field, operator, value] of strings, "
                f"got {_describe(item)}"]
    field, op = item[0], item[1]
    value = item[2] if len(item) == 3 else None
    if not field:
        return ["the constraint field must not be empty"]
    if op not in CONSTRAINT_OPERATORS:
        return [f"unknown constraint operator {op!r}; expected one of "
                f"{', '.join(CONSTRAINT_OPERATORS)}"]
    if op in ("LIKE", "UNLIKE", "IS", "MAX_PER") and value is None:
        return [f"{op} needs a value"]
    if op in ("LIKE", "UNLIKE"):
        try:
            re.compile(value)
        except re.error as e:
            return [f"{op} value {value!r} is not a valid regular expression: {e}"]
    if op == "MAX_PER" and not value.isdigit():
        return [f"MAX_PER needs a whole number, got {value!r}"]
    if op == "GROUP_BY" and value is not None and not (value.isdigit() or value == "inf"):
        return [f"GROUP_BY takes a whole number of groups, got {value!r}"]
    return []


# --- groups ------------------------------------------------------------------------------

def normalize_group(raw: Any, *, group_id: str | None = None, base: str = ids.ROOT,
                    role: str = "*", path: str = "") -> dict:
    """A group body as `{"id", "apps": [canonical app], "groups": [...], "dependencies"}`.

    Ids of nested groups and apps are relative to their enclosing group; `group_id` (the URL)
    overrides the body's id. Invalid lists every problem, with paths such as
    `/groups(0)/apps(1)/cpus`.
    """
    errors = _Errors()
    group = _group(raw, group_id, base, role, path, errors)
    errors.raise_if_any()
    return group


def _group(raw, group_id, base, role, path, errors: _Errors) -> dict:
    if not isinstance(raw, dict):
        errors.add(path or "/", "expected a group object")
        return {"id": base, "apps": [], "groups": [], "dependencies": []}
    r = _Reader(raw, path, errors)
    try:
        gid = ids.canonical(group_id if group_id is not None else raw.get("id") or base, base)
    except ids.InvalidId as e:
        r.fail("id", str(e))
        gid = base
    if raw.get("id") is None and group_id is None and path:
        r.fail("id", "a nested group needs an id")
    apps = []
    for i, app in enumerate(r.array("apps", [])):
        where = f"{path}/apps({i})"
        try:
            apps.append(normalize_app(app, base=gid, role=role, path=where))
        except Invalid as e:
            for d in e.details:
                for msg in d["errors"]:
                    errors.add(d["path"], msg)
    groups = [_group(g, None, gid, role, f"{path}/groups({i})", errors)
              for i, g in enumerate(r.array("groups", []))]
    if r.array("pods"):
        r.fail("pods", "pods are not supported")
    deps = []
    for i, dep in enumerate(r.strings("dependencies", [])):
        try:
            deps.append(ids.canonical(dep, ids.parent(gid)))
        except ids.InvalidId as e:
            errors.add(f"{path}/dependencies({i})", str(e))
    seen = set()
    for i, child in enumerate([a["id"] for a in apps] + [g["id"] for g in groups]):
        if ids.parent(child) != gid:
            errors.add(f"{path}/id", f"{child} is not a direct child of {gid}")
        if child in seen:
            errors.add(path or "/", f"{child} is given twice")
        seen.add(child)
    return {"id": gid, "apps": apps, "groups": groups, "dependencies": sorted(set(deps))}
