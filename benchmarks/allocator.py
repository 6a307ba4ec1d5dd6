"""Allocator benchmark in the shape of Mesos's HierarchicalAllocator_BENCHMARK_Test.DeclineOffers.

Every agent has cpus:24;mem:4096;disk:4096;ports:[31000-32000], of which
cpus:16;mem:2014;disk:1024 and 16 ports are in use by one framework (round-robin over the
frameworks). Each round declines every offer of the previous round with refuse_seconds =
INT_MAX (capped at 365 days), then runs one allocation cycle over all agents, as Mesos's
batch allocation does, and times it. Mesos 1.8 (C++, --enable-optimize) reports 1.06 s per
cycle at 10,000 agents x 1,000 frameworks (perf-anchors.md A1).

    python benchmarks/allocator.py --agents 10000 --frameworks 1000 [--rounds 10] [--profile]

Prints a line per round, and on the last line ``key=value`` figures. `allocate()` pauses
the cyclic garbage collector while it runs; `gc_ms` is the collector's time over the rounds
(it runs during the declines instead), reported so that nothing is hidden.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agora.resources import Resources  # noqa: E402
from master.allocator.allocator import Allocator  # noqa: E402

INT_MAX = 2**31 - 1
AGENT = "cpus:24;mem:4096;disk:4096;ports:[31000-32000]"


def used_resources(rng: random.Random) -> Resources:
    """16 tasks' worth: cpus:16;mem:2014;disk:1024 and 16 distinct ports in 31000-32000."""
    ports = sorted(rng.sample(range(31000, 32001), 16))
    spec = ",".join(f"{p}-{p}" for p in ports)
    return Resources.parse(f"cpus:16;mem:2014;disk:1024;ports:[{spec}]")


class GCTimer:
    """Total time spent in the cyclic garbage collector while installed."""

    def __init__(self) -> None:
        self.total = 0.0
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=10000)
    p.add_argument("--frameworks", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=10, help="allocation cycles to time (Mesos runs 2 x frameworks)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="cProfile the allocation cycles; print the top entries")
    args = p.parse_args(argv)

    rng = random.Random(args.seed)
    now = [0.0]
    allocator = Allocator(clock=lambda: now[0], rng=random.Random(args.seed))
    print(f"Using {args.agents} agents and {args.frameworks} frameworks", flush=True)

    frameworks = [f"framework-{i:05d}" for i in range(args.frameworks)]
    t0 = time.perf_counter()
    for fid in frameworks:
        allocator.add_framework(fid, ("*",))
    add_frameworks_ms = (time.perf_counter() - t0) * 1000
    print(f"Added {args.frameworks} frameworks in {add_frameworks_ms:.1f} ms", flush=True)

    total = Resources.parse(AGENT)
    # A few distinct port patterns, shared, as Mesos builds one `allocation` for all agents.
    patterns = [used_resources(rng) for _ in range(16)]
    t0 = time.perf_counter()
    for i in range(args.agents):
        allocator.add_agent(f"agent-{i:06d}", total, {frameworks[i % args.frameworks]: patterns[i % 16]})
    add_agents_ms = (time.perf_counter() - t0) * 1000
    print(f"Added {args.agents} agents in {add_agents_ms:.1f} ms", flush=True)

    profiler = cProfile.Profile() if args.profile else None
    offers: list = []
    declined = 0
    cycle_ms: list[float] = []
    decline_ms: list[float] = []
    made = 0
    gc.collect()
    gc_timer = GCTimer()
    gc.callbacks.append(gc_timer)
    for r in range(args.rounds):
        t0 = time.perf_counter()
        for o in offers:
            allocator.recover(o.framework_id, o.agent_id, o.resources, refuse_seconds=INT_MAX)
        decline_ms.append((time.perf_counter() - t0) * 1000)
        declined += len(offers)
        now[0] += 1.0  # Mesos advances the clock by allocation_interval

        if profiler:
            profiler.enable()
        t0 = time.perf_counter()
        offers = allocator.allocate()
        elapsed = (time.perf_counter() - t0) * 1000
        if profiler:
            profiler.disable()
        cycle_ms.append(elapsed)
        made += len(offers)
        print(
            f"round {r} allocate() took {elapsed:.1f} ms to make {len(offers)} offers "
            f"after filtering {declined} offers (declining took {decline_ms[-1]:.1f} ms)",
            flush=True,
        )

    gc.callbacks.remove(gc_timer)
    if profiler:
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(12)

    total_s = sum(cycle_ms) / 1000
    figures = {
        "agents": args.agents,
        "frameworks": args.frameworks,
        "rounds": args.rounds,
        "ms_per_cycle": f"{statistics.fmean(cycle_ms):.1f}",
        "ms_per_cycle_p50": f"{statistics.median(cycle_ms):.1f}",
        "ms_per_cycle_max": f"{max(cycle_ms):.1f}",
        "offers_per_cycle": made // max(1, args.rounds),
        "offers_per_s": f"{made / total_s:.0f}" if total_s else "inf",
        "decline_ms_per_round": f"{statistics.fmean(decline_ms[1:] or decline_ms):.1f}",
        "gc_ms": f"{gc_timer.total * 1000:.0f}",
        "add_agents_ms": f"{add_agents_ms:.1f}",
        "add_frameworks_ms": f"{add_frameworks_ms:.1f}",
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
