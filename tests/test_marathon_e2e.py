"""Marathon end to end: `agora local` with three agents (127.0.0.1, .2 and .3, each its own
hostname and ports) and its Marathon, driven with the real marathon 0.13 client; tasks are
real `python3 -m http.server` processes that Marathon health-checks over HTTP."""

import glob
import os
import subprocess
import sys

import marathon as marathon_client
import pytest
from marathon.exceptions import MarathonHttpError, NotFoundError
from marathon.models import MarathonApp, MarathonConstraint, MarathonHealthCheck

from tests.cluster import REPO, LocalCluster, processes_with, wait_for
from tests.images import busybox_images  # noqa: F401  (fixture)
from tests.marathon_harness import FAST, EventLog, request, settled

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
SERVE = "exec python3 -m http.server --bind $HOST $PORT0"


class LocalMarathon:
    """The Marathon `agora local` started: its URL and a client."""

    def __init__(self, url: str):
        self.url = url
        self.client = marathon_client.MarathonClient([url])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`agora local --agents 3` with its Marathon (quick timings); every task gone after."""
    tmp = tmp_path_factory.mktemp("marathon")
    local = LocalCluster(tmp, agents=3, marathon=True,
                         args=["--resources", "cpus:2;mem:2048;disk:2048", "--marathon-port",
                               "0", *FAST])
    try:
        lines = local.read_banner_lines(4)
        url = next(line.split("marathon: ", 1)[1].split()[0] for line in lines
                   if "marathon: " in line)
        yield local, None, LocalMarathon(url)
    finally:
        local.stop()
    assert wait_for(lambda: not processes_with(str(tmp)), timeout=20,
                    what="every task to be gone")


def web_app(instances=3, cmd=SERVE, **extra):
    return MarathonApp(cmd=cmd, cpus=0.1, mem=32, instances=instances, health_checks=[
        MarathonHealthCheck(protocol="HTTP", path="/", interval_seconds=1, timeout_seconds=1,
                            grace_period_seconds=15, max_consecutive_failures=3)], **extra)


def test_health_checked_app_scales_and_rolls_within_its_capacity_bounds(cluster):
    """3 healthy instances, scaled to 5, then a new cmd: never more than maxCap alive, never
    fewer than minHealthy healthy, and the deployment completes."""
    master, agents, m = cluster
    c = m.client
    assert c.create_app("web", web_app(upgrade_strategy=None)) is not False
    wait_for(lambda: settled(c, "/web", 3, healthy=True), timeout=60, what="3 healthy tasks")
    c.scale_app("web", instances=5)
    before = {t.id for t in wait_for(lambda: settled(c, "/web", 5, healthy=True), timeout=60,
                                     what="5 healthy tasks").tasks}
    log = EventLog(c)
    app = c.get_app("web")
    app.cmd = SERVE + " # v2"
    app.upgrade_strategy.minimum_health_capacity = 0.6  # minHealthy = 3
    app.upgrade_strategy.maximum_over_capacity = 0.2  # maxCap = 6
    deployment = c.update_app("web", app)["deploymentId"]
    wait_for(lambda: [e for e in log.of("deployment_success") if e["id"] == deployment],
             timeout=90, what="the rolling restart to finish")
    final = wait_for(lambda: settled(c, "/web", 5, healthy=True), timeout=30, what="5 new")
    assert not {t.id for t in final.tasks} & before
    assert all(t.version == final.version for t in final.tasks)
    # Replay the stream: which tasks were alive, which healthy, after each event.
    alive, healthy = set(before), set(before)
    by_instance = {}
    max_alive, min_healthy = len(alive), len(healthy)
    for e in log.events:
        kind = e["eventType"]
        if kind == "status_update_event" and e["appId"] == "/web":
            by_instance[e["taskId"].rsplit("._app.", 1)[0]] = e["taskId"]
            if e["taskStatus"] in ("TASK_STAGING", "TASK_STARTING", "TASK_RUNNING",
                                   "TASK_KILLING"):
                alive.add(e["taskId"])
            else:
                alive.discard(e["taskId"])
                healthy.discard(e["taskId"])
        elif kind == "instance_health_changed_event" and e["runSpecId"] == "/web":
            task = by_instance.get(e["instanceId"])
            if task and e["healthy"]:
                healthy.add(task)
            elif task:
                healthy.discard(task)
        max_alive = max(max_alive, len(alive))
        min_healthy = min(min_healthy, len(healthy))
    assert max_alive <= 6, f"{max_alive} tasks alive at once, maxCap is 6"
    assert min_healthy >= 3, f"only {min_healthy} healthy at one point, minHealthy is 3"
    assert max_alive == 6, "the restart should use its over-capacity"
    kinds = {e["eventType"] for e in log.events}
    assert {"status_update_event", "deployment_info", "deployment_step_success",
            "health_status_changed_event", "instance_changed_event"} <= kinds


def test_killed_task_is_replaced(cluster):
    """Killing a task (without scale) gets the instance a new task; the count stays."""
    _, _, m = cluster
    c = m.client
    c.create_app("kill-me", web_app(instances=2))
    tasks = wait_for(lambda: settled(c, "/kill-me", 2, healthy=True), timeout=60,
                     what="2 healthy").tasks
    victim = tasks[0]
    killed = c.kill_task("kill-me", victim.id)
    assert killed.id == victim.id
    replaced = wait_for(lambda: (a := settled(c, "/kill-me", 2, healthy=True)) and
                        victim.id not in {t.id for t in a.tasks} and a, timeout=60,
                        what="a replacement task")
    survivor = tasks[1].id
    assert survivor in {t.id for t in replaced.tasks}
    # The instance is the same one, in its next incarnation.
    assert any(t.id.startswith(victim.id.rsplit("._app.", 1)[0]) for t in replaced.tasks)
    result = c.kill_task("kill-me", survivor, scale=True)
    assert result["deploymentId"]
    wait_for(lambda: settled(c, "/kill-me", 1), timeout=30, what="scaled down to 1")
    assert c.get_app("kill-me").instances == 1
    c.delete_app("kill-me", force=True)


def test_unique_hostname_spreads_and_the_queue_says_why_not(cluster):
    """UNIQUE hostname puts 3 instances on the 3 agents; a 4th waits, and /v2/queue and
    `agora app why` say it is the constraint."""
    _, _, m = cluster
    c = m.client
    c.create_app("spread", MarathonApp(cmd="sleep 600", cpus=0.1, mem=16, instances=3,
                                       constraints=[MarathonConstraint("hostname", "UNIQUE")]))
    app = wait_for(lambda: settled(c, "/spread", 3), timeout=60, what="3 running")
    assert sorted(t.host for t in app.tasks) == list(HOSTS)
    c.scale_app("spread", instances=4)
    item = wait_for(lambda: [q for q in c.list_queue(embed_last_unused_offers=True)
                             if q.app.id == "/spread" and (q.processed_offers_summary or {})
                             .get("unusedOffersCount")], timeout=30, what="a queue entry")[0]
    assert item.count == 1
    funnel = {r["reason"]: r for r in item.processed_offers_summary["rejectSummaryLaunchAttempt"]}
    assert funnel["UnfulfilledConstraint"]["declined"] >= 1
    assert funnel["InsufficientCpus"]["declined"] == 0
    assert item.last_unused_offers[-1]["reason"] == ["UnfulfilledConstraint"]
    out = subprocess.run([sys.executable, "-m", "cli.main", "app", "why", "/spread",
                          "--marathon", m.url], cwd=REPO, capture_output=True, text=True,
                         timeout=30, env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr
    assert "1 instance(s) waiting" in out.stdout and "UnfulfilledConstraint" in out.stdout
    assert "hostname:UNIQUE not met" in out.stdout
    c.delete_app("spread", force=True)
    wait_for(lambda: "/spread" not in [a.id for a in c.list_apps()], what="deleted")


def test_group_with_dependencies_deploys_in_order(cluster):
    """A group whose web depends on db: db runs (and is healthy) before web is launched."""
    master, _, m = cluster
    c = m.client
    status, body, _ = request(m.url + "/v2/groups", "POST", {
        "id": "/shop", "apps": [
            {"id": "db", "cmd": SERVE, "cpus": 0.1, "mem": 32, "instances": 2,
             "healthChecks": [{"protocol": "TCP", "intervalSeconds": 1, "timeoutSeconds": 1,
                               "gracePeriodSeconds": 15}]},
            {"id": "web", "cmd": "sleep 600", "cpus": 0.1, "mem": 16, "instances": 2,
             "dependencies": ["db"]}]})
    assert status == 201, body
    deployments = {d.id: d for d in c.list_deployments()}
    steps = [[a.app for a in s.actions] for s in deployments[body["deploymentId"]].steps]
    assert steps == [["/shop/db", "/shop/web"], ["/shop/db"], ["/shop/web"]]
    wait_for(lambda: settled(c, "/shop/web", 2) and settled(c, "/shop/db", 2, healthy=True),
             timeout=90, what="the group to deploy")
    db, web = c.get_app("/shop/db"), c.get_app("/shop/web")
    db_ready = max(max(r.first_success for r in t.health_check_results) for t in db.tasks)
    assert min(t.staged_at for t in web.tasks) >= db_ready
    group = c.get_group("/shop")
    assert sorted(a.id for a in group.apps) == ["/shop/db", "/shop/web"]
    c.delete_group("/shop", force=True)
    wait_for(lambda: not [a for a in c.list_apps() if a.id.startswith("/shop")], timeout=30,
             what="the group to go")


def test_event_stream_delivers_status_and_deployment_events(cluster):
    """event_stream() yields parsed events: api_post, status updates, the deployment's."""
    _, _, m = cluster
    c = m.client
    parsed = []

    def consume():
        try:
            for event in c.event_stream():
                parsed.append(event)
        except Exception:  # the stream ends when the module's Marathon stops
            pass

    import threading
    threading.Thread(target=consume, daemon=True).start()
    wait_for(lambda: any(e.event_type == "event_stream_attached" for e in parsed),
             what="attached")
    created = c.create_app("evented", MarathonApp(cmd="sleep 600", cpus=0.1, mem=16,
                                                  instances=1))
    deployment = created.deployments[0].id
    wait_for(lambda: any(e.event_type == "deployment_success" and e.id == deployment
                         for e in parsed), timeout=60, what="deployment_success")
    kinds = [e.event_type for e in parsed]
    for kind in ("api_post_event", "group_change_success", "deployment_info",
                 "status_update_event", "deployment_step_success", "deployment_success"):
        assert kind in kinds, kinds
    info = next(e for e in parsed if e.event_type == "deployment_info")
    assert info.plan.target.apps and info.plan.original is not None
    running = [e for e in parsed if e.event_type == "status_update_event"
               and e.task_status == "TASK_RUNNING" and e.app_id == "/evented"]
    assert running and running[0].host in HOSTS
    c.delete_app("evented", force=True)


