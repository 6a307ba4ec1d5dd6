"""The launch helper and what its children become: real forks, namespaces, mounts, pivot_root.

Every test talks to a real helper process over its real socket (helper_wire.Client, as our
executor does) and checks what the container saw from inside, through its stdout.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from agent.containerizer import helper_wire as wire
from agent.containerizer.spawn import resolve_in_root
from tests.cluster import REPO, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="containers need root")

BUSYBOX = shutil.which("busybox")


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory):
    """A busybox root filesystem in a directory (bind-mounted as the container's root)."""
    if BUSYBOX is None:
        pytest.skip("busybox-static is not installed (scripts/test installs it)")
    root = tmp_path_factory.mktemp("rootfs")
    os.chmod(root, 0o755)  # the container's /, which a non-root user must traverse
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "mnt"):
        (root / d).mkdir()
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "cat", "ls", "echo", "hostname", "ps", "true", "sleep", "id",
                   "mount", "readlink", "touch"):
        os.symlink("busybox", root / "bin" / applet)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                         "nobody:x:65534:65534:nobody:/:/bin/sh\n")
    (root / "etc" / "image-marker").write_text("from the image\n")
    return str(root)


@pytest.fixture
def helper(tmp_path):
    """A launch helper of our own, stopped (by `exit`) at the end."""
    runtime = tmp_path / "run"
    runtime.mkdir()
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-S", "-m", "agent.containerizer.helper",
                             "--runtime-dir", str(runtime), "--idle-exit", "5"],
                            env=env, stdout=subprocess.PIPE, start_new_session=True)
    assert b"ready" in proc.stdout.readline()
    helper = Helper(str(runtime), proc, tmp_path)
    yield helper
    helper.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


class Helper:
    def __init__(self, runtime: str, proc, tmp_path):
        self.runtime = runtime
        self.proc = proc
        self.tmp = tmp_path
        self.client = wire.Client(wire.address(runtime))
        self.pidfds: list[int] = []  # killed at the end, should a test fail midway

    def launch(self, cid: str, spec: dict, fds: list[int]) -> int:
        pid = self.client.launch(cid, spec, fds)
        try:
            self.pidfds.append(os.pidfd_open(pid))  # (never a reused pid's process)
        except OSError:
            pass  # gone already
        return pid

    def run(self, spec: dict, timeout: float = 10.0) -> tuple[int, str]:
        """Launch, wait for the exit; (wait status, what it printed)."""
        cid = uuid.uuid4().hex
        out = self.tmp / f"{cid}.out"
        fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            self.launch(cid, spec, [fd, fd])
        finally:
            os.close(fd)
        status = self.wait(cid, timeout)
        return status, out.read_text()

    def wait(self, cid: str, timeout: float) -> int:
        self.client.sock.settimeout(timeout)
        while True:
            for message in self.client.receive():
                if message.get("id") == cid and message["op"] == "exited":
                    return message["status"]

    def close(self) -> None:
        for fd in self.pidfds:
            try:  # a PID namespace's init takes the whole container with it
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
            os.close(fd)
        try:
            self.client.send({"op": "exit"})
        except OSError:
            pass
        self.client.close()


def contained(rootfs: str, tmp_path, argv: list[str], **more) -> dict:
    """A spec for `argv` in every namespace, on `rootfs` bound as the container's root."""
    target = tmp_path / f"mnt-{uuid.uuid4().hex[:8]}"
    target.mkdir()
    spec = {"argv": argv, "env": {"PATH": "/bin"}, "cwd": "/",
            "namespaces": ["mnt", "pid", "uts", "ipc"], "hostname": "boxed",
            "rootfs": {"kind": "bind", "path": rootfs, "target": str(target)}}
    spec.update(more)
    return spec


def test_a_plain_process_runs_and_its_exit_status_comes_back(helper):
    """Without namespaces the helper forks and execs; exit codes and output come back."""
    status, out = helper.run({"argv": ["/bin/sh", "-c", "echo hello; exit 3"],
                              "env": {"PATH": "/bin:/usr/bin"}})
    assert os.waitstatus_to_exitcode(status) == 3
    assert out == "hello\n"


