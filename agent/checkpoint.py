"""Checkpoints under the agent's work dir: status update journals, written so no crash tears them.

    <work_dir>/meta/slaves/<agent_id>/frameworks/<framework_id>/executors/<executor_id>/
        runs/<container_id>/tasks/<task_id>/task.updates

The layout is Mesos's (`src/slave/paths.cpp`). A `task.updates` file is the task's stream as
a journal, one JSON record per line, as Mesos's `StatusUpdateRecord`s:

    {"type": "UPDATE", "update": {"framework_id": {"value": ...}, "status": TaskStatus}}
    {"type": "ACK", "uuid": "<base64 of the acknowledged update's uuid>"}

Mesos appends to the file; here every change rewrites it whole through `atomic_write`
(temporary file, fsync, rename, fsync of the directory), so a reader sees the old journal
or the new one, never half a record. Journals are short: a task has a handful of updates.

`replay` folds a journal into what is still unacknowledged; `recover_status_updates` reads
every journal of an agent. Both only read; the agent decides what to do with the result.
Only frameworks with `checkpoint: true` are journaled (as in Mesos): an fsync per update is
the price, and only a framework that asked for recovery can use it.
"""

from __future__ import annotations

import json
import os
import tempfile

import attrs

from agora import mesos_json as mj

from agent import sandbox
from agent.procfs import stat_fields

META = "meta"
UPDATES_FILE = "task.updates"


class CheckpointError(Exception):
    """A checkpoint that cannot be read back (corrupt or not ours); says which and why."""


def meta_dir(work_dir: str, agent_id: str) -> str:
    """Where an agent's checkpoints live."""
    return os.path.join(work_dir, META, "slaves", sandbox.check_id("agent id", agent_id))


def meta_run_dir(work_dir: str, agent_id: str, framework_id: str, executor_id: str,
                 container_id: str) -> str:
    """The checkpoint directory of one executor run (Mesos: getExecutorRunPath under meta)."""
    return os.path.join(meta_dir(work_dir, agent_id),
                        "frameworks", sandbox.check_id("framework id", framework_id),
                        "executors", sandbox.check_id("executor id", executor_id),
                        "runs", sandbox.check_id("container id", container_id))


def task_updates_path(work_dir: str, agent_id: str, framework_id: str, executor_id: str,
                      container_id: str, task_id: str) -> str:
    """The journal of one task's status updates."""
    return os.path.join(meta_run_dir(work_dir, agent_id, framework_id, executor_id,
                                     container_id),
                        "tasks", sandbox.check_id("task id", task_id), UPDATES_FILE)


def atomic_write(path: str, data: bytes, durable: bool = True) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new content.

    Temporary file in the same directory, fsync, rename over `path`, fsync the directory
    (the rename itself must survive too). Creates missing parent directories. Without
    `durable` (runtime state that a reboot makes moot) the fsyncs are skipped: readers
    still never see a partial file.
    """
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    if not durable:
        return
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class TaskUpdates:
    """The journal of one task's stream, kept in memory and rewritten on every change."""

    def __init__(self, path: str, records: list[dict] | None = None):
        self.path = path
        self.records: list[dict] = list(records or [])
        self._uuids = {r["update"]["status"]["uuid"] for r in self.records
                       if r.get("type") == "UPDATE"}

    def update(self, framework_id: str, status: dict) -> bool:
        """Journal an update taken into the stream; False (nothing written) if it is known."""
        if status["uuid"] in self._uuids:
            return False
        self._uuids.add(status["uuid"])
        self.records.append({"type": "UPDATE", "update": {
            "framework_id": mj.ident(framework_id), "status": status}})
        self._write()
        return True

    def ack(self, uuid: str) -> None:
        """Journal the acknowledgement of `uuid`."""
        self.records.append({"type": "ACK", "uuid": uuid})
        self._write()

    def _write(self) -> None:
        atomic_write(self.path, encode(self.records))


def encode(records: list[dict]) -> bytes:
    return b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n" for r in records)


def read_records(path: str) -> list[dict]:
    """The records of a journal; CheckpointError if a line is not a record."""
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if record.get("type") == "UPDATE":
                status = record["update"]["status"]
                mj.id_of(status, "task_id")
                if not isinstance(status.get("uuid"), str):
                    raise ValueError("the status has no uuid")
            elif record.get("type") != "ACK" or not isinstance(record.get("uuid"), str):
                raise ValueError("neither an UPDATE nor an ACK record")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path}, line {number}: not a status update record "
                                  f"({e})") from None
        records.append(record)
    return records