def test_bad_app_json_gets_422_with_details(cluster):
    """Invalid definitions are 422 with every problem's path; malformed JSON is 400; a
    duplicate id is 409; an unknown app 404."""
    _, _, m = cluster
    c = m.client
    with pytest.raises(MarathonHttpError) as e:
        c.create_app("bad", MarathonApp(cmd="x", cpus=-1, mem=16, instances=1,
                                        constraints=[MarathonConstraint("hostname", "NEAR")]))
    assert e.value.status_code == 422
    assert e.value.error_message == "Object is not valid"
    details = {d["path"]: d["errors"] for d in e.value.error_details}
    assert "/cpus" in details and "/constraints(0)" in details
    status, body, _ = request(m.url + "/v2/apps", "POST", b'{"id": "x", "cmd": ')
    assert status == 400 and body["message"] == "Invalid JSON"
    status, body, _ = request(m.url + "/v2/apps", "POST", {"id": "/Bad_Id", "cmd": "x"})
    assert status == 422 and body["details"][0]["path"] == "/id"
    c.create_app("dup", MarathonApp(cmd="sleep 600", cpus=0.1, mem=16, instances=0))
    status, body, _ = request(m.url + "/v2/apps", "POST", {"id": "/dup", "cmd": "x"})
    assert status == 409 and "already exists" in body["message"]
    with pytest.raises(NotFoundError):
        c.get_app("nope")
    status, body, _ = request(m.url + "/v2/apps//dup", "PUT", {"cmd": "y", "version": "x"})
    assert status == 422
    c.delete_app("dup", force=True)


