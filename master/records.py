"""What the master remembers about frameworks, agents, tasks and offers (soft state)."""

from collections import deque

import attrs
from twisted.logger import Logger

from agora import protocol
from agora.resources import Resources

log = Logger()


def capabilities_of(info: dict) -> set:
    """The capability names in a FrameworkInfo."""
    return {c.get("type") for c in info.get("capabilities", []) if isinstance(c, dict)}


def roles_of(info: dict) -> tuple:
    """The roles a (valid) FrameworkInfo subscribes to: `roles` with MULTI_ROLE, else `role`."""
    if "MULTI_ROLE" in capabilities_of(info):
        return tuple(info.get("roles") or ())
    return (info.get("role", "*"),)


@attrs.define(eq=False)
class Task:
    """A task as the master knows it: the latest state the agent reported."""

    id: str
    framework_id: str
    agent_id: str
    executor_id: str  # "" for command tasks
    # TaskInfo JSON as launched, or as an agent's re-registration packed it (decoded on
    # first use: see protocol.task_entry)
    _info: dict | bytes = attrs.field(alias="info")
    resources: Resources
    state: str = "TASK_STAGING"
    status: dict | None = None  # latest TaskStatus
    statuses: list = attrs.field(factory=list)  # (state, timestamp) history
    kill_requested: bool = False
    resources_recovered: bool = False

    @property
    def info(self) -> dict:
        """The TaskInfo JSON ({} if the agent packed something that is not one)."""
        if isinstance(self._info, bytes):
            try:
                info = protocol.unpacked(self._info)
            except protocol.ProtocolError as e:
                log.warn("Task {tid}: unreadable TaskInfo from its agent: {e}", tid=self.id, e=e)
                info = None
            self._info = info if isinstance(info, dict) else {}
        return self._info

    @property
    def name(self) -> str:
        return self.info.get("name", "")


@attrs.define(eq=False)
class Executor:
    """A custom executor running on an agent for a framework."""

    id: str
    framework_id: str
    info: dict
    resources: Resources


@attrs.define(eq=False)
class Framework:
    """A framework: its info, its subscription stream and what it holds."""

    id: str
    info: dict
    roles: tuple
    registered_time: float
    stream: object | None = None  # agora.http.Stream while subscribed
    stream_id: str | None = None
    connected: bool = False
    failover_call: object | None = None
    tasks: dict = attrs.field(factory=dict)  # task id -> Task
    unreachable_tasks: dict = attrs.field(factory=dict)
    completed_tasks: deque = attrs.field(factory=lambda: deque(maxlen=1000))
    offers: set = attrs.field(factory=set)  # offer ids
    reregistered_time: float | None = None
    unregistered_time: float | None = None
    removed: bool = False

    @property
    def capabilities(self) -> set:
        return capabilities_of(self.info)

    @property
    def partition_aware(self) -> bool:
        return "PARTITION_AWARE" in self.capabilities

    @property
    def multi_role(self) -> bool:
        return "MULTI_ROLE" in self.capabilities

    @property
    def name(self) -> str:
        return self.info.get("name", "")

    @property
    def failover_timeout(self) -> float:
        value = self.info.get("failover_timeout", 0)
        return float(value) if isinstance(value, (int, float)) else 0.0


@attrs.define(eq=False)
class Agent:
    """An agent: its info, its connection and what runs on it."""

    id: str
    info: dict
    total: Resources
    registered_time: float
    link: object | None = None  # agora.link.Link while connected
    connected: bool = False
    active: bool = True  # False once an operator deactivates or drains it
    drain_state: str | None = None  # None, "DRAINING" or "DRAINED"
    drain_config: dict | None = None  # {"max_grace_period": secs | None, "mark_gone": bool}
    reregistered_time: float | None = None
    tasks: dict = attrs.field(factory=dict)  # (framework id, task id) -> Task
    executors: dict = attrs.field(factory=dict)  # framework id -> {executor id -> Executor}
    offers: set = attrs.field(factory=set)
    pong_pending: bool = False
    missed_pings: int = 0
    lost_call: object | None = None

    @property
    def hostname(self) -> str:
        return self.info.get("hostname", "")

    @property
    def port(self) -> int:
        return int(self.info.get("port", 5051))

    @property
    def ip(self) -> str:
        return self.info.get("ip") or self.hostname

    @property
    def attributes(self) -> list:
        return self.info.get("attributes", [])

    @property
    def pid(self) -> str:
        return f"slave(1)@{self.ip}:{self.port}"

    def used(self) -> dict:
        """framework id -> resources its live tasks and executors hold here."""
        held: dict = {}
        for task in self.tasks.values():
            if not task.resources_recovered:
                held.setdefault(task.framework_id, []).append(task.resources)
        for fid, executors in self.executors.items():
            for ex in executors.values():
                held.setdefault(fid, []).append(ex.resources)
        return {fid: Resources.sum(parts) for fid, parts in held.items()}


@attrs.define(eq=False)
class OfferRecord:
    """An outstanding offer."""

    id: str
    framework_id: str
    agent_id: str
    role: str
    resources: Resources
    timeout_call: object | None = None
