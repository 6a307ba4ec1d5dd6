"""The agent end to end through real processes: `agora master`, two `agora agent`s and an
unmodified pymesos scheduler. Fetching over HTTP, the task environment, /files, /monitor,
sandbox collection, kill grace periods and user switching.

The second agent runs with `--gc-disk-headroom 1.0`: it must keep the whole disk free, so
its disk always counts as past the headroom and every finished sandbox goes at the next disk
check (max age = gc_delay * max(0, 1 - headroom - usage) = 0) — exactly what a full disk
does, without filling one. Its `--gc-delay` is a week, so age alone would never collect.
"""

import http.server
import io
import json
import os
import pwd
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.cluster import AgentProcess, MasterProcess, get_json, processes_with, wait_for
from tests.schedulers import Recorder, command_task, start_driver, unique

RESOURCES = "cpus:4;mem:2048;disk:4000;ports:[31000-31099]"


class Launcher(Recorder):
    """Launches tasks built from offers of the agent each is meant for."""

    def __init__(self):
        super().__init__(refuse=0.1)
        self.wanted = []  # (agent id, build(offer, take_port) -> TaskInfo)

    def add(self, driver, agent_id: str, build) -> None:
        with self.lock:
            self.wanted.append((agent_id, build))
        driver.reviveOffers()

    def resourceOffers(self, driver, offers):
        for offer in offers:
            with self.lock:
                self.offers.append(offer)
                mine = [w for w in self.wanted if w[0] == offer["agent_id"]["value"]]
                for w in mine:
                    self.wanted.remove(w)
            ports = [p for r in offer["resources"] if r["name"] == "ports"
                     for rng in r["ranges"]["range"] for p in range(rng["begin"], rng["end"] + 1)]
            tasks = [build(offer, ports.pop) for _, build in mine]
            if tasks:
                driver.launchTasks(offer["id"], tasks, {"refuse_seconds": 0.1})
            else:
                driver.declineOffer(offer["id"], {"refuse_seconds": 0.1})