def test_info_leader_ping_metrics(cluster):
    """/v2/info parses in the client; /v2/leader, /ping and /metrics answer."""
    _, _, m = cluster
    c = m.client
    info = c.get_info()
    assert info.version == "1.11.0" and info.framework_id and info.elected
    assert c.get_leader() == {"leader": info.leader}
    assert c.ping() in (b'"pong"', b"pong")
    metrics = c.get_metrics()
    assert metrics["gauges"]["marathon.leadership.elected.gauge"]["value"] == 1


def test_agora_local_runs_marathon(tmp_path):
    """`agora local` starts a Marathon that runs apps on its agents."""
    local = LocalCluster(tmp_path, agents=1, marathon=True,
                         args=["--min-revive-offers-interval", "0.2"])
    try:
        lines = local.read_banner_lines(2)
        url = next(line.split("marathon: ", 1)[1].strip() for line in lines
                   if "marathon: " in line)
        import marathon as marathon_client
        c = marathon_client.MarathonClient([url])
        c.create_app("hello", MarathonApp(cmd="sleep 600", cpus=0.1, mem=16, instances=2))
        wait_for(lambda: settled(c, "/hello", 2), timeout=60, what="2 tasks in agora local")
        frameworks = [f["name"] for f in local.state()["frameworks"]]
        assert frameworks == ["marathon"]
    finally:
        local.stop()
    wait_for(lambda: not processes_with(str(tmp_path)), timeout=20, what="tasks gone")


