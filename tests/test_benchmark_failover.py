"""benchmarks/failover.py end to end at a small size: the harness (ZooKeeper, two masters,
agents in worker processes, a scheduler) still measures a failover that loses nothing.

Figures are not checked here (benchmarks run on demand); what is checked is that the run
completes and that the new leader ends with every agent and task back.
"""

import os
import subprocess
import sys

import pytest

from tests import zookeeper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not zookeeper.available(), reason="ZooKeeper is not installed")
@pytest.mark.parametrize("processes", [1, 2])
def test_a_small_failover_run_brings_every_agent_and_task_back(processes):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "failover.py"), "--agents", "20",
         "--tasks", "60", "--agent-processes", str(processes), "--timeout", "60"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    figures = dict(kv.split("=", 1) for kv in out.stdout.strip().splitlines()[-1].split())
    assert figures["agent_processes"] == str(processes)
    assert figures["active_agents"] == "20" and figures["tasks_running"] == "60"
    assert figures["held_tasks"] == "60" and figures["reregistrations"] == "20"
    assert figures["errors"] == "0" and float(figures["reregister_s"]) > 0
