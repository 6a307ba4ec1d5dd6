"""The agent: offers this host to the master and runs the executors and tasks it is given.

    master ──RunTask/KillTask/...──> Agent ──launch──> container (session) ── executor
       ^                               │  <──/api/v1/executor (SUBSCRIBE stream, UPDATE)──┘
       └──StatusUpdate (reliable)──────┘

The agent keeps the books (`agent.state`), launches executors through the containerizer
(`agent.containerizer`: posix or linux launcher, isolators, images) in sandboxes
(`agent.sandbox`) after fetching their URIs
(`agent.fetcher`, in a thread of its own), serves the executor API (`agent.executor_api`), the sandbox
files (`agent.files`) and the read-only endpoints (`agent.endpoints`), forwards status updates
through `agent.status_updates`, retried until the master acknowledges them and journaled for
checkpointing frameworks (`agent.checkpoint`), and collects finished sandboxes (`agent.gc`).

Life of a launch: `_add_tasks` → `_launch`: user check, sandbox, files attached → fetch (a
thread, only when there are URIs) → `_start_container`. An executor that is shut down while
its URIs are fetched ends at once ("never started"); the fetch's result is then ignored.

Recovery (`_recover_books`, before the agent listens): the books of checkpointing frameworks
come back from `meta/` (agent.checkpoint), live executors are re-attached and re-subscribe,
the tasks of dead ones fail; `--recover cleanup` kills them instead and starts afresh. With a
`zk://` master the leader is followed (agent.master_detector).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter, deque

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from agora import mesos_json as mj
from agora import protocol
from agora.http import HTTPError, HTTPFactory, Router, Stream, listen
from agora.recordio import encode_json
from agora.resources import Resources
from agora.zookeeper import ZkUrl

import agent as _agent_package
from agent import checkpoint, monitor, sandbox, users
from agent import files as sandbox_files
from agent import gc as sandbox_gc
from agent import state as st
from agent import containerizer as containerizers
from agent.containerizer.containerizer import TaskProcess
from agent.containerizer.launcher import LaunchError, LaunchSpec, describe_status
from agent.containerizer.launcher import recover as launcher_recover
from agent.containerizer.launcher import signal_session
from isolators.interface import ContainerConfig, ContainerState
from agent.detect import detect_resources, parse_attributes
from agent.endpoints import AgentEndpoints
from agent.executor_api import ExecutorAPI, validate_status
from agent.executors.command import (
    SWITCH_USER_VARIABLE, command_argv, environment_variables, task_user, task_variables)
from agent.fetcher import FetchError, Fetcher
from agent.master_detector import ZooKeeperMaster, parse_master
from agent.master_link import MasterLink
from agent.status_updates import StatusUpdates

log = Logger()

#: The directory that holds the `agent` and `agora` packages: executors we start import from it.
CODE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(_agent_package.__file__)))
BUILTIN_EXECUTOR_MODULE = "agent.executors.command"
STOP_GRACE = 1.0  # on agent stop: SIGTERM, then SIGKILL after this long
RECOVERY_TIMEOUT = "15mins"  # what checkpointing executors are told (Mesos's default)
EXECUTOR_HEARTBEAT_INTERVAL = 30 * 60.0  # Mesos: DEFAULT_EXECUTOR_HEARTBEAT_INTERVAL
FETCHER_CACHE_SIZE = 2 * 1024**3  # Mesos: --fetcher_cache_size=2GB
RECOVER_MODES = ("reconnect", "cleanup")
#: What a command task's container gets for our executor, on top of the task (Mesos's
#: DEFAULT_EXECUTOR_CPUS and DEFAULT_EXECUTOR_MEM); not offered, only in the limits.
COMMAND_EXECUTOR_OVERHEAD = Resources.parse("cpus:0.1;mem:32")


class RecoveryError(Exception):
    """The work dir's checkpoint cannot be recovered by this agent; says why and what to do."""


