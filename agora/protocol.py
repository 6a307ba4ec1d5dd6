"""Messages between master and agent, and their msgpack encoding.

An agent opens one TCP connection to the master's own port and sends `PREFIX` first, so
the master can tell it from HTTP by the first bytes. After that both sides send frames: a
4-byte big-endian length, then that many bytes of one msgpack array, a batch of messages,
each message `[tag, field, field, ...]`. Framing lets a link decode each batch with one
`msgpack.unpackb`, so a connection holds no streaming unpacker (one costs ~44 KB and
30-100 µs to make: that was a fifth of a new leader's work with 10,000 agents reconnecting).
Task, executor and framework descriptions travel as Mesos v1 JSON dicts: they come from
schedulers as JSON and go to executors as JSON, so there is nothing to gain by re-modelling
them here. One exception: a re-registering agent's TaskInfos travel packed into bytes of
their own (`task_entry`). This module is the only one that knows the encoding.
"""

import hashlib
import hmac
import struct
from typing import Any

import attrs
import msgpack

PREFIX = b"AGORA2\n"  # 2: length-framed batches (1 was a bare msgpack stream)
MAX_BATCH_BYTES = 64 * 1024 * 1024


def _message(cls):
    return attrs.frozen(cls)


# --- handshake and registration -------------------------------------------------------


@_message
class Challenge:
    """Master -> agent, first message: prove you know the shared secret (if any).

    `leading`: this master leads (or was elected and reads its registry), so it will answer
    the registration, however long its queue; a follower ignores registrations.
    """

    nonce: bytes
    master_id: str
    leading: bool = False


@_message
class RegisterAgent:
    """Agent -> master: a new agent asks to be admitted.

    `info` is the AgentInfo JSON: hostname, port, resources (Mesos JSON list), attributes.
    """

    info: dict
    version: str
    proof: bytes = b""


@_message
class ReregisterAgent:
    """Agent -> master: a known agent comes back with what it runs.

    `executors` are ExecutorInfo JSON dicts (with framework_id), `tasks` are `task_entry`
    dicts, `frameworks` are FrameworkInfo JSON dicts.
    """

    agent_id: str
    info: dict
    version: str
    executors: list = attrs.field(factory=list)
    tasks: list = attrs.field(factory=list)
    frameworks: list = attrs.field(factory=list)
    proof: bytes = b""


@_message
class AgentRegistered:
    """Master -> agent: admitted (or re-admitted) under `agent_id`."""

    agent_id: str
    master_id: str
    ping_interval: float


@_message
class AgentRefused:
    """Master -> agent: registration refused; the agent must not retry as it is."""

    message: str


# --- tasks and executors --------------------------------------------------------------


@_message
class RunTask:
    """Master -> agent: launch `task` (TaskInfo JSON) for `framework` (FrameworkInfo JSON)."""

    framework: dict
    task: dict


@_message
class RunTaskGroup:
    """Master -> agent: launch a task group under the default executor."""

    framework: dict
    executor: dict
    task_group: dict


@_message
class KillTask:
    """Master -> agent: kill a task, optionally overriding its kill policy."""

    framework_id: str
    task_id: str
    kill_policy: dict | None = None


@_message
class StatusUpdate:
    """Agent -> master: a task's status changed; `status` is TaskStatus JSON with a uuid."""

    framework_id: str
    status: dict


@_message
class StatusUpdateAck:
    """Master -> agent: the scheduler acknowledged the update with `uuid` (base64)."""

    framework_id: str
    task_id: str
    uuid: str


@_message
class FrameworkMessage:
    """Either way: opaque bytes between a scheduler and an executor."""

    framework_id: str
    executor_id: str
    data: bytes


@_message
class ShutdownExecutor:
    """Master -> agent: shut an executor down (its tasks are killed)."""

    framework_id: str
    executor_id: str


@_message
class ShutdownFramework:
    """Master -> agent: kill everything the framework runs on the agent."""

    framework_id: str


@_message
class ExitedExecutor:
    """Agent -> master: an executor's process ended with `status` (wait status)."""

    framework_id: str
    executor_id: str
    status: int


@_message
class UpdateFramework:
    """Master -> agent: a framework's info changed (e.g. after re-subscription)."""

    framework: dict


# --- liveness -------------------------------------------------------------------------


@_message
class Ping:
    """Master -> agent: are you there?"""

    seq: int = 0


@_message
class Pong:
    """Agent -> master: yes."""

    seq: int = 0


@_message
class ShutdownAgent:
    """Master -> agent: stop; the agent was removed from the cluster."""

    message: str


