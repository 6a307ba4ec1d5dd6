"""filesystem/linux: a mount namespace for each container, its volumes, and room for a rootfs.

Volumes are Mesos `Volume` JSON in the ContainerInfo:

    {"container_path": "data", "mode": "RW",
     "source": {"type": "HOST_PATH", "host_path": {"path": "/srv/data"}}}
    {"container_path": "/cache", "mode": "RO",
     "source": {"type": "SANDBOX_PATH", "sandbox_path": {"type": "SELF", "path": "cache"}}}
    {"container_path": "/srv", "host_path": "/srv", "mode": "RO"}          # the old form

A relative `container_path` is in the sandbox (a host path, mounted before the rootfs, so
the container sees it under /mnt/mesos/sandbox too); an absolute one is in the container's
root filesystem, or, for a container without an image, the host path of that name, which
must exist (its mount stays in the container's mount namespace). A SANDBOX_PATH source is a
relative path in the sandbox, created if missing; PARENT means the same as SELF here (an
executor and its tasks share one sandbox). Nothing may leave the sandbox through `..`.
The image's rootfs itself comes from the provisioner (agent.containerizer.provisioner).
"""

from __future__ import annotations

import os
import posixpath

from isolators.interface import ContainerConfig, Isolator, LaunchInfo, Mount, Settings


def _inside(sandbox: str, relative: str, what: str) -> str:
    """`relative` joined to the sandbox; ValueError if it is absolute or climbs out."""
    if not relative or relative.startswith("/"):
        raise ValueError(f"{what} must be a relative path in the sandbox: {relative!r}")
    normal = posixpath.normpath(relative)
    if normal == ".." or normal.startswith("../"):
        raise ValueError(f"{what} leaves the sandbox: {relative!r}")
    return os.path.join(sandbox, normal)


def has_image(container_info: dict | None) -> bool:
    """Whether a ContainerInfo names an image (MESOS with `mesos.image`, or DOCKER)."""
    info = container_info or {}
    return bool((info.get("mesos") or {}).get("image") or
                (info.get("type") == "DOCKER" and (info.get("docker") or {}).get("image")))


def volume_mounts(container_info: dict | None, sandbox: str, has_rootfs: bool) -> tuple:
    """The Mounts for the volumes of a ContainerInfo (see the module docstring); ValueError
    with a message for the first bad volume."""
    mounts = []
    for volume in (container_info or {}).get("volumes") or ():
        if not isinstance(volume, dict):
            raise ValueError(f"a volume must be an object: {volume!r}")
        target = volume.get("container_path")
        if not isinstance(target, str) or not target:
            raise ValueError(f"volume {volume!r} has no container_path")
        mode = volume.get("mode", "RW")
        if mode not in ("RW", "RO"):
            raise ValueError(f"volume {target}: mode must be RW or RO, not {mode!r}")
        source = volume.get("source") or {}
        kind = source.get("type") or ("HOST_PATH" if volume.get("host_path") else None)
        if kind == "HOST_PATH":
            path = (source.get("host_path") or {}).get("path") or volume.get("host_path")
            if not isinstance(path, str) or not path.startswith("/"):
                raise ValueError(f"volume {target}: the host path must be absolute: {path!r}")
            if not os.path.exists(path):
                raise ValueError(f"volume {target}: host path {path} does not exist")
        elif kind == "SANDBOX_PATH":
            sandbox_path = source.get("sandbox_path") or {}
            if sandbox_path.get("type", "SELF") not in ("SELF", "PARENT"):
                raise ValueError(f"volume {target}: sandbox_path type must be SELF or PARENT")
            path = _inside(sandbox, sandbox_path.get("path") or "", f"volume {target}'s path")
            os.makedirs(path, exist_ok=True)
        elif source.get("type") == "DOCKER_VOLUME" or volume.get("image"):
            raise ValueError(f"volume {target}: {source.get('type') or 'image'} volumes are not "
                             "supported; use HOST_PATH or SANDBOX_PATH")
        else:
            raise ValueError(f"volume {target}: source type must be HOST_PATH or SANDBOX_PATH")
        read_only = mode == "RO"
        if target.startswith("/"):
            if not has_rootfs and not os.path.exists(target):
                raise ValueError(f"volume {target}: a container without an image can mount "
                                 "only on an existing path or a relative one (in the sandbox)")
            mounts.append(Mount(path, posixpath.normpath(target), read_only,
                                host=not has_rootfs))
        else:
            mounts.append(Mount(path, _inside(sandbox, target, "container_path"), read_only,
                                host=True))
    return tuple(mounts)


class LinuxFilesystemIsolator(Isolator):
    """A private mount namespace for every container, and its volumes."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def prepare(self, config: ContainerConfig) -> LaunchInfo:
        mounts = volume_mounts(config.container_info, config.directory,
                               has_image(config.container_info))
        return LaunchInfo(namespaces=frozenset({"mnt"}), mounts=mounts)