@attrs.frozen
class Replayed:
    """A journal folded: the updates still waiting for an ack, in order."""

    pending: tuple[dict, ...]  # TaskStatus dicts, oldest first
    terminal_acked: bool  # the stream is over: its terminal update was acknowledged


def replay(records: list[dict]) -> Replayed:
    """Apply the journal's records in order, with the stream's own rules (Mesos's replay):
    a repeated uuid is ignored, an ACK releases the head only if it names it."""
    queue: list[dict] = []
    seen: set[str] = set()
    terminal_acked = False
    for record in records:
        if record["type"] == "UPDATE":
            status = record["update"]["status"]
            if status["uuid"] not in seen:
                seen.add(status["uuid"])
                queue.append(status)
        elif queue and queue[0]["uuid"] == record["uuid"]:
            acked = queue.pop(0)
            terminal_acked = terminal_acked or mj.is_terminal(acked.get("state", ""))
    return Replayed(pending=tuple(queue), terminal_acked=terminal_acked)


@attrs.frozen
class RecoveredStream:
    """One task's journal found on disk, and what it still owes the master."""

    framework_id: str
    executor_id: str
    container_id: str
    task_id: str
    path: str
    records: tuple[dict, ...]
    pending: tuple[dict, ...]
    terminal_acked: bool


def recover_status_updates(work_dir: str, agent_id: str
                           ) -> tuple[list[RecoveredStream], list[str]]:
    """Every task journal of `agent_id` under `work_dir`: (streams, errors).

    A journal that cannot be read is reported in `errors` (one line each) and skipped; the
    rest are still recovered. Order: by framework, executor, run and task id.
    """
    root = os.path.join(meta_dir(work_dir, agent_id), "frameworks")
    streams, errors = [], []
    for fid in _listdir(root):
        executors = os.path.join(root, fid, "executors")
        for eid in _listdir(executors):
            runs = os.path.join(executors, eid, "runs")
            for cid in _listdir(runs):
                if cid == sandbox.LATEST:
                    continue
                tasks = os.path.join(runs, cid, "tasks")
                for tid in _listdir(tasks):
                    path = os.path.join(tasks, tid, UPDATES_FILE)
                    if not os.path.exists(path):
                        continue
                    try:
                        records = read_records(path)
                    except CheckpointError as e:
                        errors.append(str(e))
                        continue
                    state = replay(records)
                    streams.append(RecoveredStream(
                        framework_id=fid, executor_id=eid, container_id=cid, task_id=tid,
                        path=path, records=tuple(records), pending=state.pending,
                        terminal_acked=state.terminal_acked))
    return streams, errors