class Site:
    """The test's own HTTP server for URIs to fetch (`http.server`, 127.0.0.1, a free port)."""

    def __init__(self, directory):
        handler = lambda *a, **kw: _Quiet(*a, directory=str(directory), **kw)  # noqa: E731
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A master, a plain agent, an agent that collects at once, a scheduler, an HTTP site."""
    tmp = tmp_path_factory.mktemp("agent-e2e")
    master = MasterProcess(tmp)
    agent = AgentProcess(tmp, master.address, args=["--resources", RESOURCES])
    full = AgentProcess(tmp, master.address, name="full-disk", args=[
        "--resources", RESOURCES, "--gc-delay", "604800", "--gc-disk-headroom", "1.0",
        "--disk-watch-interval", "0.2"])
    www = tmp / "www"
    www.mkdir()
    site = Site(www)
    sched = Launcher()
    driver = None
    try:
        for a in (agent, full):
            a.id = wait_for(lambda a=a: _agent_id(master, a.port),
                            what=f"agent on port {a.port} to register")
            a.hostname = get_json(a.url + "/state")["hostname"]
        driver = start_driver(sched, master.address, name="agent-e2e")
        wait_for(sched.registered_event.is_set, what="the scheduler to register")
        yield {"master": master, "agent": agent, "full": full, "sched": sched,
               "driver": driver, "site": site, "www": www}
    finally:
        if driver is not None:
            driver.stop()
            driver.join()
        site.stop()
        for process in (full, agent, master):
            process.stop()


def _agent_id(master, port: int):
    for slave in master.state()["slaves"]:
        if slave["pid"].endswith(f":{port}") and slave["active"]:
            return slave["id"]
    return None


def launch(setup, command, agent: str = "agent", **extra) -> str:
    """Launch a command task (its CommandInfo extended by `extra`'s `command_extra`)."""
    name = unique("e2e")
    command_extra = extra.pop("command_extra", {})
    with_port = extra.pop("with_port", False)

    def build(offer, take_port):
        task = command_task(offer, name, command, **extra)
        task["command"].update(command_extra)
        if with_port:
            port = take_port()
            task["resources"].append({"name": "ports", "type": "RANGES",
                                      "ranges": {"range": [{"begin": port, "end": port}]}})
        return task

    setup["sched"].add(setup["driver"], setup[agent].id, build)
    return name


def wait_state(setup, name: str, state: str, timeout: float = 20.0) -> dict:
    sched = setup["sched"]

    def found():
        with sched.lock:
            return next((u for u in sched.updates
                         if u["task_id"]["value"] == name and u["state"] == state), None)
    return wait_for(found, timeout, what=f"{name} to reach {state} "
                                         f"(seen {sched.states(name)})")


def files(setup, endpoint: str, path: str, agent: str = "agent", **params):
    """(status, JSON or raw body) of /files/<endpoint> on an agent's HTTP port."""
    query = urllib.parse.urlencode({"path": path, **params})
    try:
        with urllib.request.urlopen(f"{setup[agent].url}/files/{endpoint}?{query}",
                                    timeout=10) as r:
            body = r.read()
            return r.status, (body if endpoint == "download" else json.loads(body))
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def latest(setup, name: str) -> str:
    return f"/frameworks/{setup['sched'].framework_id}/executors/{name}/runs/latest"


def stdout_of(setup, name: str, agent: str = "agent") -> str:
    status, body = files(setup, "read", latest(setup, name) + "/stdout", agent, offset=0)
    assert status == 200, body
    return body["data"]


# --- fetching -------------------------------------------------------------------------------


def test_a_fetched_archive_is_extracted_and_its_script_runs(setup):
    """A tar.gz served over HTTP is extracted into the sandbox; the task runs its script."""
    script = b"#!/bin/sh\necho \"fetched script says hi from $(pwd)\"\n"
    with tarfile.open(setup["www"] / "tools.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("tools/hello.sh")
        info.size, info.mode = len(script), 0o755
        tar.addfile(info, io.BytesIO(script))
    name = launch(setup, "./tools/hello.sh", command_extra={
        "uris": [{"value": setup["site"].url + "/tools.tar.gz", "extract": True}]})
    wait_state(setup, name, "TASK_FINISHED")
    assert "fetched script says hi from" in stdout_of(setup, name)


def test_a_bad_uri_fails_the_task_with_the_fetch_error(setup):
    """A URI that 404s: TASK_FAILED, REASON_CONTAINER_LAUNCH_FAILED, the error as message."""
    uri = setup["site"].url + "/missing.tar.gz"
    name = launch(setup, "true", command_extra={"uris": [{"value": uri}]})
    status = wait_state(setup, name, "TASK_FAILED")
    assert status["reason"] == "REASON_CONTAINER_LAUNCH_FAILED"
    assert uri in status["message"] and "404" in status["message"]
    assert setup["sched"].states(name) == ["TASK_FAILED"]


# --- what a task sees -----------------------------------------------------------------------


def test_a_task_sees_port0_its_id_and_the_host(setup):
    """A task with a port from the offer gets PORT0/PORTS, MESOS_TASK_ID and HOST."""
    name = launch(setup, "echo $PORT0 $PORTS $MESOS_TASK_ID $HOST", with_port=True)
    wait_state(setup, name, "TASK_FINISHED")
    port0, ports, task_id, host = stdout_of(setup, name).split()
    assert 31000 <= int(port0) <= 31099 and ports == port0
    assert task_id == name and host == setup["agent"].hostname


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs the agent to run as root")
def test_a_task_naming_nobody_runs_as_nobody(setup):
    """CommandInfo.user = nobody: `id -u` prints nobody's uid."""
    name = launch(setup, "id -u", command_extra={"user": "nobody"})
    wait_state(setup, name, "TASK_FINISHED")
    assert stdout_of(setup, name).strip() == str(pwd.getpwnam("nobody").pw_uid)


# --- /files and /monitor on the agent's port -------------------------------------------------


def test_files_browse_and_tail_a_running_tasks_stdout(setup):
    """/files/browse lists the sandbox; /files/read with offset=-1 then from there tails."""
    name = launch(setup, "i=0; while true; do i=$((i+1)); echo line-$i; sleep 0.05; done")
    wait_state(setup, name, "TASK_RUNNING")
    base = latest(setup, name)
    try:
        status, listing = wait_for(lambda: files(setup, "browse", base), what="the sandbox")
        assert status == 200 and base + "/stdout" in {e["path"] for e in listing}
        status, end = files(setup, "read", base + "/stdout", offset=-1)
        assert status == 200 and end["data"] == "" and end["offset"] >= 0

        def tail():
            status, more = files(setup, "read", base + "/stdout", offset=end["offset"])
            return status == 200 and more["data"].count("\n") >= 3 and more
        more = wait_for(tail, what="new lines to tail")
        assert more["offset"] == end["offset"]
        # The tail picks up exactly where the file ended: the next line, whole.
        status, head = files(setup, "read", base + "/stdout", offset=0, length=end["offset"])
        before = head["data"].count("\n")
        assert head["data"] == "".join(f"line-{i}\n" for i in range(1, before + 1))
        assert more["data"].startswith(f"line-{before + 1}\n")
    finally:
        setup["driver"].killTask({"value": name})
    wait_state(setup, name, "TASK_KILLED")


def test_files_refuse_every_way_out_of_the_sandbox(setup):
    """`..`, an absolute host path and a symlink the task made to /etc: 4xx, never the file."""
    name = launch(setup, "ln -s /etc etc; ln -s /etc/passwd passwd; sleep 100")
    wait_state(setup, name, "TASK_RUNNING")
    base = latest(setup, name)
    try:
        wait_for(lambda: files(setup, "browse", base + "/passwd")[0] != 404,
                 what="the task's links")
        for path in (base + "/../../../../../../../../etc/passwd", "/etc/passwd",
                     base + "/etc/passwd", base + "/passwd", base + "/etc"):
            for endpoint in ("read", "browse", "download"):
                status, body = files(setup, endpoint, path, offset=0)
                assert 400 <= status < 500, (endpoint, path, status, body)
                assert b"root:" not in (body if isinstance(body, bytes) else b"")
    finally:
        setup["driver"].killTask({"value": name})
    wait_state(setup, name, "TASK_KILLED")


def test_monitor_statistics_show_the_running_tasks_executor(setup):
    """/monitor/statistics has the running task's executor, with rss > 0 and its limits."""
    name = launch(setup, "sleep 100", cpus=0.2, mem=48)
    wait_state(setup, name, "TASK_RUNNING")
    try:
        stats = get_json(setup["agent"].url + "/monitor/statistics")
        [entry] = [e for e in stats if e["executor_id"] == name]
        assert entry["framework_id"] == setup["sched"].framework_id
        assert entry["statistics"]["mem_rss_bytes"] > 0
        assert entry["statistics"]["processes"] >= 2
        # In a linux container the limits are the cgroup's: our executor's 0.1 cpus and
        # 32 MB come on top of the task's (as in Mesos).
        linux = get_json(setup["agent"].url + "/flags")["flags"]["launcher"] == "linux"
        assert entry["statistics"]["cpus_limit"] == pytest.approx(0.3 if linux else 0.2)
        assert entry["statistics"]["mem_limit_bytes"] == (80 if linux else 48) * 1024 * 1024
    finally:
        setup["driver"].killTask({"value": name})
    wait_state(setup, name, "TASK_KILLED")


# --- kill, and collection --------------------------------------------------------------------


def test_a_task_ignoring_sigterm_is_killed_within_its_grace_period(setup):
    """kill_policy grace 1 s: SIGTERM is ignored, SIGKILL follows; TASK_KILLED, nothing left."""
    name = launch(setup, "trap '' TERM; sleep 100",
                  kill_policy={"grace_period": {"nanoseconds": 1_000_000_000}})
    wait_state(setup, name, "TASK_RUNNING")
    wait_for(lambda: processes_with(name), what="the task's processes")
    started = time.monotonic()
    setup["driver"].killTask({"value": name})
    wait_state(setup, name, "TASK_KILLED")
    took = time.monotonic() - started
    assert 0.9 <= took < 4.0, took
    wait_for(lambda: not processes_with(name), what="no process of the task to be left")


def test_a_disk_filling_sandbox_is_collected(setup):
    """On the agent whose disk counts as full, a finished 20 MB sandbox is removed at the next
    disk check, and /files no longer serves it."""
    name = launch(setup, "head -c 20000000 /dev/zero > filler; "
                         "while [ ! -e go ]; do sleep 0.05; done", agent="full")
    wait_state(setup, name, "TASK_RUNNING")
    base = latest(setup, name)

    def filled():
        status, listing = files(setup, "browse", base, "full")
        return status == 200 and any(e["path"].endswith("/filler") and
                                     e["size"] == 20_000_000 for e in listing)
    wait_for(filled, what="the filler file")
    # The task goes on once `go` exists; the sandbox is its cwd, found through /state.
    state = get_json(setup["full"].url + "/state")
    [directory] = [e["directory"] for f in state["frameworks"] for e in f["executors"]
                   if e["id"] == name]
    open(os.path.join(directory, "go"), "w").close()
    wait_state(setup, name, "TASK_FINISHED")
    wait_for(lambda: not os.path.exists(directory), what="the sandbox to be collected")
    assert files(setup, "browse", base, "full")[0] == 404
    metrics = get_json(setup["full"].url + "/metrics/snapshot")
    assert metrics["gc/path_removals_succeeded"] >= 1
