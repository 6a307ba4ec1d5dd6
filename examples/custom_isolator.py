"""An example third-party isolator, `example/stamp`: it stamps each container and keeps a
journal of the hooks the containerizer calls.

    prepare  → the container's processes get AGORA_STAMP=<container id>
    every hook → a line in <runtime dir>/stamp.journal

Install it as a package whose metadata declares the entry point (setup.cfg):

    [options.entry_points]
    agora.isolators =
        example/stamp = custom_isolator:StampIsolator

then start the agent with `--launcher linux --isolation filesystem/linux,example/stamp`.
An isolator overrides only the hooks it needs (isolators/interface.py); each may return a
value or a Deferred; `cleanup` must be idempotent.
"""

from __future__ import annotations

import os

from isolators.interface import ContainerConfig, Isolator, LaunchInfo, Settings


class StampIsolator(Isolator):
    def __init__(self, settings: Settings):
        self.journal = os.path.join(settings.runtime_dir, "stamp.journal")

    def _note(self, *words: str) -> None:
        with open(self.journal, "a") as f:
            f.write(" ".join(words) + "\n")

    def recover(self, states: list) -> None:
        self._note("recover", *(s.container_id for s in states))

    def prepare(self, config: ContainerConfig) -> LaunchInfo:
        self._note("prepare", config.container_id, str(config.resources))
        return LaunchInfo(env={"AGORA_STAMP": config.container_id})

    def cleanup(self, container_id: str) -> None:
        self._note("cleanup", container_id)