def _listdir(path: str) -> list[str]:
    try:
        return sorted(name for name in os.listdir(path) if not name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


# --- the agent's books -----------------------------------------------------------------------
#
#   <work_dir>/meta/agent.json                                  id, hostname, port, resources
#   meta/slaves/<agent>/frameworks/<fw>/framework.info          FrameworkInfo
#       .../executors/<ex>/executor.info                        {"info": ExecutorInfo, "kind"}
#       .../executors/<ex>/runs/<container>/run.json            {pid, start_ticks, directory}
#       .../runs/<container>/completed                          the run is over and forgotten
#       .../runs/<container>/tasks/<task>/task.info             {"info": TaskInfo, "how"}
#
# Written only for frameworks with `checkpoint: true`, as Mesos does: the others' executors
# give up on their own once the agent is gone (a few seconds), so there is nothing to recover.

AGENT_FILE = "agent.json"
FRAMEWORK_FILE = "framework.info"
EXECUTOR_FILE = "executor.info"
RUN_FILE = "run.json"
COMPLETED_FILE = "completed"
TASK_FILE = "task.info"


def agent_path(work_dir: str) -> str:
    return os.path.join(work_dir, META, AGENT_FILE)


def framework_dir(work_dir: str, agent_id: str, framework_id: str) -> str:
    return os.path.join(meta_dir(work_dir, agent_id), "frameworks",
                        sandbox.check_id("framework id", framework_id))


def executor_meta_dir(work_dir: str, agent_id: str, framework_id: str,
                      executor_id: str) -> str:
    return os.path.join(framework_dir(work_dir, agent_id, framework_id), "executors",
                        sandbox.check_id("executor id", executor_id))


def task_info_path(work_dir: str, agent_id: str, framework_id: str, executor_id: str,
                   container_id: str, task_id: str) -> str:
    return os.path.join(meta_run_dir(work_dir, agent_id, framework_id, executor_id,
                                     container_id),
                        "tasks", sandbox.check_id("task id", task_id), TASK_FILE)


def write_json(path: str, value) -> None:
    atomic_write(path, json.dumps(value, separators=(",", ":")).encode())


def read_json(path: str):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise CheckpointError(f"{path} is not JSON: {e}") from None


def process_start_ticks(pid: int) -> int | None:
    """When `pid` started (clock ticks after boot, /proc/<pid>/stat field 22), or None if it
    is gone or a zombie. A pid with another start time is another process (pid reuse)."""
    fields = stat_fields(pid)
    return int(fields[19]) if fields is not None else None


@attrs.frozen
class RecoveredTask:
    info: dict
    how: str  # "task" or "group": how it is delivered to its executor
    records: tuple[dict, ...]  # its status update journal (empty if none)


@attrs.frozen
class RecoveredRun:
    container_id: str
    pid: int | None  # None: the agent went before the container started
    start_ticks: int | None
    directory: str | None
    tasks: dict  # task id -> RecoveredTask


@attrs.frozen
class RecoveredExecutor:
    info: dict
    kind: str
    run: RecoveredRun | None  # the run not yet completed; None if every run is over


@attrs.frozen
class RecoveredFramework:
    info: dict
    executors: dict  # executor id -> RecoveredExecutor


@attrs.frozen
class RecoveredAgent:
    """What a work dir's checkpoint holds: the agent and its live books."""

    agent: dict  # {agent_id, hostname, port, resources, attributes}
    frameworks: dict  # framework id -> RecoveredFramework
    errors: tuple[str, ...]  # checkpoints that could not be read (skipped)


def recover_agent(work_dir: str) -> RecoveredAgent | None:
    """The checkpointed books under `work_dir`, or None if there is no agent checkpoint.
    CheckpointError if `meta/agent.json` itself is unreadable; anything below it that cannot
    be read is skipped and reported in `errors`."""
    if not os.path.exists(agent_path(work_dir)):
        return None
    agent = read_json(agent_path(work_dir))
    if not isinstance(agent, dict) or not isinstance(agent.get("agent_id"), str):
        raise CheckpointError(f"{agent_path(work_dir)} does not name an agent id")
    aid = agent["agent_id"]
    errors: list[str] = []
    frameworks = {}
    root = os.path.join(meta_dir(work_dir, aid), "frameworks")
    for fid in _listdir(root):
        try:
            info = read_json(os.path.join(root, fid, FRAMEWORK_FILE))
        except CheckpointError as e:
            errors.append(str(e))
            continue
        executors = {}
        for eid in _listdir(os.path.join(root, fid, "executors")):
            try:
                executor = _recover_executor(os.path.join(root, fid, "executors", eid))
            except (CheckpointError, KeyError, TypeError, ValueError) as e:
                errors.append(f"executor {eid} of framework {fid}: {e}")
                continue
            if executor is not None and executor.run is not None:
                executors[eid] = executor
        if executors:
            frameworks[fid] = RecoveredFramework(info, executors)
    return RecoveredAgent(agent, frameworks, tuple(errors))


def _recover_executor(path: str) -> RecoveredExecutor | None:
    if not os.path.exists(os.path.join(path, EXECUTOR_FILE)):
        return None
    meta = read_json(os.path.join(path, EXECUTOR_FILE))
    run = None
    runs = os.path.join(path, "runs")
    for cid in _listdir(runs):
        if cid == sandbox.LATEST or os.path.exists(os.path.join(runs, cid, COMPLETED_FILE)):
            continue
        run_meta = {}
        if os.path.exists(os.path.join(runs, cid, RUN_FILE)):
            run_meta = read_json(os.path.join(runs, cid, RUN_FILE))
        tasks = {}
        for tid in _listdir(os.path.join(runs, cid, "tasks")):
            task_dir = os.path.join(runs, cid, "tasks", tid)
            if not os.path.exists(os.path.join(task_dir, TASK_FILE)):
                continue
            task = read_json(os.path.join(task_dir, TASK_FILE))
            journal = os.path.join(task_dir, UPDATES_FILE)
            records = read_records(journal) if os.path.exists(journal) else []
            tasks[tid] = RecoveredTask(task["info"], task.get("how", "task"), tuple(records))
        run = RecoveredRun(cid, run_meta.get("pid"), run_meta.get("start_ticks"),
                           run_meta.get("directory"), tasks)
    return RecoveredExecutor(meta["info"], meta["kind"], run)
