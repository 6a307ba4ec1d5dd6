"""Image sources: the contract every image store (docker, oci, appc) meets, and what they share.

An image source turns Mesos Image JSON into a `Resolved` image: the key of its record in
the layer store, its id, its runtime config and where each layer comes from. It reads
manifests and configs (small) itself; the layer store fetches the layers (big) through
the `LayerSource.open` it is given, once each.

    class Source:
        kind: str                                   "docker", "oci", "appc"
        def reference(self, image: dict) -> str     the record key; ValueError if bad JSON
        def resolve(self, image: dict) -> Resolved  ImageError if it cannot be had

`resolve` blocks (network, disk) and may run in several threads at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import platform
import tarfile
from typing import BinaryIO, Callable

import attrs

from agent.containerizer.provisioner import manifest as mf
from agent.containerizer.provisioner import runtime
from agent.containerizer.provisioner.errors import ImageError
from agent.containerizer.provisioner.layers import LayerError, clean_name
from agent.containerizer.provisioner.store import LayerSource

MAX_CONFIG = 8 << 20
_ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
           "s390x": "s390x", "i686": "386"}
#: The platform this host runs (what a manifest list is resolved to).
HOST_OS = "linux"
HOST_ARCH = _ARCHES.get(platform.machine(), platform.machine())


@attrs.frozen
class Resolved:
    reference: str  # the image record's key
    image_id: str | None  # None: the id of the (single) layer, known once it is unpacked
    config: runtime.ImageConfig | None  # None: the layer's metadata carries it (AppC)
    layers: tuple[LayerSource, ...]  # bottom first


class Blobs:
    """Content-addressed blobs of one image, from wherever they are kept."""

    def open(self, digest: str) -> BinaryIO:
        """A stream of the blob (unchecked: the reader checks the digest)."""
        raise NotImplementedError

    def read(self, descriptor: mf.Descriptor, limit: int = MAX_CONFIG) -> bytes:
        """A small blob, whole, its size and digest checked."""
        if descriptor.size > limit:
            raise ImageError(f"blob {descriptor.digest} is {descriptor.size} bytes; at most "
                             f"{limit} are accepted for a {descriptor.media_type}")
        with contextlib.closing(self.open(descriptor.digest)) as f:
            data = f.read(limit + 1)
        check_digest(data, descriptor.digest, f"blob {descriptor.digest}")
        return data


def check_digest(data: bytes, digest: str, what: str) -> None:
    algorithm, hexdigest = mf.parse_digest(digest)
    actual = hashlib.new(algorithm, data).hexdigest()
    if actual != hexdigest:
        raise ImageError(f"{what}: the content has digest {algorithm}:{actual}, not {digest}")


def from_manifest(data: bytes, media_type: str | None, *, name: str, reference: str,
                  blobs: Blobs, fetch_manifest: Callable[[mf.Descriptor], bytes],
                  store=None) -> Resolved:
    """A Resolved image from a manifest (or an index, resolved to this host's platform).

    `fetch_manifest(descriptor)` returns the bytes of a manifest an index points at
    (checked against its digest here); image configs are read through `blobs` (or the
    store's blob cache, when it has them).
    """
    image_id = "sha256:" + hashlib.sha256(data).hexdigest()
    try:
        parsed = mf.parse_manifest(data, media_type)
        if isinstance(parsed, mf.Index):
            entry = mf.select_manifest(parsed, HOST_OS, HOST_ARCH)
            data = fetch_manifest(entry)
            check_digest(data, entry.digest, f"the {HOST_OS}/{HOST_ARCH} manifest of {name}")
            image_id = entry.digest
            parsed = mf.parse_manifest(data, entry.media_type)
            if isinstance(parsed, mf.Index):
                raise ValueError("an index entry points at another index")
    except ValueError as e:
        raise ImageError(f"image {name}: {e}") from None
    config_data = store.get_blob(parsed.config.digest) if store is not None else None
    if config_data is None:
        config_data = blobs.read(parsed.config)
        if store is not None:
            store.put_blob(config_data)
    try:
        config = mf.parse_config(config_data)
        mf.check_layers_match(parsed, config)
    except ValueError as e:
        raise ImageError(f"image {name}: {e}") from None
    check_platform(config, name)
    layers = tuple(
        LayerSource(open=_opener(blobs, layer.digest), diff_id=diff_id, digest=layer.digest,
                    size=layer.size, what=f"layer {layer.digest[:19]} of {name}")
        for layer, diff_id in zip(parsed.layers, config.diff_ids))
    return Resolved(reference, image_id, runtime.from_config(config), layers)


def check_platform(config: mf.Config, name: str) -> None:
    """Refuse an image built for another OS or CPU than this host's."""
    if config.os and config.os != HOST_OS:
        raise ImageError(f"image {name} is for {config.os}, not {HOST_OS}")
    if config.architecture and config.architecture != HOST_ARCH:
        raise ImageError(f"image {name} is for {config.architecture} CPUs; this host is "
                         f"{HOST_ARCH}")


def _opener(blobs: Blobs, digest: str):
    return lambda: blobs.open(digest)


class Slice(io.RawIOBase):
    """`size` bytes of a file from `offset`, through a file handle of its own (so several
    threads can each read a member of one tar archive)."""

    def __init__(self, path: str, offset: int, size: int):
        self._f = open(path, "rb")
        self._f.seek(offset)
        self._left = size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        n = self._left if n < 0 else min(n, self._left)
        data = self._f.read(n)
        self._left -= len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()


def tar_index(path: str) -> dict:
    """member name (cleaned) → TarInfo of a tar archive's regular files; ImageError if the
    file is not a readable tar."""
    try:
        with tarfile.open(path, "r:") as tar:
            index = {}
            for member in tar:
                if member.isreg():
                    index[clean_name(member.name)] = member
                elif member.islnk():
                    target = index.get(clean_name(member.linkname))
                    if target is not None:
                        index[clean_name(member.name)] = target
            return index
    except (OSError, tarfile.TarError, LayerError) as e:
        raise ImageError(f"{path} is not a readable tar archive: {e}") from None


def safe_relative(name: str, what: str) -> str:
    """A name that is a relative path with no '..' (to look up below a directory)."""
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{what} {name!r} is not a relative path without '..'")
    return os.path.join(*parts)
