"""The Mesos TaskInfo for one launch of an instance: command, container, environment,
ports, health check, kill policy (spec mesos-v1-wire.md §3.4, marathon-api.md §2.2).

Containers: both MESOS and DOCKER apps with an image become a MESOS ContainerInfo whose
`mesos.image` is the Docker image: Agora's unified containerizer runs them (there is no
Docker daemon). Host volumes are passed on; bridge networking becomes a `network_infos`
entry with the app's port mappings.

Pure: no I/O.
"""

from __future__ import annotations

import re

from frameworks.marathon import health

def _env_name(text: str) -> str:
    return re.sub(r"[^A-Z0-9_]", "_", text.upper())


def environment(app: dict, task_id: str, host: str, ports: list) -> dict:
    """The variables Marathon gives a task (§2.2); the app's own `env` wins."""
    env = {"MARATHON_APP_ID": app["id"], "MARATHON_APP_VERSION": app.get("version", ""),
           "MARATHON_APP_RESOURCE_CPUS": f"{app['cpus']:g}",
           "MARATHON_APP_RESOURCE_MEM": f"{app['mem']:g}",
           "MARATHON_APP_RESOURCE_DISK": f"{app['disk']:g}",
           "MARATHON_APP_RESOURCE_GPUS": str(app.get("gpus") or 0),
           "MESOS_TASK_ID": task_id, "HOST": host}
    image = ((app.get("container") or {}).get("docker") or {}).get("image")
    if image:
        env["MARATHON_APP_DOCKER_IMAGE"] = image
    labels = app.get("labels") or {}
    if labels:
        env["MARATHON_APP_LABELS"] = " ".join(_env_name(k) for k in sorted(labels))
        for k, v in labels.items():
            env["MARATHON_APP_LABEL_" + _env_name(k)] = v
    definitions = app.get("portDefinitions")
    if definitions is None:
        definitions = (app.get("container") or {}).get("portMappings") or []
    for i, port in enumerate(ports):
        env[f"PORT{i}"] = str(port)
        name = definitions[i].get("name") if i < len(definitions) else None
        if name:
            env["PORT_" + _env_name(name)] = str(port)
    if ports:
        env["PORT"] = str(ports[0])
        env["PORTS"] = ",".join(str(p) for p in ports)
    env.update(app.get("env") or {})
    return env


def task_info(app: dict, task_id: str, agent_id: str, host: str, resources: list,
              ports: list) -> dict:
    """The TaskInfo to launch `app` as `task_id` with the given resources and host ports."""
    env = environment(app, task_id, host, ports)
    command: dict = {"environment": {"variables": [{"name": k, "value": v}
                                                   for k, v in sorted(env.items())]}}
    if app.get("cmd"):
        command.update(value=app["cmd"], shell=True)
    elif app.get("args"):
        command.update(value=app["args"][0], arguments=list(app["args"]), shell=False)
    else:
        command["shell"] = False  # the image's entrypoint runs
    if app.get("user"):
        command["user"] = app["user"]
    uris = [{"value": f["uri"], "extract": f.get("extract", True),
             "executable": f.get("executable", False), "cache": f.get("cache", False),
             **({"output_file": f["destPath"]} if f.get("destPath") else {})}
            for f in app.get("fetch") or ()]
    if uris:
        command["uris"] = uris
    info: dict = {"name": app["id"].strip("/").replace("/", "."), "task_id": {"value": task_id},
                  "agent_id": {"value": agent_id}, "resources": resources}
    executor = app.get("executor") or ""
    if executor in ("", "//cmd"):
        info["command"] = command
    else:
        info["executor"] = {"executor_id": {"value": f"marathon-{task_id}"},
                            "name": f"marathon executor for {app['id']}",
                            "command": {**command, "value": executor, "shell": True}}
    container = _container(app, ports)
    if container:
        info["container"] = container
    labels = app.get("labels") or {}
    if labels:
        info["labels"] = {"labels": [{"key": k, "value": v} for k, v in sorted(labels.items())]}
    definitions = app.get("portDefinitions") or \
        (app.get("container") or {}).get("portMappings") or []
    if ports:
        info["discovery"] = {
            "visibility": "FRAMEWORK", "name": info["name"],
            "ports": {"ports": [{"number": p,
                                 **({"name": definitions[i]["name"]} if i < len(definitions)
                                    and definitions[i].get("name") else {}),
                                 "protocol": (definitions[i].get("protocol", "tcp")
                                              if i < len(definitions) else "tcp").split(",")[0]}
                                for i, p in enumerate(ports)]}}
    for check in health.checks_of(app):
        mesos_check = health.mesos_health_check(check, ports)
        if mesos_check is not None:
            info["health_check"] = mesos_check  # Mesos takes one; validation allows one
            break
    grace = app.get("taskKillGracePeriodSeconds")
    if grace is not None:
        info["kill_policy"] = {"grace_period": {"nanoseconds": int(grace * 1e9)}}
    return info


def _container(app: dict, ports: list) -> dict | None:
    spec = app.get("container")
    if not spec:
        return None
    out: dict = {"type": "MESOS"}
    image = (spec.get("docker") or {}).get("image")
    if image:
        out["mesos"] = {"image": {"type": "DOCKER", "docker": {"name": image},
                                  "cached": not spec["docker"].get("forcePullImage", False)}}
    volumes = [{"container_path": v["containerPath"], "host_path": v["hostPath"],
                "mode": v.get("mode", "RW")} for v in spec.get("volumes") or ()]
    if volumes:
        out["volumes"] = volumes
    mode = (app.get("networks") or [{"mode": "host"}])[0]
    if mode["mode"] != "host":
        mappings = []
        host_ports = iter(ports)
        for m in spec.get("portMappings") or ():
            entry = {"container_port": m.get("containerPort", 0),
                     "protocol": m.get("protocol", "tcp").split(",")[0]}
            if "hostPort" in m:
                entry["host_port"] = next(host_ports, 0)
                if not entry["container_port"]:
                    entry["container_port"] = entry["host_port"]
            mappings.append(entry)
        network = {"name": mode.get("name") or "mesos-bridge"}
        if mappings:
            network["port_mappings"] = mappings
        out["network_infos"] = [network]
    return out