def test_unhealthy_instance_is_killed_and_replaced(cluster):
    """An instance failing its HTTP check maxConsecutiveFailures times is killed (with an
    unhealthy_instance_kill_event) and its instance gets a new task."""
    _, _, m = cluster
    c = m.client
    log = EventLog(c)
    c.create_app("sick", MarathonApp(cmd=SERVE, cpus=0.1, mem=32, instances=1, health_checks=[
        MarathonHealthCheck(protocol="HTTP", path="/missing", interval_seconds=1,
                            timeout_seconds=1, grace_period_seconds=0,
                            max_consecutive_failures=2)]))
    kill = wait_for(lambda: [e for e in log.of("unhealthy_instance_kill_event")
                             if e["appId"] == "/sick"], timeout=60, what="a health kill")[0]
    assert log.of("failed_health_check_event")
    wait_for(lambda: [t for t in c.list_tasks("sick") if t.id != kill["taskId"]], timeout=60,
             what="a replacement task")
    assert c.get_app("sick").instances == 1
    c.delete_app("sick", force=True)


def test_mesos_http_check_run_by_the_executor_makes_instances_healthy(cluster):
    """MESOS_HTTP goes to the executor in the TaskInfo; its TASK_RUNNING healthy=true makes
    both instances healthy (health_status_changed_event alive), with no Marathon probe."""
    _, _, m = cluster
    c = m.client
    log = EventLog(c)
    # The executor checks 127.0.0.1 (Mesos's MESOS_HTTP target), not the agent's address.
    local_serve = "exec python3 -m http.server --bind 127.0.0.1 $PORT0"
    c.create_app("mesos-web", MarathonApp(cmd=local_serve, cpus=0.1, mem=32, instances=2,
                                          health_checks=[MarathonHealthCheck(
                                              protocol="MESOS_HTTP", path="/", port_index=0,
                                              delay_seconds=1, interval_seconds=1,
                                              timeout_seconds=2,
                                              grace_period_seconds=15,
                                              max_consecutive_failures=3)]))
    wait_for(lambda: settled(c, "/mesos-web", 2, healthy=True), timeout=60,
             what="2 instances healthy by the executor's checks")
    changed = [e for e in log.of("health_status_changed_event") if e["appId"] == "/mesos-web"]
    assert len(changed) == 2 and all(e["alive"] for e in changed)
    assert not log.of("failed_health_check_event")  # Marathon ran no check itself
    c.delete_app("mesos-web", force=True)


def test_failing_command_check_run_by_the_executor_gets_the_instance_replaced(cluster):
    """A COMMAND check failing maxConsecutiveFailures times: the executor kills the task
    (TASK_KILLED naming the check), Marathon sees it unhealthy and relaunches the instance."""
    _, _, m = cluster
    c = m.client
    log = EventLog(c)
    c.create_app("mesos-sick", MarathonApp(cmd="sleep 1000", cpus=0.1, mem=32, instances=1,
                                           health_checks=[MarathonHealthCheck(
                                               protocol="COMMAND",
                                               command="test -f never",
                                               delay_seconds=0, interval_seconds=1,
                                               timeout_seconds=1,
                                               grace_period_seconds=0,
                                               max_consecutive_failures=2)]))
    killed = wait_for(lambda: [e for e in log.of("status_update_event")
                               if e["appId"] == "/mesos-sick" and
                               e["taskStatus"] == "TASK_KILLED"], timeout=60,
                      what="the unhealthy task to be killed")[0]
    assert "COMMAND health check failed 2 times in a row" in killed["message"], killed
    assert [e["alive"] for e in log.of("health_status_changed_event")
            if e["appId"] == "/mesos-sick"][:1] == [False]
    instance = killed["taskId"].rsplit("._app.", 1)[0]
    wait_for(lambda: [t for t in c.list_tasks("mesos-sick")
                      if t.id != killed["taskId"] and t.id.startswith(instance)], timeout=60,
             what="the instance's next task")
    c.delete_app("mesos-sick", force=True)


