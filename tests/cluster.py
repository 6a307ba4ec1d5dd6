"""Real Agora processes for integration tests: `agora local`, `agora master`, `agora agent`.

Each runs as its own process on 127.0.0.1 with free ports; tests wait for conditions by
polling with a deadline, never for fixed times.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

from agent.containerizer import agent_cgroups_root

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; that value is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def get_json(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def post_json(url: str, body, headers=None, timeout: float = 10.0):
    """(status, body bytes) of a JSON POST; HTTP errors are returned, not raised."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Process:
    """An `agora` subcommand running as a child process, its log in a file."""

    def __init__(self, args: list, log_path: str, banner: str):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=REPO,
                                     env=env, stdout=subprocess.PIPE, stderr=self.log,
                                     start_new_session=True)
        self.lines = []
        pattern = re.compile(banner)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                raise AssertionError(f"agora {args[0]} exited early:\n{self.tail()}")
            self.lines.append(line)
            match = pattern.search(line)
            if match:
                self.match = match
                return
        raise AssertionError(f"agora {args[0]} did not start:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return b"".join(f.readlines()[-n:]).decode(errors="replace")

    def read_banner_lines(self, count: int) -> list:
        for _ in range(count):
            self.lines.append(self.proc.stdout.readline().decode())
        return self.lines

    def send_signal(self, sig) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, timeout: float = 20.0) -> int:
        self.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"process did not stop on {sig}:\n{self.tail()}")
        finally:
            self.log.close()

    def kill(self) -> None:
        """SIGKILL the process (its children survive: they have their own sessions)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class LocalCluster(Process):
    """`agora local` with N agents on free ports (and its Marathon, with `marathon=True`)."""

    def __init__(self, tmp_path, agents: int = 1, args=(), marathon: bool = False):
        self.work_dir = str(tmp_path / "local")
        super().__init__(["local", "--port", "0", "--agents", str(agents), "--work-dir",
                          self.work_dir, "--allocation-interval", "0.2",
                          *(() if marathon else ("--no-marathon",)), *args],
                         str(tmp_path / "local.log"), r"master: http://([\d.]+):(\d+)")
        self.host, self.port = self.match.group(1), int(self.match.group(2))
        self.address = f"{self.host}:{self.port}"
        self.url = f"http://{self.address}"
        wait_for(lambda: len([s for s in self.state()["slaves"] if s["active"]]) == agents,
                 what=f"{agents} agents to register")

    def state(self) -> dict:
        return get_json(self.url + "/master/state")


class MasterProcess(Process):
    """`agora master` on a free port."""

    def __init__(self, tmp_path, args=(), name: str = "master"):
        self.work_dir = str(tmp_path / name)
        super().__init__(["master", "--port", "0", "--work-dir", self.work_dir,
                          "--allocation-interval", "0.2", *args],
                         str(tmp_path / f"{name}.log"), r"Master: http://([\d.]+):(\d+)")
        self.host, self.port = self.match.group(1), int(self.match.group(2))
        self.address = f"{self.host}:{self.port}"
        self.url = f"http://{self.address}"

    def state(self) -> dict:
        return get_json(self.url + "/master/state")


class AgentProcess(Process):
    """`agora agent` on a free port, registered with `master`."""

    def __init__(self, tmp_path, master_address: str, args=(), name: str = "agent"):
        self.work_dir = str(tmp_path / name)
        super().__init__(["agent", "--master", master_address, "--port", "0", "--work-dir",
                          self.work_dir, *args],
                         str(tmp_path / f"{name}.log"), r"Agent: http://([\d.]+):(\d+)")
        self.port = int(self.match.group(2))
        self.url = f"http://127.0.0.1:{self.port}"


def container_cgroups(agent: AgentProcess) -> list:
    """The container cgroups (paths) under `agent`'s own cgroup root in the v1 hierarchies
    the agent uses; none without the linux launcher."""
    root = agent_cgroups_root("agora", os.path.join(agent.work_dir, "run"))
    found = []
    for hierarchy in ("cpu", "cpuacct", "memory", "pids", "freezer"):
        base = f"/sys/fs/cgroup/{hierarchy}/{root}"
        if os.path.isdir(base):
            found += [f"{base}/{n}" for n in os.listdir(base) if os.path.isdir(f"{base}/{n}")]
    return found


def descendants(pid: int) -> list:
    """Pids of every process below `pid` (by walking /proc)."""
    children: dict[int, list] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def own_pid(pid: int) -> int:
    """The pid a process sees for itself: in its own PID namespace (NSpid's last field)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except OSError:
        pass
    return pid


def processes_with(marker: str) -> list:
    """Pids whose command line contains `marker` (e.g. a unique work dir)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = f.read().decode(errors="replace")
            except OSError:
                continue
            if marker in cmd or marker in env:
                pids.append(int(entry))
    return pids
