"""Backoff, health results, TaskInfo building and the store backends (memory, SQLite)."""

import pytest
from twisted.internet import task

from frameworks.marathon import backoff, health, store, taskinfo, validation


def test_backoff_grows_by_factor_up_to_the_cap_and_resets_per_config():
    """First failure: backoffSeconds; then times backoffFactor, capped; a new config resets."""
    app = {"backoffSeconds": 2, "backoffFactor": 2.0, "maxLaunchDelaySeconds": 5}
    d = backoff.failed(None, app, "v1", 100.0)
    assert (d.seconds, d.deadline) == (2.0, 102.0) and d.waiting(101.0)
    d = backoff.failed(d, app, "v1", 103.0)
    assert d.seconds == 4.0
    d = backoff.failed(d, app, "v1", 110.0)
    assert d.seconds == 5.0 and d.time_left(112.0) == 3.0
    assert backoff.failed(d, app, "v2", 120.0).seconds == 2.0
    assert backoff.advanced(d, 130.0).reference == 130.0
    assert backoff.expired(d, app, "v1", 200.0) and not backoff.expired(d, app, "v1", 112.0)
    assert backoff.expired(d, None, None, 112.0)


def test_health_grace_period_failures_and_kill():
    """Failures within the grace period are ignored; maxConsecutiveFailures kill."""
    check = health.Check(0, "HTTP", grace=10, max_failures=2)
    h = health.Health()
    assert health.record(h, check, False, "refused", now=105.0, running_since=100.0) == \
        health.Outcome()
    assert h.alive is None
    out = health.record(h, check, False, "refused", now=111.0, running_since=100.0)
    assert out.failed and out.changed and not out.kill and h.consecutive_failures == 1
    out = health.record(h, check, False, "refused", now=112.0, running_since=100.0)
    assert out.kill and not out.changed
    assert health.record(h, check, True, None, 113.0, 100.0).changed and h.alive is True
    assert health.healthy([h, health.Health()]) is None
    assert health.http_ok(302, check) and not health.http_ok(500, check)
    assert health.http_ok(101, health.Check(0, "HTTP", ignore_1xx=True)) is None


def test_mesos_checks_become_the_taskinfo_health_check():
    """COMMAND / MESOS_HTTP / MESOS_TCP checks go to the executor as Mesos HealthCheck JSON."""
    app = validation.normalize_app({
        "id": "/web", "cmd": "serve", "portDefinitions": [{"port": 0, "name": "http"}],
        "healthChecks": [{"protocol": "MESOS_HTTP", "path": "/ok", "gracePeriodSeconds": 3,
                          "intervalSeconds": 2, "timeoutSeconds": 1,
                          "maxConsecutiveFailures": 4, "delaySeconds": 0}],
        "labels": {"team": "a"}, "taskKillGracePeriodSeconds": 7, "user": "nobody",
        "fetch": [{"uri": "http://h/f.tgz", "destPath": "f"}]})
    app = {**app, "version": "v1"}
    info = taskinfo.task_info(app, "web.instance-1._app.1", "S1", "node-a",
                              [{"name": "cpus"}], [31001])
    assert info["health_check"] == {
        "type": "HTTP", "http": {"port": 31001, "path": "/ok", "scheme": "http"},
        "delay_seconds": 0.0, "interval_seconds": 2.0, "timeout_seconds": 1.0,
        "consecutive_failures": 4, "grace_period_seconds": 3.0}
    env = {v["name"]: v["value"] for v in info["command"]["environment"]["variables"]}
    assert (env["PORT0"], env["PORT"], env["PORT_HTTP"], env["PORTS"]) == ("31001",) * 4
    assert env["MARATHON_APP_ID"] == "/web" and env["HOST"] == "node-a"
    assert env["MARATHON_APP_LABEL_TEAM"] == "a"
    assert info["command"]["shell"] is True and info["command"]["user"] == "nobody"
    assert info["command"]["uris"][0]["output_file"] == "f"
    assert info["kill_policy"] == {"grace_period": {"nanoseconds": 7_000_000_000}}
    assert info["discovery"]["ports"]["ports"][0] == {"number": 31001, "name": "http",
                                                      "protocol": "tcp"}
    tcp = health.mesos_health_check(health.Check(0, "MESOS_TCP", port_index=0), [31002])
    assert tcp["type"] == "TCP" and tcp["tcp"] == {"port": 31002}
    assert health.mesos_health_check(health.Check(0, "HTTP"), [1]) is None


def test_docker_images_run_in_the_unified_containerizer():
    """DOCKER and MESOS apps with an image both become a MESOS ContainerInfo with the image."""
    for kind in ("DOCKER", "MESOS"):
        app = {**validation.normalize_app({"id": "/i", "container": {
            "type": kind, "docker": {"image": "busybox:1"},
            "volumes": [{"containerPath": "/data", "hostPath": "/srv", "mode": "RO"}]}}),
            "version": "v"}
        info = taskinfo.task_info(app, "i.instance-1._app.1", "S", "h", [], [31000])
        assert info["container"]["type"] == "MESOS"
        assert info["container"]["mesos"]["image"] == {"type": "DOCKER", "docker": {
            "name": "busybox:1"}, "cached": True}
        assert info["container"]["volumes"] == [{"container_path": "/data",
                                                 "host_path": "/srv", "mode": "RO"}]
        assert info["command"]["shell"] is False and "value" not in info["command"]


@pytest.fixture(params=["memory", "sqlite"])
def backend(request, tmp_path):
    if request.param == "memory":
        return store.MemoryBackend
    return lambda: store.SQLiteBackend(str(tmp_path / "m.sqlite"))


def test_store_groups_a_turns_writes_and_reads_them_back(backend):
    """Writes of one reactor turn are one batch; they fire once durable; a reopen sees them."""
    clock = task.Clock()
    b = backend()
    s = store.Store(clock, b)
    s.open()
    fired = []
    s.put("apps", "/web", {"id": "/web"}).addCallback(fired.append)
    s.put("instances", "i1", {"id": "i1"}).addCallback(fired.append)
    s.put("instances", "i2", {"id": "i2"})
    s.delete("instances", "i2")
    assert fired == [] and s.get("apps", "/web") is None
    clock.advance(0)
    assert len(fired) == 2 and s.get("apps", "/web") == {"id": "/web"}
    flushed = []
    s.flush().addCallback(flushed.append)
    clock.advance(0)
    assert flushed == [None]
    if isinstance(b, store.SQLiteBackend):
        again = store.Store(clock, store.SQLiteBackend(b.path))
        data = []
        again.open().addCallback(data.append)
        assert data[0]["apps"] == {"/web": {"id": "/web"}}
        assert data[0]["instances"] == {"i1": {"id": "i1"}}
    with pytest.raises(ValueError):
        s.put("nonsense", "k", 1)


def test_https_checks_do_not_verify_certificates(tmp_path):
    """An HTTPS check talks TLS to a self-signed server and reads its status (§2.4)."""
    import http.server
    import shutil
    import ssl
    import subprocess
    import threading

    from frameworks.marathon import health_checks

    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a self-signed certificate")
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=nobody"],
                   check=True, capture_output=True)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(204 if self.path == "/ok" else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        status = health_checks._https_get("127.0.0.1", port, "/ok", 5)[0]
        assert health.http_ok(status, health.Check(0, "HTTPS"))
        status = health_checks._https_get("127.0.0.1", port, "/sick", 5)[0]
        assert not health.http_ok(status, health.Check(0, "HTTPS"))
    finally:
        server.shutdown()
        server.server_close()