def test_a_program_that_cannot_run_fails_the_launch_with_the_reason(helper):
    """A missing program is a failed launch saying why, not an exit status."""
    for spec in ({"argv": ["/no/such/program"]},
                 {"argv": ["/no/such/program"], "namespaces": ["mnt", "pid"]}):
        with pytest.raises(wire.HelperError, match="No such file or directory"):
            helper.client.launch(uuid.uuid4().hex, spec, [])


def test_the_container_has_pid_1_its_hostname_and_the_image_files(helper, rootfs, tmp_path):
    """PID namespace with our init as PID 1, own hostname, the image's files, only /proc
    of its own."""
    script = ("echo pid=$$; hostname; cat /etc/image-marker; ls /proc | grep -c '^[0-9]';"
              "readlink /proc/1/ns/pid")
    status, out = helper.run(contained(rootfs, tmp_path, ["/bin/sh", "-c", script]))
    assert status == 0, out
    lines = out.splitlines()
    assert lines[0] == "pid=2"  # our init is PID 1
    assert lines[1] == "boxed"
    assert lines[2] == "from the image"
    assert int(lines[3]) <= 4  # init, sh, ls (and grep): nothing of the host's
    assert lines[4] != os.readlink("/proc/self/ns/pid")


def test_the_sandbox_and_volumes_are_mounted_read_only_where_asked(helper, rootfs, tmp_path):
    """The sandbox at /mnt/mesos/sandbox (writable), a read-only volume, and a volume on a
    host path in the sandbox."""
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("volume data\n")
    mounts = [{"source": str(data), "target": str(sandbox / "inside"), "host": True},
              {"source": str(sandbox), "target": "/mnt/mesos/sandbox"},
              {"source": str(data), "target": "/ro", "read_only": True}]
    script = ("cat /ro/f; cat /mnt/mesos/sandbox/inside/f; echo w > /mnt/mesos/sandbox/out;"
              "touch /ro/x 2>/dev/null && echo writable || echo read-only")
    status, out = helper.run(contained(rootfs, tmp_path, ["/bin/sh", "-c", script],
                                       mounts=mounts))
    assert status == 0, out
    assert out.splitlines() == ["volume data", "volume data", "read-only"]
    assert (sandbox / "out").read_text() == "w\n"
    assert not os.path.ismount(sandbox / "inside")  # it lived in the container's namespace


def test_the_init_passes_sigterm_on_and_reports_the_tasks_status(helper, rootfs, tmp_path):
    """SIGTERM to the init reaches the task (which handles it); the status is the task's."""
    cid = uuid.uuid4().hex
    out = tmp_path / "trap.out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o644)
    script = "trap 'echo got TERM; exit 7' TERM; echo ready; while true; do sleep 0.05; done"
    try:
        pid = helper.launch(cid, contained(rootfs, tmp_path, ["/bin/sh", "-c", script]),
                                   [fd, fd])
    finally:
        os.close(fd)
    wait_for(lambda: "ready" in out.read_text(), 5, what="the task to start")
    os.kill(pid, signal.SIGTERM)
    status = helper.wait(cid, 10)
    assert os.waitstatus_to_exitcode(status) == 7
    assert "got TERM" in out.read_text()


def test_sigkill_of_the_init_ends_everything_in_the_namespace(helper, rootfs, tmp_path):
    """Killing PID 1 kills every process of the container; the status says SIGKILL."""
    cid = uuid.uuid4().hex
    out = tmp_path / "bg.out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o644)
    script = "sleep 1000 & sleep 1000 & echo started; wait"
    try:
        pid = helper.launch(cid, contained(rootfs, tmp_path, ["/bin/sh", "-c", script]),
                                   [fd, fd])
    finally:
        os.close(fd)
    wait_for(lambda: "started" in out.read_text(), 5, what="the task to start")
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    assert children.stdout.split(), "the init has a child"
    os.kill(pid, signal.SIGKILL)
    status = helper.wait(cid, 10)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    sleepers = subprocess.run(["pgrep", "-f", "sleep 1000"], capture_output=True, text=True)
    assert not [p for p in sleepers.stdout.split() if _ancestor(int(p), helper.proc.pid)]