def test_versions_rollback_restart_and_deployment_cancel(cluster):
    """Versions are kept and rolled back to; a restart replaces tasks; a stuck deployment is
    409 for others, and DELETE /v2/deployments/{id} rolls it back (or just stops, forced)."""
    _, _, m = cluster
    c = m.client
    c.create_app("ver", MarathonApp(cmd="sleep 600", cpus=0.1, mem=16, instances=1))
    first = wait_for(lambda: settled(c, "/ver", 1), timeout=60, what="v1")
    app = c.get_app("ver")
    app.cmd = "sleep 601"
    c.update_app("ver", app)
    wait_for(lambda: (a := settled(c, "/ver", 1)) and a.cmd == "sleep 601" and a, timeout=60,
             what="v2")
    versions = c.list_versions("ver")
    assert len(versions) == 2 and versions[1] == first.version
    assert c.get_version("ver", first.version).cmd == "sleep 600"
    c.rollback_app("ver", first.version)
    rolled = wait_for(lambda: (a := settled(c, "/ver", 1)) and a.cmd == "sleep 600" and a,
                      timeout=60, what="the rollback")
    c.restart_app("ver")
    wait_for(lambda: (a := settled(c, "/ver", 1)) and a.tasks[0].id != rolled.tasks[0].id,
             timeout=60, what="a restarted task")
    stuck = c.scale_app("ver", instances=500)["deploymentId"]  # far more than fits
    wait_for(lambda: c.get_app("ver").tasks_running > 1, timeout=60, what="some launches")
    with pytest.raises(MarathonHttpError) as e:
        c.scale_app("ver", instances=2)
    assert e.value.status_code == 409
    back = c.delete_deployment(stuck)["deploymentId"]
    assert back != stuck
    wait_for(lambda: settled(c, "/ver", 1), timeout=60, what="the revert to 1 instance")
    stuck = c.scale_app("ver", instances=500)["deploymentId"]
    c.delete_deployment(stuck, force=True)
    wait_for(lambda: stuck not in [d.id for d in c.list_deployments()], what="cancelled")
    assert c.get_app("ver").instances == 500  # a forced cancel changes nothing back
    c.scale_app("ver", instances=0, force=True)
    wait_for(lambda: settled(c, "/ver", 0), timeout=60, what="scaled to 0")
    c.delete_app("ver", force=True)


def test_readiness_check_holds_the_deployment_until_ready(cluster):
    """A deployment waits for its new tasks' readiness check; results show in
    /v2/deployments; a ready check lets the next deployment finish."""
    _, _, m = cluster
    c = m.client
    body = {"id": "/ready", "cmd": SERVE, "cpus": 0.1, "mem": 32, "instances": 1,
            "portDefinitions": [{"port": 0, "name": "http"}],
            "readinessChecks": [{"name": "probe", "portName": "http", "path": "/missing",
                                 "intervalSeconds": 1, "timeoutSeconds": 0.5}]}
    status, answer, _ = request(m.url + "/v2/apps", "POST", body)
    assert status == 422  # timeoutSeconds must be a whole number below intervalSeconds
    body["readinessChecks"][0].update(intervalSeconds=2, timeoutSeconds=1)
    status, answer, _ = request(m.url + "/v2/apps", "POST", body)
    assert status == 201, answer
    deployment = answer["deployments"][0]["id"]

    def results():
        d = [d for d in c.list_deployments() if d.id == deployment]
        actions = d[0].current_actions if d else []
        return [r for a in actions for r in (a.readiness_check_results or [])]

    found = wait_for(results, timeout=60, what="a readiness result")
    assert found[0]["name"] == "probe" and found[0]["ready"] is False
    assert c.get_app("ready").tasks_running == 1 and results()  # running, still not ready
    status, answer, _ = request(m.url + "/v2/apps/ready?force=true", "PUT", {
        "readinessChecks": [{"name": "probe", "portName": "http", "path": "/",
                             "intervalSeconds": 2, "timeoutSeconds": 1}]})
    assert status == 200, answer
    wait_for(lambda: not c.list_deployments(), timeout=60, what="the ready deployment")
    c.delete_app("ready", force=True)


