"""The content-addressed layer store shared by every image, and its garbage collection.

    <store>/layers/<hex>/          one unpacked layer, keyed by the digest of its uncompressed
                                   tar (sha256 diff_id; sha512 for an AppC image), shared by
                                   every image that has it; overlay lowerdir as is
    <store>/layers/<hex>.json      {"key", "size", "blob"}: its size on disk, for the budget
    <store>/blobs/sha256/<hex>     small blobs kept as fetched: manifests and image configs
    <store>/images/<id>.json       an image record: reference → image id, layers, config, use
    <store>/containers/<id>/       what one container holds: container.json (its image and
                                   layers), upper/ + work/ (overlay) or rootfs/ (copy)
    <store>/tmp/                   downloads and unpacking in progress; emptied at start

A layer is keyed by its diff_id, not a chain id: each layer is its own lowerdir, so its
directory does not depend on what is below it and two images share every layer they have
in common. Compressed layer blobs are not kept: the unpacked directory is the content, and
keeping both would double the disk. Records are written atomically (agent.checkpoint).

Thread-safe. A layer is fetched and unpacked once however many threads ask for it at once
(a lock per key); a layer that a provision is using ("pinned") or a live container holds
is never collected.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from typing import BinaryIO, Callable

import attrs

from agent import checkpoint
from agent.sandbox import check_id
from agent.containerizer.provisioner import layers as lz
from agent.containerizer.provisioner import manifest as mf
from agent.containerizer.provisioner.errors import ImageError
from agent.containerizer.provisioner.runtime import ImageConfig

LAYERS, BLOBS, IMAGES, CONTAINERS, TMP = "layers", "blobs", "images", "containers", "tmp"
CONTAINER_FILE = "container.json"
TOUCH_INTERVAL = 60.0  # seconds


class KeyedLocks:
    """One lock per key, made on demand and dropped when nobody holds or waits for it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._slots: dict[str, list] = {}

    @contextlib.contextmanager
    def __call__(self, key: str):
        with self._lock:
            slot = self._slots.setdefault(key, [threading.Lock(), 0])
            slot[1] += 1
        slot[0].acquire()
        try:
            yield
        finally:
            slot[0].release()
            with self._lock:
                slot[1] -= 1
                if slot[1] == 0:
                    del self._slots[key]


@attrs.frozen
class LayerSource:
    """Where one layer comes from and what it must hash to."""

    open: Callable[[], BinaryIO]  # the blob as stored (maybe compressed); closed after use
    diff_id: str | None  # "sha256:<hex>" of the uncompressed tar; None: learnt by unpacking
    digest: str | None = None  # "sha256:<hex>" of the blob as stored, checked when given
    size: int | None = None  # of the blob as stored, checked when given
    algorithm: str = "sha256"  # of the uncompressed tar, when diff_id is None
    whiteouts: bool = True
    prefix: str | None = None  # unpack only what is below this top-level directory
    other: Callable | None = None  # layers.unpack's `other`
    what: str = "layer"  # for messages and progress: "layer sha256:ab12… of busybox"
    #: Called once the layer is unpacked and checked, before it is admitted; raises
    #: ImageError to refuse it, or returns what to keep in its metadata (`extra`).
    finish: Callable[[], dict] | None = None


@attrs.frozen
class ImageRecord:
    """What the store knows of one image reference."""

    reference: str  # the record's key: "docker:<registry>/<repo>:<tag>", "oci:...", "appc:..."
    image_id: str  # manifest digest, or the AppC image id
    layers: tuple[str, ...]  # layer keys, bottom first
    config: ImageConfig
    last_used: float = 0.0

    def to_json(self) -> dict:
        return {"reference": self.reference, "image_id": self.image_id,
                "layers": list(self.layers), "config": self.config.to_json(),
                "last_used": self.last_used}

    @classmethod
    def from_json(cls, doc: dict) -> ImageRecord:
        return cls(doc["reference"], doc["image_id"], tuple(doc["layers"]),
                   ImageConfig.from_json(doc["config"]), float(doc.get("last_used", 0.0)))


def layer_name(key: str) -> str:
    """The directory name of a layer key ("sha256:<hex>" → "<hex>"): short, no ':' (the
    overlay lowerdir separator)."""
    _, hexdigest = mf.parse_digest(key, what="layer key")
    return hexdigest


