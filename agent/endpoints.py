"""The agent's read-only HTTP endpoints, shaped like Mesos's so that tools and habits carry over.

    /state, /slave(1)/state    agent id, resources, attributes, frameworks/executors/tasks, flags
    /health                    200 while the agent serves
    /version                   {"version": "1.11.0", ...}
    /flags                     {"flags": {...}}
    /metrics/snapshot          slave/* and gc/* gauges and counters
    /monitor/statistics        per running executor: usage and limits (ResourceStatistics)

Both `/x` and `/slave(1)/x` work, as on a Mesos agent (libprocess serves the actor's
endpoints under its name).
"""

from __future__ import annotations

import os
import time

from agora import mesos_json as mj
from agora.http import Router, empty_response, json_response

from agent import state as st
from agent.detect import attributes_view, resources_view

AGORA_VERSION = "0.1.0"


class AgentEndpoints:
    """Builds the endpoint responses from the agent's current books."""

    def __init__(self, agent):
        self.agent = agent

    def install(self, router: Router, guard=lambda handler: handler) -> None:
        """Serve them on `router`; `guard` wraps all but /health and /version (which
        `--authenticate-http-readonly` leaves open, as on the master)."""
        for prefix in ("", "/slave(1)"):
            router.add(prefix + "/state", guard(self.state), ("GET",))
            router.add(prefix + "/state.json", guard(self.state), ("GET",))
            router.add(prefix + "/health", self.health, ("GET",))
            router.add(prefix + "/flags", guard(self.flags), ("GET",))
        router.add("/version", self.version, ("GET",))
        router.add("/metrics/snapshot", guard(self.metrics), ("GET",))
        router.add("/monitor/statistics", guard(self.statistics), ("GET",))
        router.add("/monitor/statistics.json", guard(self.statistics), ("GET",))

    # --- handlers ----------------------------------------------------------------------

    def health(self, request):
        return empty_response(200)

    def version(self, request):
        return json_response({"version": mj.MESOS_VERSION, "agora_version": AGORA_VERSION,
                              "build_user": "agora", "git_sha": "", "git_tag": ""})

    def flags(self, request):
        return json_response({"flags": self.agent.flags()})

    def state(self, request):
        agent = self.agent
        aid = agent.agent_id
        return json_response({
            "version": mj.MESOS_VERSION,
            "id": aid or "",
            "pid": f"slave(1)@{agent.advertised_ip}:{agent.port}",
            "hostname": agent.hostname,
            "start_time": agent.start_time or 0.0,
            "registered": agent.registered,
            "master_hostname": agent.master_address[0],
            "capabilities": ["MULTI_ROLE", "HIERARCHICAL_ROLE", "TASK_KILLING_STATE"],
            "resources": resources_view(agent.resources),
            "attributes": attributes_view(agent.attributes),
            "flags": agent.flags(),
            "log_dir": "",
            "frameworks": [fw.state_view(aid) for fw in agent.frameworks.values()],
            "completed_frameworks": [fw.state_view(aid) for fw in agent.completed_frameworks],
        })

    def metrics(self, request):
        return json_response(self.snapshot())

    def statistics(self, request):
        return self.agent.statistics().addCallback(json_response)

    def snapshot(self) -> dict:
        """slave/* metrics with Mesos's names."""
        agent = self.agent
        executors = [e for fw in agent.frameworks.values() for e in fw.executors.values()]
        tasks = [t for e in executors for t in e.tasks.values()]
        by_state: dict[str, int] = {}
        for task in tasks:
            by_state[task.state] = by_state.get(task.state, 0) + 1
        counters = agent.metrics
        used = {}
        for task in tasks:
            if task.terminal:
                continue
            for r in task.info.get("resources") or []:
                if isinstance(r, dict) and r.get("type", "SCALAR") == "SCALAR":
                    value = (r.get("scalar") or {}).get("value")
                    if isinstance(value, (int, float)):
                        used[r.get("name")] = used.get(r.get("name"), 0.0) + value
        total = agent.resources.scalars()
        snapshot = {
            "slave/registered": 1.0 if agent.registered else 0.0,
            "slave/uptime_secs": time.time() - agent.start_time if agent.start_time else 0.0,
            "slave/frameworks_active": float(len(agent.frameworks)),
            "slave/executors_registering": float(sum(e.state == st.LAUNCHING for e in executors)),
            "slave/executors_running": float(sum(e.state == st.RUNNING for e in executors)),
            "slave/executors_terminating": float(sum(e.state == st.TERMINATING
                                                     for e in executors)),
            "slave/executors_terminated": float(counters.get("executors_terminated", 0)),
            "slave/tasks_staging": float(by_state.get("TASK_STAGING", 0)),
            "slave/tasks_starting": float(by_state.get("TASK_STARTING", 0)),
            "slave/tasks_running": float(by_state.get("TASK_RUNNING", 0)),
            "slave/tasks_killing": float(by_state.get("TASK_KILLING", 0)),
            "slave/valid_status_updates": float(counters.get("valid_status_updates", 0)),
            "slave/invalid_status_updates": float(counters.get("invalid_status_updates", 0)),
            "slave/valid_framework_messages": float(counters.get("valid_framework_messages", 0)),
            "slave/invalid_framework_messages": float(
                counters.get("invalid_framework_messages", 0)),
            "slave/container_launch_errors": float(counters.get("container_launch_errors", 0)),
            "slave/executor_registration_timeouts": float(
                counters.get("executor_registration_timeouts", 0)),
            "slave/status_updates_pending": float(len(agent.updates.streams)),
            "slave/checkpoint_errors": float(counters.get("checkpoint_errors", 0)),
            "containerizer/fetcher/task_fetches_succeeded": float(
                counters.get("fetches_succeeded", 0)),
            "containerizer/fetcher/task_fetches_failed": float(counters.get("fetches_failed", 0)),
            "containerizer/fetcher/cache_size_total_bytes": float(agent.fetcher_cache_size),
            "containerizer/fetcher/cache_size_used_bytes": float(
                agent.fetcher.cache_usage() if agent.fetcher is not None else 0),
        }
        snapshot.update(agent.gc.metrics())
        for state in ("finished", "failed", "killed", "lost", "gone", "dropped", "error"):
            snapshot[f"slave/tasks_{state}"] = float(counters.get(f"tasks_{state}", 0))
        for name in ("cpus", "mem", "disk", "gpus"):
            snapshot[f"slave/{name}_total"] = total.get(name, 0.0)
            snapshot[f"slave/{name}_used"] = used.get(name, 0.0)
        snapshot["system/cpus_total"] = float(os.cpu_count() or 0)
        return snapshot
