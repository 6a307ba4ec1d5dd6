#!/usr/bin/env python3
"""Many emulated agents in one process, speaking the real master-agent protocol.

Each emulated agent keeps its own TCP connection to the master through the real agent's
`agent.master_link.MasterLink` (challenge, registration, Ping/Pong, reconnect with backoff,
re-registration with the tasks it runs). It answers RunTask / RunTaskGroup with
TASK_RUNNING (then TASK_FINISHED after `finish_after` seconds, if given), KillTask and
ShutdownExecutor with TASK_KILLED, and a kill of a task it does not know with TASK_LOST, as
the real agent does. No process is started: this measures the master, not the
containerizer. Status updates are sent once (the real agent retries them until
acknowledged); after a reconnect the re-registration carries every task's latest state.

    python benchmarks/emulated_agents.py --master 127.0.0.1:5050 --agents 1000 [--duration 60]

As a library (in the reactor thread):

    pool = EmulatedAgents(reactor, ("127.0.0.1", 5050), 1000, finish_after=5.0)
    pool.start().addCallback(...)   # fires once every agent is registered
    pool.running(), pool.launched, pool.acks, pool.registered_with(master_id)
"""

import argparse
import collections
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer  # noqa: E402

from agent.master_link import Backoff, MasterLink  # noqa: E402
from agora import mesos_json as mj  # noqa: E402
from agora import protocol  # noqa: E402
from agora.resources import Resources  # noqa: E402

DEFAULT_RESOURCES = "cpus:24;mem:4096;disk:100000;ports:[31000-32000]"

#: File descriptors a process needs besides one per agent connection.
FD_HEADROOM = 256