class Store:
    """The layer store under `root` (see the module docstring for the layout)."""

    def __init__(self, root: str, *, clock: Callable[[], float] = time.time):
        self.root = os.path.abspath(root)
        self.clock = clock
        for sub in (LAYERS, os.path.join(BLOBS, "sha256"), IMAGES, CONTAINERS):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        shutil.rmtree(os.path.join(self.root, TMP), ignore_errors=True)
        os.makedirs(os.path.join(self.root, TMP))
        self._lock = threading.RLock()
        self._key_locks = KeyedLocks()
        self._pins: dict[str, int] = {}
        self._images: dict[str, ImageRecord] = {}
        self._containers: dict[str, dict] = {}
        self._load()

    # --- layers -------------------------------------------------------------------------------

    def layer_path(self, key: str) -> str:
        return os.path.join(self.root, LAYERS, layer_name(key))

    def has_layer(self, key: str) -> bool:
        return os.path.isdir(self.layer_path(key))

    def acquire(self, keys) -> bool:
        """Pin every layer of `keys` if all are in the store (True); else pin none (False)."""
        with self._lock:
            if not all(self.has_layer(k) for k in keys):
                return False
            for k in keys:
                self._pins[k] = self._pins.get(k, 0) + 1
            return True

    def release(self, keys) -> None:
        """Unpin layers pinned by `acquire` or `add_layer`."""
        with self._lock:
            for k in keys:
                n = self._pins.get(k, 0) - 1
                if n > 0:
                    self._pins[k] = n
                else:
                    self._pins.pop(k, None)

    def add_layer(self, source: LayerSource,
                  progress: Callable[[str], None] | None = None) -> str:
        """Fetch, check and unpack a layer unless the store has it; its key, pinned (the
        caller releases it). One fetch per key however many threads ask at once."""
        if source.diff_id is None:
            return self._add_unkeyed(source, progress)
        with self._key_locks(source.diff_id):
            if self.acquire([source.diff_id]):
                return source.diff_id
            temp, size, extra = self._unpack(source, progress)
            self._admit(source.diff_id, temp, size, source.digest, extra)
            return source.diff_id

    def _add_unkeyed(self, source: LayerSource, progress) -> str:
        temp, size, extra, key = self._unpack(source, progress, learn=True)
        with self._key_locks(key):
            if self.acquire([key]):
                shutil.rmtree(temp, ignore_errors=True)
                return key
            self._admit(key, temp, size, source.digest, extra)
            return key

    def _admit(self, key: str, temp: str, size: int, blob: str | None, extra: dict) -> None:
        """Move an unpacked layer into place (metadata first: a layer directory that exists
        is complete) and pin it."""
        name = layer_name(key)
        checkpoint.write_json(os.path.join(self.root, LAYERS, name + ".json"),
                              {"key": key, "size": size, "blob": blob, "extra": extra})
        with self._lock:
            os.rename(temp, os.path.join(self.root, LAYERS, name))
            self._pins[key] = self._pins.get(key, 0) + 1

    def _unpack(self, source: LayerSource, progress, learn: bool = False):
        """Unpack into a temp directory, checking every digest: (temp, size[, key])."""
        temp = tempfile.mkdtemp(prefix="layer-", dir=os.path.join(self.root, TMP))
        os.chmod(temp, 0o755)
        algorithm = source.diff_id.split(":")[0] if source.diff_id else source.algorithm
        report = None
        if progress is not None:
            total = f" of {source.size / 1e6:.1f} MB" if source.size else ""
            report = lambda n: progress(f"{source.what}: {n / 1e6:.1f} MB{total}")  # noqa: E731
        try:
            raw = source.open()
            try:
                stored = lz.HashingReader(raw, "sha256", report)
                plain = lz.decompressed(stored)
                tar = lz.HashingReader(plain, algorithm)
                try:
                    unpacked = lz.unpack(tar, temp, whiteouts=source.whiteouts,
                                         prefix=source.prefix, other=source.other)
                    tar.drain()
                    stored.drain()
                finally:
                    if hasattr(plain, "close"):
                        plain.close()
            finally:
                raw.close()
            if source.digest is not None and stored.digest() != source.digest:
                raise ImageError(f"{source.what}: what was downloaded has digest "
                                 f"{stored.digest()}, not {source.digest}")
            if source.size is not None and stored.count != source.size:
                raise ImageError(f"{source.what}: {stored.count} bytes were downloaded, the "
                                 f"manifest says {source.size}")
            if source.diff_id is not None and tar.digest() != source.diff_id:
                raise ImageError(f"{source.what}: the uncompressed content has digest "
                                 f"{tar.digest()}, not the expected {source.diff_id}")
            extra = source.finish() if source.finish is not None else {}
            if progress is not None:
                progress(f"{source.what}: done, {stored.count / 1e6:.1f} MB")
        except lz.LayerError as e:
            shutil.rmtree(temp, ignore_errors=True)
            raise ImageError(f"{source.what} cannot be unpacked: {e}") from None
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        if learn:
            return temp, unpacked.size, extra, tar.digest()
        return temp, unpacked.size, extra

    def layer_meta(self, key: str) -> dict:
        """{"key", "size", "blob", "extra"} of a layer in the store ({} if unreadable)."""
        try:
            with open(os.path.join(self.root, LAYERS, layer_name(key) + ".json"), "rb") as f:
                doc = json.load(f)
            return doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            return {}

    def layer_size(self, key: str) -> int:
        size = self.layer_meta(key).get("size")
        return size if isinstance(size, int) else 0

    # --- blobs --------------------------------------------------------------------------------

    def put_blob(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self._blob_path(digest)
        if not os.path.exists(path):
            checkpoint.atomic_write(path, data)
        return digest

    def get_blob(self, digest: str) -> bytes | None:
        try:
            with open(self._blob_path(digest), "rb") as f:
                data = f.read()
        except (OSError, ValueError):
            return None
        return data if hashlib.sha256(data).hexdigest() == digest.split(":", 1)[1] else None

    def _blob_path(self, digest: str) -> str:
        algorithm, hexdigest = mf.parse_digest(digest)
        return os.path.join(self.root, BLOBS, algorithm, hexdigest)

    # --- images -------------------------------------------------------------------------------

    def image(self, reference: str) -> ImageRecord | None:
        with self._lock:
            return self._images.get(reference)

    def put_image(self, record: ImageRecord) -> ImageRecord:
        """Record (or replace) an image, marked used now."""
        record = attrs.evolve(record, last_used=self.clock())
        with self._lock:
            self._images[record.reference] = record
            checkpoint.write_json(self._image_path(record.reference), record.to_json())
        return record

    def touch(self, record: ImageRecord) -> ImageRecord:
        """Mark an image used now. On disk only every TOUCH_INTERVAL seconds: a launch of a
        cached image should not wait for an fsync, and GC needs no finer order than that."""
        now = self.clock()
        with self._lock:
            current = self._images.get(record.reference, record)
            if now - current.last_used < TOUCH_INTERVAL:
                current = attrs.evolve(current, last_used=now)
                self._images[record.reference] = current
                return current
        return self.put_image(current)

    def _image_path(self, reference: str) -> str:
        return os.path.join(self.root, IMAGES,
                            hashlib.sha256(reference.encode()).hexdigest()[:32] + ".json")

    # --- containers ---------------------------------------------------------------------------

    def container_dir(self, container_id: str) -> str:
        return os.path.join(self.root, CONTAINERS, check_id("container id", container_id))

    def add_container(self, container_id: str, doc: dict) -> None:
        """Record what a container holds (`doc`: {"image", "layers", "backend"}); from now
        on its layers are kept for it."""
        with self._lock:
            checkpoint.write_json(os.path.join(self.container_dir(container_id),
                                               CONTAINER_FILE), doc)
            self._containers[container_id] = doc

    def remove_container(self, container_id: str) -> bool:
        """Forget a container and remove its directory; False if it was not known."""
        directory = self.container_dir(container_id)
        with self._lock:
            known = self._containers.pop(container_id, None) is not None
            trash = self._trash_name()
            try:
                os.rename(directory, trash)  # gone at once; removed outside the lock
            except FileNotFoundError:
                return known
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def _trash_name(self) -> str:
        return os.path.join(self.root, TMP, "gc-" + uuid.uuid4().hex)

    def containers(self) -> dict[str, dict]:
        with self._lock:
            return dict(self._containers)

    # --- collection ---------------------------------------------------------------------------

    def size(self) -> int:
        """Bytes the layers take (as recorded when they were unpacked)."""
        with self._lock:
            return sum(self.layer_size(k) for k in self._layer_keys())

    def collect(self, budget: int | None) -> tuple[list[str], list[str]]:
        """Remove unused images, least recently used first, and the layers no image or
        container keeps, until the layers fit in `budget` bytes: (images, layers) removed."""
        if budget is None:
            return [], []
        trash = []
        with self._lock:
            sizes = {k: self.layer_size(k) for k in self._layer_keys()}
            kept = set(self._pins)
            used_images = set()
            for doc in self._containers.values():
                kept.update(doc.get("layers") or ())
                used_images.add(doc.get("image"))
            images, layers = plan_collection(
                {r.reference: (r.layers, r.last_used) for r in self._images.values()},
                sizes, kept, used_images, budget)
            for reference in images:
                del self._images[reference]
                _unlink(self._image_path(reference))
            for key in layers:
                name = layer_name(key)
                trash.append(self._trash_name())
                os.rename(os.path.join(self.root, LAYERS, name), trash[-1])
                _unlink(os.path.join(self.root, LAYERS, name + ".json"))
        for path in trash:  # outside the lock: it can take a while
            shutil.rmtree(path, ignore_errors=True)
        return images, layers

    def _layer_keys(self) -> list[str]:
        keys = []
        directory = os.path.join(self.root, LAYERS)
        for name in os.listdir(directory):
            if name.endswith(".json") or not os.path.isdir(os.path.join(directory, name)):
                continue
            keys.append(("sha512:" if len(name) == 128 else "sha256:") + name)
        return keys

    def _load(self) -> None:
        for name in _listdir(os.path.join(self.root, IMAGES)):
            try:
                doc = checkpoint.read_json(os.path.join(self.root, IMAGES, name))
                record = ImageRecord.from_json(doc)
            except (checkpoint.CheckpointError, KeyError, TypeError, ValueError):
                _unlink(os.path.join(self.root, IMAGES, name))  # its layers go as orphans
                continue
            self._images[record.reference] = record
        for cid in _listdir(os.path.join(self.root, CONTAINERS)):
            path = os.path.join(self.root, CONTAINERS, cid, CONTAINER_FILE)
            try:
                self._containers[cid] = checkpoint.read_json(path)
            except checkpoint.CheckpointError:
                # Written before its record (or the record is broken): nothing to keep for it.
                self._containers[cid] = {"image": None, "layers": []}


def plan_collection(images: dict[str, tuple[tuple[str, ...], float]], sizes: dict[str, int],
                    kept_layers: set[str], used_images: set[str], budget: int
                    ) -> tuple[list[str], list[str]]:
    """Which images and layers to remove so the layers fit in `budget` bytes. Pure.

    `images`: reference → (layers, last used); `sizes`: every layer on disk → bytes;
    `kept_layers`: layers in use (live containers, provisions under way); `used_images`:
    images a live container runs. Layers nobody references go first, then the images in
    least-recently-used order, each with the layers only it held; never a kept one.
    """
    total = sum(sizes.values())
    if total <= budget:
        return [], []
    remaining = dict(images)

    def referenced() -> set[str]:
        refs = set(kept_layers)
        for layers, _ in remaining.values():
            refs.update(layers)
        return refs

    removed_images: list[str] = []
    removed_layers: list[str] = []

    def drop_unreferenced() -> None:
        nonlocal total
        refs = referenced()
        for key in sorted(sizes):
            if key not in refs and key not in removed_layers:
                removed_layers.append(key)
                total -= sizes[key]

    drop_unreferenced()
    candidates = sorted((last, ref) for ref, (_, last) in images.items()
                        if ref not in used_images)
    for _, reference in candidates:
        if total <= budget:
            break
        del remaining[reference]
        removed_images.append(reference)
        drop_unreferenced()
    return removed_images, removed_layers


def _listdir(path: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(path) if not n.startswith("."))
    except FileNotFoundError:
        return []


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
