"""Sandbox directories in the Mesos layout, so that Mesos tools and habits carry over.

    <work_dir>/slaves/<agent_id>/frameworks/<framework_id>/executors/<executor_id>/
        runs/<container_id>/        the sandbox: cwd of the executor, its stdout and stderr
        runs/latest -> <container_id>

Ids go into paths, so they are checked first: an id with a '/' or a leading '.' could point
anywhere (Mesos rejects them the same way).
"""

from __future__ import annotations

import os

LATEST = "latest"


def check_id(kind: str, value: str) -> str:
    """`value` if it is safe as one path component; ValueError saying why not otherwise."""
    if not value or "/" in value or "\0" in value or value in (".", "..") or value == LATEST:
        raise ValueError(f"{kind} {value!r} cannot name a directory: it must be non-empty, "
                         f"contain no '/' and not be '.', '..' or '{LATEST}'")
    return value


def executor_dir(work_dir: str, agent_id: str, framework_id: str, executor_id: str) -> str:
    """The directory that holds every run of one executor."""
    return os.path.join(work_dir, "slaves", check_id("agent id", agent_id),
                        "frameworks", check_id("framework id", framework_id),
                        "executors", check_id("executor id", executor_id))


def run_dir(work_dir: str, agent_id: str, framework_id: str, executor_id: str,
            container_id: str) -> str:
    """The sandbox of one run (container) of an executor."""
    return os.path.join(executor_dir(work_dir, agent_id, framework_id, executor_id), "runs",
                        check_id("container id", container_id))


def sandbox_path(work_dir: str, agent_id: str, framework_id: str, executor_id: str) -> str:
    """The sandbox of the newest run of an executor (through the `latest` link)."""
    return os.path.join(executor_dir(work_dir, agent_id, framework_id, executor_id), "runs",
                        LATEST)


def create_run(work_dir: str, agent_id: str, framework_id: str, executor_id: str,
               container_id: str) -> str:
    """Make the sandbox of a new run, point `latest` at it, and return its path."""
    path = run_dir(work_dir, agent_id, framework_id, executor_id, container_id)
    os.makedirs(path, exist_ok=True)
    runs = os.path.dirname(path)
    # Replace the link atomically: a reader never sees `latest` missing.
    tmp = os.path.join(runs, f".{LATEST}.{container_id}")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(container_id, tmp)
    os.replace(tmp, os.path.join(runs, LATEST))
    return path