class Agent:
    """An agent process's core: see the module docstring. Runs in the reactor thread."""

    def __init__(self, reactor, *, master, work_dir: str,
                 ip: str = "127.0.0.1", port: int = 5051, hostname: str | None = None,
                 resources: str | None = None, attributes: str | None = None,
                 secret: bytes | None = None, status_update_retry: float = 10.0,
                 executor_registration_timeout: float = 60.0,
                 executor_shutdown_grace: float = 5.0, python: str = sys.executable,
                 fetcher_cache_dir: str | None = None,
                 fetcher_cache_size: int = FETCHER_CACHE_SIZE,
                 gc_delay: float = sandbox_gc.DEFAULT_DELAY,
                 gc_disk_headroom: float = sandbox_gc.DEFAULT_HEADROOM,
                 disk_watch_interval: float = sandbox_gc.DEFAULT_INTERVAL,
                 disk_usage=None, switch_user: bool = True,
                 executor_heartbeat_interval: float = EXECUTOR_HEARTBEAT_INTERVAL,
                 usage: monitor.UsageFunction | None = None,
                 zk_session_timeout: float = 10.0, recover: str = "reconnect",
                 executor_reregistration_timeout: float = 10.0, launcher: str = "posix",
                 isolation: str | None = None, container_flags: dict | None = None,
                 http_authenticator=None):
        """`disk_usage()` (the used fraction of the work dir's disk, for the sandbox
        collector) and `usage(containers)` (see `agent.monitor`) replace the host-reading
        defaults, for tests and for containerizers that measure better. `master` is
        `(host, port)` or a `zk://` URL (str or ZkUrl): then the leader is followed.
        `launcher` ("posix" or "linux"), `isolation` (isolator names) and `container_flags`
        (runtime_dir, cgroups_root, image and CNI settings: agent.containerizer.build) make
        the containerizer; ValueError for a combination that cannot work.
        `http_authenticator` (agora.http_auth), if given, guards the read-only endpoints."""
        self.reactor = reactor
        self.http_authenticator = http_authenticator
        if isinstance(master, str):
            master = parse_master(master)
        if isinstance(master, ZkUrl):
            self.master_zk: ZkUrl | None = master
            self.master_address = (None, None)
        else:
            self.master_zk = None
            self.master_address = (master[0], int(master[1]))
        self.zk_session_timeout = zk_session_timeout
        if recover not in RECOVER_MODES:
            raise ValueError(f"recover must be one of {', '.join(RECOVER_MODES)}")
        self.recover = recover
        self.executor_reregistration_timeout = executor_reregistration_timeout
        self._agent_checkpointed = False  # meta/agent.json written for the current id
        self.detector: ZooKeeperMaster | None = None
        self.work_dir = os.path.abspath(work_dir)
        self.ip = ip
        # What executors and the master are told to connect to: a wildcard is not an address.
        self.advertised_ip = "127.0.0.1" if ip in ("", "0.0.0.0") else ip
        self.port = port
        self.hostname = hostname or socket.gethostname()
        self.resources_text = resources
        self.attributes_text = attributes
        self.resources = detect_resources(self.work_dir, resources)
        self.attributes = parse_attributes(attributes)
        self.secret = secret
        self.status_update_retry = status_update_retry
        self.executor_registration_timeout = executor_registration_timeout
        self.executor_shutdown_grace = executor_shutdown_grace
        self.python = python
        self.fetcher_cache_dir = os.path.abspath(fetcher_cache_dir or
                                                 os.path.join(self.work_dir, "fetch"))
        self.fetcher_cache_size = int(fetcher_cache_size)
        self.fetcher: Fetcher | None = None  # made in start(): it reads its cache directory
        self.switch_user = switch_user
        self.executor_heartbeat_interval = executor_heartbeat_interval
        self._usage = usage
        self.files = sandbox_files.Files()
        self.gc = sandbox_gc.SandboxGC(
            reactor, self.work_dir, delay=gc_delay, headroom=gc_disk_headroom,
            interval=disk_watch_interval, disk_usage=disk_usage,
            on_removed=self._sandbox_removed)
        # Status update journals of checkpointing frameworks, by (framework id, task id).
        self._journals: dict[tuple[str, str], checkpoint.TaskUpdates] = {}

        self.agent_id: str | None = None
        self.master_id: str | None = None
        self.start_time: float | None = None
        self.refused: str | None = None  # the master's message if it refused or removed us
        self.on_refused = lambda message: None  # for the CLI: e.g. exit when not wanted
        self.frameworks: dict[str, st.Framework] = {}
        self.completed_frameworks: deque[st.Framework] = deque(maxlen=st.MAX_COMPLETED_FRAMEWORKS)
        self.metrics: Counter = Counter()
        self.launcher_name = launcher
        self.container_flags = dict(container_flags or {})
        self.isolation = containerizers.default_isolation(launcher) if isolation is None \
            else isolation
        self.containerizer = containerizers.build(
            reactor, work_dir=self.work_dir, launcher=launcher, isolation=self.isolation,
            flags=self.container_flags, python=python, code_root=CODE_ROOT,
            on_limitation=self._limited)
        self.updates = StatusUpdates(reactor, self._send_update, status_update_retry,
                                     on_taken=self._journal_taken,
                                     on_acked=self._journal_acked)
        self.link = MasterLink(
            reactor, *self.master_address,
            registration=self._registration, on_registered=self._registered,
            on_message=self._on_master_message, on_disconnected=self._disconnected,
            on_refused=self._refused)
        self._listening = None
        self._heartbeat: LoopingCall | None = None
        self._stopping = False

    @property
    def registered(self) -> bool:
        return self.link.registered

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> Deferred:
        """Start the containerizer, recover what an earlier run left, listen on ip:port (0 =
        any free port, then `self.port` is the real one), then connect to the master. Fires
        when listening."""
        d = self.containerizer.start()
        d.addCallback(lambda _: self._recover_books())
        d.addCallback(lambda _: self._listen())
        return d

    def _listen(self):
        router = Router()
        # Executors call without credentials (Mesos gives them tokens of their own).
        router.add("/api/v1/executor", ExecutorAPI(self), ("POST",))
        guard = self.http_authenticator.guard if self.http_authenticator else lambda h: h
        AgentEndpoints(self).install(router, guard)
        for prefix, handler, methods in sandbox_files.routes(self.files):
            router.add(prefix, guard(handler), methods)
        factory = HTTPFactory(router, reactor=self.reactor, server_name="Agora agent")
        self.fetcher = Fetcher(self.fetcher_cache_dir, self.fetcher_cache_size)
        self._listening = listen(self.reactor, self.port, factory, self.ip)
        self.port = self._listening.getHost().port
        self.start_time = self.reactor.seconds()
        log.info("Agent listening on {ip}:{port}, resources {res}, work dir {wd}, launcher "
                 "{launcher}, isolation {iso}", ip=self.ip, port=self.port,
                 res=str(self.resources), wd=self.work_dir, launcher=self.launcher_name,
                 iso=self.isolation)
        self.gc.start()
        if self.executor_heartbeat_interval > 0:
            self._heartbeat = LoopingCall(self._heartbeat_executors)
            self._heartbeat.clock = self.reactor
            self._heartbeat.start(self.executor_heartbeat_interval, now=False)
        self.link.start()
        if self.master_zk is not None:
            self.detector = ZooKeeperMaster(self.reactor, self.master_zk, self._leader,
                                            session_timeout=self.zk_session_timeout)
            self.detector.start()
        return self

    def _leader(self, host: str | None, port: int | None) -> None:
        self.master_address = (host, port)
        self.link.set_master(host, port)

    def stop(self, grace: float = STOP_GRACE) -> Deferred:
        """Kill every container (SIGTERM, SIGKILL after `grace`), close the link and the port.

        Fires once no process of ours is left.
        """
        self._stopping = True
        waits = [self.link.stop(), self.gc.stop()]
        if self.detector is not None:
            waits.append(self.detector.stop())
        self.updates.stop()
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        self._heartbeat = None
        for fw in list(self.frameworks.values()):
            for executor in list(fw.executors.values()):
                self._cancel_timers(executor)
                if executor.stream is not None:
                    executor.stream.close()
                if executor.container is not None:
                    waits.append(self.containerizer.destroy(executor.container, grace))
        if self._listening is not None:
            waits.append(self._listening.stopListening())
            self._listening = None
        d = DeferredList(waits, consumeErrors=True)
        d.addCallback(lambda _: self.containerizer.stop())
        d.addCallback(lambda _: None)
        return d

    def flags(self) -> dict:
        """The configuration, as /flags and /state show it (strings, like Mesos)."""
        return {
            "master": str(self.master_zk) if self.master_zk else "%s:%d" % self.master_address,
            "work_dir": self.work_dir,
            "ip": self.ip, "port": str(self.port), "hostname": self.hostname,
            "resources": self.resources_text or "", "attributes": self.attributes_text or "",
            "authenticatee": "shared_secret" if self.secret else "none",
            "launcher": self.launcher_name, "isolation": self.isolation,
            "executor_registration_timeout": mj.format_duration(
                self.executor_registration_timeout),
            "executor_shutdown_grace_period": mj.format_duration(self.executor_shutdown_grace),
            "status_update_retry_interval": mj.format_duration(self.status_update_retry),
            "fetcher_cache_dir": self.fetcher_cache_dir,
            "fetcher_cache_size": "%dB" % self.fetcher_cache_size,
            "gc_delay": mj.format_duration(self.gc.delay),
            "gc_disk_headroom": str(self.gc.headroom),
            "disk_watch_interval": mj.format_duration(self.gc.interval),
            "switch_user": "true" if self.switch_user else "false",
            "recover": self.recover,
            "executor_reregistration_timeout": mj.format_duration(
                self.executor_reregistration_timeout),
            "python": self.python, "version": mj.MESOS_VERSION,
        }

    # --- the master ----------------------------------------------------------------------

    def agent_info(self) -> dict:
        """AgentInfo JSON as sent to the master (plus `ip`)."""
        info = {"hostname": self.hostname, "port": self.port, "ip": self.advertised_ip,
                "resources": self.resources.to_json(), "attributes": self.attributes}
        if self.agent_id:
            info["id"] = mj.ident(self.agent_id)
        return info

    def _registration(self, challenge: protocol.Challenge):
        proof = protocol.proof(self.secret, challenge.nonce) if self.secret else b""
        if self.agent_id is None:
            return protocol.RegisterAgent(info=self.agent_info(), version=mj.MESOS_VERSION,
                                          proof=proof)
        executors, tasks, frameworks = [], [], []
        for fw in self.frameworks.values():
            frameworks.append(fw.info)
            for executor in fw.executors.values():
                if executor.kind != st.COMMAND and executor.state != st.TERMINATED:
                    executors.append(executor.info)
                tasks.extend(t.view() for t in executor.tasks.values())
        return protocol.ReregisterAgent(
            agent_id=self.agent_id, info=self.agent_info(), version=mj.MESOS_VERSION,
            executors=executors, tasks=tasks, frameworks=frameworks, proof=proof)

    def _registered(self, msg: protocol.AgentRegistered) -> None:
        if self.agent_id is None:
            log.info("Registered with master {mid} as agent {aid}", mid=msg.master_id,
                     aid=msg.agent_id)
        elif msg.agent_id != self.agent_id:
            log.warn("The master re-admitted us as {new}, not {old}; taking the new id",
                     new=msg.agent_id, old=self.agent_id)
        else:
            log.info("Re-registered with master {mid} as agent {aid}", mid=msg.master_id,
                     aid=msg.agent_id)
        first = self.agent_id is None
        if msg.agent_id != self.agent_id:
            self._agent_checkpointed = False
        self.agent_id = msg.agent_id
        self.master_id = msg.master_id
        if first:
            self._recover_updates()
        self.updates.reconnected()

    def _disconnected(self) -> None:
        log.warn("Lost the master; status updates wait until we are back")
        self.updates.disconnected()

    def _refused(self, message: str) -> None:
        self.refused = message
        self.updates.stop()
        for fw in list(self.frameworks.values()):
            self._shutdown_framework(fw.framework_id)
        self.on_refused(message)

    def _send_update(self, framework_id: str, status: dict) -> None:
        self.link.send(protocol.StatusUpdate(framework_id=framework_id, status=status))

    def _on_master_message(self, msg) -> None:
        kind = type(msg)
        if kind is protocol.RunTask:
            self._run_task(msg.framework, msg.task)
        elif kind is protocol.RunTaskGroup:
            self._run_task_group(msg.framework, msg.executor, msg.task_group)
        elif kind is protocol.KillTask:
            self._kill_task(msg.framework_id, msg.task_id, msg.kill_policy)
        elif kind is protocol.StatusUpdateAck:
            self._on_ack(msg.framework_id, msg.task_id, msg.uuid)
        elif kind is protocol.FrameworkMessage:
            self._to_executor_message(msg)
        elif kind is protocol.ShutdownExecutor:
            fw = self.frameworks.get(msg.framework_id)
            executor = fw.executors.get(msg.executor_id) if fw else None
            if executor is None:
                log.warn("Asked to shut down unknown executor {eid} of framework {fid}",
                         eid=msg.executor_id, fid=msg.framework_id)
                return
            self._shutdown_executor(executor, ("TASK_KILLED", "REASON_EXECUTOR_TERMINATED",
                                               "The executor was shut down"))
        elif kind is protocol.ShutdownFramework:
            self._shutdown_framework(msg.framework_id)
        elif kind is protocol.UpdateFramework:
            fid = mj.id_of(msg.framework, "id", required=False)
            if fid in self.frameworks:
                self.frameworks[fid].update_info(msg.framework)
                if self.frameworks[fid].checkpoint:
                    self._checkpoint_framework(self.frameworks[fid], force=True)
        else:
            log.warn("Unexpected {kind} from the master", kind=kind.__name__)

    # --- launching -----------------------------------------------------------------------

    def _framework(self, info: dict) -> st.Framework:
        fid = mj.id_of(info, "id")
        fw = self.frameworks.get(fid)
        if fw is None:
            fw = self.frameworks[fid] = st.Framework(info)
        else:
            fw.update_info(info)
        return fw

    def _run_task(self, framework_info: dict, task: dict) -> None:
        try:
            fid = mj.id_of(framework_info, "id")
            tid = mj.id_of(task, "task_id")
            if "executor" in task:
                info, kind = self._executor_info(task["executor"], fid), st.CUSTOM
            elif isinstance(task.get("command"), dict):
                info, kind = self._command_executor_info(fid, task), st.COMMAND
            else:
                raise mj.InvalidMessage("the task has neither 'command' nor 'executor'")
        except (ValueError, TypeError, AttributeError) as e:  # InvalidMessage is a ValueError
            self._reject(framework_info, task, f"Invalid task: {e}", "REASON_TASK_INVALID")
            return
        fw = self._framework(framework_info)
        self._add_tasks(fw, info, kind, [task], "task")

    def _run_task_group(self, framework_info: dict, executor: dict, task_group: dict) -> None:
        tasks = (task_group or {}).get("tasks") if isinstance(task_group, dict) else None
        try:
            fid = mj.id_of(framework_info, "id")
            info = self._executor_info(executor, fid)
            if not tasks or not isinstance(tasks, list):
                raise mj.InvalidMessage("the task group has no tasks")
            for task in tasks:
                mj.id_of(task, "task_id")
        except (ValueError, TypeError, AttributeError) as e:  # InvalidMessage is a ValueError
            for task in tasks or []:
                self._reject(framework_info, task, f"Invalid task group: {e}",
                             "REASON_TASK_GROUP_INVALID")
            return
        fw = self._framework(framework_info)
        self._add_tasks(fw, info, st.DEFAULT, tasks, "group")

    def _reject(self, framework_info, task, message: str, reason: str) -> None:
        fid = mj.id_of(framework_info, "id", required=False) if isinstance(framework_info,
                                                                           dict) else None
        tid = mj.id_of(task, "task_id", required=False) if isinstance(task, dict) else None
        log.error("Dropping a task: {message} (framework {fid}, task {tid})", message=message,
                  fid=fid, tid=tid)
        if fid and tid:
            self._update_without_record(fid, tid, "TASK_FAILED", reason, message)

    def _executor_info(self, info, fid: str) -> dict:
        """ExecutorInfo with the exact id dicts pymesos compares against."""
        if not isinstance(info, dict):
            raise mj.InvalidMessage("'executor' must be an ExecutorInfo object")
        eid = mj.id_of(info, "executor_id")
        sandbox.check_id("executor id", eid)
        return dict(info, executor_id=mj.ident(eid), framework_id=mj.ident(fid))

    def _command_executor_info(self, fid: str, task: dict) -> dict:
        tid = mj.id_of(task, "task_id")
        sandbox.check_id("task id", tid)
        value = str(task["command"].get("value", ""))
        return {
            "executor_id": mj.ident(tid), "framework_id": mj.ident(fid),
            "name": f"Command Executor (Task: {tid}) (Command: sh -c '{value[:64]}')",
            "source": tid,
            "command": {"value": self.python, "shell": False,
                        "arguments": self._builtin_executor_argv()},
        }

    def _builtin_executor_argv(self) -> list[str]:
        # -S: our executor needs no site-packages, and skipping site saves ~20 ms a launch.
        # -P: `-m` would put the cwd (the sandbox, where fetched files land) first on the
        # path, and a fetched `agent/` package would run as root instead of our executor.
        return [self.python, "-S", "-P", "-m", BUILTIN_EXECUTOR_MODULE]

    def _add_tasks(self, fw: st.Framework, info: dict, kind: str, tasks: list[dict],
                   how: str) -> None:
        eid = mj.id_of(info, "executor_id")
        if fw.terminating:
            for task in tasks:
                self._update_without_record(fw.framework_id, mj.id_of(task, "task_id"),
                                            self._lost_state(fw), "REASON_FRAMEWORK_REMOVED",
                                            "The framework is being shut down on this agent")
            return
        executor = fw.executors.get(eid)
        if executor is not None and executor.state in (st.TERMINATING, st.TERMINATED):
            for task in tasks:
                self._update_without_record(fw.framework_id, mj.id_of(task, "task_id"),
                                            self._lost_state(fw), "REASON_EXECUTOR_TERMINATED",
                                            f"Executor {eid} is terminating")
            return
        known = {tid for e in fw.executors.values() for tid in e.tasks}
        fresh = []
        for task in tasks:
            tid = mj.id_of(task, "task_id")
            if tid in known or (kind == st.COMMAND and executor is not None):
                log.error("Task {tid} of framework {fid} is already on this agent; ignoring "
                          "the second launch", tid=tid, fid=fw.framework_id)
                continue
            fresh.append(st.Task(task, fw.framework_id, eid))
        if not fresh:
            return
        new = executor is None
        if not new and kind == st.DEFAULT:
            # A further group for a running default executor: its tasks' users must exist.
            try:
                self._check_task_users(fw, executor.info, [t.info for t in fresh])
            except users.UnknownUser as e:
                for record in fresh:
                    self._update_without_record(
                        fw.framework_id, record.task_id, "TASK_FAILED",
                        "REASON_CONTAINER_LAUNCH_FAILED",
                        f"Failed to launch the container: {e}", executor_id=eid)
                return
        if new:
            executor = fw.executors[eid] = st.Executor(info, fw.framework_id, kind)
        for record in fresh:
            executor.tasks[record.task_id] = record
        entry = (how, [t.task_id for t in fresh])
        if fw.checkpoint:
            self._checkpoint_framework(fw)
            if new:
                self._checkpoint(checkpoint.executor_meta_dir, (fw.framework_id, eid),
                                 checkpoint.EXECUTOR_FILE, {"info": info, "kind": kind})
            else:
                self._checkpoint_tasks(fw, executor, [entry])
        if new:
            executor.queue.append(entry)
            self._launch(fw, executor)
            return
        try:
            uris = self._task_uris([t.info for t in fresh]) if kind != st.CUSTOM else []
        except ValueError as e:
            for record in fresh:
                self._agent_update(executor, record, "TASK_FAILED",
                                   "REASON_CONTAINER_LAUNCH_FAILED", f"Invalid task: {e}")
            return
        # A group joining a running default executor: its URIs go into the shared sandbox
        # and its containers are prepared first; the tasks wait (out of the queue) until then.
        d = self._fetch(uris, executor.directory, self._executor_user(fw, executor)) \
            if uris else succeed(None)
        if self.containerizer.linux and kind != st.CUSTOM:
            d.addCallback(lambda _: self._prepare_joining(fw, executor, fresh))
        d.addCallbacks(lambda _: self._joined(executor, entry, bool(uris)),
                       lambda failure: self._join_failed(executor, entry, failure))

    def _prepare_joining(self, fw: st.Framework, executor: st.Executor, tasks: list) -> Deferred:
        env = self._executor_environment(fw, executor, executor.directory)
        config = self._container_config(fw, executor, None)
        return self.containerizer.add_tasks(
            config, self._task_processes(fw, executor, tasks, env))

    def _joined(self, executor: st.Executor, entry: tuple[str, list[str]],
                fetched: bool = True) -> None:
        if fetched:
            self.metrics["fetches_succeeded"] += 1
        if executor.state in (st.TERMINATING, st.TERMINATED) or self._stopping:
            return  # its tasks were settled when it ended
        executor.queue.append(entry)
        self._deliver(executor)

    def _join_failed(self, executor: st.Executor, entry: tuple[str, list[str]],
                     failure) -> None:
        if failure.check(FetchError):
            self.metrics["fetches_failed"] += 1
        if executor.state == st.TERMINATED or self._stopping:
            return
        message = self._fetch_message(executor, failure)
        for tid in entry[1]:
            task = executor.tasks.get(tid)
            if task is not None and not task.terminal:
                self._agent_update(executor, task, "TASK_FAILED",
                                   "REASON_CONTAINER_LAUNCH_FAILED", message)

    def _launch(self, fw: st.Framework, executor: st.Executor) -> None:
        """Check the user, create the sandbox, fetch the URIs, then start the container."""
        executor.container_id = str(uuid.uuid4())
        if fw.checkpoint:
            self._checkpoint_tasks(fw, executor, executor.queue)
        directory = None
        try:
            run_as = self._run_as(fw, executor)
            directory = sandbox.create_run(self.work_dir, self.agent_id, fw.framework_id,
                                           executor.executor_id, executor.container_id)
            executor.directory = directory
            self._attach(fw, executor, directory)
            if run_as is not None:
                self._give_sandbox(directory, run_as)
            uris = self._executor_uris(executor)
        except (OSError, ValueError) as e:  # UnknownUser is a ValueError
            self._launch_failed(fw, executor, f"Failed to launch the container: {e}")
            return
        if not uris:
            self._start_container(fw, executor, run_as)
            return
        d = self._fetch(uris, directory, run_as.name if run_as is not None else None)
        d.addCallbacks(lambda _: self._fetched(fw, executor, run_as),
                       lambda failure: self._fetch_failed(fw, executor, failure))

    def _fetch(self, uris: list, directory: str, user: str | None) -> Deferred:
        """Fetch `uris` into `directory` in a thread of its own (the fetcher blocks).

        Not the reactor's pool: a few slow downloads would starve what else uses it (sandbox
        removal, /monitor/statistics), and its threads are joined at shutdown, so a stalled
        download would hold up the agent's exit. A daemon thread per fetch does neither.
        """
        d = Deferred()
        reactor = self.reactor

        def run():
            try:
                result = self.fetcher.fetch(uris, directory, user)
            except BaseException:
                reactor.callFromThread(d.errback, Failure())
            else:
                reactor.callFromThread(d.callback, result)

        threading.Thread(target=run, daemon=True, name=f"fetch {directory}").start()
        return d

    def _fetched(self, fw: st.Framework, executor: st.Executor, run_as) -> None:
        self.metrics["fetches_succeeded"] += 1
        if executor.state != st.LAUNCHING or self._stopping:
            return  # shut down while fetching: it ended already
        self._start_container(fw, executor, run_as)

    def _fetch_failed(self, fw: st.Framework, executor: st.Executor, failure) -> None:
        self.metrics["fetches_failed"] += 1
        if executor.state != st.LAUNCHING or self._stopping:
            return
        self._launch_failed(fw, executor, self._fetch_message(executor, failure))

    def _fetch_message(self, executor: st.Executor, failure) -> str:
        if failure.check(FetchError):
            return failure.getErrorMessage()
        if failure.check(LaunchError):
            return f"Failed to launch the container: {failure.getErrorMessage()}"
        log.failure("Fetching the URIs of executor {eid} failed unexpectedly", failure,
                    eid=executor.executor_id)
        return f"Failed to fetch URIs: {failure.getErrorMessage()}"

    def _start_container(self, fw: st.Framework, executor: st.Executor, run_as) -> None:
        directory = executor.directory
        try:
            spec = self._launch_spec(fw, executor, directory, run_as)
            config = self._container_config(fw, executor, run_as)
            tasks = self._task_processes(fw, executor, list(executor.tasks.values()), spec.env)
        except (OSError, ValueError) as e:
            self._launch_failed(fw, executor, f"Failed to launch the container: {e}")
            return
        before_exec = None
        if fw.checkpoint:
            def before_exec(pid):  # the run's pid is durable before the executor runs
                self._checkpoint(checkpoint.meta_run_dir,
                                 (fw.framework_id, executor.executor_id, executor.container_id),
                                 checkpoint.RUN_FILE,
                                 {"pid": pid, "directory": directory,
                                  "start_ticks": checkpoint.process_start_ticks(pid)})
        d = self.containerizer.launch(config, spec, builtin=executor.kind != st.CUSTOM,
                                      tasks=tasks, before_exec=before_exec)
        d.addCallbacks(lambda container: self._container_started(fw, executor, container),
                       lambda failure: self._container_failed(fw, executor, failure))

    def _container_started(self, fw: st.Framework, executor: st.Executor, container) -> None:
        if executor.state in (st.TERMINATING, st.TERMINATED) or self._stopping:
            # Shut down (or the agent stopped) while it was being launched. (It may have
            # subscribed already: RUNNING before we hear that it started is fine.)
            self.containerizer.destroy(container)
            return
        directory = executor.directory
        executor.container = container
        log.info("Launched executor {eid} of framework {fid} (pid {pid}) in {dir}",
                 eid=executor.executor_id, fid=fw.framework_id, pid=container.pid, dir=directory)
        container.exited.addCallback(
            lambda status: self._executor_ended(fw.framework_id, executor, status))
        executor.registration_timer = self.reactor.callLater(
            self.executor_registration_timeout, self._registration_timed_out, executor)

    def _container_failed(self, fw: st.Framework, executor: st.Executor, failure) -> None:
        if executor.state in (st.TERMINATING, st.TERMINATED) or self._stopping:
            return
        if failure.check(LaunchError, OSError, ValueError):
            message = failure.getErrorMessage()
        else:
            log.failure("Launching the container of executor {eid} failed", failure,
                        eid=executor.executor_id)
            message = failure.getErrorMessage()
        self._launch_failed(fw, executor, f"Failed to launch the container: {message}")

    def _container_config(self, fw: st.Framework, executor: st.Executor,
                          run_as) -> ContainerConfig:
        """The container as isolators see it: for a command task, the task's ContainerInfo
        and resources plus our executor's overhead (Mesos's 0.1 cpus and 32 MB)."""
        infos = [t.info for t in executor.tasks.values()]
        resources = Resources.sum([Resources.from_json(executor.info.get("resources") or [])] +
                                  [Resources.from_json(i.get("resources") or []) for i in infos])
        if executor.kind == st.COMMAND:
            resources = resources.flatten() + COMMAND_EXECUTOR_OVERHEAD
            container_info = infos[0].get("container") if infos else None
        else:
            container_info = executor.info.get("container")
        return ContainerConfig(
            container_id=executor.container_id, directory=executor.directory,
            resources=resources, executor_info=executor.info, task_infos=tuple(infos),
            container_info=container_info, user=run_as.name if run_as is not None else None)

    def _task_processes(self, fw: st.Framework, executor: st.Executor, tasks: list,
                        executor_env: dict) -> list:
        """What the containerizer needs to prepare each of our executor's tasks' containers."""
        if executor.kind == st.CUSTOM or not self.containerizer.linux:
            return []
        base = {k: v for k, v in executor_env.items() if k.startswith("MESOS_") or k == "HOST"}
        out = []
        for task in tasks:
            user = task_user(task.info, executor.info, fw.info) if self._switching() else None
            out.append(TaskProcess(task_id=task.task_id, info=task.info,
                                   variables={**base, **task_variables(task.info)},
                                   user_name=user))
        return out

    def _launch_failed(self, fw: st.Framework, executor: st.Executor, message: str) -> None:
        """The container could not be started: its tasks fail with CONTAINER_LAUNCH_FAILED."""
        log.error("Executor {eid} of framework {fid}: {message}", eid=executor.executor_id,
                  fid=fw.framework_id, message=message)
        self.metrics["container_launch_errors"] += 1
        if executor.directory:
            try:
                with open(os.path.join(executor.directory, "stderr"), "a") as f:
                    f.write(message + "\n")
            except OSError:
                pass
        executor.termination = ("TASK_FAILED", "REASON_CONTAINER_LAUNCH_FAILED", message)
        self._executor_ended(fw.framework_id, executor, None)

    def _attach(self, fw: st.Framework, executor: st.Executor, directory: str) -> None:
        """Serve the sandbox under /files: by its real path and as the executor's latest run."""
        self.files.attach(directory, directory)
        self.files.attach(f"/frameworks/{fw.framework_id}/executors/{executor.executor_id}"
                          f"/runs/{sandbox.LATEST}", directory)

    # --- users and URIs --------------------------------------------------------------------

    def _switching(self) -> bool:
        return self.switch_user and users.can_switch()

    def _executor_user(self, fw: st.Framework, executor: st.Executor) -> str | None:
        """Who owns the sandbox (and runs a custom executor): Mesos's rule, or None."""
        if not self._switching():
            return None
        if executor.kind == st.COMMAND:
            task = next(iter(executor.tasks.values()), None)
            return task_user(task.info if task else None, None, fw.info)
        return task_user(None, executor.info, fw.info)

    def _check_task_users(self, fw: st.Framework, executor_info: dict,
                          tasks: list[dict]) -> None:
        """UnknownUser unless every task's user exists (our executor switches to them)."""
        if not self._switching():
            return
        for task in tasks:
            name = task_user(task, executor_info, fw.info)
            if name is not None:
                users.lookup(name)

    def _run_as(self, fw: st.Framework, executor: st.Executor) -> users.RunAs | None:
        """The executor's user, looked up; UnknownUser if it, or a task's, does not exist."""
        name = self._executor_user(fw, executor)
        if executor.kind != st.CUSTOM:
            self._check_task_users(fw, executor.info,
                                   [t.info for t in executor.tasks.values()])
        return users.lookup(name) if name is not None else None

    @staticmethod
    def _give_sandbox(directory: str, run_as: users.RunAs) -> None:
        """The sandbox and its stdout/stderr belong to the user the container runs as."""
        for name in ("stdout", "stderr"):
            with open(os.path.join(directory, name), "ab"):
                pass
            os.chown(os.path.join(directory, name), run_as.uid, run_as.gid)
        os.chown(directory, run_as.uid, run_as.gid)

    @staticmethod
    def _command_uris(command) -> list:
        if not isinstance(command, dict) or command.get("uris") is None:
            return []
        uris = command["uris"]
        if not isinstance(uris, list):
            raise ValueError("'command.uris' must be a list of CommandInfo.URI objects")
        return uris

    def _task_uris(self, tasks: list[dict]) -> list:
        uris = []
        for task in tasks:
            uris.extend(self._command_uris(task.get("command")))
        return uris

    def _executor_uris(self, executor: st.Executor) -> list:
        """What to fetch before the executor starts: its command's URIs (a custom or default
        executor), then the URIs of the tasks it starts with (command tasks and groups)."""
        uris = list(self._command_uris(executor.info.get("command")))
        if executor.kind != st.CUSTOM:
            uris.extend(self._task_uris([t.info for t in executor.tasks.values()]))
        return uris

    def _launch_spec(self, fw: st.Framework, executor: st.Executor, directory: str,
                     run_as: users.RunAs | None = None) -> LaunchSpec:
        if executor.kind == st.CUSTOM:
            command = executor.info.get("command")
            if not isinstance(command, dict):
                raise ValueError("the ExecutorInfo has no 'command' to run")
            argv, program = command_argv(command)
        else:
            argv, program = self._builtin_executor_argv(), self.python
            command = executor.info.get("command") if executor.kind == st.DEFAULT else None
        env = self._executor_environment(fw, executor, directory)
        user = None
        if executor.kind == st.CUSTOM:
            if run_as is not None:
                env.update(run_as.environment())
                user = run_as
        elif self._switching():
            # Our executor stays root and starts each task as the task's user.
            env[SWITCH_USER_VARIABLE] = "1"
        if isinstance(command, dict):
            env.update(environment_variables(command))
        return LaunchSpec(argv=argv, env=env, cwd=directory, program=program,
                          stdout=os.path.join(directory, "stdout"),
                          stderr=os.path.join(directory, "stderr"), user=user)

    def _executor_environment(self, fw: st.Framework, executor: st.Executor,
                              directory: str) -> dict:
        """The agent's environment plus the MESOS_* variables of spec §4.1."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MESOS_", "LIBPROCESS_", "AGORA_TASK_"))
               and k != SWITCH_USER_VARIABLE}
        endpoint = f"{self.advertised_ip}:{self.port}"
        env.update({
            "HOST": self.hostname,
            "MESOS_FRAMEWORK_ID": fw.framework_id,
            "MESOS_EXECUTOR_ID": executor.executor_id,
            "MESOS_DIRECTORY": directory,
            "MESOS_SANDBOX": directory,
            "MESOS_CHECKPOINT": "1" if fw.checkpoint else "0",
            "MESOS_AGENT_ENDPOINT": endpoint,
            "MESOS_SLAVE_ID": self.agent_id or "",
            "MESOS_AGENT_ID": self.agent_id or "",
            "MESOS_SLAVE_PID": f"slave(1)@{endpoint}",
            "MESOS_HTTP_COMMAND_EXECUTOR": "1",
            # Never zero: pymesos would SIGKILL itself at once on SHUTDOWN (spec §4.5).
            "MESOS_EXECUTOR_SHUTDOWN_GRACE_PERIOD": mj.format_duration(
                max(self._shutdown_grace(executor), 0.1)),
        })
        if fw.checkpoint:
            env["MESOS_RECOVERY_TIMEOUT"] = RECOVERY_TIMEOUT
            env["MESOS_SUBSCRIPTION_BACKOFF_MAX"] = "2secs"
        if executor.kind != st.CUSTOM:
            # Our executor imports our packages from wherever the agent runs them; it puts
            # the original PYTHONPATH back for the tasks.
            original = os.environ.get("PYTHONPATH", "")
            env["AGORA_TASK_PYTHONPATH"] = original
            env["PYTHONPATH"] = CODE_ROOT + (os.pathsep + original if original else "")
        return env

    def _shutdown_grace(self, executor: st.Executor) -> float:
        return mj.nanoseconds_to_seconds(executor.info.get("shutdown_grace_period"),
                                         self.executor_shutdown_grace)

    def _deliver(self, executor: st.Executor) -> None:
        """Send the executor the tasks queued for it, in order, if it is connected."""
        if not executor.connected:
            return
        queue, executor.queue = executor.queue, []
        for how, ids in queue:
            infos = []
            for tid in ids:
                task = executor.tasks.get(tid)
                if task is not None and not task.terminal and not task.delivered:
                    task.delivered = True
                    infos.append(task.info)
            if not infos:
                continue
            if how == "group":
                self._send_event(executor, "LAUNCH_GROUP", {"task_group": {"tasks": infos}})
            else:
                for info in infos:
                    self._send_event(executor, "LAUNCH", {"task": info})

    def _registration_timed_out(self, executor: st.Executor) -> None:
        executor.registration_timer = None
        if executor.subscribed or executor.state == st.TERMINATED:
            return
        timeout = mj.format_duration(self.executor_registration_timeout)
        log.warn("Executor {eid} did not subscribe within {t}; killing it",
                 eid=executor.executor_id, t=timeout)
        self.metrics["executor_registration_timeouts"] += 1
        self._kill_silent_executor(executor, "REASON_EXECUTOR_REGISTRATION_TIMEOUT",
                                   f"Executor did not register within {timeout}")

    # --- the executor API (ExecutorHost) ------------------------------------------------

    def find_executor(self, framework_id: str, executor_id: str) -> st.Executor:
        fw = self.frameworks.get(framework_id)
        if fw is None:
            raise HTTPError(400, f"Framework {framework_id} cannot be found on this agent")
        executor = fw.executors.get(executor_id)
        if executor is None:
            raise HTTPError(400, f"Executor {executor_id} of framework {framework_id} cannot "
                                 "be found on this agent")
        return executor

    def subscribe(self, executor: st.Executor, stream: Stream, unacknowledged_tasks: list,
                  unacknowledged_updates: list) -> None:
        fw = self.frameworks[executor.framework_id]
        old = executor.stream
        executor.stream = stream
        if old is not None and not old.closed:
            old.close()  # a re-subscription replaces the old stream
        stream.on_close(lambda: self._stream_closed(executor, stream))
        resubscribed = executor.subscribed
        executor.subscribed = True
        if executor.state == st.LAUNCHING:
            executor.state = st.RUNNING
        if executor.registration_timer is not None and executor.registration_timer.active():
            executor.registration_timer.cancel()
        executor.registration_timer = None
        log.info("Executor {eid} of framework {fid} {how}", eid=executor.executor_id,
                 fid=executor.framework_id, how="re-subscribed" if resubscribed else "subscribed")
        self._send_event(executor, "SUBSCRIBED", {
            "executor_info": executor.info, "framework_info": fw.info,
            "agent_info": self.agent_info(),
            "container_id": mj.ident(executor.container_id or ""),
        })
        if executor.state == st.TERMINATING or executor.state == st.TERMINATED:
            self._send_event(executor, "SHUTDOWN")
            return
        # Tasks the executor already holds must never be launched again (pymesos asserts).
        held = {mj.id_of(t, "task_id", required=False) for t in unacknowledged_tasks
                if isinstance(t, dict)}
        for tid in held:
            task = executor.tasks.get(tid)
            if task is not None:
                task.delivered = True
        for update in unacknowledged_updates:
            status = update.get("status") if isinstance(update, dict) else None
            try:
                self.executor_update(executor, validate_status(status, executor.executor_id))
            except HTTPError as e:
                log.warn("Ignoring an unacknowledged update from executor {eid}: {e}",
                         eid=executor.executor_id, e=e.message)
        self._deliver(executor)
        for task in executor.tasks.values():
            if task.kill_requested is not None and task.delivered and not task.terminal:
                self._send_kill(executor, task, task.kill_requested)

    def _stream_closed(self, executor: st.Executor, stream: Stream) -> None:
        if executor.stream is stream:
            executor.stream = None
            if executor.state != st.TERMINATED and not self._stopping:
                log.info("Executor {eid} of framework {fid} disconnected",
                         eid=executor.executor_id, fid=executor.framework_id)

    def executor_update(self, executor: st.Executor, status: dict) -> None:
        tid = mj.id_of(status, "task_id")
        task = executor.tasks.get(tid)
        if task is None:
            if not any(t.task_id == tid for t in executor.completed_tasks):
                self.metrics["invalid_status_updates"] += 1
                raise HTTPError(400, f"Task {tid} was not launched on executor "
                                     f"{executor.executor_id}")
        else:
            status = dict(status)
            status.setdefault("agent_id", mj.ident(self.agent_id))
            status.setdefault("executor_id", mj.ident(executor.executor_id))
            status.setdefault("source", "SOURCE_EXECUTOR")
            if status.get("state") == "TASK_FAILED" and executor.container_id:
                self._blame_limitation(executor, status)
            if self._take_update(executor, task, status):
                self.metrics["valid_status_updates"] += 1
        # Taken (or already had): the executor may forget it.
        self._send_event(executor, "ACKNOWLEDGED", {"task_id": mj.ident(tid),
                                                    "uuid": status["uuid"]})

    def executor_message(self, executor: st.Executor, data: bytes) -> None:
        self.metrics["valid_framework_messages"] += 1
        if not self.link.send(protocol.FrameworkMessage(
                framework_id=executor.framework_id, executor_id=executor.executor_id,
                data=data)):
            log.warn("Dropping a framework message from executor {eid}: no master",
                     eid=executor.executor_id)

    def _send_event(self, executor: st.Executor, kind: str, payload: dict | None = None) -> bool:
        if not executor.connected:
            return False
        executor.stream.write(encode_json(mj.event(kind, payload)))
        return True

    # --- status updates ------------------------------------------------------------------

    def _take_update(self, executor: st.Executor, task: st.Task, status: dict) -> bool:
        """Record a task's new status and hand it to reliable delivery; False if dropped."""
        if task.terminal:
            if status.get("state") != task.state:
                log.warn("Dropping {state} for task {tid}: it already is {terminal}",
                         state=status.get("state"), tid=task.task_id, terminal=task.state)
            return False
        if any(s.get("uuid") == status.get("uuid") for s in task.statuses):
            return False  # taken before (an executor re-sends it after an agent restart)
        if executor.container_id and "container_status" not in status:
            container_status = self.containerizer.status(executor.container_id)
            if container_status:
                status["container_status"] = container_status
        # (A checkpointing framework's update is journaled inside `update`, before it is sent.)
        if not self.updates.update(executor.framework_id, status):
            return False  # a duplicate
        task.state = status["state"]
        task.statuses.append(status)
        if task.terminal:
            self.metrics["tasks_" + task.state[len("TASK_"):].lower()] += 1
        return True

    def _blame_limitation(self, executor: st.Executor, status: dict) -> None:
        """A task failed: if its container broke a limit (the kernel's OOM kill often
        reaches the executor before its notification reaches us), say so, as Mesos does,
        and end the container."""
        limitation = self.containerizer.check(executor.container_id)
        if limitation is None:
            return
        status["reason"] = limitation.reason
        status["message"] = limitation.message
        status["limitation"] = {"resources": limitation.resources.to_json()}
        self._limited(executor.container_id, limitation)

    def _limited(self, container_id: str, limitation) -> None:
        """An isolator says the container broke a limit: its tasks fail with the reason and
        the container is destroyed (Mesos)."""
        for fw in self.frameworks.values():
            for executor in fw.executors.values():
                if executor.container_id != container_id or executor.state == st.TERMINATED:
                    continue
                log.warn("Container {cid} of executor {eid}: {message}", cid=container_id,
                         eid=executor.executor_id, message=limitation.message)
                self.metrics["container_limitations"] += 1
                if executor.termination is None:
                    executor.termination = ("TASK_FAILED", limitation.reason,
                                            limitation.message)
                executor.state = st.TERMINATING
                if executor.container is not None:
                    self.containerizer.destroy(executor.container)
                return

    def _agent_update(self, executor: st.Executor, task: st.Task, state: str, reason: str,
                      message: str) -> None:
        """A status the agent makes itself (the executor cannot): it needs an ack too."""
        status = mj.task_status(task.task_id, state, source="SOURCE_AGENT",
                                timestamp=self.reactor.seconds(), agent_id=self.agent_id,
                                executor_id=executor.executor_id, reason=reason,
                                message=message, uuid=mj.new_uuid())
        self._take_update(executor, task, status)

    def _update_without_record(self, fid: str, tid: str, state: str, reason: str,
                               message: str, executor_id: str | None = None) -> None:
        """A status for a task the agent keeps no record of (rejected or unknown)."""
        self.updates.update(fid, mj.task_status(
            tid, state, source="SOURCE_AGENT", timestamp=self.reactor.seconds(),
            agent_id=self.agent_id, executor_id=executor_id, reason=reason, message=message,
            uuid=mj.new_uuid()))

    def _on_ack(self, fid: str, tid: str, uuid_b64: str) -> None:
        status = self.updates.ack(fid, tid, uuid_b64)
        if status is None:
            log.debug("Ignoring an unexpected ack {uuid} for task {tid}", uuid=uuid_b64, tid=tid)
            return
        if not mj.is_terminal(status.get("state", "")):
            return
        fw = self.frameworks.get(fid)
        eid = mj.id_of(status, "executor_id", required=False)
        executor = fw.executors.get(eid) if fw is not None and eid else None
        if executor is None:
            return
        task = executor.tasks.pop(tid, None)
        if task is not None:
            executor.completed_tasks.append(task)
        self._maybe_forget_executor(fw, executor)

    # --- checkpointing status updates -----------------------------------------------------

    def _journal_taken(self, fid: str, status: dict) -> None:
        """Journal an update of a checkpointing framework before it goes to the master."""
        tid = mj.id_of(status, "task_id")
        journal = self._journals.get((fid, tid))
        if journal is None:
            fw = self.frameworks.get(fid)
            eid = mj.id_of(status, "executor_id", required=False)
            executor = fw.executors.get(eid) if fw is not None and eid else None
            if not fw or not fw.checkpoint or executor is None or not executor.container_id \
                    or not self.agent_id:
                return
            try:
                path = checkpoint.task_updates_path(self.work_dir, self.agent_id, fid, eid,
                                                    executor.container_id, tid)
            except ValueError as e:  # an id that cannot name a directory
                self.metrics["checkpoint_errors"] += 1
                log.error("Cannot checkpoint the updates of task {tid}: {e}", tid=tid, e=e)
                return
            journal = self._journals[(fid, tid)] = checkpoint.TaskUpdates(path)
        try:
            journal.update(fid, status)
        except OSError as e:
            self.metrics["checkpoint_errors"] += 1
            log.error("Cannot checkpoint an update of task {tid}: {e}", tid=tid, e=e)

    def _journal_acked(self, fid: str, status: dict) -> None:
        tid = mj.id_of(status, "task_id")
        journal = self._journals.get((fid, tid))
        if journal is None:
            return
        try:
            journal.ack(status["uuid"])
        except OSError as e:
            self.metrics["checkpoint_errors"] += 1
            log.error("Cannot checkpoint an acknowledgement for task {tid}: {e}", tid=tid, e=e)
        if mj.is_terminal(status.get("state", "")):
            del self._journals[(fid, tid)]

    def _checkpoint(self, where, ids: tuple, name: str, value) -> bool:
        """Write `value` as `name` in the checkpoint directory `where(work_dir, agent_id,
        *ids)`, atomically; False (logged, counted) if it cannot be written."""
        if not self.agent_id:
            return False
        try:
            checkpoint.write_json(os.path.join(where(self.work_dir, self.agent_id, *ids), name),
                                  value)
            return True
        except (OSError, ValueError) as e:
            self.metrics["checkpoint_errors"] += 1
            log.error("Cannot checkpoint {name} of {ids}: {e}", name=name, ids=ids, e=e)
            return False

    def _checkpoint_framework(self, fw: st.Framework, force: bool = False) -> None:
        if not self.agent_id:
            return
        if not self._agent_checkpointed:
            try:
                checkpoint.write_json(checkpoint.agent_path(self.work_dir), {
                    "agent_id": self.agent_id, "hostname": self.hostname, "port": self.port,
                    "resources": self.resources.to_json(), "attributes": self.attributes})
                self._agent_checkpointed = True
            except OSError as e:
                self.metrics["checkpoint_errors"] += 1
                log.error("Cannot checkpoint the agent's info: {e}", e=e)
        if force or not fw.checkpointed:
            fw.checkpointed = self._checkpoint(checkpoint.framework_dir, (fw.framework_id,),
                                               checkpoint.FRAMEWORK_FILE, fw.info)

    def _checkpoint_tasks(self, fw: st.Framework, executor: st.Executor, entries) -> None:
        if not executor.container_id:
            return
        for how, ids in entries:
            for tid in ids:
                task = executor.tasks.get(tid)
                if task is not None:
                    self._checkpoint(checkpoint.meta_run_dir,
                                     (fw.framework_id, executor.executor_id,
                                      executor.container_id),
                                     os.path.join("tasks", tid, checkpoint.TASK_FILE),
                                     {"info": task.info, "how": how})

    # --- recovery ------------------------------------------------------------------------

    def _recover_books(self) -> Deferred:
        """Take back what an earlier agent process checkpointed in this work dir
        (`--recover reconnect`), or kill what it left running and start afresh (`cleanup`).
        RecoveryError when the checkpoint is not this agent's to recover."""
        hint = ("restart with --recover cleanup to kill what it left running and start as a "
                "new agent, or use another --work-dir")
        try:
            found = checkpoint.recover_agent(self.work_dir)
        except checkpoint.CheckpointError as e:
            raise RecoveryError(f"cannot recover the agent: {e}; {hint}") from None
        if found is None:
            return self.containerizer.recover([])  # whatever is left is an orphan
        for error in found.errors:
            log.error("Skipping an unreadable checkpoint: {error}", error=error)
        if self.recover == "cleanup":
            self._cleanup(found)
            return self.containerizer.recover([])
        saved = found.agent
        mismatches = []
        if saved.get("resources") != self.resources.to_json():
            try:
                before = str(Resources.from_json(saved.get("resources")))
            except (ValueError, TypeError):
                before = "?"
            mismatches.append(f"resources {before!r} (now {str(self.resources)!r})")
        if saved.get("attributes") != self.attributes:
            mismatches.append("attributes")
        if self.port and saved.get("port") and saved["port"] != self.port:
            mismatches.append(f"port {saved['port']} (now {self.port}; its executors would "
                              "not find this one)")
        if mismatches:
            raise RecoveryError(
                f"the checkpoint in {os.path.join(self.work_dir, checkpoint.META)} belongs to "
                f"agent {saved['agent_id']} with another configuration: "
                f"{'; '.join(mismatches)}; {hint}")
        self.agent_id = saved["agent_id"]
        self._agent_checkpointed = True
        if not self.port and saved.get("port"):
            self.port = saved["port"]  # executors connect back to where they were started
        waits = []
        for fid, recovered_fw in found.frameworks.items():
            fw = self.frameworks[fid] = st.Framework(recovered_fw.info)
            fw.checkpointed = True
            for eid, recovered in recovered_fw.executors.items():
                waits.append(self._recover_executor(fw, eid, recovered))
        d = DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)
        d.addCallback(lambda results: self._recovered([e for _, e in results], found))
        return d

    def _recovered(self, executors: list, found) -> Deferred:
        """Every recorded executor was looked for: fail the tasks of those that are gone,
        and let the containerizer destroy what no recovered container holds."""
        dead = [e for e in executors if e.container is None]
        log.info("Recovered agent {aid}: {f} framework(s), {e} executor(s), {d} of them gone",
                 aid=self.agent_id, f=len(found.frameworks), e=len(executors), d=len(dead))
        for executor in dead:
            executor.termination = ("TASK_FAILED", "REASON_EXECUTOR_TERMINATED",
                                    "The executor ended while the agent was down")
            self._executor_ended(executor.framework_id, executor, None,
                                 "ended while the agent was down")
        states = [ContainerState(e.container_id, e.container.pid, e.directory,
                                 self._container_config(self.frameworks[e.framework_id], e,
                                                        None).resources)
                  for e in executors if e.container is not None]
        return self.containerizer.recover(states)

    def _recover_executor(self, fw: st.Framework, eid: str, recovered) -> Deferred:
        """Rebuild an executor's books from its checkpoint and look for its container;
        fires with the Executor (its `container` None when it is gone)."""
        fid = fw.framework_id
        run = recovered.run
        executor = fw.executors[eid] = st.Executor(recovered.info, fid, recovered.kind)
        executor.container_id = run.container_id
        executor.directory = run.directory
        if run.directory and os.path.isdir(run.directory):
            self._attach(fw, executor, run.directory)
        staging: dict[str, list[str]] = {}
        for tid, recovered_task in run.tasks.items():
            task = st.Task(recovered_task.info, fid, eid)
            for record in recovered_task.records:
                if record["type"] == "UPDATE":
                    status = record["update"]["status"]
                    if all(s.get("uuid") != status["uuid"] for s in task.statuses):
                        task.statuses.append(status)
                        task.state = status["state"]
            replayed = checkpoint.replay(list(recovered_task.records))
            if replayed.terminal_acked:
                executor.completed_tasks.append(task)
                continue
            executor.tasks[tid] = task
            task.delivered = task.state != "TASK_STAGING"
            if not task.delivered:
                staging.setdefault(recovered_task.how, []).append(tid)
            path = checkpoint.task_updates_path(self.work_dir, self.agent_id, fid, eid,
                                                run.container_id, tid)
            self._journals[(fid, tid)] = checkpoint.TaskUpdates(path,
                                                                list(recovered_task.records))
            for status in replayed.pending:
                self.updates.update(fid, status)
        for how, ids in staging.items():
            if how == "group":
                executor.queue.append((how, ids))
            else:
                executor.queue.extend((how, [tid]) for tid in ids)
        if not run.pid:
            return succeed(executor)
        d = self.containerizer.recover_container(run.container_id, run.pid, run.start_ticks,
                                                 checkpoint.process_start_ticks)

        def attached(container):
            if container is None:
                return executor
            executor.container = container
            executor.state = st.RUNNING
            container.exited.addCallback(
                lambda status: self._executor_ended(fid, executor, status))
            executor.registration_timer = self.reactor.callLater(
                self.executor_reregistration_timeout, self._reregistration_timed_out, executor)
            log.info("Recovered executor {eid} of framework {fid} (pid {pid}); waiting for it "
                     "to re-subscribe", eid=eid, fid=fid, pid=run.pid)
            return executor

        return d.addCallback(attached)

    def _reregistration_timed_out(self, executor: st.Executor) -> None:
        executor.registration_timer = None
        if executor.connected or executor.state == st.TERMINATED:
            return
        timeout = mj.format_duration(self.executor_reregistration_timeout)
        log.warn("Recovered executor {eid} did not re-subscribe within {t}; killing it",
                 eid=executor.executor_id, t=timeout)
        self._kill_silent_executor(executor, "REASON_EXECUTOR_REREGISTRATION_TIMEOUT",
                                   f"Executor did not re-register within {timeout}")

    def _kill_silent_executor(self, executor: st.Executor, reason: str, message: str) -> None:
        """Kill an executor that never (re)subscribed; its tasks fail with `reason`."""
        executor.termination = ("TASK_FAILED", reason, message)
        executor.state = st.TERMINATING
        self.containerizer.destroy(executor.container)

    def _cleanup(self, found) -> None:
        """`--recover cleanup`: kill every executor an earlier agent left running, forget
        its checkpoint, and register as a new agent."""
        killed = 0
        for recovered_fw in found.frameworks.values():
            for recovered in recovered_fw.executors.values():
                run = recovered.run
                if not run.pid or self.containerizer.linux:
                    continue  # (the linux launcher's containers go as orphans: recover)
                container = launcher_recover(self.reactor, run.container_id, run.pid,
                                             run.start_ticks, checkpoint.process_start_ticks)
                if container is not None:
                    signal_session(run.pid, signal.SIGKILL)
                    container.destroy(0)
                    killed += 1
        shutil.rmtree(os.path.join(self.work_dir, checkpoint.META), ignore_errors=True)
        log.warn("--recover cleanup: killed {n} executor(s) of agent {aid} and dropped its "
                 "checkpoint; registering as a new agent", n=killed,
                 aid=found.agent["agent_id"])

    def _recover_updates(self) -> None:
        """Take back the unacknowledged updates journaled under this agent id (a restart
        with the same work dir and id): they are sent again until acknowledged."""
        streams, errors = checkpoint.recover_status_updates(self.work_dir, self.agent_id)
        for error in errors:
            log.error("Skipping a status update checkpoint: {error}", error=error)
        count = 0
        for stream in streams:
            key = (stream.framework_id, stream.task_id)
            if not stream.pending or key in self._journals:
                continue
            self._journals[key] = checkpoint.TaskUpdates(stream.path, list(stream.records))
            for status in stream.pending:
                count += self.updates.update(stream.framework_id, status)
        if count:
            log.info("Recovered {n} unacknowledged status update(s) from {dir}", n=count,
                     dir=checkpoint.meta_dir(self.work_dir, self.agent_id))

    # --- executors' heartbeats and usage ---------------------------------------------------

    def _heartbeat_executors(self) -> None:
        for fw in self.frameworks.values():
            for executor in fw.executors.values():
                self._send_event(executor, "HEARTBEAT")

    def usage(self, containers: list) -> dict:
        """(In a thread) usage per container id: the `usage` function given, else the
        processes' from /proc with what the isolators measure (cgroups) on top."""
        if self._usage is not None:
            return self._usage(containers)
        if not self.containerizer.linux:
            return monitor.posix_usage(containers)
        out = monitor.member_usage(containers)
        for cid, stats in self.containerizer.usage([c.container_id for c in containers]).items():
            out.setdefault(cid, {}).update(stats)
        return out

    def statistics(self) -> Deferred:
        """/monitor/statistics: one entry per running executor (the usage is read in a
        thread); fires with the list."""
        running = [e for fw in self.frameworks.values() for e in fw.executors.values()
                   if e.container is not None and e.container.running]
        d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self.usage,
                              [e.container for e in running])

        def build(usage: dict) -> list:
            now = time.time()
            entries = []
            for executor in running:
                stats = {"timestamp": now, "processes": 0, "threads": 0,
                         "cpus_user_time_secs": 0.0, "cpus_system_time_secs": 0.0,
                         "mem_rss_bytes": 0}
                # The limits the resources imply, unless the cgroups say what they are.
                stats.update(monitor.limits(
                    [executor.info.get("resources")] +
                    [t.info.get("resources") for t in executor.tasks.values()
                     if not t.terminal]))
                stats.update(usage.get(executor.container_id) or {})
                entries.append(monitor.entry(
                    executor.executor_id, executor.info.get("name", ""),
                    executor.framework_id, executor.info.get("source", ""), stats))
            return entries

        return d.addCallback(build)

    @staticmethod
    def _lost_state(fw: st.Framework | None) -> str:
        partition_aware = fw is not None and "PARTITION_AWARE" in fw.capabilities()
        return "TASK_DROPPED" if partition_aware else "TASK_LOST"

    # --- killing and shutting down -------------------------------------------------------

    def _kill_task(self, fid: str, tid: str, kill_policy: dict | None) -> None:
        fw = self.frameworks.get(fid)
        executor = task = None
        if fw is not None:
            for candidate in fw.executors.values():
                task = candidate.tasks.get(tid)
                if task is not None:
                    executor = candidate
                    break
        if task is None:
            if fw is not None and any(tid == t.task_id for e in fw.executors.values()
                                      for t in e.completed_tasks):
                return  # it ended already; the master has (or will get) its terminal update
            log.warn("Asked to kill unknown task {tid} of framework {fid}", tid=tid, fid=fid)
            self._update_without_record(fid, tid, self._lost_state(fw), "REASON_TASK_UNKNOWN",
                                        "The agent does not know this task")
            return
        if task.terminal or executor.state == st.TERMINATED:
            return
        if not task.delivered:
            # Still queued: it never reached an executor, so the agent reports the kill.
            for _, ids in executor.queue:
                if tid in ids:
                    ids.remove(tid)
            self._agent_update(executor, task, "TASK_KILLED", "REASON_TASK_KILLED_DURING_LAUNCH",
                               "Killed before it was delivered to the executor")
            if not executor.subscribed and not executor.live_tasks():
                self._shutdown_executor(executor, ("TASK_KILLED", "REASON_EXECUTOR_TERMINATED",
                                                   "The executor was shut down"))
            return
        if not self._send_kill(executor, task, kill_policy):
            task.kill_requested = kill_policy or {}  # sent when the executor re-subscribes

    def _send_kill(self, executor: st.Executor, task: st.Task, kill_policy: dict | None) -> bool:
        payload = {"task_id": mj.ident(task.task_id)}
        if kill_policy:
            payload["kill_policy"] = kill_policy
        if self._send_event(executor, "KILL", payload):
            task.kill_requested = None
            return True
        return False

    def _shutdown_executor(self, executor: st.Executor, termination: tuple[str, str, str]) -> None:
        """SHUTDOWN to the executor, then kill its container after the grace period."""
        if executor.state == st.TERMINATED:
            return
        if executor.termination is None:
            executor.termination = termination
        if executor.state == st.TERMINATING:
            return
        executor.state = st.TERMINATING
        if executor.registration_timer is not None and executor.registration_timer.active():
            executor.registration_timer.cancel()
        executor.registration_timer = None
        if executor.container is None:
            # Still being prepared (its URIs are being fetched): it never starts.
            self._executor_ended(executor.framework_id, executor, None)
            return
        grace = self._shutdown_grace(executor)
        log.info("Shutting down executor {eid} of framework {fid}", eid=executor.executor_id,
                 fid=executor.framework_id)
        if self._send_event(executor, "SHUTDOWN"):
            executor.shutdown_timer = self.reactor.callLater(
                grace, lambda: self.containerizer.destroy(executor.container))
        else:
            self.containerizer.destroy(executor.container, grace)

    def _shutdown_framework(self, fid: str) -> None:
        fw = self.frameworks.get(fid)
        if fw is None:
            return
        fw.terminating = True
        for executor in list(fw.executors.values()):
            self._shutdown_executor(executor, ("TASK_KILLED", "REASON_FRAMEWORK_REMOVED",
                                               "The framework was removed"))
            self._maybe_forget_executor(fw, executor)
        if not fw.executors:
            self._forget_framework(fw)

    def _executor_ended(self, fid: str, executor: st.Executor, status: int | None,
                        what: str | None = None) -> None:
        """The executor's process is gone (or never started): settle its tasks."""
        self._cancel_timers(executor)
        executor.state = st.TERMINATED
        executor.exit_status = status
        self.metrics["executors_terminated"] += 1
        if executor.stream is not None:
            stream, executor.stream = executor.stream, None
            stream.close()
        if what is not None:
            pass
        elif status is None:
            what = "never started"
        elif not getattr(executor.container, "status_known", True):
            what = "exited (its status is unknown: it outlived an earlier agent process)"
        else:
            what = describe_status(status)
        log.info("Executor {eid} of framework {fid} {what}", eid=executor.executor_id, fid=fid,
                 what=what)
        if executor.termination is not None:
            state, reason, message = executor.termination
        elif executor.kind == st.COMMAND:
            state, reason, message = ("TASK_FAILED", "REASON_COMMAND_EXECUTOR_FAILED",
                                      f"Command executor {what}")
        else:
            state, reason, message = ("TASK_FAILED", "REASON_EXECUTOR_TERMINATED",
                                      f"Executor {what}")
        executor.queue = []
        for task in executor.live_tasks():
            self._agent_update(executor, task, state, reason, message)
        if executor.kind != st.COMMAND:
            self.link.send(protocol.ExitedExecutor(
                framework_id=fid, executor_id=executor.executor_id,
                status=status if status is not None else -1))
        if executor.container is not None and not self._stopping:
            # Whatever it left behind, and what its container held.
            self.containerizer.destroy(executor.container)
        fw = self.frameworks.get(fid)
        if fw is not None:
            self._maybe_forget_executor(fw, executor)

    def _maybe_forget_executor(self, fw: st.Framework, executor: st.Executor) -> None:
        """Move a finished executor to the completed list once its tasks are settled."""
        if executor.state != st.TERMINATED or (executor.tasks and not fw.terminating):
            return
        for task in executor.tasks.values():
            executor.completed_tasks.append(task)
        executor.tasks.clear()
        if fw.executors.get(executor.executor_id) is executor:
            del fw.executors[executor.executor_id]
            fw.completed_executors.append(executor)
            if fw.checkpoint and executor.container_id and not self._stopping:
                self._checkpoint(checkpoint.meta_run_dir,
                                 (fw.framework_id, executor.executor_id,
                                  executor.container_id), checkpoint.COMPLETED_FILE, {})
            self._schedule_gc(executor)
        if not fw.executors and (fw.terminating or not self._stopping):
            self._forget_framework(fw)

    def _forget_framework(self, fw: st.Framework) -> None:
        if self.frameworks.get(fw.framework_id) is fw:
            del self.frameworks[fw.framework_id]
            self.completed_frameworks.append(fw)
        if fw.terminating:
            # Nobody will acknowledge these any more (Mesos cleans them up the same way).
            self.updates.streams.remove(fw.framework_id)
            for key in [k for k in self._journals if k[0] == fw.framework_id]:
                del self._journals[key]

    # --- sandbox collection ----------------------------------------------------------------

    def _schedule_gc(self, executor: st.Executor) -> None:
        """A finished run's sandbox (and its checkpoints) go after the GC delay (Mesos)."""
        if self._stopping or executor.directory is None:
            return
        self.gc.schedule(executor.directory)
        if self.agent_id and executor.container_id:
            meta = checkpoint.meta_run_dir(self.work_dir, self.agent_id, executor.framework_id,
                                           executor.executor_id, executor.container_id)
            if os.path.isdir(meta):
                self.gc.schedule(meta)

    def _sandbox_removed(self, path: str) -> None:
        """The collector removed a run directory: stop serving it, and remove the executor's
        and the framework's directories too once nothing of theirs is left."""
        self.files.detach_under(path)
        runs = os.path.dirname(path)
        executor_dir = os.path.dirname(runs)
        executors = os.path.dirname(executor_dir)
        framework_dir = os.path.dirname(executors)
        if os.path.basename(runs) != "runs" or os.path.basename(executors) != "executors":
            return
        fid, eid = os.path.basename(framework_dir), os.path.basename(executor_dir)
        fw = self.frameworks.get(fid)
        try:
            if fw is None or eid not in fw.executors:
                left = os.listdir(runs)
                # Only the `latest` link (dangling now) and its temporary names remain.
                if all(n == sandbox.LATEST or n.startswith("." + sandbox.LATEST) for n in left):
                    for name in left:
                        os.unlink(os.path.join(runs, name))
                    os.rmdir(runs)
                    os.rmdir(executor_dir)
            if fw is None:
                os.rmdir(executors)
                os.rmdir(framework_dir)
        except OSError:
            pass  # not empty (another run, or a new launch): it stays

    def _to_executor_message(self, msg: protocol.FrameworkMessage) -> None:
        fw = self.frameworks.get(msg.framework_id)
        executor = fw.executors.get(msg.executor_id) if fw else None
        if executor is None or not self._send_event(executor, "MESSAGE",
                                                    {"data": mj.b64(msg.data)}):
            self.metrics["invalid_framework_messages"] += 1
            log.warn("Dropping a framework message for executor {eid} of framework {fid}: "
                     "it is not connected", eid=msg.executor_id, fid=msg.framework_id)
            return
        self.metrics["valid_framework_messages"] += 1

    @staticmethod
    def _cancel_timers(executor: st.Executor) -> None:
        for name in ("registration_timer", "shutdown_timer"):
            timer = getattr(executor, name)
            if timer is not None and timer.active():
                timer.cancel()
            setattr(executor, name, None)
