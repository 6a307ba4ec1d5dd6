"""The fetcher under a real agent: URIs land in the sandbox before the executor starts."""

from __future__ import annotations

import os

from agent_harness import (  # noqa: F401  (fixtures)
    agent_reactor, cluster, file_server, make_cluster, make_tarball, process_alive, wait_for)

from agora import protocol


def uri_command(command: str, *uris: dict) -> dict:
    return {"value": command, "uris": list(uris)}


def test_command_task_uris_are_fetched_and_extracted_before_it_runs(cluster, file_server):
    """A tar.gz over HTTP is extracted and an executable file copied; the task runs both."""
    make_tarball(file_server.root / "app.tar.gz", {"app/run.sh": "echo from-the-archive\n"},
                 {"app/run.sh": 0o755})
    tool = file_server.root / "tool.sh"
    tool.write_text("echo from-the-tool\n")
    cluster.run_task("fetch", uri_command(
        "./app/run.sh && ./tool.sh",
        {"value": file_server.url + "/app.tar.gz"},
        {"value": str(tool), "executable": True}))
    cluster.wait_state("fetch", "TASK_FINISHED")
    assert cluster.read_sandbox("fetch") == "from-the-archive\nfrom-the-tool\n"
    assert os.path.exists(os.path.join(cluster.sandbox("fetch"), "app.tar.gz"))
    metrics = cluster.get_json("/metrics/snapshot")
    assert metrics["containerizer/fetcher/task_fetches_succeeded"] == 1.0


def test_failed_fetch_fails_the_task_and_starts_no_executor(cluster, file_server):
    """A 404 is TASK_FAILED, CONTAINER_LAUNCH_FAILED with the fetch error; nothing runs."""
    missing = file_server.url + "/no-such.tar.gz"
    cluster.run_task("nofetch", uri_command("touch ran", {"value": missing}))
    status = cluster.wait_state("nofetch", "TASK_FAILED")
    assert status["reason"] == "REASON_CONTAINER_LAUNCH_FAILED"
    assert status["source"] == "SOURCE_AGENT"
    assert missing in status["message"] and "404" in status["message"]
    assert cluster.master.states("nofetch") == ["TASK_FAILED"]
    assert missing in cluster.read_sandbox("nofetch", "stderr")
    assert not os.path.exists(os.path.join(cluster.sandbox("nofetch"), "ran"))

    def completed():
        fw = cluster.agent.completed_frameworks
        return [e for f in fw for e in f.completed_executors if e.executor_id == "nofetch"]
    [executor] = wait_for(lambda: cluster.call(completed), what="the executor to be settled")
    assert executor.container is None  # never started
    metrics = cluster.get_json("/metrics/snapshot")
    assert metrics["containerizer/fetcher/task_fetches_failed"] == 1.0


def test_fetch_runs_off_the_reactor_and_a_kill_meanwhile_ends_the_task(cluster, file_server):
    """While a slow fetch runs the agent still answers; a kill then is TASK_KILLED at once."""
    (file_server.root / "slow.txt").write_text("late\n")
    cluster.run_task("slow", uri_command("cat slow.txt",
                                         {"value": file_server.url + "/gated/slow.txt"}))
    wait_for(lambda: file_server.hits.get("/gated/slow.txt"), what="the fetch to start")
    assert cluster.http("GET", "/health")[0] == 200
    [fw] = cluster.get_json("/state")["frameworks"]
    assert [e["state"] for e in fw["executors"]] == ["LAUNCHING"]
    cluster.send(protocol.KillTask(framework_id="fw-1", task_id="slow"))
    status = cluster.wait_state("slow", "TASK_KILLED")
    assert status["reason"] == "REASON_TASK_KILLED_DURING_LAUNCH"
    file_server.gate.set()
    wait_for(lambda: cluster.get_json("/metrics/snapshot")[
        "containerizer/fetcher/task_fetches_succeeded"] == 1.0, what="the fetch to finish")
    assert cluster.master.states("slow") == ["TASK_KILLED"]
    assert cluster.read_sandbox("slow") == ""  # the executor never started


def test_cached_uri_is_downloaded_once_for_two_tasks(cluster, file_server):
    """`cache: true` keeps the file in the agent's fetcher cache: one download, two tasks."""
    (file_server.root / "data.txt").write_text("cached\n")
    uri = {"value": file_server.url + "/data.txt", "cache": True}
    for tid in ("c1", "c2"):
        cluster.run_task(tid, uri_command("cat data.txt", uri))
        cluster.wait_state(tid, "TASK_FINISHED")
        assert cluster.read_sandbox(tid) == "cached\n"
    assert file_server.hits["/data.txt"] == 1
    assert os.listdir(os.path.join(cluster.work_dir, "fetch"))
    metrics = cluster.get_json("/metrics/snapshot")
    assert metrics["containerizer/fetcher/cache_size_used_bytes"] == len("cached\n")


def test_custom_executor_command_uris_are_fetched(cluster, file_server):
    """A custom executor's own CommandInfo.uris are in its sandbox when it starts."""
    (file_server.root / "conf.txt").write_text("executor-config\n")
    executor = {"executor_id": {"value": "custom"},
                "command": {"value": "cat conf.txt; sleep 100",
                            "uris": [{"value": file_server.url + "/conf.txt"}]}}
    cluster.run_task("ct", None, executor=executor)
    pid = cluster.executor_pid("custom")
    wait_for(lambda: cluster.read_sandbox("custom") == "executor-config\n",
             what="the executor's output")
    assert process_alive(pid)


def test_a_group_fetches_each_tasks_uris_into_the_shared_sandbox(cluster, file_server):
    """LAUNCH_GROUP: every task's URIs are fetched before the default executor starts."""
    for name in ("a.txt", "b.txt"):
        (file_server.root / name).write_text(name + "\n")
    executor = {"executor_id": {"value": "grp"}, "type": "DEFAULT",
                "framework_id": {"value": "fw-1"}}
    tasks = [{"name": n, "task_id": {"value": n}, "agent_id": {"value": "fake-S0"},
              "command": uri_command("cat a.txt b.txt",
                                     {"value": f"{file_server.url}/{n}.txt"})}
             for n in ("a", "b")]
    cluster.send(protocol.RunTaskGroup(framework=cluster.framework(), executor=executor,
                                       task_group={"tasks": tasks}))
    cluster.wait_state("a", "TASK_FINISHED")
    cluster.wait_state("b", "TASK_FINISHED")
    lines = cluster.read_sandbox("grp").splitlines()
    assert sorted(lines) == ["a.txt", "a.txt", "b.txt", "b.txt"]
