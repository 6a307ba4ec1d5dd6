#!/usr/bin/env python3
"""Launch N command tasks with an unmodified pymesos scheduler and wait until they finish.

    agora local --agents 2 &                 # or: scripts/local --agents 2
    python examples/pymesos_scheduler.py 127.0.0.1:5050 --tasks 10

Exits 0 when every task reached TASK_FINISHED, 1 otherwise.
"""

import argparse
import sys
import threading
import uuid

from pymesos import MesosSchedulerDriver, Scheduler


def scalar(offer, name):
    return sum(r["scalar"]["value"] for r in offer["resources"] if r["name"] == name)


class CommandScheduler(Scheduler):
    """Runs `command` once per task, as many tasks per offer as fit."""

    def __init__(self, count, command, cpus, mem):
        self.todo = [f"task-{i}-{uuid.uuid4().hex[:6]}" for i in range(count)]
        self.command, self.cpus, self.mem = command, cpus, mem
        self.final = {}
        self.done = threading.Event()

    def resourceOffers(self, driver, offers):
        for offer in offers:
            cpus, mem = scalar(offer, "cpus"), scalar(offer, "mem")
            tasks = []
            while self.todo and cpus >= self.cpus and mem >= self.mem:
                task_id = self.todo.pop()
                tasks.append({
                    "task_id": {"value": task_id}, "agent_id": offer["agent_id"],
                    "name": task_id, "command": {"value": self.command},
                    "resources": [
                        {"name": "cpus", "type": "SCALAR", "scalar": {"value": self.cpus}},
                        {"name": "mem", "type": "SCALAR", "scalar": {"value": self.mem}}]})
                cpus, mem = cpus - self.cpus, mem - self.mem
            if tasks:
                driver.launchTasks(offer["id"], tasks)
            else:
                driver.declineOffer(offer["id"], {"refuse_seconds": 60})

    def statusUpdate(self, driver, status):
        task_id, state = status["task_id"]["value"], status["state"]
        print(f"{task_id}: {state} {status.get('message', '')}".rstrip(), flush=True)
        if state in ("TASK_FINISHED", "TASK_FAILED", "TASK_KILLED", "TASK_LOST", "TASK_ERROR",
                     "TASK_DROPPED", "TASK_GONE"):
            self.final[task_id] = state
            if not self.todo and len(self.final) == self.expected:
                self.done.set()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("master", help="HOST:PORT of the master (or zk://...)")
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--command", default="echo hello from Agora; sleep 1")
    p.add_argument("--cpus", type=float, default=0.1)
    p.add_argument("--mem", type=float, default=32)
    p.add_argument("--timeout", type=float, default=300)
    args = p.parse_args()

    scheduler = CommandScheduler(args.tasks, args.command, args.cpus, args.mem)
    scheduler.expected = args.tasks
    driver = MesosSchedulerDriver(scheduler, {"user": "", "name": "pymesos-example"},
                                  args.master, use_addict=False)
    driver.start()
    finished = scheduler.done.wait(args.timeout)
    driver.stop()
    driver.join()
    ok = finished and all(s == "TASK_FINISHED" for s in scheduler.final.values())
    print(f"{sum(s == 'TASK_FINISHED' for s in scheduler.final.values())}/{args.tasks} "
          "tasks finished", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
