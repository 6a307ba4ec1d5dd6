"""An agent given `--master zk://…` follows the leading master: real ZooKeeper, two real
`agora master --zk` processes, a real agent and an unmodified pymesos framework."""

import json
import signal
import time
import uuid

from tests.cluster import AgentProcess, MasterProcess, get_json, wait_for
from tests.schedulers import Recorder, start_driver, unique
from tests.zookeeper import zk_server  # noqa: F401  (fixture)


def elected(m) -> bool:
    try:
        return get_json(m.url + "/metrics/snapshot", timeout=2)["master/elected"] == 1.0
    except OSError:
        return False


def active_agents(m) -> list:
    try:
        return [s for s in m.state()["slaves"] if s["active"]]
    except OSError:
        return []


def test_agent_follows_the_leader_and_reregisters_with_its_tasks(zk_server, tmp_path):
    """The agent registers with the leader; SIGTERM the leader and it re-registers with the
    new one within seconds, its running task listed there."""
    url = f"zk://{zk_server.address}/agora-{uuid.uuid4().hex[:8]}"
    m1 = MasterProcess(tmp_path, ["--zk", url, "--zk-session-timeout", "3"], name="m1")
    m2 = MasterProcess(tmp_path, ["--zk", url, "--zk-session-timeout", "3"], name="m2")
    agent = driver = None
    try:
        wait_for(lambda: elected(m1), 10, what="m1 to lead")
        agent = AgentProcess(tmp_path, url, ["--resources", "cpus:2;mem:512"])
        wait_for(lambda: active_agents(m1), 10, what="the agent to register with m1")
        assert get_json(agent.url + "/flags")["flags"]["master"] == url
        name = unique("zk")
        sched = Recorder([(name, "sleep 300")])
        driver = start_driver(sched, url, name="zk-agent", failover_timeout=60)
        wait_for(lambda: sched.last_state(name) == "TASK_RUNNING", 20,
                 what="the task to run")
        agent_id = active_agents(m1)[0]["id"]

        m1.stop(signal.SIGTERM)
        stopped = time.monotonic()
        wait_for(lambda: elected(m2), 5, what="m2 to lead")
        try:
            back = wait_for(lambda: active_agents(m2), 10, what="the agent to re-register")
        except AssertionError:
            raise AssertionError(f"agent:\n{agent.tail()}\nm2:\n{m2.tail()}") from None
        assert time.monotonic() - stopped < 8
        assert back[0]["id"] == agent_id
        wait_for(lambda: name in json.dumps(m2.state()), 10, what="m2 to list the task")
        assert "Leading master is now" in agent.tail(200)
    finally:
        if driver is not None:
            driver.stop()
            driver.join()
        if agent is not None:
            agent.stop()
        for m in (m2, m1):
            if m.proc.poll() is None:
                m.stop()


def test_parse_master_takes_host_port_and_zk_urls():
    """`--master` is `host[:port]` (port 5050 by default) or a zk:// URL; junk says why."""
    import pytest

    from agent.master_detector import parse_master
    from agora.zookeeper import ZkUrl

    assert parse_master("10.0.0.1:5051") == ("10.0.0.1", 5051)
    assert parse_master("m1") == ("m1", 5050)
    assert parse_master("zk://a:1,b/agora") == ZkUrl("a:1,b:2181", "/agora")
    for bad in ("m1:x", "zk://a:1", ":5050", "http://m1:5050"):
        with pytest.raises(ValueError):
            parse_master(bad)
