"""Small pymesos schedulers that tests drive, recording every callback."""

import threading
import uuid

from pymesos import MesosSchedulerDriver, Scheduler


def command_task(offer, name: str, value: str, cpus: float = 0.1, mem: float = 32,
                 **extra) -> dict:
    """A TaskInfo running shell command `value`; `extra` fields (even `command`) win."""
    return {
        "task_id": {"value": name}, "agent_id": offer["agent_id"], "name": name,
        # The marker in the environment lets tests find the task's processes.
        "command": {"value": value, "environment": {"variables": [
            {"name": "AGORA_TEST_MARKER", "value": name}]}},
        "resources": [{"name": "cpus", "type": "SCALAR", "scalar": {"value": cpus}},
                      {"name": "mem", "type": "SCALAR", "scalar": {"value": mem}}],
        **extra,
    }


def scalar(offer, name: str) -> float:
    return sum(r["scalar"]["value"] for r in offer["resources"] if r["name"] == name)


class Recorder(Scheduler):
    """Launches queued command tasks on offers and records what happens."""

    def __init__(self, commands=(), cpus: float = 0.1, mem: float = 32, refuse: float = 1.0,
                 hold: bool = False):
        self.pending = list(commands)  # (name, command[, TaskInfo fields])
        self.hold = hold  # keep unused offers instead of declining them
        self.cpus, self.mem, self.refuse = cpus, mem, refuse
        self.lock = threading.Lock()
        self.updates = []  # status dicts, in arrival order
        self.offers = []
        self.rescinded = []
        self.messages = []
        self.failures = []
        self.errors = []
        self.registered_event = threading.Event()
        self.reregistered_event = threading.Event()
        self.framework_id = None
        self.launch_extra = {}

    def registered(self, driver, framework_id, master_info):
        self.framework_id = framework_id["value"]
        self.registered_event.set()

    def reregistered(self, driver, master_info):
        self.reregistered_event.set()

    def resourceOffers(self, driver, offers):
        for offer in offers:
            with self.lock:
                self.offers.append(offer)
                tasks = []
                cpus, mem = scalar(offer, "cpus"), scalar(offer, "mem")
                while self.pending and cpus >= self.cpus - 1e-9 and mem >= self.mem - 1e-9:
                    # (name, command) or (name, command, TaskInfo fields of its own)
                    name, command, *extra = self.pending.pop(0)
                    tasks.append(command_task(offer, name, command, self.cpus, self.mem,
                                              **{**self.launch_extra, **(extra or [{}])[0]}))
                    cpus -= self.cpus
                    mem -= self.mem
            if tasks:
                driver.launchTasks(offer["id"], tasks, {"refuse_seconds": self.refuse})
            elif not self.hold:
                driver.declineOffer(offer["id"], {"refuse_seconds": self.refuse})

    def offerRescinded(self, driver, offer_id):
        self.rescinded.append(offer_id)

    def statusUpdate(self, driver, status):
        with self.lock:
            self.updates.append(status)

    def frameworkMessage(self, driver, executor_id, agent_id, data):
        self.messages.append((executor_id, agent_id, data))

    def slaveLost(self, driver, agent_id):
        self.failures.append(("agent", agent_id))

    def executorLost(self, driver, executor_id, agent_id, status):
        self.failures.append(("executor", executor_id, agent_id, status))

    def error(self, driver, message):
        self.errors.append(message)

    def states(self, task_id: str) -> list:
        with self.lock:
            return [u["state"] for u in self.updates if u["task_id"]["value"] == task_id]

    def last_state(self, task_id: str):
        states = self.states(task_id)
        return states[-1] if states else None


def framework_info(name: str = "test", **extra) -> dict:
    return {"user": "root", "name": name, **extra}


def start_driver(scheduler, master: str, name: str = "test", **info) -> MesosSchedulerDriver:
    driver = MesosSchedulerDriver(scheduler, framework_info(name, **info), master,
                                  use_addict=False)
    driver.start()
    return driver


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
