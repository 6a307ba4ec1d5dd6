"""HTTP Basic authentication: `agora master --credentials F --authenticate-http-*`, with the
unmodified pymesos driver given a principal and a secret."""

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from pymesos import MesosSchedulerDriver

from agora.http_auth import Credentials, basic_authorization
from tests.cluster import REPO, AgentProcess, MasterProcess, post_json, wait_for
from tests.schedulers import Recorder, framework_info, unique

GOOD = {"Authorization": basic_authorization("ops", "s3cret")}
WRONG = {"Authorization": basic_authorization("ops", "guess")}


def test_credentials_in_mesos_json_or_lines_and_what_they_accept():
    mesos = Credentials.parse(json.dumps({"credentials": [
        {"principal": "ops", "secret": "s3cret"}, {"principal": "spark", "secret": "x:y"}]}))
    lines = Credentials.parse("# who may call\nops s3cret\nspark:x:y\n")
    for creds in (mesos, lines):
        assert creds.check(basic_authorization("ops", "s3cret")) == "ops"
        assert creds.check(basic_authorization("spark", "x:y")) == "spark"
        assert creds.check(basic_authorization("ops", "s3cre")) is None
        assert creds.check(basic_authorization("nobody", "s3cret")) is None
    for header in (None, "", "Bearer abc", "Basic !!!", "Basic " +
                   base64.b64encode(b"no-colon").decode()):
        assert mesos.check(header) is None


@pytest.mark.parametrize("text, says", [
    ("", "no credentials"), ("ops\n", "line 1"), ('{"credentials": 3}', "expected"),
    ('{"credentials": [{"principal": "p"}]}', "needs a principal and a secret"),
    ("{nope", "not Mesos credentials JSON"),
])
def test_bad_credentials_are_refused_saying_why(text, says):
    with pytest.raises(ValueError, match=says):
        Credentials.parse(text)


def get(url: str, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    creds = tmp / "credentials"
    creds.write_text(json.dumps({"credentials": [{"principal": "ops", "secret": "s3cret"}]}))
    master = MasterProcess(tmp, ["--credentials", str(creds), "--authenticate-http-frameworks",
                                 "--authenticate-http-readonly",
                                 "--authenticate-http-readwrite"])
    agent = AgentProcess(tmp, master.address, args=["--resources", "cpus:2;mem:512"])
    yield master
    agent.stop()
    master.stop()


def test_state_needs_credentials_and_health_does_not(secured):
    status, headers, body = get(secured.url + "/master/state")
    assert status == 401 and headers["WWW-Authenticate"] == 'Basic realm="mesos"'
    assert b"needs credentials" in body
    assert get(secured.url + "/master/state", WRONG)[0] == 401
    status, _, body = get(secured.url + "/master/state", GOOD)
    assert status == 200 and json.loads(body)["id"]
    assert get(secured.url + "/health")[0] == 200
    assert get(secured.url + "/version")[0] == 200  # pymesos asks without credentials
    assert get(secured.url + "/metrics/snapshot")[0] == 401


def test_operator_calls_need_credentials(secured):
    api = secured.url + "/api/v1"
    assert post_json(api, {"type": "GET_STATE"})[0] == 401
    assert post_json(api, {"type": "GET_STATE"}, GOOD)[0] == 200
    weights = {"type": "UPDATE_WEIGHTS", "update_weights": {"weight_infos": [
        {"role": "ops", "weight": 2.0}]}}
    assert post_json(api, weights, WRONG)[0] == 401
    assert post_json(api, weights, GOOD)[0] == 200


def test_frameworks_subscribe_only_with_their_credentials(secured):
    api = secured.url + "/api/v1/scheduler"
    subscribe = {"type": "SUBSCRIBE", "subscribe": {"framework_info": {"user": "root",
                                                                       "name": "x"}}}
    assert post_json(api, subscribe)[0] == 401
    status, body = post_json(api, {"type": "SUBSCRIBE", "subscribe": {"framework_info": {
        "user": "root", "name": "x", "principal": "someone-else"}}}, GOOD)
    assert status == 403 and b"does not match the authenticated principal 'ops'" in body

    name = unique("authed")
    sched = Recorder([(name, "echo hello")])
    driver = MesosSchedulerDriver(sched, framework_info("authed"), secured.address,
                                  use_addict=False, principal="ops", secret="s3cret")
    driver.start()
    try:
        wait_for(lambda: sched.last_state(name) == "TASK_FINISHED", 30, what="TASK_FINISHED")
    finally:
        driver.stop()
        driver.join()


def test_authentication_without_credentials_is_refused_at_start(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cli.main", "master", "--port", "0",
                          "--work-dir", str(tmp_path), "--authenticate-http-frameworks"],
                         capture_output=True, text=True, timeout=30, cwd=REPO)
    assert out.returncode == 2 and "needs --credentials FILE" in out.stderr
    missing = tmp_path / "nope"
    out = subprocess.run([sys.executable, "-m", "cli.main", "master", "--port", "0",
                          "--work-dir", str(tmp_path), "--credentials", str(missing)],
                         capture_output=True, text=True, timeout=30, cwd=REPO)
    assert out.returncode == 2 and f"credentials file {missing}" in out.stderr


