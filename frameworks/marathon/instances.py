"""Instances: what Marathon keeps for each copy of an app it wants running.

An instance outlives its tasks: when a task fails and the instance's goal is still Running,
the instance is *rescheduled* (same id, next incarnation, a new task id) after the backoff.
When its goal becomes Decommissioned it is killed and, once terminal, expunged.

    Scheduled ──offer──> Provisioned ──> Staging ──> Starting ──> Running ──> (terminal)
        ^                                                  │                     │
        └──────────── goal Running: rescheduled ───────────┴─── Unreachable ─────┘
                                                                  └─> UnreachableInactive

Conditions follow Marathon's mapping of Mesos task states (specs/marathon-api.md §4.1);
TASK_LOST becomes Unreachable, Unknown or Gone depending on its reason.

Pure: no I/O.
"""

from __future__ import annotations

import attrs

# Goals.
RUNNING = "Running"
DECOMMISSIONED = "Decommissioned"

# Conditions.
SCHEDULED = "Scheduled"
PROVISIONED = "Provisioned"
STAGING = "Staging"
STARTING = "Starting"
RUNNING_C = "Running"
KILLING = "Killing"
UNREACHABLE = "Unreachable"
UNREACHABLE_INACTIVE = "UnreachableInactive"
TERMINAL = frozenset({"Finished", "Failed", "Killed", "Error", "Gone", "Dropped", "Unknown"})
#: Terminal conditions that count as a failure for backoff (Killed does not, §4.2).
BACKOFF = frozenset({"Failed", "Error", "Finished", "Gone", "Dropped"})
#: Terminal conditions recorded as the app's lastTaskFailure.
FAILURES = frozenset({"Failed", "Error", "Gone", "Dropped", "Unknown"})

_BY_STATE = {
    "TASK_STAGING": STAGING, "TASK_STARTING": STARTING, "TASK_RUNNING": RUNNING_C,
    "TASK_KILLING": KILLING, "TASK_UNREACHABLE": UNREACHABLE, "TASK_ERROR": "Error",
    "TASK_FAILED": "Failed", "TASK_FINISHED": "Finished", "TASK_KILLED": "Killed",
    "TASK_DROPPED": "Dropped", "TASK_GONE": "Gone", "TASK_GONE_BY_OPERATOR": "Gone",
    "TASK_UNKNOWN": "Unknown",
}
_LOST_UNREACHABLE = frozenset({"REASON_RECONCILIATION", "REASON_SLAVE_DISCONNECTED",
                               "REASON_AGENT_DISCONNECTED", "REASON_SLAVE_REMOVED",
                               "REASON_AGENT_REMOVED"})
#: The Mesos state a condition is shown as in the task JSON (the API never shows TASK_LOST).
_STATE_OF = {STAGING: "TASK_STAGING", PROVISIONED: "TASK_STAGING", STARTING: "TASK_STARTING",
             RUNNING_C: "TASK_RUNNING", KILLING: "TASK_KILLING",
             UNREACHABLE: "TASK_UNREACHABLE", UNREACHABLE_INACTIVE: "TASK_UNREACHABLE",
             "Error": "TASK_ERROR", "Failed": "TASK_FAILED", "Finished": "TASK_FINISHED",
             "Killed": "TASK_KILLED", "Dropped": "TASK_DROPPED", "Gone": "TASK_GONE",
             "Unknown": "TASK_UNKNOWN"}


def condition_of(state: str, reason: str | None = None) -> str:
    """Marathon's condition for a Mesos task state (and reason, for TASK_LOST)."""
    if state == "TASK_LOST":
        if reason in _LOST_UNREACHABLE:
            return UNREACHABLE
        return "Unknown" if reason == "REASON_TASK_UNKNOWN" else "Gone"
    return _BY_STATE.get(state, "Unknown")


def is_terminal(condition: str) -> bool:
    return condition in TERMINAL


def mesos_state(condition: str) -> str:
    return _STATE_OF.get(condition, "TASK_STAGING")


@attrs.define(eq=False)
class Instance:
    """One wanted copy of an app, and its current task (if any).

    `config_version` is the app configuration it runs (or will run, once launched):
    versionInfo.lastConfigChangeAt; `app_version` the app's full version at launch, as
    tasks show it. `healthy` is None until health checks say otherwise (or when the app has
    none); `ready` tracks readiness checks during deployments.
    """

    id: str
    app_id: str
    config_version: str
    app_version: str
    goal: str = RUNNING
    condition: str = SCHEDULED
    since: float = 0.0  # when the condition last changed
    incarnation: int = 0
    task_id: str | None = None
    agent_id: str | None = None
    host: str | None = None
    agent_ip: str | None = None
    attributes: dict = attrs.field(factory=dict)  # the agent's, formatted for constraints
    ports: list = attrs.field(factory=list)  # host ports, in port definition order
    staged_at: float | None = None
    started_at: float | None = None
    unreachable_since: float | None = None
    kill_sent_at: float | None = None
    healthy: bool | None = None
    ready: bool = False
    message: str = ""

    # -- reading ------------------------------------------------------------------------

    @property
    def terminal(self) -> bool:
        return self.condition in TERMINAL

    @property
    def launched(self) -> bool:
        """Whether a task exists for it (launched and not terminal)."""
        return self.task_id is not None and self.condition not in TERMINAL and \
            self.condition != SCHEDULED

    @property
    def active(self) -> bool:
        """Counts toward the app's instances: wanted, and neither terminal nor given up on."""
        return self.goal == RUNNING and self.condition != UNREACHABLE_INACTIVE

    @property
    def placed(self) -> bool:
        """Holds an agent's resources (for constraints): launched and not inactive."""
        return self.agent_id is not None and self.condition not in TERMINAL and \
            self.condition not in (SCHEDULED, UNREACHABLE_INACTIVE)

    def considered_healthy(self, has_checks: bool) -> bool:
        """Running, and healthy if the app has health checks (Marathon's rule)."""
        if self.condition != RUNNING_C:
            return False
        return self.healthy is True if has_checks else True

    # -- changing -------------------------------------------------------------------------

    def reschedule(self, config_version: str, app_version: str, now: float) -> None:
        """Back to Scheduled for a new task attempt (same id)."""
        self.config_version, self.app_version = config_version, app_version
        self.condition, self.since = SCHEDULED, now
        self.task_id = self.agent_id = self.host = self.agent_ip = None
        self.attributes, self.ports = {}, []
        self.staged_at = self.started_at = self.unreachable_since = self.kill_sent_at = None
        self.healthy, self.ready = None, False

    # -- storage --------------------------------------------------------------------------

    def to_record(self) -> dict:
        return attrs.asdict(self, recurse=False)

    @classmethod
    def from_record(cls, record: dict) -> Instance:
        fields = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in fields})
