#!/usr/bin/env python3
"""Many emulated agents in one process, speaking the real master-agent protocol.

Each emulated agent opens its own TCP connection to the master, registers with the given
resources, answers pings, and answers RunTask with TASK_RUNNING (then TASK_FINISHED after
`--finish-after` seconds, if given) and KillTask with TASK_KILLED. No process is started:
this measures the master, not the containerizer.

    python benchmarks/emulated_agents.py --master 127.0.0.1:5050 --agents 1000

As a library: `EmulatedAgents(reactor, ("127.0.0.1", 5050), 1000).start()`.
"""

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, protocol as tprotocol  # noqa: E402

from agora import mesos_json as mj  # noqa: E402
from agora import protocol  # noqa: E402
from agora.link import Link  # noqa: E402
from agora.resources import Resources  # noqa: E402


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class EmulatedAgent:
    """One agent: a link, an id once registered, and the tasks it pretends to run."""

    def __init__(self, pool: "EmulatedAgents", index: int):
        self.pool = pool
        self.index = index
        self.agent_id = None
        self.link = None
        self.tasks: dict[tuple[str, str], str] = {}  # (framework id, task id) -> state
        self.registered = defer.Deferred()

    def info(self) -> dict:
        return {"hostname": f"emulated-{self.index}", "ip": "127.0.0.1",
                "port": 40000 + self.index % 20000, "resources": self.pool.resources_json,
                "attributes": [{"name": "index", "type": "TEXT",
                                "text": {"value": str(self.index)}}]}

    def connected(self, link: Link) -> None:
        self.link = link
        link.on_message = self.on_message

    def on_message(self, msg) -> None:
        kind = type(msg)
        if kind is protocol.RunTask:
            self._run(msg.framework, msg.task)
        elif kind is protocol.StatusUpdateAck:
            self.pool.acks += 1
        elif kind is protocol.Ping:
            self.link.send(protocol.Pong(seq=msg.seq))
        elif kind is protocol.Challenge:
            if self.agent_id is None:
                self.link.send(protocol.RegisterAgent(info=self.info(), version="emulated"))
            else:
                self.link.send(protocol.ReregisterAgent(
                    agent_id=self.agent_id, info=self.info(), version="emulated",
                    tasks=[{"framework_id": mj.ident(f), "task_id": mj.ident(t), "state": s,
                            "resources": self.pool.task_resources}
                           for (f, t), s in self.tasks.items()]))
        elif kind is protocol.AgentRegistered:
            self.agent_id = msg.agent_id
            if not self.registered.called:
                self.registered.callback(self)
        elif kind is protocol.KillTask:
            self._update(msg.framework_id, msg.task_id, "TASK_KILLED")
        elif kind is protocol.RunTaskGroup:
            for task in msg.task_group.get("tasks", []):
                self._run(msg.framework, task)
        elif kind is protocol.AgentRefused or kind is protocol.ShutdownAgent:
            print(f"agent {self.index} refused: {msg.message}", file=sys.stderr)

    def _run(self, framework: dict, task: dict) -> None:
        fid, tid = framework["id"]["value"], task["task_id"]["value"]
        self.pool.launched += 1
        self._update(fid, tid, "TASK_RUNNING")
        if self.pool.finish_after is not None:
            self.pool.reactor.callLater(self.pool.finish_after, self._update, fid, tid,
                                        "TASK_FINISHED")

    def _update(self, fid: str, tid: str, state: str) -> None:
        if self.tasks.get((fid, tid)) in mj.TERMINAL_STATES:
            return
        self.tasks[(fid, tid)] = state
        if mj.is_terminal(state):
            del self.tasks[(fid, tid)]
        self.link.send(protocol.StatusUpdate(framework_id=fid, status=mj.task_status(
            tid, state, source="SOURCE_EXECUTOR", timestamp=time.time(),
            agent_id=self.agent_id, executor_id=tid, uuid=mj.new_uuid())))


class _Factory(tprotocol.ClientFactory):
    def __init__(self, agent: EmulatedAgent):
        self.agent = agent

    def buildProtocol(self, addr):
        link = Link(self.agent.pool.reactor, send_prefix=True)
        self.agent.connected(link)
        return link

    def clientConnectionFailed(self, connector, reason):
        if not self.agent.registered.called:
            self.agent.registered.errback(reason)


class EmulatedAgents:
    """A pool of emulated agents connected to one master."""

    def __init__(self, reactor, master: tuple[str, int], count: int,
                 resources: str = "cpus:24;mem:4096;disk:100000;ports:[31000-32000]",
                 finish_after: float | None = None, task_resources: str = "cpus:0.1;mem:32"):
        self.reactor = reactor
        self.master = master
        self.resources_json = Resources.parse(resources).to_json()
        self.task_resources = Resources.parse(task_resources).to_json()
        self.finish_after = finish_after
        self.agents = [EmulatedAgent(self, i) for i in range(count)]
        self.launched = 0
        self.acks = 0

    def start(self, batch: int = 500) -> defer.Deferred:
        """Connect every agent (in batches, not to overflow the accept queue)."""
        raise_fd_limit()

        @defer.inlineCallbacks
        def connect_all():
            for i in range(0, len(self.agents), batch):
                group = self.agents[i:i + batch]
                for agent in group:
                    self.reactor.connectTCP(self.master[0], self.master[1], _Factory(agent))
                yield defer.gatherResults([a.registered for a in group], consumeErrors=True)
            return self

        return connect_all()

    def running(self) -> int:
        return sum(sum(1 for s in a.tasks.values() if s == "TASK_RUNNING") for a in self.agents)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--master", default="127.0.0.1:5050")
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--resources", default="cpus:24;mem:4096;disk:100000;ports:[31000-32000]")
    p.add_argument("--finish-after", type=float, default=None, metavar="SECS")
    args = p.parse_args()
    from twisted.internet import reactor

    host, _, port = args.master.rpartition(":")
    pool = EmulatedAgents(reactor, (host, int(port)), args.agents, args.resources,
                          args.finish_after)
    started = time.monotonic()

    def ready(_):
        print(f"agents={args.agents} register_s={time.monotonic() - started:.3f}", flush=True)

    def failed(f):
        print(f"failed: {f.getErrorMessage()}", file=sys.stderr)
        reactor.stop()

    reactor.callWhenRunning(lambda: pool.start().addCallbacks(ready, failed))
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
