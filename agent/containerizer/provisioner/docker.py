"""Docker images: pulled from a registry v2, or read from a directory of `docker save` tars.

Registry (`docker_registry` is a URL, https://registry-1.docker.io by default): the name's
own registry host if it has one, else the default; the manifest (Docker schema2 or OCI, or
a list / index resolved to this host's platform), the config, then the layers through the
layer store. Credentials: the image's `credential` ({principal, secret}), else
`docker_credentials[host]`.

Local archives (`docker_registry` is a directory, as Mesos's `--docker_registry=/dir`):
`<dir>/<name as written>:<tag>.tar` (e.g. `<dir>/ctrverify/busybox:latest.tar`), the
format `docker save` and `skopeo copy ... docker-archive:` write: `manifest.json` naming
the config file and the layer tars. Layers there are usually *uncompressed* (skopeo's
synthesized manifest says gzip: we never trust it; the layer store sniffs), and their
diff_ids come from the config. The image id is the config's digest, as Docker's.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import urllib.parse

from agent.containerizer.provisioner import manifest as mf
from agent.containerizer.provisioner import runtime
from agent.containerizer.provisioner.errors import ImageError
from agent.containerizer.provisioner.layers import clean_name
from agent.containerizer.provisioner.registry import Registry, is_loopback
from agent.containerizer.provisioner.source import (
    Blobs, Resolved, Slice, check_digest, check_platform, from_manifest, safe_relative,
    tar_index)
from agent.containerizer.provisioner.store import LayerSource

DEFAULT_REGISTRY_URL = "https://registry-1.docker.io"


def docker_name(image: dict) -> str:
    """The `docker.name` of a DOCKER Image JSON; ValueError if missing."""
    docker = image.get("docker") if isinstance(image, dict) else None
    name = docker.get("name") if isinstance(docker, dict) else None
    if not isinstance(name, str) or not name:
        raise ValueError("a DOCKER image needs 'docker.name'")
    return name


def image_credential(image: dict) -> tuple[str, str] | None:
    """The image's own pull credential ({principal, secret}), if it has one."""
    credential = (image.get("docker") or {}).get("credential")
    if not credential:
        return None
    if not isinstance(credential, dict) or not isinstance(credential.get("principal"), str):
        raise ValueError("docker.credential needs a 'principal' (and a 'secret')")
    secret = credential.get("secret", "")
    if not isinstance(secret, str):
        raise ValueError("docker.credential.secret must be a string")
    return credential["principal"], secret


class _RegistryBlobs(Blobs):
    def __init__(self, registry: Registry, repository: str, name: str):
        self.registry, self.repository, self.name = registry, repository, name

    def open(self, digest: str):
        return self.registry.blob(self.repository, digest, self.name)


class RegistrySource:
    """Docker (and OCI) images from registries speaking the Docker Registry HTTP API v2."""

    kind = "docker"

    def __init__(self, store, *, default_registry: str = DEFAULT_REGISTRY_URL,
                 insecure_registries=(), credentials: dict | None = None,
                 timeout: float | None = None):
        parts = urllib.parse.urlsplit(default_registry)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"--docker-registry {default_registry!r} is neither an http(s) "
                             "URL nor a directory")
        self.store = store
        self.default_host = parts.netloc
        self.insecure = set(insecure_registries or ())
        if parts.scheme == "http":
            self.insecure.add(parts.netloc)
        self.credentials = dict(credentials or {})
        self.timeout = timeout
        self._registries: dict[tuple, Registry] = {}
        self._lock = threading.Lock()

    def reference(self, image: dict) -> str:
        ref = mf.parse_reference(docker_name(image))
        return f"docker:{ref.registry or self.default_host}/{ref.repository}:" \
               f"{ref.tag or ''}{'@' + ref.digest if ref.digest else ''}"

    def registry(self, host: str, credentials) -> Registry:
        """The client for `host` as `credentials` (kept: it caches tokens)."""
        key = (host, credentials)
        with self._lock:
            if key not in self._registries:
                secure = not (host in self.insecure or is_loopback(host))
                kwargs = {"timeout": self.timeout} if self.timeout else {}
                self._registries[key] = Registry(host, secure=secure, credentials=credentials,
                                                 **kwargs)
            return self._registries[key]

    def resolve(self, image: dict) -> Resolved:
        name = docker_name(image)
        try:
            ref = mf.parse_reference(name)
            credentials = image_credential(image)
        except ValueError as e:
            raise ImageError(str(e)) from None
        host = ref.registry or self.default_host
        if credentials is None and host in self.credentials:
            credentials = tuple(self.credentials[host])
        registry = self.registry(host, credentials)
        data, content_type, _ = registry.manifest(ref.repository, ref.ref, name)
        if ref.digest:
            check_digest(data, ref.digest, f"the manifest of {name}")

        def fetch_manifest(entry: mf.Descriptor) -> bytes:
            return registry.manifest(ref.repository, entry.digest, name)[0]

        return from_manifest(data, content_type, name=name, reference=self.reference(image),
                             blobs=_RegistryBlobs(registry, ref.repository, name),
                             fetch_manifest=fetch_manifest, store=self.store)


