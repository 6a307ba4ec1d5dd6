"""The image config merged with a task's CommandInfo by Mesos's docker/runtime rules (pure)."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.containerizer.provisioner import manifest as mf
from agent.containerizer.provisioner import runtime
from agent.containerizer.provisioner.runtime import ImageConfig, merge

EP = ("/entry", "e1")
CMD = ("/cmd", "c1", "c2")
ARGS = ["a1", "a2"]

# Mesos docs/isolators/docker-runtime.md, row by row: (shell, value, arguments) against the
# four Entrypoint/Cmd combinations. None = error.
TABLE = [
    # sh, value, argv        E=0,C=0   E=0,C=1                 E=1,C=0              E=1,C=1
    (False, None, None, [None, ["/cmd", "c1", "c2"], ["/entry", "e1"],
                         ["/entry", "e1", "/cmd", "c1", "c2"]]),
    (False, None, ARGS, [None, ["/cmd", "a1", "a2"], ["/entry", "e1", "a1", "a2"],
                         ["/entry", "e1", "a1", "a2"]]),
    (False, "/v", None, [["/v"]] * 4),
    (False, "/v", ["v0", "x"], [["/v", "x"]] * 4),
    (True, None, None, [None] * 4),
    (True, None, ARGS, [None] * 4),
    (True, "echo hi", None, [["/bin/sh", "-c", "echo hi"]] * 4),
    (True, "echo hi", ARGS, [["/bin/sh", "-c", "echo hi"]] * 4),
]
IMAGES = [ImageConfig(), ImageConfig(cmd=CMD), ImageConfig(entrypoint=EP),
          ImageConfig(entrypoint=EP, cmd=CMD)]


@pytest.mark.parametrize("shell, value, arguments, expected", TABLE)
def test_the_mesos_table(shell, value, arguments, expected):
    """Every cell of Mesos's Entrypoint/Cmd × shell/value/arguments table."""
    command = {"shell": shell}
    if value is not None:
        command["value"] = value
    if arguments is not None:
        command["arguments"] = arguments
    for config, want in zip(IMAGES, expected):
        if want is None:
            with pytest.raises(ValueError):
                merge(config, command)
        else:
            assert merge(config, command)[0] == want, (config, command)


def test_shell_is_the_default():
    """A CommandInfo without `shell` is a shell command, as in Mesos."""
    assert merge(ImageConfig(cmd=CMD), {"value": "ls"})[0] == ["/bin/sh", "-c", "ls"]


def test_environment_image_first_the_command_wins():
    """The process sees the image's Env, with the CommandInfo's variables over it."""
    config = ImageConfig(cmd=CMD, env=("PATH=/bin", "A=image", "B=x=y", "A=later"))
    command = {"shell": False, "environment": {"variables": [
        {"name": "A", "value": "task"}, {"name": "C", "value": "c"}]}}
    _, env, _, _ = merge(config, command)
    assert env == {"PATH": "/bin", "A": "task", "B": "x=y", "C": "c"}


def test_working_dir_and_user_come_from_the_image():
    """WorkingDir and User are returned (None when the image sets none)."""
    assert merge(ImageConfig(cmd=CMD, working_dir="/srv", user="app"), {"shell": False})[2:] == \
        ("/srv", "app")
    assert merge(ImageConfig(cmd=CMD), {"shell": False})[2:] == (None, None)


def test_a_docker_config_and_an_appc_manifest_become_image_configs():
    """Docker/OCI fields map one to one; AppC exec is a Cmd, user:group the user."""
    config = mf.parse_config(json.dumps({
        "config": {"Entrypoint": ["/e"], "Cmd": ["c"], "Env": ["A=1"], "WorkingDir": "/w",
                   "User": "u"}, "rootfs": {"type": "layers", "diff_ids": []}}).encode())
    assert runtime.from_config(config) == ImageConfig(("/e",), ("c",), ("A=1",), "/w", "u")
    aci = mf.parse_appc_manifest(json.dumps({
        "acKind": "ImageManifest", "acVersion": "0.8.11", "name": "a/b",
        "app": {"exec": ["/bin/app", "-x"], "user": "1000", "group": "100",
                "workingDirectory": "/app",
                "environment": [{"name": "K", "value": "v"}]}}).encode())
    image = runtime.from_appc(aci)
    assert image == ImageConfig((), ("/bin/app", "-x"), ("K=v",), "/app", "1000:100")
    assert merge(image, {"shell": False})[0] == ["/bin/app", "-x"]
    assert merge(image, {"shell": False, "arguments": ["-y"]})[0] == ["/bin/app", "-y"]


def test_image_configs_round_trip_through_json():
    """What the store writes in an image record reads back the same."""
    config = ImageConfig(EP, CMD, ("A=1",), "/w", "0:0")
    assert ImageConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


words = st.text(st.characters(codec="ascii", categories=("L", "N")), min_size=1, max_size=6)
lists = st.lists(words, max_size=3).map(tuple)


@given(entrypoint=lists, cmd=lists, arguments=st.lists(words, max_size=3))
def test_without_a_value_entrypoint_comes_first_and_arguments_replace_cmd(entrypoint, cmd,
                                                                          arguments):
    """Property: shell=false without value runs Entrypoint + (arguments or Cmd); with no
    Entrypoint, Cmd[0] + (arguments or Cmd[1:]); with neither, an error."""
    config = ImageConfig(entrypoint=entrypoint, cmd=cmd)
    command = {"shell": False, "arguments": arguments}
    if not entrypoint and not cmd:
        with pytest.raises(ValueError):
            merge(config, command)
        return
    argv = merge(config, command)[0]
    if entrypoint:
        assert argv == [*entrypoint, *(arguments or cmd)]
    else:
        assert argv == [cmd[0], *(arguments or cmd[1:])]


@given(entrypoint=lists, cmd=lists, value=words, arguments=st.lists(words, max_size=3))
def test_a_value_always_overrides_the_image(entrypoint, cmd, value, arguments):
    """Property: with a value, the image's Entrypoint and Cmd never matter."""
    config = ImageConfig(entrypoint=entrypoint, cmd=cmd)
    for shell in (True, False):
        command = {"shell": shell, "value": value, "arguments": arguments}
        assert merge(config, command)[0] == merge(ImageConfig(), command)[0]
