"""`POST /api/v1/executor`: the Mesos v1 executor API, as pymesos and our executors speak it.

    SUBSCRIBE  -> 200, chunked RecordIO: SUBSCRIBED, then queued LAUNCH / LAUNCH_GROUP,
                  later KILL, ACKNOWLEDGED, MESSAGE, SHUTDOWN (spec §4.2-4.3)
    UPDATE     -> 202 once the agent has taken the update; ACKNOWLEDGED follows on the stream
    MESSAGE    -> 202; the data goes to the scheduler
    HEARTBEAT  -> 202

Errors follow Mesos (src/slave/http.cpp): 400 for malformed calls and for unknown frameworks
or executors, 403 for calls before SUBSCRIBE. This module parses and validates; what a
call *does* is up to the `ExecutorHost` (the agent).
"""

from __future__ import annotations

from typing import Protocol

from agora import mesos_json as mj
from agora.http import HTTPError, Request, Stream, StreamingResponse, empty_response

#: Every 202 asks the client to reconnect for the next call: an executor's kept-alive
#: connection would otherwise break when the agent restarts (spec §5.1 #2).
_ACCEPTED_HEADERS = (("Connection", "close"),)


class ExecutorHost(Protocol):
    """What the executor API needs from the agent."""

    def find_executor(self, framework_id: str, executor_id: str):
        """The executor record, or raise HTTPError(400) saying which id is unknown."""

    def subscribe(self, executor, stream: Stream, unacknowledged_tasks: list,
                  unacknowledged_updates: list) -> None:
        """Attach `stream` to the executor and send SUBSCRIBED and what is queued."""

    def executor_update(self, executor, status: dict) -> None:
        """Take a validated TaskStatus from the executor (HTTPError to refuse it)."""

    def executor_message(self, executor, data: bytes) -> None:
        """Forward a framework message from the executor to its scheduler."""


def validate_status(status, executor_id: str) -> dict:
    """The TaskStatus of an UPDATE call if Mesos would take it; HTTPError(400) otherwise."""
    if not isinstance(status, dict):
        raise HTTPError(400, "UPDATE needs 'update.status', a TaskStatus object")
    try:
        mj.id_of(status, "task_id")
    except mj.InvalidMessage:
        raise HTTPError(400, "'update.status.task_id.value' is missing") from None
    state = status.get("state")
    if state not in mj.TASK_STATES:
        raise HTTPError(400, f"'update.status.state' {state!r} is not a task state")
    if state == "TASK_STAGING":
        raise HTTPError(400, "An executor cannot send TASK_STAGING (the agent reports it)")
    if not mj.valid_uuid_b64(status.get("uuid")):
        raise HTTPError(400, "'update.status.uuid' must be the standard base64 of 16 UUID bytes "
                             f"(got {status.get('uuid')!r:.60})")
    source = status.get("source", "SOURCE_EXECUTOR")
    if source != "SOURCE_EXECUTOR":
        raise HTTPError(400, f"'update.status.source' must be SOURCE_EXECUTOR, not {source!r}")
    eid = mj.id_of(status, "executor_id", required=False)
    if eid is not None and eid != executor_id:
        raise HTTPError(400, f"'update.status.executor_id' {eid!r} is not the caller "
                             f"{executor_id!r}")
    return status


class ExecutorAPI:
    """The request handler for /api/v1/executor."""

    def __init__(self, host: ExecutorHost):
        self.host = host

    def __call__(self, request: Request):
        content_type = request.header("content-type", "application/json")
        if "protobuf" in content_type:
            raise HTTPError(415, "Only JSON is supported: send Content-Type: application/json")
        call = request.json()
        if not isinstance(call, dict):
            raise HTTPError(400, "The call must be a JSON object")
        kind = call.get("type")
        try:
            framework_id = mj.id_of(call, "framework_id")
            executor_id = mj.id_of(call, "executor_id")
        except mj.InvalidMessage as e:
            raise HTTPError(400, f"Malformed {kind or 'call'}: {e}") from None
        executor = self.host.find_executor(framework_id, executor_id)
        if kind == "SUBSCRIBE":
            return self._subscribe(executor, call)
        if kind not in ("UPDATE", "MESSAGE", "HEARTBEAT"):
            raise HTTPError(400, f"Unknown call type {kind!r}: expected SUBSCRIBE, UPDATE, "
                                 "MESSAGE or HEARTBEAT")
        if not executor.subscribed:
            raise HTTPError(403, "Executor is not subscribed")
        if kind == "UPDATE":
            status = validate_status((call.get("update") or {}).get("status"), executor_id)
            self.host.executor_update(executor, status)
        elif kind == "MESSAGE":
            data = (call.get("message") or {}).get("data")
            try:
                raw = mj.unb64(data) if isinstance(data, str) else None
            except mj.InvalidMessage:
                raw = None
            if raw is None:
                raise HTTPError(400, "'message.data' must be standard (padded) base64")
            self.host.executor_message(executor, raw)
        return empty_response(202, _ACCEPTED_HEADERS)

    def _subscribe(self, executor, call: dict) -> StreamingResponse:
        body = call.get("subscribe") or {}
        tasks = body.get("unacknowledged_tasks") or []
        updates = body.get("unacknowledged_updates") or []
        if not isinstance(tasks, list) or not isinstance(updates, list):
            raise HTTPError(400, "'subscribe.unacknowledged_tasks' and "
                                 "'unacknowledged_updates' must be lists")
        return StreamingResponse(
            lambda stream: self.host.subscribe(executor, stream, tasks, updates))