class ArchiveSource:
    """Docker images from a directory of `docker save` archives (`<name>:<tag>.tar`)."""

    kind = "docker"

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)

    def path(self, image: dict) -> str:
        ref = mf.parse_reference(docker_name(image))
        written = f"{ref.registry}/{ref.written}" if ref.registry else ref.written
        suffix = f":{ref.tag}" if ref.tag else ""
        suffix += f"@{ref.digest}" if ref.digest else ""
        return os.path.join(self.directory, safe_relative(written, "image name") + suffix
                            + ".tar")

    def reference(self, image: dict) -> str:
        return f"docker-archive:{self.path(image)}"

    def resolve(self, image: dict) -> Resolved:
        name = docker_name(image)
        try:
            path = self.path(image)
        except ValueError as e:
            raise ImageError(str(e)) from None
        if not os.path.isfile(path):
            raise ImageError(f"image {name} not found: there is no {path} in the "
                             "--docker-registry directory")
        index = tar_index(path)

        def read(member_name: str, what: str) -> bytes:
            member = index.get(member_name)
            if member is None:
                raise ImageError(f"{path} has no {member_name} ({what}): not a `docker "
                                 "save` archive")
            with Slice(path, member.offset_data, member.size) as f:
                return f.read()

        try:
            entries = json.loads(read("manifest.json", "the archive's manifest"))
            if not isinstance(entries, list) or not entries:
                raise ValueError("manifest.json is not a non-empty list")
            entry = _archive_entry(entries, name)
            config_name = entry.get("Config")
            layer_names = entry.get("Layers")
            if not isinstance(config_name, str) or not isinstance(layer_names, list) \
                    or not all(isinstance(n, str) for n in layer_names):
                raise ValueError("its manifest.json entry needs 'Config' and 'Layers'")
            config_data = read(clean_name(config_name), "the image config")
            config = mf.parse_config(config_data)
            if len(config.diff_ids) != len(layer_names):
                raise ValueError(f"the archive has {len(layer_names)} layers but the image "
                                 f"config lists {len(config.diff_ids)} diff_ids")
        except ValueError as e:
            raise ImageError(f"image {name} ({path}): {e}") from None
        check_platform(config, name)
        layers = []
        for layer_name, diff_id in zip(layer_names, config.diff_ids):
            member = index.get(clean_name(layer_name))
            if member is None:
                raise ImageError(f"image {name} ({path}) has no layer {layer_name}")
            layers.append(LayerSource(
                open=_slicer(path, member.offset_data, member.size), diff_id=diff_id,
                size=member.size, what=f"layer {diff_id[:19]} of {name}"))
        image_id = "sha256:" + hashlib.sha256(config_data).hexdigest()
        return Resolved(self.reference(image), image_id, runtime.from_config(config),
                        tuple(layers))


def _archive_entry(entries: list, name: str) -> dict:
    """The manifest.json entry for `name`: the only one, or the one whose RepoTags has it."""
    if len(entries) == 1 and isinstance(entries[0], dict):
        return entries[0]
    want = mf.parse_reference(name)
    for entry in entries:
        for tag in (entry.get("RepoTags") or []) if isinstance(entry, dict) else []:
            try:
                have = mf.parse_reference(tag)
            except ValueError:
                continue
            if (have.registry, have.repository, have.tag) == \
                    (want.registry, want.repository, want.tag):
                return entry
    raise ValueError(f"the archive holds several images and none is tagged {name}")


def _slicer(path: str, offset: int, size: int):
    return lambda: Slice(path, offset, size)
