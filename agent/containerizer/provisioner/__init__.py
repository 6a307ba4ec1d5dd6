"""The provisioner: container root filesystems from Docker, OCI and AppC images.

    provision(container_id, image JSON) ──> source.resolve ──> store.add_layer × n ──> backend
        (the image record is reused when   (manifest, config)  (fetch + unpack once    (overlay dirs
         `cached` and its layers are there)                     per layer, in parallel)  or a copy)

`Provisioner` is what the containerizer calls; its methods block (run them in threads) and
are thread-safe. See README.md for the picture, the vocabulary and the store's layout.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import threading
from typing import Callable

import attrs

from agent.containerizer.provisioner import appc, backends, docker, oci
from agent.containerizer.provisioner import manifest as mf
from agent.containerizer.provisioner.errors import ImageError
from agent.containerizer.provisioner.runtime import ImageConfig
from agent.containerizer.provisioner.store import ImageRecord, KeyedLocks, Store

__all__ = ["ImageConfig", "ImageError", "Provisioner", "Rootfs"]

PARALLEL_LAYERS = 4


@attrs.frozen
class Rootfs:
    """A container's root filesystem, ready for the launcher to mount.

    overlay: mount `overlay` with lowerdir=`layers` (top first), upperdir=`upper`,
    workdir=`work` (the layers share one parent directory, so relative lowerdirs from it
    keep the mount data short). bind: bind-mount `path`.
    """

    kind: str  # "overlay" | "bind"
    config: ImageConfig
    image_id: str
    layers: tuple[str, ...] = ()
    upper: str | None = None
    work: str | None = None
    path: str | None = None


class Provisioner:
    """Root filesystems for containers, from a layer store under `store_dir`."""

    def __init__(self, store_dir: str, *, backend: str = "overlay",
                 docker_registry: str | None = None, docker_insecure_registries=(),
                 docker_credentials: dict | None = None, oci_image_dir: str | None = None,
                 appc_store_dir: str | None = None,
                 appc_simple_discovery_uri_prefix: str | None = None,
                 image_gc_budget: int | None = None,
                 progress: Callable[[str], None] | None = None,
                 registry_timeout: float | None = None):
        self.backend = backends.backend(backend)
        if image_gc_budget is not None and image_gc_budget < 0:
            raise ValueError("the image GC budget must be a number of bytes >= 0")
        self.store = Store(store_dir)
        self.budget = image_gc_budget
        self.progress = progress
        registry = docker_registry or docker.DEFAULT_REGISTRY_URL
        # A directory of archives serves the names without a registry host (Mesos's local
        # puller); a name that names its registry is always pulled from that registry.
        self.docker_archives = None
        if "://" not in registry:
            self.docker_archives = docker.ArchiveSource(registry)
            registry = docker.DEFAULT_REGISTRY_URL
        self.docker = docker.RegistrySource(
            self.store, default_registry=registry,
            insecure_registries=_split(docker_insecure_registries),
            credentials=docker_credentials, timeout=registry_timeout)
        self.oci = oci.LayoutSource(oci_image_dir, self.store) if oci_image_dir else None
        self.appc = None
        if appc_store_dir or appc_simple_discovery_uri_prefix:
            self.appc = appc.AciSource(self.store, store_dir=appc_store_dir,
                                       discovery_prefix=appc_simple_discovery_uri_prefix)
        self._image_locks = KeyedLocks()
        self._container_lock = threading.Lock()

    # --- the containerizer's calls ------------------------------------------------------------

    def provision(self, container_id: str, image: dict) -> Rootfs:
        """Make the root filesystem of `container_id` from `image` (Mesos Image JSON).

        ImageError (with a message for the task's user) if the image cannot be had. A
        container provisioned again gets a fresh filesystem (the old one is dropped)."""
        try:
            self.store.container_dir(container_id)
        except ValueError as e:
            raise ImageError(str(e)) from None
        source = self._source(image)
        try:
            reference = source.reference(image)
        except ValueError as e:
            raise ImageError(str(e)) from None
        cached = image.get("cached", True) is not False
        record, pinned = self._image(source, reference, image, cached)
        try:
            self.destroy(container_id, collect=False)
            directory = self.store.container_dir(container_id)
            os.makedirs(directory)
            try:
                fields = self.backend.prepare([self.store.layer_path(k)
                                               for k in record.layers], directory)
                self.store.add_container(container_id, {
                    "image": record.reference, "image_id": record.image_id,
                    "layers": list(record.layers), "backend": self.backend.name})
            except OSError as e:
                shutil.rmtree(directory, ignore_errors=True)
                raise ImageError(f"could not prepare the root filesystem of container "
                                 f"{container_id}: {e}") from None
        finally:
            self.store.release(pinned)
        self.collect()
        return Rootfs(config=record.config, image_id=record.image_id, **fields)

    def destroy(self, container_id: str, collect: bool = True) -> None:
        """Remove what `container_id` holds (upper/work or its copy); idempotent. The launcher
        has unmounted it: its overlay lived in the container's own mount namespace."""
        with self._container_lock:
            removed = self.store.remove_container(container_id)
        if removed and collect:
            self.collect()

    def recover(self, live_container_ids) -> None:
        """After an agent restart: destroy every container not in `live_container_ids`."""
        live = set(live_container_ids)
        for container_id in self.store.containers():
            if container_id not in live:
                self.destroy(container_id, collect=False)
        self.collect()

    def collect(self) -> None:
        """Garbage-collect now: least recently used images not used by a live container go,
        with the layers no remaining image or container has, until the store fits in the
        budget (never without one)."""
        images, layers = self.store.collect(self.budget)
        if self.progress is not None and (images or layers):
            self.progress(f"image GC: removed {len(images)} images and {len(layers)} layers "
                          f"to stay under {self.budget} bytes")

    # --- inside -------------------------------------------------------------------------------

    def _source(self, image: dict):
        kind = image.get("type") if isinstance(image, dict) else None
        if kind == "DOCKER":
            if self.docker_archives is not None:
                try:
                    named = mf.parse_reference(docker.docker_name(image)).registry
                except ValueError as e:
                    raise ImageError(str(e)) from None
                if named is None:
                    return self.docker_archives
            return self.docker
        if kind == "OCI":
            if self.oci is None:
                raise ImageError("OCI images need the agent's --oci-image-dir")
            return self.oci
        if kind == "APPC":
            if self.appc is None:
                raise ImageError("AppC images need the agent's --appc-store-dir or "
                                 "--appc-simple-discovery-uri-prefix")
            return self.appc
        raise ImageError(f"unsupported image type {kind!r} (DOCKER, OCI or APPC)")

    def _image(self, source, reference: str, image: dict, cached: bool
               ) -> tuple[ImageRecord, list[str]]:
        """The image's record and its layers, pinned (the caller releases them)."""
        with self._image_locks(reference):
            record = self.store.image(reference) if cached else None
            if record is not None and self.store.acquire(record.layers):
                return self.store.touch(record), list(record.layers)
            resolved = source.resolve(image)
            keys = self._layers(resolved.layers)
            try:
                config = resolved.config
                if config is None:
                    config = appc.config_of(self.store.layer_meta(keys[-1]))
                image_id = resolved.image_id or appc.id_of(keys[-1])
                record = self.store.put_image(
                    ImageRecord(resolved.reference, image_id, tuple(keys), config))
            except BaseException:
                self.store.release(keys)
                raise
            return record, keys

    def _layers(self, sources) -> list[str]:
        """Add every layer to the store (a few at a time); their keys, pinned."""
        if len(sources) <= 1:
            return [self.store.add_layer(s, self.progress) for s in sources]
        with concurrent.futures.ThreadPoolExecutor(min(PARALLEL_LAYERS, len(sources)),
                                                   thread_name_prefix="layer") as pool:
            futures = [pool.submit(self.store.add_layer, s, self.progress) for s in sources]
            concurrent.futures.wait(futures)
        keys, error = [], None
        for future in futures:
            if future.exception() is None:
                keys.append(future.result())
            elif error is None:
                error = future.exception()
        if error is not None:
            self.store.release(keys)
            raise error
        return keys


def _split(value) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value or ())