def test_event_subscription_callbacks_get_events(cluster):
    """/v2/eventSubscriptions: a callback URL receives events as JSON POSTs."""
    import http.server
    import json
    import threading

    _, _, m = cluster
    c = m.client
    got = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/events"
    try:
        c.create_event_subscription(url)
        assert c.list_event_subscriptions() == [url]
        c.create_app("called", MarathonApp(cmd="sleep 600", cpus=0.1, mem=16, instances=1))
        wait_for(lambda: any(e["eventType"] == "status_update_event" and
                             e["appId"] == "/called" for e in got), timeout=60,
                 what="a status update at the callback")
        # (Callbacks are POSTed concurrently: the earlier event may land later.)
        wait_for(lambda: any(e["eventType"] == "api_post_event" for e in got), timeout=10,
                 what="the api_post_event at the callback")
        c.delete_event_subscription(url)
        assert c.list_event_subscriptions() == []
        c.delete_app("called", force=True)
    finally:
        server.shutdown()
        server.server_close()


def test_group_methods_of_the_client(cluster):
    """The client's group calls: update_group (PUT back what get_group gave), scale_group,
    rollback_group (our superset route) and delete_group."""
    _, _, m = cluster
    c = m.client
    status, _, _ = request(m.url + "/v2/groups", "POST", {"id": "/g", "apps": [
        {"id": "a", "cmd": "sleep 600", "cpus": 0.1, "mem": 16, "instances": 1}]})
    assert status == 201
    wait_for(lambda: settled(c, "/g/a", 1), timeout=60, what="/g/a")
    first = c.get_group("/g").version
    group = c.get_group("/g")
    group.apps[0].instances = 2
    c.update_group("/g", group)
    wait_for(lambda: settled(c, "/g/a", 2), timeout=60, what="/g/a at 2")
    c.scale_group("/g", 2)
    wait_for(lambda: settled(c, "/g/a", 4), timeout=60, what="/g/a at 4")
    c.rollback_group("/g", first)
    wait_for(lambda: settled(c, "/g/a", 1), timeout=60, what="/g/a rolled back to 1")
    assert "/g" in [g.id for g in c.list_groups()]
    status, body, _ = request(m.url + "/v2/groups/g?dryRun=true", "PUT", {"apps": []})
    assert status == 200 and body["steps"][0]["actions"][0] == {"action": "StopApplication",
                                                                "app": "/g/a"}
    c.delete_group("/g", force=True)
    wait_for(lambda: "/g" not in [g.id for g in c.list_groups()], timeout=30, what="gone")
    status, body, _ = request(m.url + "/v2/leader", "DELETE")
    assert status == 400  # without --zk there is nobody to abdicate to


def test_an_app_in_a_docker_image_runs_in_our_containerizer(cluster, busybox_images):
    """container DOCKER with an image from a real registry: the instances run in the image
    (its files, its own PID namespace), with no Docker daemon."""
    from marathon.models.container import MarathonContainer, MarathonDockerContainer

    local, _, m = cluster
    app = MarathonApp(cmd="cat /etc/agora-image; echo pid=$$; exec sleep 600", cpus=0.1,
                      mem=32, instances=2, container=MarathonContainer(
                          type="DOCKER",
                          docker=MarathonDockerContainer(image=busybox_images.v2s2_name)))
    assert m.client.create_app("boxed", app) is not False
    try:
        tasks = wait_for(lambda: settled(m.client, "/boxed", 2), timeout=60,
                         what="2 instances in the image").tasks

        def outputs():
            found = []
            for task in tasks:
                found += glob.glob(os.path.join(local.work_dir, "agent*", "slaves", "*",
                                                "frameworks", "*", "executors", task.id,
                                                "runs", "latest", "stdout"))
            texts = [open(p).read() for p in found]
            return len(texts) == 2 and all("pid=" in t for t in texts) and texts

        for text in wait_for(outputs, what="the instances' output"):
            assert text.splitlines()[:2] == ["busybox", "pid=2"]
    finally:
        m.client.delete_app("boxed", force=True)
