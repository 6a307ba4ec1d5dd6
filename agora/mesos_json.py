"""The Mesos v1 JSON model: ids, task states, statuses, events, durations.

Mesos messages travel as plain dicts in the proto's JSON form (snake_case keys, enums as
names, ids as {"value": ...}, bytes as padded base64). This module holds the few rules
that every component needs to agree on. Pure: no I/O.
"""

import base64
import binascii
import ipaddress
import socket
import struct
import uuid as _uuid

MESOS_VERSION = "1.11.0"

TERMINAL_STATES = frozenset({
    "TASK_FINISHED", "TASK_FAILED", "TASK_KILLED", "TASK_ERROR", "TASK_LOST",
    "TASK_DROPPED", "TASK_GONE", "TASK_GONE_BY_OPERATOR",
})
TASK_STATES = TERMINAL_STATES | {
    "TASK_STAGING", "TASK_STARTING", "TASK_RUNNING", "TASK_KILLING", "TASK_UNREACHABLE",
    "TASK_UNKNOWN",
}


class InvalidMessage(ValueError):
    """A JSON message lacks a required field or has a wrong one."""


def ident(value: str) -> dict:
    """A Mesos id object."""
    return {"value": value}


def id_of(obj, key: str, required: bool = True) -> str | None:
    """The string inside obj[key]["value"]; InvalidMessage when required and missing."""
    item = obj.get(key) if isinstance(obj, dict) else None
    if isinstance(item, dict) and isinstance(item.get("value"), str) and item["value"]:
        return item["value"]
    if required:
        raise InvalidMessage(f"missing '{key}.value'")
    return None


def new_uuid() -> bytes:
    return _uuid.uuid4().bytes


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    """Decode standard padded base64; InvalidMessage if it is not."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise InvalidMessage(f"not base64: {text!r:.40}") from None


def valid_uuid_b64(text) -> bool:
    """True for base64 of exactly 16 bytes (what pymesos's executor demands)."""
    if not isinstance(text, str):
        return False
    try:
        return len(unb64(text)) == 16
    except InvalidMessage:
        return False


def is_terminal(state: str) -> bool:
    return state in TERMINAL_STATES


def task_status(task_id: str, state: str, *, source: str, timestamp: float,
                agent_id: str | None = None, executor_id: str | None = None,
                reason: str | None = None, message: str | None = None,
                uuid: bytes | None = None, data: str | None = None, **extra) -> dict:
    """A TaskStatus dict with only the set fields."""
    status = {"task_id": ident(task_id), "state": state, "source": source,
              "timestamp": float(timestamp)}
    if agent_id:
        status["agent_id"] = ident(agent_id)
    if executor_id:
        status["executor_id"] = ident(executor_id)
    if reason:
        status["reason"] = reason
    if message:
        status["message"] = message
    if uuid is not None:
        status["uuid"] = b64(uuid)
    if data is not None:
        status["data"] = data
    status.update(extra)
    return status


def status_view(state: str, timestamp, status: dict | None = None) -> dict:
    """A TaskStatus as a /state `statuses` entry shows it (Mesos's `model(TaskStatus)`): state
    and timestamp, and the labels, container status (Mesos-DNS reads the task's IP there)
    and health of `status`, where it has them."""
    view = {"state": state, "timestamp": timestamp}
    if status:
        for key in ("labels", "container_status", "healthy"):
            if key in status:
                view[key] = status[key]
    return view


def event(kind: str, payload: dict | None = None) -> dict:
    """A scheduler/executor/operator event: the payload under the lower-cased type."""
    if payload is None:
        return {"type": kind}
    return {"type": kind, kind.lower(): payload}


_DURATION_UNITS = (("weeks", 604800.0), ("days", 86400.0), ("hrs", 3600.0),
                   ("mins", 60.0), ("secs", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9))


def format_duration(seconds: float) -> str:
    """A Mesos duration string such as `5secs` or `100ms` (what executors parse)."""
    if seconds >= 1 and float(seconds).is_integer():
        return f"{int(seconds)}secs"
    return f"{int(round(seconds * 1000))}ms"


def parse_duration(text: str) -> float:
    """Seconds in a Mesos duration string (`5secs`, `3mins`, `100ms`, `1.5hrs`)."""
    text = text.strip()
    for unit, factor in _DURATION_UNITS:
        if text.endswith(unit):
            number = text[: -len(unit)]
            try:
                return float(number) * factor
            except ValueError:
                break
    raise ValueError(f"not a duration: {text!r} (write e.g. 5secs, 100ms, 2mins)")


def nanoseconds_to_seconds(obj: dict | None, default: float) -> float:
    """Seconds in a DurationInfo {"nanoseconds": n}, or the default."""
    if isinstance(obj, dict) and isinstance(obj.get("nanoseconds"), (int, float)):
        return max(0.0, obj["nanoseconds"] / 1e9)
    return default


def packed_ip(ip: str) -> int:
    """The IPv4 address as Mesos packs it in MasterInfo.ip: network order read as uint32."""
    try:
        return struct.unpack("=I", socket.inet_aton(str(ipaddress.IPv4Address(ip))))[0]
    except (ValueError, OSError):
        return 0


def master_info(master_id: str, ip: str, port: int, hostname: str) -> dict:
    """MasterInfo JSON as Mesos writes it (also what goes into ZooKeeper)."""
    return {
        "id": master_id, "ip": packed_ip(ip), "port": port, "pid": f"master@{ip}:{port}",
        "hostname": hostname, "version": MESOS_VERSION,
        "address": {"hostname": hostname, "ip": ip, "port": port},
        "capabilities": [{"type": "AGENT_UPDATE"}],
    }
