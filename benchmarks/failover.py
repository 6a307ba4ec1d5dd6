#!/usr/bin/env python3
"""Master failover: emulated agents holding tasks re-register with a newly elected leader.

A real ZooKeeper server (a plain `java … QuorumPeerMain` process, as `tests/zookeeper.py`
starts it) and two `agora master --zk zk://…/agora --registry zk` processes. N emulated
agents (`benchmarks/emulated_agents.py`) register with the leader and a lean v1 scheduler
(`benchmarks/master_launch.py`'s) launches M tasks on them, spread evenly, and acknowledges
every update. Then the leader is SIGKILLed and the benchmark times, from the kill:

* `elected_s`: ZooKeeper reports the standby as the new leader (its session outlives the dead
  leader's by `--zk-session-timeout`, which dominates this figure);
* `reregistered_s`: every agent re-registered with the new leader, with its tasks (and
  `reregister_s`, the same counted from the election);
* `first_offer_s`: the scheduler, re-subscribed with its framework id as soon as the new
  leader is known, receives its first OFFERS from the new leader.

The agents live in `--agent-processes` worker processes (`benchmarks/agent_workers.py`) and
follow the leader through ZooKeeper as the real agent does (`agent.master_detector.
ZooKeeperMaster` driving `MasterLink.set_master`), except that one detector per worker drives
all its links instead of one ZooKeeper session per agent.

    python benchmarks/failover.py                                   # 10,000 agents, 100,000 tasks
    python benchmarks/failover.py --agents 1000 --tasks 10000
    python benchmarks/failover.py --profile /tmp/fo                 # py-spy the new leader
    python benchmarks/failover.py --agent-processes 1               # all agents in one worker

Prints progress and, on its last line, `key=value` figures.
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, threads  # noqa: E402
from twisted.internet import task as ttask  # noqa: E402

from agent.master_detector import ZooKeeperMaster  # noqa: E402
from agora import zookeeper  # noqa: E402
from benchmarks.agent_workers import AgentWorkers  # noqa: E402
from benchmarks.emulated_agents import DEFAULT_RESOURCES, FD_HEADROOM, raise_fd_limit  # noqa: E402
from benchmarks.master_launch import (MasterProcess, Profiler, Scheduler, Stats, run_bench,  # noqa: E402
                                      _EventStream, _Factory, http_request, load_average,
                                      self_cpu, wait_until)
from tests import zookeeper as zk_test  # noqa: E402


class Resubscriber(Scheduler):
    """The same framework subscribing again (with its id) to the new leader; launches nothing,
    declines what it is offered."""

    def __init__(self, reactor, address, old: Scheduler, stats: Stats):
        super().__init__(reactor, address, old.name, 0, 1, "cpus:0.01;mem:1", stats)
        self.framework_id = old.framework_id
        self.running = old.running
        self.first_offer_at = None

    def subscribe_call(self) -> dict:
        """SUBSCRIBE again under the framework's id, as a failed-over scheduler does."""
        call = super().subscribe_call()
        call["framework_id"] = {"value": self.framework_id}
        call["subscribe"]["framework_info"]["id"] = {"value": self.framework_id}
        return call

    def _offers(self, offers: list) -> None:
        if self.first_offer_at is None:
            self.first_offer_at = time.monotonic()
        super()._offers(offers)


