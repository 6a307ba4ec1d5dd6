#!/usr/bin/env python3
"""Container launch: our launcher against runc and crun, and a burst of containers on an agent.

Part 1 (`latency`): `/bin/true` in a container on the same busybox rootfs, one after the
other, interleaved (ours, runc, crun, ours, ...) so the three see the same machine. Each run
does the whole job: cgroups made and limited (memory 64 MB, cpu shares 512, pids 64), mount,
PID, UTS and IPC namespaces, the root filesystem (ours: an overlay of the cached image layer
with a fresh upper dir, as a provisioned image is; runc/crun: the rootfs read-only), run,
wait for the exit, remove the cgroups. Ours goes through the launch helper
(agent.containerizer.helper) exactly as the agent does; runc and crun through `run`
(crun in a mount namespace made once without the hybrid cgroup2 mount, entered with
nsenter: the toolchain spec's workaround). Goal: no slower than crun (spec: runc ~21 ms, crun ~8-10 ms).

Part 2 (`burst`): a real Agent (linux launcher, cgroups/cpu, cgroups/mem, namespaces/pid,
filesystem/linux) in this process against a fake master on the real agent link, sent
`--burst` command tasks (`true`) at once; measured until every one is TASK_FINISHED and
its container cleaned up (Mesos 1.7: 1,000 containers in 30.7 s).

    python benchmarks/container_launch.py                 # both parts
    python benchmarks/container_launch.py --runs 100 --burst 1000

Needs root, busybox-static, runc and crun (scripts/test installs them). The last line is
`key=value` figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agent.containerizer import helper_wire as wire  # noqa: E402
from isolators.cgroups import hierarchy  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.environ.get("BENCH_LAUNCHER", "linux")
APPLETS = ("sh", "true", "echo", "cat", "ls")


def build_rootfs(path: str) -> None:
    """A busybox root filesystem (the image layer every launcher gets)."""
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "mnt"):
        os.makedirs(os.path.join(path, d), exist_ok=True)
    shutil.copy(shutil.which("busybox"), os.path.join(path, "bin", "busybox"))
    for applet in APPLETS:
        os.symlink("busybox", os.path.join(path, "bin", applet))
    with open(os.path.join(path, "etc", "passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\n")


def oci_config(rootfs: str, hostname: str) -> dict:
    """The runc/crun bundle config: what ours does, in OCI terms."""
    return {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": ["/bin/true"],
                    "env": ["PATH=/bin"], "cwd": "/"},
        "root": {"path": rootfs, "readonly": True},
        "hostname": hostname,
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                    "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts")],
                  "resources": {"memory": {"limit": 64 * 1024 * 1024},
                                "cpu": {"shares": 512}, "pids": {"limit": 64},
                                "devices": [{"allow": False, "access": "rwm"}]}},
    }


class Ours:
    """Launches through our helper: cgroups made and removed with isolators' hierarchy code."""

    def __init__(self, work: str, layer: str):
        self.work = work
        self.layer = layer
        self.runtime = os.path.join(work, "run")
        os.makedirs(self.runtime)
        env = dict(os.environ, PYTHONPATH=REPO)
        self.proc = subprocess.Popen([sys.executable, "-S", "-m", "agent.containerizer.helper",
                                      "--runtime-dir", self.runtime, "--idle-exit", "5"],
                                     env=env, stdout=subprocess.PIPE, start_new_session=True)
        self.proc.stdout.readline()
        self.client = wire.Client(wire.address(self.runtime))
        self.cgroups = hierarchy.discover()
        self.root = f"agora-bench-{uuid.uuid4().hex[:8]}"
        self.null = os.open(os.devnull, os.O_WRONLY)

    def run(self) -> float:
        cid = uuid.uuid4().hex
        start = time.perf_counter()
        groups = [self.cgroups.container(c, self.root, cid)
                  for c in ("freezer", "memory", "cpu", "pids")]
        for group in groups:
            group.create()
        groups[1].write("memory.limit_in_bytes", 64 * 1024 * 1024)
        groups[2].write("cpu.shares", 512)
        groups[3].write("pids.max", 64)
        scratch = os.path.join(self.work, cid)
        for d in ("upper", "work", "mnt"):
            os.makedirs(os.path.join(scratch, d))
        spec = {"argv": ["/bin/true"], "env": {"PATH": "/bin"}, "cwd": "/",
                "namespaces": ["mnt", "pid", "uts", "ipc"], "hostname": cid[:12],
                "cgroups": [g.path for g in groups],
                "rootfs": {"kind": "overlay", "base": os.path.dirname(self.layer),
                           "layers": [os.path.basename(self.layer)],
                           "upper": os.path.join(scratch, "upper"),
                           "work": os.path.join(scratch, "work"),
                           "target": os.path.join(scratch, "mnt")}}
        self.client.launch(cid, spec, [self.null, self.null])
        while not any(m.get("id") == cid and m["op"] == "exited"
                      for m in self.client.receive()):
            pass
        for group in groups:
            group.remove()
        shutil.rmtree(scratch)
        return time.perf_counter() - start

    def close(self) -> None:
        self.client.send({"op": "exit"})
        self.client.close()
        self.proc.wait(10)
        for mount in set(self.cgroups.v1.values()):
            try:
                os.rmdir(os.path.join(mount, self.root))
            except OSError:
                pass


