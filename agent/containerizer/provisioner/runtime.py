"""What an image says about running it, and its merge with a task's CommandInfo.

Pure. `ImageConfig` holds Entrypoint, Cmd, Env, WorkingDir and User, built from a Docker/OCI
image config or an AppC manifest (`app.exec` is a Cmd without an Entrypoint, as Mesos's
appc/runtime isolator treats it). `merge` applies Mesos's rules (docs/isolators/
docker-runtime.md; `DockerRuntimeIsolatorProcess::getLaunchCommand`):

    shell=true,  value        /bin/sh -c value           (Entrypoint and Cmd ignored)
    shell=true,  no value     error
    shell=false, value        value, with `arguments` as its argv (Mesos: argv[0] included)
    shell=false, no value     Entrypoint + (arguments, else Cmd); without an Entrypoint,
                              Cmd[0] + (arguments, else Cmd[1:]); neither: error

The process gets the image's Env with the command's `environment` over it, and the image's
WorkingDir (None: the caller's default, the sandbox). The image's User is returned for the
caller to resolve inside the image.
"""

from __future__ import annotations

import attrs

from agent.containerizer.provisioner import manifest as mf
from agent.executors.command import command_argv
from agent.executors.command import environment_variables as command_environment

__all__ = ["DEFAULT_PATH", "ImageConfig", "command_environment", "from_appc", "from_config",
           "merge"]

#: PATH for a process whose image sets none (Mesos's default, os::host_default_path()).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@attrs.frozen
class ImageConfig:
    """How the image wants to be run."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()  # "NAME=value", in the image's order
    working_dir: str | None = None
    user: str | None = None

    def to_json(self) -> dict:
        return {"entrypoint": list(self.entrypoint), "cmd": list(self.cmd),
                "env": list(self.env), "working_dir": self.working_dir, "user": self.user}

    @classmethod
    def from_json(cls, doc: dict) -> ImageConfig:
        return cls(tuple(doc.get("entrypoint") or ()), tuple(doc.get("cmd") or ()),
                   tuple(doc.get("env") or ()), doc.get("working_dir"), doc.get("user"))


def from_config(config: mf.Config) -> ImageConfig:
    """The runtime part of a Docker/OCI image config."""
    return ImageConfig(config.entrypoint, config.cmd, config.env, config.working_dir,
                       config.user)


def from_appc(manifest: mf.AppcManifest) -> ImageConfig:
    """The runtime part of an AppC manifest: app.exec, app.environment, app.user:app.group
    and app.workingDirectory (an image without `app` says nothing)."""
    app = manifest.app
    if app is None:
        return ImageConfig()
    return ImageConfig(cmd=app.exec, env=tuple(f"{k}={v}" for k, v in app.environment),
                       working_dir=app.working_directory, user=f"{app.user}:{app.group}")


def image_environment(config: ImageConfig) -> dict:
    """The image's Env as a dict (a later duplicate wins, as in Docker)."""
    env = {}
    for item in config.env:
        name, sep, value = item.partition("=")
        if sep and name:
            env[name] = value
    return env


def merge(config: ImageConfig, command: dict | None
          ) -> tuple[list[str], dict, str | None, str | None]:
    """(argv, environment, working directory or None, image user or None) for running
    `command` (a Mesos CommandInfo dict) in an image with `config`; ValueError when there
    is nothing to run. argv[0] is the program to execute."""
    command = command or {}
    env = image_environment(config)
    env.update(command_environment(command))
    value = command.get("value")
    if not isinstance(value, str) or not value:
        value = None
    if command.get("shell", True):
        if value is None:
            raise ValueError("the command is a shell command (shell=true, the default) but "
                             "has no value")
        argv, _ = command_argv(command)
    elif value is not None:
        argv, _ = command_argv(command)
        # Mesos execs `value` with `arguments` as argv (argv[0] included); we run argv[0],
        # so the program goes there.
        argv = [value, *argv[1:]]
    else:
        arguments = [a for a in command.get("arguments") or [] if isinstance(a, str)]
        if config.entrypoint:
            argv = [*config.entrypoint, *(arguments or config.cmd)]
        elif config.cmd:
            argv = [config.cmd[0], *(arguments or config.cmd[1:])]
        else:
            raise ValueError("nothing to run: the command has no value and the image has "
                             "neither an Entrypoint nor a Cmd")
    return argv, env, config.working_dir, config.user