class Bench:
    def __init__(self, reactor, args, work_dir: str):
        self.reactor, self.args, self.work_dir = reactor, args, work_dir
        self.fig: dict = {"agents": args.agents, "tasks": args.tasks,
                          "agent_processes": args.agent_processes,
                          "zk_session_timeout": args.zk_session_timeout,
                          "loadavg_before": load_average()}
        self.stats = Stats()
        self.profiler = Profiler(args.profile, args.profile_rate)
        # The agents' side of the same window, one profile per worker.
        self.client_profilers = [Profiler(args.profile and f"{args.profile}-agents{i}",
                                          args.profile_rate)
                                 for i in range(args.agent_processes)]
        self.zk = None
        self.masters: dict[int, MasterProcess] = {}  # port -> process
        self.leader = None  # (host, port) as ZooKeeper says
        self.leader_changed_at: dict[tuple, float] = {}
        self.detector = None
        self.pool = None
        self._t0 = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self._t0:7.2f}s] {text}", flush=True)

    # --- set-up ----------------------------------------------------------------------

    def start_zookeeper(self):
        if not zk_test.available():
            raise RuntimeError(f"ZooKeeper is not installed ({zk_test.ZOOKEEPER_JAR} or java)")
        port = zk_test.free_ports(1)[0]
        self.zk = zk_test.ZooKeeperServer(os.path.join(self.work_dir, "zk"), port)
        self.zk.start()
        mode = self.zk.wait_serving(60)
        self.say(f"ZooKeeper {mode} on {self.zk.address} (pid {self.zk.proc.pid})")
        return f"zk://{self.zk.address}/agora"

    @defer.inlineCallbacks
    def start_master(self, name: str, url: str):
        args = self.args
        d = os.path.join(self.work_dir, name)
        os.makedirs(d, exist_ok=True)
        master = MasterProcess(d, 0, args=[
            "--ip", "127.0.0.1", "--zk", url, "--registry", "zk",
            "--zk-session-timeout", str(args.zk_session_timeout),
            "--allocation-interval", str(args.allocation_interval)],
            log_level=args.master_log_level)
        port = yield threads.deferToThread(master.wait_banner, 60.0)
        self.masters[port] = master
        self.say(f"master {name} pid {master.pid} on port {port}; log {master.log_path}")
        return master

    def _on_leader(self, host, port) -> None:
        self.leader = (host, port) if host else None
        if host:
            self.leader_changed_at[(host, port)] = time.monotonic()
            self.say(f"ZooKeeper: leading master is {host}:{port}")

    # --- the run ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def run(self):
        args, fig, reactor = self.args, self.fig, self.reactor
        raise_fd_limit(4 * args.max_calls + FD_HEADROOM)
        url = yield threads.deferToThread(self.start_zookeeper)
        yield self.start_master("m0", url)
        yield ttask.deferLater(reactor, 1.0, lambda: None)  # m0 first in the election
        yield self.start_master("m1", url)
        self.detector = ZooKeeperMaster(reactor, zookeeper.parse_url(url), self._on_leader,
                                        session_timeout=10.0)
        self.detector.start()
        yield wait_until(reactor, lambda: self.leader is not None, 60, "a leader")
        leader = self.masters[self.leader[1]]

        # Agents register with the leader.
        self.pool = pool = AgentWorkers(reactor, url, args.agents, args.agent_processes,
                                        args.agent_resources, args.batch)
        t0 = time.monotonic()
        yield pool.start(args.timeout, progress=lambda done, total: self.say(
            f"registered {done}/{total}"))
        fig["register_s"] = round(time.monotonic() - t0, 2)
        self.say(f"{args.agents} agents registered in {fig['register_s']}s")

        # Tasks: one offer round spreads them over every agent.
        per_offer = max(1, math.ceil(args.tasks / args.agents))
        sched = Scheduler(reactor, self.leader, "failover", args.tasks, per_offer, args.task,
                          self.stats, max_calls=args.max_calls)
        t0 = time.monotonic()
        yield sched.subscribe()
        yield wait_until(reactor, lambda: pool.running() >= args.tasks, args.timeout,
                         "every task RUNNING", interval=0.2)
        fig["launch_s"] = round(time.monotonic() - t0, 2)
        self.say(f"{args.tasks} tasks RUNNING in {fig['launch_s']}s; waiting for acks")
        yield wait_until(reactor, lambda: self.stats.ack_calls >= args.tasks, args.timeout,
                         "every update acknowledged", interval=0.2)
        yield ttask.deferLater(reactor, 1.0, lambda: None)  # let the acks reach the agents
        fig["launch_acked_s"] = round(time.monotonic() - t0, 2)
        self.say(f"every update acknowledged {fig['launch_acked_s']}s after SUBSCRIBE")

        # Failover.
        old = self.leader
        [old_id] = pool.masters()
        held = pool.tasks()
        standby = next(m for p, m in self.masters.items() if p != old[1])
        fig["master_rss_before_mb"] = round(leader.rss_mb())
        cpu0 = standby.cpu_seconds()
        fig["standby_cpu_before_s"] = round(cpu0, 2)  # mostly mirroring the registry
        yield self.profiler.start(reactor, standby.pid, "failover")
        for profiler, pid in zip(self.client_profilers, pool.pids):
            yield profiler.start(reactor, pid, "failover")
        client_cpu0 = self_cpu() + pool.cpu_seconds()
        challenges0 = pool.challenges
        t_kill = time.monotonic()
        leader.kill()
        self.say(f"leader {old[0]}:{old[1]} SIGKILLed; {args.agents} agents hold {held} tasks")
        yield wait_until(reactor, lambda: self.leader not in (None, old), args.timeout,
                         "a new leader", interval=0.01)
        t_elected = self.leader_changed_at[self.leader]
        fig["elected_s"] = round(t_elected - t_kill, 3)
        new = self.leader
        resub = Resubscriber(reactor, new, sched, self.stats)

        @defer.inlineCallbacks
        def resubscribe():
            nonlocal resub
            while True:
                try:
                    yield resub.subscribe()
                    fig["resubscribed_s"] = round(time.monotonic() - t_kill, 3)
                    return
                except Exception as e:  # 307/503 while the standby is not leading yet
                    if time.monotonic() - t_kill > args.timeout:
                        raise
                    self.say(f"re-SUBSCRIBE: {e}; retrying")
                    yield ttask.deferLater(reactor, 0.1, lambda: None)
                    resub = Resubscriber(reactor, new, sched, self.stats)

        sub_d = resubscribe()

        def moved():
            counts = [n for mid, n in pool.masters().items() if mid != old_id]
            return bool(counts) and max(counts) >= args.agents

        last = [0.0]

        def progress():
            if "first_reregistered_s" not in fig and any(
                    n for mid, n in pool.masters().items() if mid != old_id):
                fig["first_reregistered_s"] = round(time.monotonic() - t_kill, 3)
            if time.monotonic() - last[0] >= args.report_every or moved():
                last[0] = time.monotonic()
                counts = {mid[-6:]: n for mid, n in pool.masters().items()}
                self.say(f"re-registered so far: {counts}; challenges answered since the "
                         f"kill: {pool.challenges - challenges0}")
            return moved()

        yield wait_until(reactor, progress, args.timeout, "every agent to re-register",
                         interval=0.01)
        t_rereg = time.monotonic()
        fig["reregistered_s"] = round(t_rereg - t_kill, 3)
        fig["reregister_s"] = round(t_rereg - t_elected, 3)
        fig["reregister_master_cpu_s"] = round(standby.cpu_seconds() - cpu0, 2)
        fig["reregister_client_cpu_s"] = round(self_cpu() + pool.cpu_seconds() - client_cpu0, 2)
        yield self.profiler.stop("new leader, from the kill to every agent re-registered")
        for i, profiler in enumerate(self.client_profilers):
            yield profiler.stop(f"agent worker {i}, the same window")
        self.say(f"all {args.agents} agents re-registered {fig['reregistered_s']}s after the "
                 f"kill ({fig['reregister_s']}s after the election)")
        yield sub_d
        yield wait_until(reactor, lambda: resub.first_offer_at is not None, args.timeout,
                         "the first offer from the new leader", interval=0.01)
        fig["first_offer_s"] = round(resub.first_offer_at - t_kill, 3)
        self.say(f"first OFFERS to the re-subscribed framework {fig['first_offer_s']}s "
                 f"after the kill")
        status, body = yield http_request(reactor, new, "GET", "/metrics/snapshot")
        metrics = json.loads(body)
        fig["active_agents"] = int(metrics.get("master/slaves_active", -1))
        fig["tasks_running"] = int(metrics.get("master/tasks_running", -1))
        fig["reregistrations"] = int(metrics.get("master/slave_reregistrations", -1))
        fig["dropped_registrations"] = int(metrics.get("master/dropped_registrations", -1))
        fig["held_tasks"] = held
        fig["master_rss_after_mb"] = round(standby.rss_mb())

    @defer.inlineCallbacks
    def stop(self):
        if self.pool is not None:
            yield self.pool.stop()
        if self.detector is not None:
            yield self.detector.stop()
        for master in self.masters.values():
            master.stop()
        if self.zk is not None:
            self.zk.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=10000)
    p.add_argument("--tasks", type=int, default=100000)
    p.add_argument("--task", default="cpus:0.01;mem:1", help="resources of one task")
    p.add_argument("--agent-resources", default=DEFAULT_RESOURCES)
    p.add_argument("--agent-processes", type=int, default=2, metavar="K",
                   help="worker processes playing the agents between them")
    p.add_argument("--allocation-interval", type=float, default=1.0, metavar="SECS")
    p.add_argument("--zk-session-timeout", type=float, default=2.0, metavar="SECS",
                   help="the masters' ZooKeeper session timeout (ZooKeeper here has "
                        "tickTime=500 ms, so 1-10 s)")
    p.add_argument("--batch", type=int, default=500, help="agents connecting at once")
    p.add_argument("--max-calls", type=int, default=64)
    p.add_argument("--report-every", type=float, default=1.0, metavar="SECS")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECS")
    p.add_argument("--master-log-level", default="info")
    p.add_argument("--profile", default=None, metavar="PREFIX",
                   help="py-spy the new leader from the kill to re-registration")
    p.add_argument("--profile-rate", type=int, default=100)
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    from twisted.internet import reactor

    work_dir = tempfile.mkdtemp(prefix="agora-failover-")
    bench = Bench(reactor, args, work_dir)
    status = run_bench(reactor, bench)
    fig = bench.fig
    fig.update(errors=len(bench.stats.other_states), client_cpu_s=round(self_cpu(), 1),
               loadavg_after=load_average(), cpus=os.cpu_count(),
               python=sys.version.split()[0])
    if not args.keep and status == 0:
        shutil.rmtree(work_dir, ignore_errors=True)
    else:
        print(f"work directory kept: {work_dir}", flush=True)
    print(" ".join(f"{k}={v}" for k, v in fig.items()), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
