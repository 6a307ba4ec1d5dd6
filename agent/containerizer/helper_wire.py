"""The launch helper's wire: length-prefixed JSON frames on a Unix stream socket.

    frame = 4-byte big-endian length + UTF-8 JSON object
    file descriptors (a container's stdout/stderr) ride with the frame that names them
    (`"fds": n`), as SCM_RIGHTS on the sendmsg that carries the frame; or the spec names
    files for the helper to open (`"stdio_paths": [stdout, stderr]`)

Requests: `launch {id, spec, fds, go}`, `go {id}`, `wait {id}` (re-attach: answered
`waiting`, `exited` or `unknown`), `exit` (exit once no container is left), `ping`.
Replies and events: `created {id, pid}` (the child waits for `go`), `launched {id, pid}`,
`failed {id, message}`, `exited {id, status}` (a wait status), `waiting {id}`,
`unknown {id}`, `pong`.

The socket lives in the abstract namespace (no file to clean up, invisible from other
network namespaces); the helper accepts only peers with its own uid. `Client` is the
blocking client the built-in executor and the benchmarks use; the agent speaks the same
frames through Twisted (`agent.containerizer.linux`). Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct

_LENGTH = struct.Struct(">I")
MAX_FRAME = 16 * 1024 * 1024
MAX_FDS = 3


def address(runtime_dir: str) -> str:
    """The helper's abstract socket name for an agent's runtime directory."""
    digest = hashlib.sha256(runtime_dir.encode()).hexdigest()[:24]
    return f"\0agora-launcher-{digest}"


def task_key(task_id: str) -> str:
    """A file and container name for a task id (which may hold any character)."""
    return hashlib.sha256(task_id.encode()).hexdigest()[:32]


def encode(message: dict) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return _LENGTH.pack(len(body)) + body


class FrameBuffer:
    """Bytes in, whole messages out."""

    def __init__(self):
        self._data = bytearray()

    def feed(self, data: bytes) -> list[dict]:
        self._data += data
        out = []
        while len(self._data) >= 4:
            (length,) = _LENGTH.unpack_from(self._data)
            if length > MAX_FRAME:
                raise ValueError(f"frame of {length} bytes is too large")
            if len(self._data) < 4 + length:
                break
            body = bytes(self._data[4:4 + length])
            del self._data[:4 + length]
            message = json.loads(body)
            if not isinstance(message, dict):
                raise ValueError("a frame must hold a JSON object")
            out.append(message)
        return out


class HelperError(Exception):
    """The helper is unreachable, or refused or failed a launch (the message says why)."""


class Client:
    """A blocking connection to the helper; one outstanding launch at a time per caller."""

    def __init__(self, name: str, timeout: float | None = 30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(name)
        except OSError as e:
            self.sock.close()
            raise HelperError(f"cannot reach the launch helper: {e}") from None
        self._buffer = FrameBuffer()
        self._pending: list[dict] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: dict, fds: list[int] = ()) -> None:
        data = encode(message)
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def receive(self) -> list[dict]:
        """What has arrived (blocks until at least one message); raises at EOF."""
        if self._pending:
            out, self._pending = self._pending, []
            return out
        return self._read()

    def _read(self) -> list[dict]:
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise HelperError("the launch helper closed the connection")
            out = self._buffer.feed(data)
            if out:
                return out

    def launch(self, container_id: str, spec: dict, fds: list[int]) -> int:
        """Start a container; its pid once it runs. HelperError if it failed to start.
        Events for other containers that arrive meanwhile are kept for `receive`."""
        self.send({"op": "launch", "id": container_id, "spec": spec, "fds": len(fds)}, fds)
        while True:
            batch = self._read()
            for i, message in enumerate(batch):
                if message.get("id") == container_id and message["op"] in ("launched",
                                                                            "failed"):
                    self._pending.extend(batch[i + 1:])
                    if message["op"] == "failed":
                        raise HelperError(message.get("message") or "launch failed")
                    return message["pid"]
                self._pending.append(message)

    def close(self) -> None:
        self.sock.close()