def _ancestor(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
        if pid == ancestor:
            return True
    return False


def test_rlimits_user_and_working_directory_apply(helper, rootfs, tmp_path):
    """The spec's rlimits, user and cwd are what the process gets."""
    script = "ulimit -n; id -u; pwd"
    status, out = helper.run(contained(rootfs, tmp_path, ["/bin/sh", "-c", script],
                                       rlimits=[["NOFILE", 123, 456]], cwd="/tmp",
                                       user={"uid": 65534, "gid": 65534, "groups": []}))
    assert status == 0, out
    assert out.splitlines() == ["123", "65534", "/tmp"]


def test_an_exit_nobody_heard_is_kept_for_a_later_wait(helper, tmp_path):
    """A client that launched and left: another one gets the status with `wait`."""
    cid = uuid.uuid4().hex
    go = tmp_path / "go"
    helper.client.launch(cid, {"argv": ["/bin/sh", "-c", f"while [ ! -e {go} ]; do sleep "
                                        "0.01; done; exit 5"]}, [])
    helper.client.close()
    time.sleep(0.3)  # the helper notices the close first: then the exit has no listener
    go.touch()
    wait_for(lambda: not subprocess.run(["pgrep", "-f", str(go)]).returncode == 0, 5,
             what="the process to end")
    helper.client = wire.Client(wire.address(helper.runtime))
    helper.client.send({"op": "wait", "id": cid})
    assert os.waitstatus_to_exitcode(helper.wait(cid, 5)) == 5
    helper.client.send({"op": "wait", "id": "never-launched"})
    assert helper.client.receive() == [{"op": "unknown", "id": "never-launched"}]


def test_a_peer_with_another_uid_is_refused(helper):
    """Only the helper's own user may launch containers."""
    script = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect('\\0'+sys.argv[1]);"
              "print(s.recv(10) == b'')")
    python = "/usr/bin/python3"  # ours may live where nobody cannot read (/root)
    if not os.access(python, os.X_OK):
        pytest.skip("no system python3 for the unprivileged client")
    done = subprocess.run([python, "-S", "-c", script, wire.address(helper.runtime)[1:]],
                          user=65534, capture_output=True, text=True, timeout=10)
    assert done.stdout.strip() == "True", done.stderr


def test_the_helper_exits_once_told_and_idle(helper):
    """`exit` with no container left: the helper process ends."""
    helper.close()
    assert helper.proc.wait(10) == 0


def test_paths_resolve_inside_the_root_whatever_the_links_say(tmp_path):
    """Absolute and climbing symlinks in an image never lead out of its root."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    os.symlink("/etc", root / "abs")
    os.symlink("../../../..", root / "etc" / "up")
    assert resolve_in_root(str(root), "/abs/passwd") == str(root / "etc" / "passwd")
    assert resolve_in_root(str(root), "/etc/up/x") == str(root / "x")
    assert resolve_in_root(str(root), "/../../x") == str(root / "x")


@pytest.mark.parametrize("namespaces", [[], ["mnt", "pid"]])
def test_the_task_does_not_inherit_pythons_ignored_signals(helper, namespaces):
    """SIGPIPE and SIGXFSZ, which Python ignores, are back to their defaults in the task
    (an ignored signal survives exec): `yes | head -1` ends instead of spinning."""
    status, out = helper.run({"argv": ["/bin/sh", "-c", "grep SigIgn /proc/self/status; "
                                       "yes | head -1"],
                              "env": {"PATH": "/bin:/usr/bin"}, "namespaces": namespaces})
    assert status == 0, out
    ignored = int(out.splitlines()[0].split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1)) and not ignored & (1 << (signal.SIGXFSZ - 1))
    assert out.splitlines()[1] == "y"
