"""End to end through real processes: `agora local` driven by unmodified pymesos and mesoshttp."""

import glob
import os
import threading

import pytest

from tests.cluster import LocalCluster, wait_for
from tests.schedulers import Recorder, start_driver, unique


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("e2e"), agents=2)
    yield c
    c.stop()


def sandbox_files(cluster, task_id: str, name: str) -> list:
    pattern = os.path.join(cluster.work_dir, "agent*", "slaves", "*", "frameworks", "*",
                           "executors", task_id, "runs", "latest", name)
    return glob.glob(pattern)


def test_pymesos_runs_ten_command_tasks(cluster):
    """An unmodified pymesos scheduler launches 10 tasks; all finish with output in the sandbox."""
    names = [unique("echo") for _ in range(10)]
    sched = Recorder([(n, f"echo hello from {n}") for n in names])
    driver = start_driver(sched, cluster.address, name="ten-tasks")
    try:
        wait_for(lambda: all(sched.last_state(n) == "TASK_FINISHED" for n in names),
                 timeout=60, what="10 tasks to finish")
        for n in names:
            assert sched.states(n)[-1] == "TASK_FINISHED"
            assert "TASK_RUNNING" in sched.states(n)
            files = wait_for(lambda: sandbox_files(cluster, n, "stdout"), what="sandbox stdout")
            with open(files[0]) as f:
                assert f"hello from {n}" in f.read()
        update = next(u for u in sched.updates if u["state"] == "TASK_FINISHED")
        assert update["agent_id"]["value"] and update["uuid"]
    finally:
        driver.stop()
        driver.join()
    state = wait_for(lambda: [f for f in cluster.state()["completed_frameworks"]
                              if f["name"] == "ten-tasks"], what="TEARDOWN to complete")
    assert state[0]["active"] is False


def test_failed_command_reports_task_failed(cluster):
    """A command that exits non-zero ends TASK_FAILED with its exit status in the message."""
    name = unique("fail")
    sched = Recorder([(name, "exit 3")])
    driver = start_driver(sched, cluster.address)
    try:
        wait_for(lambda: sched.last_state(name) == "TASK_FAILED", what="TASK_FAILED")
        last = [u for u in sched.updates if u["task_id"]["value"] == name][-1]
        assert "3" in last.get("message", "")
    finally:
        driver.stop()
        driver.join()


def test_mesoshttp_runs_command_tasks(cluster):
    """The mesoshttp client subscribes, launches tasks on offers and sees them finish."""
    from mesoshttp.client import MesosClient

    names = [unique("mh") for _ in range(3)]
    pending = list(names)
    states = {}
    done = threading.Event()
    client = MesosClient(mesos_urls=[cluster.url], frameworkName="mesoshttp-test")

    def on_offers(offers):
        for offer in offers:
            data = offer.get_offer()
            if not pending:
                offer.decline()
                continue
            name = pending.pop()
            offer.accept([{
                "task_id": {"value": name}, "agent_id": data["agent_id"], "name": name,
                "command": {"value": "echo mesoshttp ünïcödé"},
                "resources": [{"name": "cpus", "type": "SCALAR", "scalar": {"value": 0.1}},
                              {"name": "mem", "type": "SCALAR", "scalar": {"value": 32}}]}])

    def on_update(update):
        status = update["status"]
        states[status["task_id"]["value"]] = status["state"]
        if all(states.get(n) == "TASK_FINISHED" for n in names):
            done.set()

    client.on(MesosClient.OFFERS, on_offers)
    client.on(MesosClient.UPDATE, on_update)
    thread = threading.Thread(target=client.register, daemon=True)
    thread.start()
    try:
        assert done.wait(60), f"tasks did not finish: {states}"
    finally:
        client.tearDown()
        thread.join(20)
