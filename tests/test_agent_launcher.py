"""The posix launcher: sessions, exit statuses without polling, and killing whole trees."""

from __future__ import annotations

import os
import signal
import time

from agent_harness import agent_reactor, no_session_left, wait_for  # noqa: F401
from twisted.internet.threads import blockingCallFromThread

from agent.containerizer.launcher import LaunchSpec, PosixLauncher, describe_status


def launch(reactor, tmp_path, script: str):
    spec = LaunchSpec(argv=["/bin/sh", "-c", script], env={"PATH": os.environ["PATH"]},
                      cwd=str(tmp_path), stdout=str(tmp_path / "stdout"),
                      stderr=str(tmp_path / "stderr"))
    return blockingCallFromThread(reactor, PosixLauncher(reactor).launch, "c1", spec)


def test_exit_status_arrives_and_output_goes_to_the_files(agent_reactor, tmp_path):
    """The leader's wait status is reported; stdout/stderr are the given files; cwd is set."""
    container = launch(agent_reactor, tmp_path, "pwd; echo err >&2; exit 3")
    wait_for(lambda: container.status is not None, what="the exit")
    assert describe_status(container.status) == "exited with status 3"
    assert (tmp_path / "stdout").read_text().strip() == str(tmp_path)
    assert (tmp_path / "stderr").read_text() == "err\n"


def test_containers_run_in_their_own_session(agent_reactor, tmp_path):
    """The leader is a session leader, so a killpg(0) inside cannot reach the agent."""
    container = launch(agent_reactor, tmp_path, "sleep 100")
    assert os.getsid(container.pid) == container.pid != os.getsid(0)
    blockingCallFromThread(agent_reactor, container.destroy, 0)


def test_destroy_kills_a_tree_that_ignores_sigterm(agent_reactor, tmp_path):
    """SIGTERM first; after the grace period SIGKILL reaches every process, forked ones too."""
    container = launch(agent_reactor, tmp_path,
                       "trap '' TERM; (trap '' TERM; sleep 100) & sleep 100 & wait")
    wait_for(lambda: len(_members(container.pid)) >= 3, what="the tree to start")
    started = time.monotonic()
    status = blockingCallFromThread(agent_reactor, container.destroy, 0.3)
    assert time.monotonic() - started >= 0.25
    assert status == signal.SIGKILL
    assert no_session_left(container.pid)


def test_destroy_is_quick_when_sigterm_is_enough(agent_reactor, tmp_path):
    """A tree that obeys SIGTERM is gone without waiting for the grace period."""
    container = launch(agent_reactor, tmp_path, "sleep 100 & sleep 100 & wait")
    wait_for(lambda: len(_members(container.pid)) >= 3, what="the tree to start")
    started = time.monotonic()
    blockingCallFromThread(agent_reactor, container.destroy, 5.0)
    assert time.monotonic() - started < 2.0
    assert no_session_left(container.pid)


def _members(sid):
    from agent.containerizer.launcher import session_members
    return session_members(sid) or []
