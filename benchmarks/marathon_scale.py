#!/usr/bin/env python3
"""Marathon at scale: one app scaled to 10,000 instances on emulated agents.

Starts a real `agora master` (in-memory registry) and a real `agora marathon` (its embedded
SQLite store by default) as child processes, connects `--agents` emulated agents to the
master (benchmarks/emulated_agents.py: the real agent link, RunTask answered with
TASK_RUNNING), creates one app with no instances (`cpus:0.01, mem:1`, one host port, the
command executor) and then scales it to `--instances` with one `PUT /v2/apps/bench`.
Measured, from the PUT:

* the first instance RUNNING, and every instance RUNNING as Marathon reports it
  (`tasksRunning` of `GET /v2/apps?id=/bench`, polled every 50 ms): `instances_per_s`;
* the deployment gone from `/v2/deployments` (Marathon saw every instance run);
* Marathon's and the master's CPU time for it, Marathon's RSS;
* with every instance running: `GET /v2/apps/bench` (10,000 tasks embedded), `/v2/tasks`,
  `/v2/apps`, `/v2/queue`, `/metrics`;
* then the scale back to 0 (`--scale-down`, on by default): every task killed.

    python benchmarks/marathon_scale.py                       # 1,000 agents, 10,000 instances
    python benchmarks/marathon_scale.py --per-offer 5         # Marathon's default per offer
    python benchmarks/marathon_scale.py --agents 100 --instances 1000 --store memory

`--profile PREFIX` runs py-spy on Marathon during the scale-up. Progress goes to stdout; the
last line is `key=value` figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, threads  # noqa: E402

from benchmarks.emulated_agents import DEFAULT_RESOURCES, FD_HEADROOM, EmulatedAgents, \
    raise_fd_limit  # noqa: E402
from benchmarks.master_launch import (MasterProcess, Profiler, http_request,  # noqa: E402
                                      load_average, run_bench, self_cpu)


def marathon_process(work_dir: str, master: tuple, args=()) -> MasterProcess:
    """`agora marathon` as a child process (CPU, RSS and stop as for the master)."""
    return MasterProcess(work_dir, name="marathon", banner=r"Marathon: http://[\d.]+:(\d+)",
                         command=["marathon", "--master", f"{master[0]}:{master[1]}",
                                  "--port", "0", "--work-dir",
                                  os.path.join(work_dir, "marathon"), *args])


class Bench:
    def __init__(self, reactor, args, work_dir: str):
        self.reactor, self.args, self.work_dir = reactor, args, work_dir
        self.fig: dict = {"agents": args.agents, "instances": args.instances,
                          "per_offer": args.per_offer, "store": args.store,
                          "loadavg_before": load_average()}
        self.profiler = Profiler(args.profile, args.profile_rate)
        self.master = self.marathon = self.pool = None
        self._t0 = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self._t0:7.2f}s] {text}", flush=True)

    def api(self, method: str, path: str, body=None):
        """(status, JSON) of one Marathon request, made from the reactor without blocking."""
        data = json.dumps(body).encode() if body is not None else b""
        d = http_request(self.reactor, ("127.0.0.1", self.marathon.port), method, path, data,
                         {"Content-Type": "application/json", "Accept": "application/json"})

        def parsed(result):
            status, raw = result
            return status, json.loads(raw) if raw.strip() else None

        return d.addCallback(parsed)

    @defer.inlineCallbacks
    def run(self):
        args, fig = self.args, self.fig
        raise_fd_limit(args.agents + FD_HEADROOM)
        self.master = MasterProcess(self.work_dir, args=[
            "--allocation-interval", str(args.allocation_interval)])
        port = yield threads.deferToThread(self.master.wait_banner)
        address = ("127.0.0.1", port)
        self.say(f"master pid {self.master.pid} on port {port}")
        self.pool = EmulatedAgents(self.reactor, address, args.agents, args.agent_resources)
        t0 = time.monotonic()
        yield self.pool.start(batch=500)
        self.say(f"{args.agents} agents registered in {time.monotonic() - t0:.1f}s")
        self.marathon = marathon_process(self.work_dir, address, args=[
            "--store", args.store, "--max-instances-per-offer", str(args.per_offer),
            "--min-revive-offers-interval", "0.5", "--decline-offer-duration", "5"])
        yield threads.deferToThread(self.marathon.wait_banner)
        fig["marathon_pid"] = self.marathon.pid
        yield self._wait_registered()
        self.say(f"marathon pid {self.marathon.pid} on port {self.marathon.port} registered")
        status, body = yield self.api("POST", "/v2/apps", {
            "id": "/bench", "cmd": "sleep 3600", "cpus": args.cpus, "mem": args.mem,
            "instances": 0})
        if status != 201:
            raise RuntimeError(f"creating the app answered {status}: {body}")
        yield self._wait_deployments()
        yield self.scale_up()
        yield self.endpoints()
        if args.scale_down:
            yield self.scale_down()
        fig["marathon_rss_mb"] = round(self.marathon.rss_mb())
        fig["client_cpu_s"] = round(self_cpu(), 1)

    @defer.inlineCallbacks
    def _wait_registered(self):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status, body = yield self.api("GET", "/v2/info")
            if status == 200 and body.get("frameworkId"):
                return
            yield self._sleep(0.1)
        raise TimeoutError("Marathon did not register with the master")

    @defer.inlineCallbacks
    def _wait_deployments(self, timeout: float = 600.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, body = yield self.api("GET", "/v2/deployments")
            if status == 200 and body == []:
                return time.monotonic()
            yield self._sleep(0.05)
        raise TimeoutError("the deployment did not finish")

    def _sleep(self, seconds: float):
        from twisted.internet import task
        return task.deferLater(self.reactor, seconds, lambda: None)

    @defer.inlineCallbacks
    def _running(self):
        status, body = yield self.api("GET", "/v2/apps?id=/bench")
        apps = body["apps"] if status == 200 else []
        return apps[0]["tasksRunning"] if apps else 0

    @defer.inlineCallbacks
    def scale_up(self):
        args, fig = self.args, self.fig
        n = args.instances
        yield self.profiler.start(self.reactor, self.marathon.pid, "scale")
        cpu0, mcpu0 = self.marathon.cpu_seconds(), self.master.cpu_seconds()
        t0 = time.monotonic()
        status, body = yield self.api("PUT", "/v2/apps/bench", {"instances": n})
        if status != 200:
            raise RuntimeError(f"scaling answered {status}: {body}")
        fig["put_ms"] = round(1000 * (time.monotonic() - t0), 1)
        first = None
        last_report = t0
        while True:
            running = yield self._running()
            now = time.monotonic()
            if running and first is None:
                first = now - t0
            if running >= n:
                break
            if now - last_report >= 2:
                self.say(f"{running}/{n} running ({self.pool.running()} at the agents)")
                last_report = now
            if now - t0 > args.timeout:
                raise TimeoutError(f"only {running}/{n} instances ran in {args.timeout:.0f}s")
            yield self._sleep(0.05)
        all_running = time.monotonic() - t0
        done = (yield self._wait_deployments()) - t0
        fig.update(first_running_ms=round(1000 * first, 1), scale_s=round(all_running, 3),
                   instances_per_s=round(n / all_running),
                   deployment_done_s=round(done, 3),
                   scale_marathon_cpu_s=round(self.marathon.cpu_seconds() - cpu0, 2),
                   scale_master_cpu_s=round(self.master.cpu_seconds() - mcpu0, 2))
        fig["marathon_us_per_instance"] = round(1e6 * fig["scale_marathon_cpu_s"] / n)
        yield self.profiler.stop("scale-up")
        self.say(f"{n} instances running in {all_running:.2f}s ({fig['instances_per_s']}/s); "
                 f"deployment done at {done:.2f}s; Marathon CPU "
                 f"{fig['scale_marathon_cpu_s']}s, master CPU {fig['scale_master_cpu_s']}s")

    @defer.inlineCallbacks
    def endpoints(self):
        for name, path in (("get_app", "/v2/apps/bench"), ("tasks", "/v2/tasks"),
                           ("apps", "/v2/apps"), ("queue", "/v2/queue"),
                           ("metrics", "/metrics")):
            t0 = time.monotonic()
            status, raw = yield http_request(self.reactor, ("127.0.0.1", self.marathon.port),
                                             "GET", path, b"", {"Accept": "application/json"})
            if status != 200:
                raise RuntimeError(f"GET {path} answered {status}")
            self.fig[f"{name}_ms"] = round(1000 * (time.monotonic() - t0), 1)
            if name in ("get_app", "tasks"):
                self.fig[f"{name}_mb"] = round(len(raw) / 1e6, 2)
        self.say("endpoints: " + ", ".join(f"{k}={v}" for k, v in self.fig.items()
                                           if k.endswith(("_ms", "_mb"))))

    @defer.inlineCallbacks
    def scale_down(self):
        fig = self.fig
        cpu0 = self.marathon.cpu_seconds()
        t0 = time.monotonic()
        status, body = yield self.api("PUT", "/v2/apps/bench", {"instances": 0})
        if status != 200:
            raise RuntimeError(f"scaling down answered {status}: {body}")
        done = (yield self._wait_deployments()) - t0
        fig.update(scale_down_s=round(done, 3),
                   scale_down_marathon_cpu_s=round(self.marathon.cpu_seconds() - cpu0, 2))
        self.say(f"scaled back to 0 in {done:.2f}s ({self.pool.running()} left at the agents)")

    def figures(self) -> dict:
        """Every figure, with the machine's state at the end."""
        return {**self.fig, "loadavg_after": load_average(), "cpus": os.cpu_count(),
                "python": sys.version.split()[0]}

    @defer.inlineCallbacks
    def stop(self):
        if self.marathon is not None:
            self.marathon.stop()
        if self.pool is not None:
            yield self.pool.stop()
        if self.master is not None:
            self.master.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--instances", type=int, default=10000)
    p.add_argument("--per-offer", type=int, default=10,
                   help="Marathon's --max-instances-per-offer (default 10: one round at "
                        "1,000 agents; Marathon's own default is 5)")
    p.add_argument("--store", choices=("sqlite", "memory"), default="sqlite")
    p.add_argument("--cpus", type=float, default=0.01)
    p.add_argument("--mem", type=float, default=1)
    p.add_argument("--agent-resources", default=DEFAULT_RESOURCES)
    p.add_argument("--allocation-interval", type=float, default=1.0, metavar="SECS")
    p.add_argument("--scale-down", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECS")
    p.add_argument("--profile", default=None, metavar="PREFIX",
                   help="py-spy Marathon during the scale-up into PREFIX-scale.txt")
    p.add_argument("--profile-rate", type=int, default=200)
    args = p.parse_args(argv)
    from twisted.internet import reactor

    bench = Bench(reactor, args, tempfile.mkdtemp(prefix="agora-marathon-bench-"))
    status = run_bench(reactor, bench)
    print(" ".join(f"{k}={v}" for k, v in bench.figures().items()), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