def raise_fd_limit(needed: int = 0) -> int:
    """Lift the soft open-files limit to the hard one; returns the new soft limit.

    Raises OSError with a remedy when even the hard limit is below `needed`. Children
    started afterwards (e.g. a master) inherit the raised limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if needed and soft < needed:
        raise OSError(f"{needed} file descriptors are needed but the hard limit is {soft}; "
                      f"raise it (e.g. `ulimit -Hn {needed}` as root, or LimitNOFILE=)")
    return soft


class EmulatedAgent:
    """One agent: a master link, an id once registered, and the tasks it pretends to run."""

    def __init__(self, pool: "EmulatedAgents", index: int):
        self.pool = pool
        self.index = index
        self.agent_id = None
        self.master_id = None
        self.registrations = 0
        # (framework id, task id) -> [state, TaskInfo, executor id, its entry in a
        # ReregisterAgent (kept up to date)]; terminal tasks leave.
        self.tasks: dict[tuple[str, str], list] = {}
        self._changes = 0  # bumped when `tasks` change: the registration built is then stale
        self._built = (None, None)  # (what it was built from, ReregisterAgent)
        self._info = None
        self._finish_calls: dict[tuple[str, str], object] = {}
        self.registered = defer.Deferred()  # fires on the first registration
        self.link = MasterLink(
            pool.reactor, pool.master[0], pool.master[1], registration=self._registration,
            on_registered=self._on_registered, on_message=self._on_message,
            on_refused=self._on_refused, backoff=Backoff(initial=pool.reconnect_initial),
            registration_timeout=pool.registration_timeout)

    def info(self) -> dict:
        if self._info is None:
            self._info = {"hostname": f"emulated-{self.index}", "ip": "127.0.0.1",
                          "port": 40000 + self.index % 20000,
                          "resources": self.pool.resources_json,
                          "attributes": [{"name": "index", "type": "TEXT",
                                          "text": {"value": str(self.index)}}]}
        return self._info

    # --- registration ------------------------------------------------------------------

    def _registration(self, challenge: protocol.Challenge):
        self.pool.challenges += 1
        proof = protocol.proof(self.pool.secret, challenge.nonce) if self.pool.secret else b""
        if self.agent_id is None:
            return protocol.RegisterAgent(info=self.info(), version=mj.MESOS_VERSION,
                                          proof=proof)
        # The same ReregisterAgent again, unless something changed (MasterLink asks for it
        # on every unanswered attempt; 10,000 agents share this process, not their own).
        key = (proof, self.agent_id, self._changes, self.pool.framework_changes)
        if self._built[0] == key:
            return self._built[1]
        tasks = [record[3] for record in self.tasks.values()]
        fids = {fid for fid, _ in self.tasks}
        frameworks = [self.pool.frameworks[f] for f in fids if f in self.pool.frameworks]
        msg = protocol.ReregisterAgent(agent_id=self.agent_id, info=self.info(),
                                       version=mj.MESOS_VERSION, tasks=tasks,
                                       frameworks=frameworks, proof=proof)
        self._built = (key, msg)
        return msg

    def _on_registered(self, msg: protocol.AgentRegistered) -> None:
        self.registrations += 1
        self.agent_id = msg.agent_id
        self.pool._moved(self.master_id, msg.master_id)
        self.master_id = msg.master_id
        if not self.registered.called:
            self.registered.callback(self)

    def _on_refused(self, message: str) -> None:
        print(f"agent {self.index} refused: {message}", file=sys.stderr)
        if not self.registered.called:
            self.registered.errback(RuntimeError(f"agent {self.index} refused: {message}"))

    # --- tasks ---------------------------------------------------------------------------

    def _on_message(self, msg) -> None:
        kind = type(msg)
        if kind is protocol.RunTask:
            self._framework(msg.framework)
            self._run(msg.framework, msg.task, None)
        elif kind is protocol.StatusUpdateAck:
            self.pool.acks += 1
            if self.pool.on_ack is not None:
                self.pool.on_ack(msg)
        elif kind is protocol.KillTask or kind is protocol.ShutdownExecutor:
            tid = msg.task_id if kind is protocol.KillTask else msg.executor_id
            self._kill(msg.framework_id, tid)
        elif kind is protocol.RunTaskGroup:
            self._framework(msg.framework)
            eid = mj.id_of(msg.executor, "executor_id", required=False)
            for task in (msg.task_group or {}).get("tasks", []):
                self._run(msg.framework, task, eid)
        elif kind is protocol.ShutdownFramework:
            for key in [k for k in self.tasks if k[0] == msg.framework_id]:
                self._forget(key)
        elif kind is protocol.UpdateFramework:
            self._framework(msg.framework)

    def _framework(self, info: dict) -> None:
        fid = mj.id_of(info, "id", required=False)
        if fid and self.pool.frameworks.get(fid) != info:
            self.pool.frameworks[fid] = info
            self.pool.framework_changes += 1

    def _run(self, framework: dict, task: dict, executor_id) -> None:
        fid, tid = framework["id"]["value"], task["task_id"]["value"]
        key = (fid, tid)
        if key in self.tasks:
            return
        pool = self.pool
        pool.launched += 1
        pool._held += 1
        eid = executor_id or tid
        # As agent.state.Task.view (no latest status here).
        self.tasks[key] = ["TASK_STAGING", task, eid,
                           protocol.task_entry(tid, fid, eid, "TASK_STAGING", task)]
        self._changes += 1
        self._update(key, "TASK_RUNNING")
        if pool.finish_after is not None:
            self._finish_calls[key] = pool.reactor.callLater(pool.finish_after, self._finish,
                                                             key)

    def _finish(self, key) -> None:
        self._finish_calls.pop(key, None)
        if key in self.tasks:
            self._update(key, "TASK_FINISHED")

    def _kill(self, fid: str, tid: str) -> None:
        if (fid, tid) in self.tasks:
            self._update((fid, tid), "TASK_KILLED")
            return
        # What the real agent says of a task it has no record of (agent/agent.py _kill_task).
        info = self.pool.frameworks.get(fid, {})
        aware = any(c.get("type") == "PARTITION_AWARE" for c in info.get("capabilities", []))
        self._send(fid, mj.task_status(
            tid, "TASK_DROPPED" if aware else "TASK_LOST", source="SOURCE_AGENT",
            timestamp=time.time(), agent_id=self.agent_id, reason="REASON_TASK_UNKNOWN",
            message="The agent does not know this task", uuid=mj.new_uuid()))

    def _update(self, key, state: str) -> None:
        record = self.tasks[key]
        previous, record[0] = record[0], state
        record[3]["state"] = state
        self._changes += 1
        pool = self.pool
        if previous == "TASK_RUNNING":
            pool._running -= 1
        if state == "TASK_RUNNING":
            pool._running += 1
        elif state in mj.TERMINAL_STATES:
            self._forget(key)
        fid, tid = key
        self._send(fid, mj.task_status(tid, state, source="SOURCE_EXECUTOR",
                                       timestamp=time.time(), agent_id=self.agent_id,
                                       executor_id=record[2], uuid=mj.new_uuid()))

    def _forget(self, key) -> None:
        record = self.tasks.pop(key, None)
        self._changes += 1
        if record is not None:
            self.pool._held -= 1
        if record is not None and record[0] == "TASK_RUNNING":
            self.pool._running -= 1
        call = self._finish_calls.pop(key, None)
        if call is not None and call.active():
            call.cancel()

    def _send(self, fid: str, status: dict) -> None:
        if self.link.send(protocol.StatusUpdate(framework_id=fid, status=status)):
            self.pool.updates_sent += 1
        else:
            self.pool.updates_dropped += 1

    def stop(self) -> defer.Deferred:
        for call in self._finish_calls.values():
            if call.active():
                call.cancel()
        self._finish_calls.clear()
        return self.link.stop()


class EmulatedAgents:
    """A pool of emulated agents connected to one master."""

    def __init__(self, reactor, master: tuple[str, int], count: int,
                 resources: str = DEFAULT_RESOURCES, finish_after: float | None = None, *,
                 secret: bytes | None = None, registration_timeout: float = 60.0,
                 reconnect_initial: float = 0.1, first_index: int = 0):
        self.reactor = reactor
        self.master = master
        self.resources_json = Resources.parse(resources).to_json()
        self.finish_after = finish_after
        self.secret = secret
        self.registration_timeout = registration_timeout
        self.reconnect_initial = reconnect_initial
        self.frameworks: dict[str, dict] = {}  # framework id -> FrameworkInfo, as last sent
        self.framework_changes = 0
        self.challenges = 0  # registrations built (a Challenge answered, or a copy)
        self.launched = 0  # tasks received (RunTask or in a RunTaskGroup)
        self.acks = 0  # StatusUpdateAcks received
        self.updates_sent = 0
        self.updates_dropped = 0  # while not registered
        self.on_ack = None  # called with each StatusUpdateAck, if set
        self._running = 0
        self._held = 0  # tasks in a non-terminal state
        self._by_master: collections.Counter = collections.Counter()
        self.agents = [EmulatedAgent(self, first_index + i) for i in range(count)]

    def start(self, batch: int = 500, progress=None) -> defer.Deferred:
        """Connect every agent, `batch` at a time; fires with the pool once all registered.

        `progress(registered, total)` is called after each batch. Fails when the file
        descriptor limit is too low or the master refuses an agent.
        """
        try:
            raise_fd_limit(len(self.agents) + FD_HEADROOM)
        except OSError as e:
            return defer.fail(e)

        @defer.inlineCallbacks
        def connect_all():
            for i in range(0, len(self.agents), batch):
                group = self.agents[i:i + batch]
                for agent in group:
                    agent.link.start()
                yield defer.gatherResults([a.registered for a in group], consumeErrors=True)
                if progress is not None:
                    progress(i + len(group), len(self.agents))
            return self

        def unwrap(failure):
            failure.trap(defer.FirstError)
            return failure.value.subFailure

        return connect_all().addErrback(unwrap)

    def stop(self) -> defer.Deferred:
        """Close every link (no reconnecting); fires once they are closed."""
        return defer.DeferredList([a.stop() for a in self.agents])

    def running(self) -> int:
        """Tasks in TASK_RUNNING now."""
        return self._running

    def registered(self) -> int:
        """Agents registered (at least once) so far."""
        return sum(1 for a in self.agents if a.agent_id is not None)

    def registered_with(self, master_id: str) -> int:
        """Agents whose latest registration was with the master `master_id`."""
        return self._by_master[master_id]

    def masters(self) -> dict[str, int]:
        """Master id -> how many agents it registered last."""
        return {mid: n for mid, n in self._by_master.items() if n}

    def tasks(self) -> int:
        """Tasks the agents hold in a non-terminal state."""
        return self._held

    def _moved(self, old: str | None, new: str) -> None:
        if old is not None:
            self._by_master[old] -= 1
        self._by_master[new] += 1


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--master", default="127.0.0.1:5050", metavar="HOST:PORT")
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--resources", default=DEFAULT_RESOURCES)
    p.add_argument("--finish-after", type=float, default=None, metavar="SECS",
                   help="send TASK_FINISHED this long after TASK_RUNNING (default: never)")
    p.add_argument("--batch", type=int, default=500, help="agents connecting at once")
    p.add_argument("--duration", type=float, default=None, metavar="SECS",
                   help="stop after this long once registered (default: until Ctrl-C)")
    p.add_argument("--report-every", type=float, default=5.0, metavar="SECS")
    p.add_argument("--secret-file", default=None)
    args = p.parse_args()
    from twisted.internet import reactor, task

    secret = None
    if args.secret_file:
        with open(args.secret_file, "rb") as f:
            secret = f.read().strip()
    host, _, port = args.master.rpartition(":")
    pool = EmulatedAgents(reactor, (host or "127.0.0.1", int(port)), args.agents,
                          args.resources, args.finish_after, secret=secret)
    started = time.monotonic()
    figures = {"agents": args.agents}
    status = [0]

    def line() -> str:
        return (f"registered={pool.registered()} launched={pool.launched} "
                f"running={pool.running()} acks={pool.acks} updates={pool.updates_sent} "
                f"dropped={pool.updates_dropped}")

    def progress(done, total):
        print(f"registered {done}/{total} in {time.monotonic() - started:.2f}s", flush=True)

    def ready(_):
        figures["register_s"] = f"{time.monotonic() - started:.3f}"
        print(f"all {args.agents} agents registered in {figures['register_s']}s", flush=True)
        loop = task.LoopingCall(lambda: print(line(), flush=True))
        loop.start(args.report_every, now=False)
        if args.duration is not None:
            reactor.callLater(args.duration, reactor.stop)

    def failed(f):
        print(f"emulated agents failed: {f.getErrorMessage()}", file=sys.stderr)
        status[0] = 1
        reactor.stop()

    def final():
        print(" ".join(f"{k}={v}" for k, v in figures.items()) + " " + line() +
              f" cpu_s={_cpu_seconds():.2f}", flush=True)

    reactor.callWhenRunning(lambda: pool.start(args.batch, progress).addCallbacks(ready, failed))
    reactor.addSystemEventTrigger("before", "shutdown", final)
    reactor.run()
    return status[0]


if __name__ == "__main__":
    sys.exit(main())
