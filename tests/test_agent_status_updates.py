"""The status update streams: order per task, retries with backoff, acks, duplicates, reconnects."""

from __future__ import annotations

from twisted.internet.task import Clock

from agora import mesos_json as mj

from agent.status_updates import StatusUpdates, UpdateStreams


def status(task_id: str, state: str, uuid: str | None = None) -> dict:
    return {"task_id": {"value": task_id}, "state": state,
            "uuid": uuid or mj.b64(mj.new_uuid())}


def test_only_the_head_of_a_stream_is_sent_and_acks_advance_it():
    """Updates of one task go out one at a time, in order; an ack releases the next."""
    s = UpdateStreams(retry_interval=10)
    a, b = status("t", "TASK_RUNNING"), status("t", "TASK_FINISHED")
    assert s.add("fw", a, now=0) and s.add("fw", b, now=0)
    assert s.due(0) == [("fw", a)]
    assert s.due(1) == []
    assert s.ack("fw", "t", a["uuid"], now=2) is a
    assert s.due(2) == [("fw", b)]


def test_streams_of_different_tasks_are_independent():
    """A task waiting for its ack does not hold up another task's updates."""
    s = UpdateStreams(retry_interval=10)
    a, b = status("t1", "TASK_RUNNING"), status("t2", "TASK_RUNNING")
    s.add("fw", a, 0)
    s.add("fw", b, 0)
    assert sorted(st["task_id"]["value"] for _, st in s.due(0)) == ["t1", "t2"]


def test_unacked_head_is_retried_with_doubling_interval_up_to_the_cap():
    """Re-sent after 10 s, then 20 s, 40 s, … never more than the cap apart."""
    s = UpdateStreams(retry_interval=10, max_interval=35)
    a = status("t", "TASK_RUNNING")
    s.add("fw", a, 0)
    sends = []
    for now in range(0, 200):
        if s.due(now):
            sends.append(now)
    assert sends[:5] == [0, 10, 30, 65, 100]


def test_duplicates_and_wrong_acks_are_ignored():
    """The same uuid twice is taken once; an ack for a non-head uuid changes nothing."""
    s = UpdateStreams(retry_interval=10)
    a, b = status("t", "TASK_RUNNING"), status("t", "TASK_FINISHED")
    s.add("fw", a, 0)
    assert not s.add("fw", dict(a), 0)
    s.add("fw", b, 0)
    assert s.ack("fw", "t", b["uuid"], 0) is None
    assert s.ack("fw", "t", "nonsense", 0) is None
    assert s.pending("fw", "t") == [a, b]


def test_nothing_follows_a_terminal_update_and_its_ack_closes_the_stream():
    """After a terminal update further updates are refused; acking it removes the stream."""
    s = UpdateStreams(retry_interval=10)
    end = status("t", "TASK_FAILED")
    s.add("fw", end, 0)
    assert not s.add("fw", status("t", "TASK_RUNNING"), 0)
    s.ack("fw", "t", end["uuid"], 0)
    assert len(s) == 0 and s.pending("fw", "t") == [] and s.next_due() is None


def test_resend_all_makes_every_head_due_now_with_a_fresh_interval():
    """After a reconnect every head goes out at once and the backoff starts again."""
    s = UpdateStreams(retry_interval=10)
    a = status("t", "TASK_RUNNING")
    s.add("fw", a, 0)
    s.due(0)
    s.due(10)
    s.resend_all(15)
    assert s.due(15) == [("fw", a)]
    assert s.next_due() == 25


def test_shell_retries_on_the_clock_until_acked():
    """StatusUpdates re-sends on its timer, stops on the ack, then sends the next at once."""
    clock, sent = Clock(), []
    updates = StatusUpdates(clock, lambda fid, st: sent.append(st["state"]), retry_interval=1)
    updates.reconnected()
    running, finished = status("t", "TASK_RUNNING"), status("t", "TASK_FINISHED")
    updates.update("fw", running)
    updates.update("fw", finished)
    assert sent == ["TASK_RUNNING"]
    clock.advance(1)
    assert sent == ["TASK_RUNNING"] * 2
    clock.advance(2)
    assert sent == ["TASK_RUNNING"] * 3
    updates.ack("fw", "t", running["uuid"])
    assert sent[-1] == "TASK_FINISHED"
    updates.ack("fw", "t", finished["uuid"])
    clock.advance(100)
    assert len(sent) == 4 and not clock.getDelayedCalls()


def test_shell_holds_updates_while_disconnected_and_sends_them_on_reconnect():
    """No retries are spent without a master; a reconnect sends the heads at once."""
    clock, sent = Clock(), []
    updates = StatusUpdates(clock, lambda fid, st: sent.append(st["state"]), retry_interval=1)
    updates.update("fw", status("t", "TASK_RUNNING"))
    clock.advance(30)
    assert sent == [] and not clock.getDelayedCalls()
    updates.reconnected()
    assert sent == ["TASK_RUNNING"]
    updates.disconnected()
    clock.advance(30)
    assert sent == ["TASK_RUNNING"]