MESSAGES = (
    Challenge, RegisterAgent, ReregisterAgent, AgentRegistered, AgentRefused,
    RunTask, RunTaskGroup, KillTask, StatusUpdate, StatusUpdateAck, FrameworkMessage,
    ShutdownExecutor, ShutdownFramework, ExitedExecutor, UpdateFramework,
    Ping, Pong, ShutdownAgent,
)
_TAGS = {cls: tag for tag, cls in enumerate(MESSAGES)}
_FIELDS = {cls: tuple(a.name for a in attrs.fields(cls)) for cls in MESSAGES}


class ProtocolError(ValueError):
    """The peer sent bytes that are not a valid message batch."""


_FRAME = struct.Struct(">I")


def encode(messages: list) -> bytes:
    """One batch of messages as a frame: its length, then msgpack bytes."""
    body = msgpack.packb(
        [[_TAGS[type(m)], *(getattr(m, f) for f in _FIELDS[type(m)])] for m in messages],
        use_bin_type=True,
    )
    return _FRAME.pack(len(body)) + body


def _decode_message(item: Any):
    if not isinstance(item, list) or not item or not isinstance(item[0], int):
        raise ProtocolError(f"not a message: {item!r:.80}")
    tag = item[0]
    if not 0 <= tag < len(MESSAGES):
        raise ProtocolError(f"unknown message tag {tag}")
    cls = MESSAGES[tag]
    try:
        return cls(*item[1:])
    except TypeError as e:
        raise ProtocolError(f"bad {cls.__name__}: {e}") from None


class Decoder:
    """Turns a byte stream into messages; feed it whatever arrives.

    Holds only the bytes of an incomplete frame (none, between batches), and appends to them
    without re-parsing, so a big batch arriving in many reads costs its length once.
    """

    def __init__(self, max_bytes: int = MAX_BATCH_BYTES):
        self.max_bytes = max_bytes
        self._partial = bytearray()
        self._need = 0  # bytes `_partial` must reach before a frame can be complete

    def feed(self, data: bytes) -> list:
        if self._partial:
            self._partial += data
            if len(self._partial) < self._need:
                return []
            data, self._partial = self._partial, bytearray()
        out: list = []
        view, pos, end = memoryview(data), 0, len(data)
        with view:
            while end - pos >= _FRAME.size:
                (size,) = _FRAME.unpack_from(view, pos)
                if size > self.max_bytes:
                    raise ProtocolError(f"a batch of {size} bytes is over the "
                                        f"{self.max_bytes}-byte limit")
                start = pos + _FRAME.size
                if end - start < size:
                    break
                pos = start + size
                out.extend(_decode_batch(view[start:pos]))
            if pos < end:
                self._partial = bytearray(view[pos:])
                self._need = (_FRAME.size + size) if end - pos >= _FRAME.size else _FRAME.size
        return out


def _decode_batch(frame) -> list:
    batch = unpacked(frame)
    if not isinstance(batch, list):
        raise ProtocolError("a batch must be an array")
    return [_decode_message(item) for item in batch]


def task_entry(task_id: str, framework_id: str, executor_id: str, state: str, info: dict,
               status: dict | None = None) -> dict:
    """A task as a ReregisterAgent carries it: ids, state, latest status, and its TaskInfo
    and that TaskInfo's resources each packed into msgpack bytes of their own.

    A new leader taking back 10,000 agents reads the resources of every task but the rest
    of a TaskInfo only when something shows the task, so it keeps the bytes (`unpacked`
    on first use): decoding 100,000 TaskInfos was a quarter of its work, and most of its
    memory afterwards. A master also accepts `info` as a dict (what agents sent before).
    """
    entry = {"task_id": {"value": task_id}, "framework_id": {"value": framework_id},
             "executor_id": {"value": executor_id}, "state": state, "info": packed(info),
             "resources": packed(info.get("resources") or [])}
    if status is not None:
        entry["status"] = status
    return entry


def packed(value: Any) -> bytes:
    """`value` as msgpack bytes (for a field decoded only when it is needed)."""
    return msgpack.packb(value, use_bin_type=True)


def unpacked(blob: bytes) -> Any:
    """What `packed` made; ProtocolError for bytes it did not make."""
    try:
        return msgpack.unpackb(blob, raw=False)
    except Exception as e:  # msgpack raises several types for garbage
        raise ProtocolError(f"undecodable bytes: {e}") from None


def proof(secret: bytes, nonce: bytes) -> bytes:
    """The answer to a Challenge: HMAC-SHA256 of the nonce under the shared secret."""
    return hmac.new(secret, nonce, hashlib.sha256).digest()


def check_proof(secret: bytes | None, nonce: bytes, given: bytes) -> bool:
    """True when no secret is configured or `given` answers the challenge."""
    if not secret:
        return True
    return hmac.compare_digest(proof(secret, nonce), given or b"")
