"""Reliable status updates: per task, in order, each retried until the master acknowledges it.

Each task has a stream of updates. Only the stream's head is on the wire: it is sent, then
re-sent every retry interval (doubling up to a cap) until a StatusUpdateAck with its uuid
comes back; then the next update becomes the head and goes out at once. Updates with a uuid
the stream has already seen, and acks for anything but the head, are ignored (Mesos does
the same). After a reconnect every head is sent again at once.

`UpdateStreams` is the pure bookkeeping (time is an argument); `StatusUpdates` is the thin
shell that owns a timer and the sending function; its `on_taken`/`on_acked` hooks let the
agent journal each change (`agent.checkpoint`) before the change goes on the wire.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from typing import Callable, Iterator

from agora import mesos_json as mj

DEFAULT_MAX_INTERVAL = 600.0  # Mesos: STATUS_UPDATE_RETRY_INTERVAL_MAX, 10 minutes


class _Stream:
    __slots__ = ("framework_id", "task_id", "queue", "seen", "due_at", "interval", "terminal")

    def __init__(self, framework_id: str, task_id: str):
        self.framework_id = framework_id
        self.task_id = task_id
        self.queue: deque[dict] = deque()
        self.seen: set[str] = set()  # uuids taken into this stream
        self.due_at: float | None = None  # when the head is (re)sent next
        self.interval = 0.0
        self.terminal = False  # a terminal update was taken; nothing may follow it


class UpdateStreams:
    """The streams of unacknowledged updates, keyed by (framework id, task id). Pure."""

    def __init__(self, retry_interval: float, max_interval: float = DEFAULT_MAX_INTERVAL):
        self.retry_interval = retry_interval
        self.max_interval = max(max_interval, retry_interval)
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._heap: list[tuple[float, int, tuple[str, str]]] = []
        self._seq = itertools.count()

    def add(self, framework_id: str, status: dict, now: float) -> bool:
        """Take an update (with task_id and uuid); False for a duplicate or one after the end."""
        task_id = mj.id_of(status, "task_id")
        uuid = status["uuid"]
        key = (framework_id, task_id)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _Stream(framework_id, task_id)
        if uuid in stream.seen or stream.terminal:
            return False
        stream.seen.add(uuid)
        stream.terminal = mj.is_terminal(status.get("state", ""))
        stream.queue.append(status)
        if len(stream.queue) == 1:
            self._schedule(stream, now, self.retry_interval)
        return True

    def ack(self, framework_id: str, task_id: str, uuid: str, now: float) -> dict | None:
        """Acknowledge the head of a stream; the acked status, or None if `uuid` is not the head."""
        key = (framework_id, task_id)
        stream = self._streams.get(key)
        if stream is None or not stream.queue or stream.queue[0].get("uuid") != uuid:
            return None
        status = stream.queue.popleft()
        if stream.queue:
            self._schedule(stream, now, self.retry_interval)
        else:
            stream.due_at = None
            if stream.terminal:
                del self._streams[key]
        return status

    def due(self, now: float) -> list[tuple[str, dict]]:
        """The heads to send now, as (framework id, status); each is then due again later."""
        out = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            due_at, _, key = heapq.heappop(heap)
            stream = self._streams.get(key)
            if stream is None or stream.due_at != due_at or not stream.queue:
                continue  # superseded entry
            out.append((stream.framework_id, stream.queue[0]))
            interval = stream.interval
            self._schedule(stream, now + interval, min(interval * 2, self.max_interval))
        return out

    def next_due(self) -> float | None:
        """When `due` next has something to return, or None."""
        heap = self._heap
        while heap:
            due_at, _, key = heap[0]
            stream = self._streams.get(key)
            if stream is not None and stream.due_at == due_at and stream.queue:
                return due_at
            heapq.heappop(heap)
        return None

    def resend_all(self, now: float) -> None:
        """Make every head due now, with the retry interval back at its start (a new link)."""
        for stream in self._streams.values():
            if stream.queue:
                self._schedule(stream, now, self.retry_interval)

    def pending(self, framework_id: str, task_id: str) -> list[dict]:
        """The unacknowledged updates of one task, oldest first."""
        stream = self._streams.get((framework_id, task_id))
        return list(stream.queue) if stream else []

    def remove(self, framework_id: str, task_id: str | None = None) -> None:
        """Forget one task's stream, or all of a framework's (it is gone)."""
        for key in [k for k in self._streams if k[0] == framework_id
                    and (task_id is None or k[1] == task_id)]:
            del self._streams[key]

    def __len__(self) -> int:
        return sum(len(s.queue) for s in self._streams.values())

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        for stream in self._streams.values():
            for status in stream.queue:
                yield stream.framework_id, status

    def _schedule(self, stream: _Stream, due_at: float, interval: float) -> None:
        stream.due_at = due_at
        stream.interval = interval
        heapq.heappush(self._heap, (due_at, next(self._seq), (stream.framework_id, stream.task_id)))


class StatusUpdates:
    """Sends the heads of `UpdateStreams` through `send(framework_id, status)` on a timer.

    While `connected` is False nothing is sent and no retries are spent; `reconnected()`
    sends every head at once.
    """

    def __init__(self, clock, send: Callable[[str, dict], None], retry_interval: float,
                 max_interval: float = DEFAULT_MAX_INTERVAL,
                 on_taken: Callable[[str, dict], None] | None = None,
                 on_acked: Callable[[str, dict], None] | None = None):
        self.clock = clock
        self.send = send
        # Checkpointing hooks: called when a stream changed, before anything is sent, so
        # a journal written there is durable before the master can see the change.
        self.on_taken = on_taken
        self.on_acked = on_acked
        self.streams = UpdateStreams(retry_interval, max_interval)
        self.connected = False
        self._timer = None
        self._timer_at: float | None = None

    def update(self, framework_id: str, status: dict) -> bool:
        """Take an update for reliable delivery; False if it was a duplicate."""
        taken = self.streams.add(framework_id, status, self.clock.seconds())
        if taken:
            if self.on_taken is not None:
                self.on_taken(framework_id, status)
            self._flush()
        return taken

    def ack(self, framework_id: str, task_id: str, uuid: str) -> dict | None:
        """The master acknowledged `uuid`; returns the acked status (None if unexpected)."""
        status = self.streams.ack(framework_id, task_id, uuid, self.clock.seconds())
        if status is not None:
            if self.on_acked is not None:
                self.on_acked(framework_id, status)
            self._flush()
        return status

    def reconnected(self) -> None:
        self.connected = True
        self.streams.resend_all(self.clock.seconds())
        self._flush()

    def disconnected(self) -> None:
        self.connected = False
        self._cancel_timer()

    def stop(self) -> None:
        self.connected = False
        self._cancel_timer()

    def _flush(self) -> None:
        if not self.connected:
            return
        for framework_id, status in self.streams.due(self.clock.seconds()):
            self.send(framework_id, status)
        self._arm()

    def _arm(self) -> None:
        due_at = self.streams.next_due()
        if due_at == self._timer_at and self._timer is not None and self._timer.active():
            return
        self._cancel_timer()
        if due_at is not None:
            self._timer_at = due_at
            self._timer = self.clock.callLater(max(0.0, due_at - self.clock.seconds()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = None
        self._flush()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_at = None
