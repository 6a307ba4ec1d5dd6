"""The agent's books: frameworks, their executors, and the executors' tasks.

    Framework ──< Executor ──< Task
                     │
                     └── container (the launched session), stream (the SUBSCRIBE response)

Plain records with the few rules that keep them consistent; the agent drives them. The JSON
views here are what /state shows and what a re-registration reports to the master.
"""

from __future__ import annotations

from collections import deque

from agora import mesos_json as mj
from agora import protocol

MAX_COMPLETED_TASKS_PER_EXECUTOR = 200  # Mesos's limits (src/slave/constants.hpp)
MAX_COMPLETED_EXECUTORS_PER_FRAMEWORK = 150
MAX_COMPLETED_FRAMEWORKS = 50
MAX_STATUSES_PER_TASK = 16

# Executor life cycle.
LAUNCHING = "LAUNCHING"  # started, not subscribed yet
RUNNING = "RUNNING"  # subscribed at least once
TERMINATING = "TERMINATING"  # asked to shut down, or being killed
TERMINATED = "TERMINATED"  # its process is gone

COMMAND, CUSTOM, DEFAULT = "command", "custom", "default"


class Task:
    """A task the agent was given, from RunTask until its terminal update is acknowledged."""

    def __init__(self, info: dict, framework_id: str, executor_id: str):
        self.info = info
        self.task_id = mj.id_of(info, "task_id")
        self.framework_id = framework_id
        self.executor_id = executor_id
        self.state = "TASK_STAGING"
        self.statuses: deque[dict] = deque(maxlen=MAX_STATUSES_PER_TASK)
        self.delivered = False  # sent to the executor in LAUNCH / LAUNCH_GROUP
        self.kill_requested: dict | None = None  # a KILL to send once the executor is back

    @property
    def terminal(self) -> bool:
        return mj.is_terminal(self.state)

    def view(self) -> dict:
        """The task as a re-registration carries it (`protocol.task_entry`): its ids, state,
        latest status and TaskInfo. Nothing else: the master finds the rest (name, labels...)
        in the TaskInfo, and 10,000 agents re-registering after a failover pay for every
        byte on both ends."""
        return protocol.task_entry(self.task_id, self.framework_id, self.executor_id,
                                   self.state, self.info,
                                   self.statuses[-1] if self.statuses else None)

    def state_view(self, agent_id: str | None) -> dict:
        """The task as the /state endpoint shows it (Mesos `model(Task)`)."""
        view = {
            "id": self.task_id, "name": self.info.get("name", ""),
            "framework_id": self.framework_id, "executor_id": self.executor_id,
            "slave_id": agent_id or "", "state": self.state,
            "resources": self.info.get("resources") or [],
            "statuses": [mj.status_view(s.get("state"), s.get("timestamp"), s)
                         for s in self.statuses],
        }
        for key in ("labels", "discovery", "container"):
            if key in self.info:
                view[key] = self.info[key]
        return view


class Executor:
    """One executor (a container) of a framework and the tasks it was given."""

    def __init__(self, info: dict, framework_id: str, kind: str):
        self.info = info
        self.executor_id = mj.id_of(info, "executor_id")
        self.framework_id = framework_id
        self.kind = kind
        self.state = LAUNCHING
        self.container_id: str | None = None
        self.directory: str | None = None
        self.container = None  # launcher.Container once started
        self.stream = None  # http.Stream while subscribed and connected
        self.subscribed = False  # has subscribed at least once
        self.queue: list[tuple[str, list[str]]] = []  # ("task" | "group", task ids) not delivered
        self.tasks: dict[str, Task] = {}  # every task not yet acknowledged as terminal
        self.completed_tasks: deque[Task] = deque(maxlen=MAX_COMPLETED_TASKS_PER_EXECUTOR)
        # (state, reason, message) for the agent's updates about tasks when this ends.
        self.termination: tuple[str, str, str] | None = None
        self.registration_timer = None
        self.shutdown_timer = None
        self.exit_status: int | None = None

    @property
    def connected(self) -> bool:
        return self.stream is not None and not self.stream.closed

    def live_tasks(self) -> list[Task]:
        return [t for t in self.tasks.values() if not t.terminal]

    def state_view(self, agent_id: str | None) -> dict:
        """The executor as the /state endpoint shows it."""
        queued = {tid for _, ids in self.queue for tid in ids}
        return {
            "id": self.executor_id, "name": self.info.get("name", ""),
            "source": self.info.get("source", ""), "framework_id": self.framework_id,
            "container": self.container_id or "", "directory": self.directory or "",
            "type": self.kind.upper(), "state": self.state,
            "resources": self.info.get("resources") or [],
            "tasks": [t.state_view(agent_id) for t in self.tasks.values()
                      if t.task_id not in queued],
            "queued_tasks": [t.state_view(agent_id) for t in self.tasks.values()
                             if t.task_id in queued],
            "completed_tasks": [t.state_view(agent_id) for t in self.completed_tasks],
        }


class Framework:
    """A framework with executors on this agent."""

    def __init__(self, info: dict):
        self.framework_id = mj.id_of(info, "id")
        self.info = normalized_framework_info(info, self.framework_id)
        self.executors: dict[str, Executor] = {}
        self.completed_executors: deque[Executor] = deque(
            maxlen=MAX_COMPLETED_EXECUTORS_PER_FRAMEWORK)
        self.terminating = False
        self.checkpointed = False  # its FrameworkInfo is in the agent's checkpoint

    def update_info(self, info: dict) -> None:
        self.info = normalized_framework_info(info, self.framework_id)

    @property
    def checkpoint(self) -> bool:
        return bool(self.info.get("checkpoint"))

    def capabilities(self) -> set[str]:
        return {c.get("type") for c in self.info.get("capabilities") or [] if isinstance(c, dict)}

    def state_view(self, agent_id: str | None) -> dict:
        info = self.info
        return {
            "id": self.framework_id, "name": info.get("name", ""), "user": info.get("user", ""),
            "role": info.get("role", "*"), "hostname": info.get("hostname", ""),
            "checkpoint": self.checkpoint,
            "failover_timeout": info.get("failover_timeout", 0.0),
            "capabilities": sorted(c for c in self.capabilities() if c),
            "executors": [e.state_view(agent_id) for e in self.executors.values()],
            "completed_executors": [e.state_view(agent_id) for e in self.completed_executors],
        }


def normalized_framework_info(info: dict, framework_id: str) -> dict:
    """FrameworkInfo whose `id` is exactly {"value": id}: pymesos compares the whole dict."""
    return dict(info, id=mj.ident(framework_id))