def test_marathon_asks_for_its_credentials_and_gives_its_own_to_the_master(tmp_path):
    """`agora marathon --http-credentials` guards /v2 (the `marathon` client with a username
    and password gets through, without gets 401; /ping stays open), and with
    --mesos-authentication-* it registers with a master that authenticates frameworks."""
    import marathon

    from tests.marathon_harness import MarathonProcess

    creds = tmp_path / "credentials"
    creds.write_text("marathon m-secret\n")
    secret = tmp_path / "marathon.secret"
    secret.write_text("m-secret\n")
    master = MasterProcess(tmp_path, ["--credentials", str(creds),
                                      "--authenticate-http-frameworks"])
    agent = AgentProcess(tmp_path, master.address, args=["--resources", "cpus:2;mem:512"])
    m = MarathonProcess(tmp_path, master.address, [
        "--http-credentials", "admin:pa ss", "--mesos-authentication-principal", "marathon",
        "--mesos-authentication-secret-file", str(secret)])
    try:
        with pytest.raises(marathon.MarathonHttpError) as refused:
            m.client.list_apps()
        assert refused.value.status_code == 401
        assert get(m.url + "/ping")[0] == 200
        client = marathon.MarathonClient([m.url], username="admin", password="pa ss")
        client.create_app("/authed", marathon.MarathonApp(cmd="sleep 60", cpus=0.1, mem=16,
                                                          instances=1))
        wait_for(lambda: client.get_app("/authed").tasks_running == 1, 30,
                 what="the app's instance running")
        [fw] = [f for f in json.loads(get(master.url + "/master/state")[2])["frameworks"]
                if f["name"] == "marathon"]
        assert fw["principal"] == "marathon"
    finally:
        m.stop()
        agent.stop()
        master.stop()


def test_marathon_principal_needs_its_secret_file(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cli.main", "marathon", "--master",
                          "127.0.0.1:1", "--port", "0", "--mesos-authentication-principal", "m"],
                         capture_output=True, text=True, timeout=30, cwd=REPO)
    assert out.returncode != 0
    assert "needs --mesos-authentication-secret-file FILE" in out.stderr


def test_marathon_without_master_credentials_exits_saying_which_flags(tmp_path):
    """A master that authenticates frameworks refuses Marathon's SUBSCRIBE (401): Marathon
    ends (status 1) and says what to give, rather than serving /v2 with no scheduler."""
    from tests.marathon_harness import MarathonProcess

    creds = tmp_path / "credentials"
    creds.write_text("marathon m-secret\n")
    master = MasterProcess(tmp_path, ["--credentials", str(creds),
                                      "--authenticate-http-frameworks"])
    try:
        m = MarathonProcess(tmp_path, master.address)
        assert m.proc.wait(timeout=30) == 1
        assert "needs --mesos-authentication-principal" in m.tail()
    finally:
        master.stop()


def test_agent_read_endpoints_need_credentials_with_authenticate_http_readonly(tmp_path):
    """An agent started with --authenticate-http-readonly asks for credentials on /state,
    /files and /monitor; /health stays open, and its executors still reach it."""
    creds = tmp_path / "credentials"
    creds.write_text("ops s3cret\n")
    master = MasterProcess(tmp_path)
    agent = AgentProcess(tmp_path, master.address, args=[
        "--resources", "cpus:2;mem:512", "--credentials", str(creds),
        "--authenticate-http-readonly"])
    name = unique("agent-auth")
    sched = Recorder([(name, "echo hi")])
    driver = MesosSchedulerDriver(sched, framework_info("agent-auth"), master.address,
                                  use_addict=False)
    driver.start()
    try:
        wait_for(lambda: sched.last_state(name) == "TASK_FINISHED", 30, what="TASK_FINISHED")
        for path in ("/state", "/monitor/statistics", "/files/debug", "/metrics/snapshot"):
            status, headers, _ = get(agent.url + path)
            assert status == 401 and "WWW-Authenticate" in headers, path
        status, _, body = get(agent.url + "/state", GOOD)
        assert status == 200 and json.loads(body)["id"]
        assert get(agent.url + "/health")[0] == 200
    finally:
        driver.stop()
        driver.join()
        agent.stop()
        master.stop()
