"""OCI images from a local directory: image layouts and archives of them.

`{"type": "OCI", "oci": {"name": "busybox:latest"}}` (our extension of Mesos's Image) is
looked up in `oci_image_dir` as the layout directory `<dir>/busybox/` (`oci-layout`,
`index.json`, `blobs/<alg>/<hex>`) or the archive `<dir>/busybox.tar` (a tar of a layout,
what `skopeo copy ... oci-archive:` writes). The tag (`latest` by default) picks the entry
of `index.json` whose `org.opencontainers.image.ref.name` annotation is that tag; an entry
that is itself an index is resolved to this host's platform. Every blob is checked against
its digest. OCI manifests served by registries go through the docker source (the same
registry client accepts them).
"""

from __future__ import annotations

import os

from agent.containerizer.provisioner import manifest as mf
from agent.containerizer.provisioner.errors import ImageError
from agent.containerizer.provisioner.source import (
    Blobs, Resolved, Slice, from_manifest, safe_relative, tar_index)

MAX_INDEX = 4 << 20


def oci_name(image: dict) -> tuple[str, str]:
    """(name, tag) of an OCI Image JSON (`oci.name` = `name[:tag]`)."""
    oci = image.get("oci") if isinstance(image, dict) else None
    value = oci.get("name") if isinstance(oci, dict) else None
    if not isinstance(value, str) or not value:
        raise ValueError("an OCI image needs 'oci.name' (a name in the OCI image directory, "
                         "with an optional ':tag')")
    name, tag = value, mf.DEFAULT_TAG
    slash, colon = value.rfind("/"), value.rfind(":")
    if colon > slash:
        name, tag = value[:colon], value[colon + 1:]
    if not tag:
        raise ValueError(f"OCI image name {value!r} has an empty tag")
    safe_relative(name, "OCI image name")
    return name, tag


class _DirBlobs(Blobs):
    def __init__(self, layout: str):
        self.layout = layout

    def open(self, digest: str):
        algorithm, hexdigest = mf.parse_digest(digest)
        try:
            return open(os.path.join(self.layout, "blobs", algorithm, hexdigest), "rb")
        except OSError as e:
            raise ImageError(f"the OCI layout {self.layout} lacks blob {digest}: "
                             f"{e.strerror}") from None


class _ArchiveBlobs(Blobs):
    def __init__(self, path: str):
        self.path = path
        self.index = tar_index(path)

    def open(self, digest: str):
        algorithm, hexdigest = mf.parse_digest(digest)
        return self.open_member(f"blobs/{algorithm}/{hexdigest}", f"blob {digest}")

    def open_member(self, name: str, what: str):
        member = self.index.get(name)
        if member is None:
            raise ImageError(f"the OCI archive {self.path} has no {name} ({what})")
        return Slice(self.path, member.offset_data, member.size)


class LayoutSource:
    """OCI image layouts (directories or tar archives) in one directory."""

    kind = "oci"

    def __init__(self, directory: str, store=None):
        self.directory = os.path.abspath(directory)
        self.store = store

    def locate(self, image: dict) -> tuple[str, str, bool]:
        """(path, tag, is_archive) of an image; ImageError if neither form is there."""
        name, tag = oci_name(image)
        base = os.path.join(self.directory, safe_relative(name, "OCI image name"))
        if os.path.isfile(os.path.join(base, "index.json")):
            return base, tag, False
        if os.path.isfile(base + ".tar"):
            return base + ".tar", tag, True
        raise ImageError(f"OCI image {name} not found: neither {base}/ (an image layout) nor "
                         f"{base}.tar (an OCI archive) exists in the OCI image directory")

    def reference(self, image: dict) -> str:
        name, tag = oci_name(image)
        return f"oci:{os.path.join(self.directory, name)}:{tag}"

    def resolve(self, image: dict) -> Resolved:
        try:
            path, tag, archive = self.locate(image)
        except ValueError as e:
            raise ImageError(str(e)) from None
        name = f"{image['oci']['name']}"
        blobs = _ArchiveBlobs(path) if archive else _DirBlobs(path)
        if archive:
            with blobs.open_member("index.json", "the layout's index") as f:
                index_data = f.read(MAX_INDEX)
        else:
            with open(os.path.join(path, "index.json"), "rb") as f:
                index_data = f.read(MAX_INDEX)
        try:
            index = mf.parse_manifest(index_data, mf.OCI_INDEX)
            if not isinstance(index, mf.Index):
                raise ValueError("index.json is not an image index")
        except ValueError as e:
            raise ImageError(f"OCI image {name} ({path}): {e}") from None
        entries = [e for e in index.manifests if e.annotations.get(mf.REF_NAME) == tag]
        if not entries:
            tags = sorted({e.annotations.get(mf.REF_NAME) for e in index.manifests
                           if e.annotations.get(mf.REF_NAME)})
            raise ImageError(f"OCI image {name}: {path} has no manifest tagged {tag!r} (its "
                             f"tags: {', '.join(tags) or 'none'})")
        entry = entries[0]
        if len(entries) > 1:
            try:
                entry = mf.select_manifest(mf.Index(mf.OCI_INDEX, tuple(entries)))
            except ValueError as e:
                raise ImageError(f"OCI image {name}: several manifests are tagged {tag!r} "
                                 f"and {e}") from None
        data = blobs.read(entry, MAX_INDEX)
        return from_manifest(data, entry.media_type, name=name,
                             reference=self.reference(image), blobs=blobs,
                             fetch_manifest=lambda d: blobs.read(d, MAX_INDEX),
                             store=self.store)
