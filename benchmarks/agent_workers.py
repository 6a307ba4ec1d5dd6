#!/usr/bin/env python3
"""Emulated agents in worker processes, each following the leader through ZooKeeper.

`failover.py` plays its agents here: one process playing 10,000 agents spent more CPU after
the election than the new leader did, so its own speed was the floor of the figure. K
workers each play N/K agents (`benchmarks/emulated_agents.py`), each with its own
`agent.master_detector.ZooKeeperMaster` driving its links, as every real agent has its own.

A worker writes a JSON line of its counters to stdout whenever they change (at most every
`REPORT_INTERVAL`) and stops when its stdin says `stop` or closes:

    python benchmarks/agent_workers.py --zk zk://127.0.0.1:2181/agora --agents 5000 --first 5000

    workers = AgentWorkers(reactor, "zk://…", 10000, processes=2)
    workers.start()            # fires once every agent is registered
    workers.masters(), workers.running(), workers.tasks(), workers.cpu_seconds()
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, protocol, stdio  # noqa: E402
from twisted.internet import task as ttask  # noqa: E402
from twisted.protocols.basic import LineReceiver  # noqa: E402

from agent.master_detector import ZooKeeperMaster  # noqa: E402
from agora import zookeeper  # noqa: E402
from benchmarks.emulated_agents import (DEFAULT_RESOURCES, FD_HEADROOM,  # noqa: E402
                                        EmulatedAgents, _cpu_seconds, raise_fd_limit)
from benchmarks.master_launch import quiet_process  # noqa: E402

REPORT_INTERVAL = 0.01


# --- the worker --------------------------------------------------------------------------


class _Control(LineReceiver):
    delimiter = b"\n"

    def __init__(self, on_stop):
        self.on_stop = on_stop

    def lineReceived(self, line):
        if line.strip() == b"stop":
            self.on_stop()

    def connectionLost(self, reason):
        self.on_stop()


class Worker:
    """One worker process: its agents, its detector, its reports."""

    def __init__(self, reactor, args):
        self.reactor, self.args = reactor, args
        self.pool: EmulatedAgents | None = None
        self.detector = ZooKeeperMaster(reactor, zookeeper.parse_url(args.zk), self._on_leader,
                                        session_timeout=10.0)
        self._last = None
        self._stopping = False

    def start(self) -> None:
        raise_fd_limit(self.args.agents + FD_HEADROOM)
        self.detector.start()
        ttask.LoopingCall(self._report).start(REPORT_INTERVAL, now=False)

    def _on_leader(self, host, port) -> None:
        if self.pool is None:
            if host is None:
                return
            self.pool = EmulatedAgents(self.reactor, (host, port), self.args.agents,
                                       self.args.resources, first_index=self.args.first)
            self.pool.start(self.args.batch).addErrback(self._failed)
            return
        for agent in self.pool.agents:
            agent.link.set_master(host, port)

    def _report(self) -> None:
        pool = self.pool
        if pool is None:
            return
        counters = (tuple(sorted(pool.masters().items())), pool.running(), pool.tasks(),
                    pool.launched, pool.challenges)
        if counters == self._last:
            return
        self._last = counters
        masters, running, held, launched, challenges = counters
        print(json.dumps({"masters": dict(masters), "running": running, "tasks": held,
                          "launched": launched, "challenges": challenges,
                          "cpu": _cpu_seconds()}), flush=True)

    def _failed(self, failure) -> None:
        print(f"emulated agents failed: {failure.getErrorMessage()}", file=sys.stderr,
              flush=True)
        self.stop()

    @defer.inlineCallbacks
    def _stop(self):
        if self.pool is not None:
            yield self.pool.stop()
        yield self.detector.stop()

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._stop().addBoth(lambda _: self.reactor.stop())


def worker_main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zk", required=True, metavar="zk://HOST:PORT/PATH")
    p.add_argument("--agents", type=int, required=True)
    p.add_argument("--first", type=int, default=0, help="index of this worker's first agent")
    p.add_argument("--resources", default=DEFAULT_RESOURCES)
    p.add_argument("--batch", type=int, default=500, help="agents connecting at once")
    args = p.parse_args(argv)
    from twisted.internet import reactor

    quiet_process()
    worker = Worker(reactor, args)
    stdio.StandardIO(_Control(worker.stop))
    reactor.callWhenRunning(worker.start)
    reactor.run()
    return 0


# --- the parent's side -------------------------------------------------------------------


class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, owner: "AgentWorkers"):
        self.owner = owner
        self.state = {"masters": {}, "running": 0, "tasks": 0, "launched": 0, "challenges": 0,
                      "cpu": 0.0}
        self.pid = None
        self.ended = defer.Deferred()
        self._buffer = b""

    def connectionMade(self):
        self.pid = self.transport.pid

    def outReceived(self, data: bytes):
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        if lines:
            self.state = json.loads(lines[-1])

    def errReceived(self, data: bytes):
        sys.stderr.write(data.decode(errors="replace"))

    def processEnded(self, reason):
        self.owner._ended(self, reason)
        self.ended.callback(None)


class AgentWorkers:
    """`processes` workers playing `agents` agents between them, for the parent to watch."""

    def __init__(self, reactor, zk_url: str, agents: int, processes: int = 2,
                 resources: str = DEFAULT_RESOURCES, batch: int = 500):
        self.reactor, self.zk_url, self.total = reactor, zk_url, agents
        self.processes, self.resources, self.batch = max(1, processes), resources, batch
        self.workers: list[_WorkerProcess] = []
        self.failure: str | None = None
        self._stopping = False

    def start(self, timeout: float, progress=None) -> defer.Deferred:
        """Spawn the workers; fires once every agent is registered, fails after `timeout`
        seconds or if a worker dies. `progress(registered, total)` is called each second."""
        share, extra = divmod(self.total, self.processes)
        first = 0
        for i in range(self.processes):
            n = share + (1 if i < extra else 0)
            proc = _WorkerProcess(self)
            self.reactor.spawnProcess(
                proc, sys.executable,
                [sys.executable, os.path.abspath(__file__), "--zk", self.zk_url,
                 "--agents", str(n), "--first", str(first), "--resources", self.resources,
                 "--batch", str(self.batch)],
                env=os.environ.copy())
            self.workers.append(proc)
            first += n
        return self._wait_registered(timeout, progress)

    @defer.inlineCallbacks
    def _wait_registered(self, timeout, progress):
        deadline = time.monotonic() + timeout
        last = 0.0
        while self.registered() < self.total:
            if self.failure is not None:
                raise RuntimeError(self.failure)
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for "
                                   f"{self.total} agents to register")
            if progress is not None and time.monotonic() - last >= 1.0:
                last = time.monotonic()
                progress(self.registered(), self.total)
            yield ttask.deferLater(self.reactor, 0.05, lambda: None)
        if progress is not None:
            progress(self.total, self.total)

    def _ended(self, proc, reason) -> None:
        if not self._stopping and self.failure is None:
            self.failure = f"agent worker {proc.pid} ended: {reason.getErrorMessage()}"

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    def masters(self) -> dict[str, int]:
        """Master id -> how many agents it registered last, over all workers."""
        out: dict[str, int] = {}
        for w in self.workers:
            for mid, n in w.state["masters"].items():
                out[mid] = out.get(mid, 0) + n
        return out

    def registered(self) -> int:
        return sum(self.masters().values())

    def running(self) -> int:
        return sum(w.state["running"] for w in self.workers)

    def tasks(self) -> int:
        return sum(w.state["tasks"] for w in self.workers)

    @property
    def challenges(self) -> int:
        return sum(w.state["challenges"] for w in self.workers)

    def cpu_seconds(self) -> float:
        """The workers' CPU as they last reported it (they report on every change)."""
        return sum(w.state["cpu"] for w in self.workers)

    def stop(self) -> defer.Deferred:
        self._stopping = True
        for w in self.workers:
            if w.transport is not None and w.transport.pid is not None:
                w.transport.write(b"stop\n")
        return defer.DeferredList([w.ended for w in self.workers])


if __name__ == "__main__":
    sys.exit(worker_main())
