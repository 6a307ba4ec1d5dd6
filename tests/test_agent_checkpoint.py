"""Status update journals: atomic writes, replay, the Mesos layout, recovery after a restart."""

from __future__ import annotations

import os

import pytest
from agent_harness import (  # noqa: F401  (fixtures)
    AgentCluster, agent_reactor, cluster, make_cluster, wait_for)

from agora import mesos_json as mj
from agora import protocol

from agent import checkpoint


def status(task_id: str, state: str) -> dict:
    return {"task_id": {"value": task_id}, "state": state, "uuid": mj.b64(mj.new_uuid())}


# --- pure / disk -----------------------------------------------------------------------------


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    """The file holds the old or the new bytes; no `.tmp-*` is left behind."""
    path = tmp_path / "a" / "b" / "file"
    checkpoint.atomic_write(str(path), b"one")
    checkpoint.atomic_write(str(path), b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["file"]


def test_replay_keeps_what_is_unacknowledged_in_order():
    """UPDATEs queue (duplicates ignored); an ACK releases only the head it names."""
    a, b, c = status("t", "TASK_STARTING"), status("t", "TASK_RUNNING"), \
        status("t", "TASK_FINISHED")
    up = [{"type": "UPDATE", "update": {"status": s}} for s in (a, b, a, c)]
    ack = [{"type": "ACK", "uuid": s["uuid"]} for s in (b, a)]  # b is not the head: ignored
    replayed = checkpoint.replay(up + ack)
    assert replayed.pending == (b, c) and not replayed.terminal_acked
    done = checkpoint.replay(up + [{"type": "ACK", "uuid": s["uuid"]} for s in (a, b, c)])
    assert done.pending == () and done.terminal_acked


def test_journal_round_trips_through_the_disk(tmp_path):
    """What TaskUpdates writes, read_records reads back; a known uuid is not written twice."""
    path = str(tmp_path / "task.updates")
    journal = checkpoint.TaskUpdates(path)
    a = status("t", "TASK_RUNNING")
    assert journal.update("fw", a) and not journal.update("fw", a)
    journal.ack(a["uuid"])
    records = checkpoint.read_records(path)
    assert records == [{"type": "UPDATE", "update": {"framework_id": {"value": "fw"},
                                                     "status": a}},
                       {"type": "ACK", "uuid": a["uuid"]}]
    assert checkpoint.TaskUpdates(path, records).update("fw", a) is False


def test_recovery_reads_every_journal_and_reports_broken_ones(tmp_path):
    """recover_status_updates finds journals by the Mesos layout; a corrupt one is an error
    line, not an exception, and the others are still recovered."""
    work = str(tmp_path)
    good = checkpoint.task_updates_path(work, "S1", "fw", "ex", "c1", "t1")
    pending = status("t1", "TASK_RUNNING")
    checkpoint.TaskUpdates(good).update("fw", pending)
    bad = checkpoint.task_updates_path(work, "S1", "fw", "ex", "c1", "t2")
    checkpoint.atomic_write(bad, b'{"type": "UPDATE"}\n')
    streams, errors = checkpoint.recover_status_updates(work, "S1")
    [stream] = streams
    assert (stream.framework_id, stream.executor_id, stream.container_id, stream.task_id) == \
        ("fw", "ex", "c1", "t1")
    assert stream.pending == (pending,)
    [error] = errors
    assert bad in error and "line 1" in error
    assert checkpoint.recover_status_updates(work, "S2") == ([], [])
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.read_records(bad)


# --- under an agent ----------------------------------------------------------------------------


def journal_of(c, task_id: str, framework_id: str = "fw-1") -> list[dict]:
    executor = c.executor(task_id, framework_id)
    container_id = executor.container_id if executor else None
    if container_id is None:
        return []
    path = checkpoint.task_updates_path(c.work_dir, "fake-S0", framework_id, task_id,
                                        container_id, task_id)
    try:
        return checkpoint.read_records(path)
    except checkpoint.CheckpointError:
        return []


def test_a_checkpointing_framework_has_its_updates_and_acks_journaled(make_cluster):
    """Each update is journaled before it is sent, each ack after it arrives (Mesos layout)."""
    c = make_cluster(master_options={"auto_ack": False})
    c.wait_registered()
    c.run_task("j", "sleep 30", framework=c.framework(checkpoint=True))
    starting = c.wait_state("j", "TASK_STARTING")
    records = wait_for(lambda: len(journal_of(c, "j")) >= 2 and journal_of(c, "j"),
                       what="the journal")
    assert [r["update"]["status"]["state"] for r in records] == ["TASK_STARTING",
                                                                 "TASK_RUNNING"]
    assert records[0]["update"]["status"]["uuid"] == starting["uuid"]
    c.call(c.master.ack, protocol.StatusUpdate("fw-1", starting))
    wait_for(lambda: journal_of(c, "j")[-1:] == [{"type": "ACK", "uuid": starting["uuid"]}],
             what="the ack in the journal")


def test_frameworks_without_checkpoint_write_no_journal(cluster):
    """No `checkpoint: true`, no fsync per update: nothing under meta/."""
    cluster.run_task("nj", "true")
    cluster.wait_state("nj", "TASK_FINISHED")
    assert not os.path.exists(os.path.join(cluster.work_dir, "meta"))


def test_an_agent_restarted_with_its_work_dir_and_id_resends_unacked_updates(
        agent_reactor, tmp_path):
    """Updates the master never acknowledged survive the agent: the next agent process with
    the same work dir and agent id sends them again, in order, until they are acked."""
    work = str(tmp_path / "work")
    first = AgentCluster(agent_reactor, work, {"auto_ack": False})
    try:
        first.wait_registered()
        first.run_task("r", "true", framework=first.framework(checkpoint=True))
        starting = first.wait_state("r", "TASK_STARTING")
        first.call(first.master.ack, protocol.StatusUpdate("fw-1", starting))
        running = first.wait_state("r", "TASK_RUNNING")
        wait_for(lambda: [r["update"]["status"]["state"] for r in journal_of(first, "r")
                          if r["type"] == "UPDATE"][-1:] == ["TASK_FINISHED"],
                 what="TASK_FINISHED in the journal")
    finally:
        first.stop()
    second = AgentCluster(agent_reactor, work)  # this fake master acks everything
    try:
        second.wait_registered()
        second.wait_state("r", "TASK_FINISHED")
        resent = [(s["state"], s["uuid"]) for s in second.master.updates("r")]
        assert resent[0] == ("TASK_RUNNING", running["uuid"])
        assert [state for state, _ in resent] == ["TASK_RUNNING", "TASK_FINISHED"]
        wait_for(lambda: not second.call(lambda: dict(second.agent._journals)),
                 what="the recovered streams to be done")
        [path] = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(work, "meta"))
                  for f in fs if f == "task.updates"]
        acks = [r["uuid"] for r in checkpoint.read_records(path) if r["type"] == "ACK"]
        assert acks[-2:] == [running["uuid"], resent[1][1]]
        assert second.get_json("/metrics/snapshot")["slave/status_updates_pending"] == 0.0
    finally:
        second.stop()