class Runtime:
    """runc or crun on a bundle whose root is the image layer.

    crun refuses hybrid cgroups (toolchain spec): it runs in a mount namespace made once,
    without the cgroup2 mount, entered with nsenter (~1 ms) — the spec's fastest set-up."""

    def __init__(self, name: str, work: str, layer: str):
        self.name = name
        self.bundle = os.path.join(work, f"{name}-bundle")
        os.makedirs(self.bundle)
        with open(os.path.join(self.bundle, "config.json"), "w") as f:
            json.dump(oci_config(layer, name), f)
        self.mntns = None
        if name == "crun":
            holder = os.path.join(work, "crun-mntns")
            os.makedirs(holder)
            subprocess.run(["mount", "--bind", holder, holder], check=True)
            subprocess.run(["mount", "--make-private", holder], check=True)
            self.mntns = os.path.join(holder, "ns")
            open(self.mntns, "w").close()
            subprocess.run(["unshare", f"--mount={self.mntns}", "--propagation", "private",
                            "umount", "/sys/fs/cgroup/unified"], check=True)
            self.holder = holder

    def argv(self, cid: str) -> list[str]:
        if self.mntns:
            return ["nsenter", f"--mount={self.mntns}", "crun", "run", "--bundle",
                    self.bundle, cid]
        return ["runc", "run", "--bundle", self.bundle, cid]

    def close(self) -> None:
        if self.mntns:
            subprocess.run(["umount", self.mntns], check=False)
            subprocess.run(["umount", self.holder], check=False)

    def run(self) -> float:
        cid = f"bench-{uuid.uuid4().hex[:12]}"
        start = time.perf_counter()
        done = subprocess.run(self.argv(cid), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{self.name} failed: {done.stderr.decode().strip()}")
        return elapsed


def latency(work: str, runs: int) -> dict:
    layer = os.path.join(work, "layer")
    build_rootfs(layer)
    launchers = [Ours(work, layer)]
    for name in ("runc", "crun"):
        if shutil.which(name):
            launchers.append(Runtime(name, work, layer))
        else:
            print(f"{name} not found: skipped", flush=True)
    names = ["ours"] + [r.name for r in launchers[1:]]
    times: dict[str, list[float]] = {n: [] for n in names}
    try:
        for launcher in launchers:  # a warm-up run each
            launcher.run()
        for i in range(runs):
            for name, launcher in zip(names, launchers):
                times[name].append(launcher.run())
            if (i + 1) % 20 == 0:
                print(f"  {i + 1}/{runs} runs", flush=True)
    finally:
        for launcher in launchers:
            launcher.close()
    out = {}
    for name, values in times.items():
        values.sort()
        out[f"{name}_median_ms"] = round(statistics.median(values) * 1000, 2)
        out[f"{name}_p90_ms"] = round(values[int(len(values) * 0.9) - 1] * 1000, 2)
        print(f"{name:5} median {out[f'{name}_median_ms']:6.2f} ms  p90 "
              f"{out[f'{name}_p90_ms']:6.2f} ms  min {values[0] * 1000:6.2f} ms", flush=True)
    for name in names[1:]:
        out[f"ours_vs_{name}"] = round(out["ours_median_ms"] / out[f"{name}_median_ms"], 2)
    return out


def burst(work: str, count: int) -> dict:
    """`count` command tasks at once on one in-process agent; seconds until all are done."""
    from twisted.internet.epollreactor import EPollReactor
    from twisted.internet.threads import blockingCallFromThread

    from agent.agent import Agent
    from agora import protocol
    from tests.agent_harness import FakeMaster

    reactor = EPollReactor()
    thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                              daemon=True)
    thread.start()
    call = lambda f, *a, **k: blockingCallFromThread(reactor, f, *a, **k)  # noqa: E731
    master = FakeMaster(reactor)
    port = call(master.start)
    agent = Agent(reactor, master=("127.0.0.1", port), work_dir=os.path.join(work, "agent"),
                  port=0, resources=f"cpus:{count};mem:{count * 64}", launcher=LAUNCHER,
                  isolation=None if LAUNCHER == "posix" else os.environ.get("BENCH_ISOLATION") or
                  "filesystem/linux,namespaces/pid,cgroups/cpu,cgroups/mem",
                  container_flags={"image_providers": ""}, executor_registration_timeout=600)
    call(agent.start)
    while not agent.registered:
        time.sleep(0.01)
    framework = {"id": {"value": "bench"}, "name": "bench", "user": "root"}
    resources = [{"name": "cpus", "type": "SCALAR", "scalar": {"value": 0.1}},
                 {"name": "mem", "type": "SCALAR", "scalar": {"value": 32}}]
    tasks = [{"name": f"b{i}", "task_id": {"value": f"b{i}"},
              "agent_id": {"value": agent.agent_id}, "resources": resources,
              "command": {"value": "true"}} for i in range(count)]

    def finished() -> int:
        return sum(1 for m in master.of(protocol.StatusUpdate)
                   if m.status["state"] == "TASK_FINISHED")

    start = time.perf_counter()

    def send_all():
        for task in tasks:
            master.send(protocol.RunTask(framework=framework, task=task))

    call(send_all)
    last = 0
    while True:
        done = finished()
        if done >= count:
            break
        if done // 100 != last // 100:
            print(f"  {done}/{count} finished ({time.perf_counter() - start:.1f}s)", flush=True)
        last = done
        time.sleep(0.05)
    all_finished = time.perf_counter() - start

    def containers_left() -> int:
        return sum(len(fw.executors) for fw in agent.frameworks.values())

    while call(containers_left):
        time.sleep(0.05)
    cleaned = time.perf_counter() - start
    call(agent.stop)
    call(master.stop)
    reactor.callFromThread(reactor.stop)
    thread.join(10)
    print(f"burst of {count}: all finished after {all_finished:.2f}s, cleaned up after "
          f"{cleaned:.2f}s ({count / cleaned:.0f} containers/s)", flush=True)
    return {"burst": count, "burst_finished_s": round(all_finished, 2),
            "burst_cleaned_s": round(cleaned, 2),
            "burst_containers_per_s": round(count / cleaned, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="launches per launcher")
    parser.add_argument("--burst", type=int, default=1000, help="containers in the burst")
    parser.add_argument("--only", choices=("latency", "burst"), default=None)
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not shutil.which("busybox"):
        print("needs root and busybox-static", file=sys.stderr)
        return 2
    figures = {"cpus": os.cpu_count(), "loadavg_before": round(os.getloadavg()[0], 2)}
    work = tempfile.mkdtemp(prefix="agora-bench-launch-")
    try:
        if args.only in (None, "latency"):
            figures.update(latency(work, args.runs))
        if args.only in (None, "burst"):
            figures.update(burst(work, args.burst))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(" ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
