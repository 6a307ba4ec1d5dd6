"""AppC images: ACI files from a local store directory, or by simple discovery over HTTP.

An image is named by `appc.name` (an AC identifier) and its labels; `version` defaults to
`latest`, `os` to `linux`, `arch` to `amd64`. It is looked for as

    <appc_store_dir>/{name}-{version}-{os}-{arch}.aci               (a local file)
    <appc_simple_discovery_uri_prefix>{name}-{version}-{os}-{arch}.aci   (http(s):// or /path)

as Mesos's simple discovery builds the URL. An ACI is a tar (gzip/bzip2/xz or plain) with
only `manifest` and `rootfs/` at the top; its id is `sha512-<hex>` of the uncompressed tar,
checked against `appc.id` when one is given (and then an ACI already in the store is used
without fetching anything). The manifest is checked (manifest.parse_appc_manifest) and must
name the image asked for; `rootfs/` becomes the image's single layer (no whiteouts: AppC has
none). Dependencies are not supported.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.parse

import attrs

from agent.containerizer.provisioner import manifest as mf
from agent.containerizer.provisioner import runtime
from agent.containerizer.provisioner.errors import ImageError
from agent.containerizer.provisioner.layers import LayerError, clean_name
from agent.containerizer.provisioner.registry import Body, USER_AGENT
from agent.containerizer.provisioner.source import Resolved, safe_relative
from agent.containerizer.provisioner.store import LayerSource
from agent.fetcher import _os_reason as os_reason

DEFAULTS = {"version": "latest", "os": "linux", "arch": "amd64"}
MAX_MANIFEST = 1 << 20
TIMEOUT = 60.0


@attrs.frozen
class AppcImage:
    name: str
    labels: dict  # version, os, arch (defaulted) and any other label asked for
    id: str | None

    @property
    def file_name(self) -> str:
        """`{name}-{version}-{os}-{arch}.aci`."""
        label = self.labels
        return f"{self.name}-{label['version']}-{label['os']}-{label['arch']}.aci"


def parse_image(image: dict) -> AppcImage:
    """The name, labels and id of an APPC Image JSON; ValueError if malformed."""
    appc = image.get("appc") if isinstance(image, dict) else None
    if not isinstance(appc, dict):
        raise ValueError("an APPC image needs 'appc' with a 'name'")
    name = mf.check_ac_identifier(appc.get("name"), "appc.name")
    labels = dict(DEFAULTS)
    for i, label in enumerate(((appc.get("labels") or {}).get("labels")) or []):
        if not isinstance(label, dict) or not isinstance(label.get("key"), str) \
                or not isinstance(label.get("value"), str):
            raise ValueError(f"appc.labels.labels[{i}] needs a string 'key' and 'value'")
        labels[label["key"]] = label["value"]
    image_id = appc.get("id") or None
    if image_id is not None and (not isinstance(image_id, str)
                                 or not mf.APPC_ID.match(image_id)):
        raise ValueError(f"appc.id {image_id!r} is not an image id (sha512-<128 hex digits>)")
    return AppcImage(name, labels, image_id)


def key_of(image_id: str) -> str:
    """The layer store key of an AppC image id (`sha512-<hex>` → `sha512:<hex>`)."""
    return "sha512:" + image_id[len("sha512-"):]


def id_of(key: str) -> str:
    return "sha512-" + key.split(":", 1)[1]


class AciSource:
    """AppC images from a store directory and/or a simple discovery prefix."""

    kind = "appc"

    def __init__(self, store, *, store_dir: str | None = None,
                 discovery_prefix: str | None = None, timeout: float = TIMEOUT):
        if discovery_prefix is not None and not discovery_prefix.startswith(
                ("http://", "https://", "/")):
            raise ValueError(f"--appc-simple-discovery-uri-prefix {discovery_prefix!r} must "
                             "start with http://, https:// or /")
        self.store = store
        self.store_dir = os.path.abspath(store_dir) if store_dir else None
        self.prefix = discovery_prefix
        self.timeout = timeout

    def reference(self, image: dict) -> str:
        aci = parse_image(image)
        if aci.id:
            return f"appc:{aci.id}"
        return "appc:" + aci.name + "," + ",".join(f"{k}={v}"
                                                   for k, v in sorted(aci.labels.items()))

    def resolve(self, image: dict) -> Resolved:
        try:
            aci = parse_image(image)
            reference = self.reference(image)
        except ValueError as e:
            raise ImageError(str(e)) from None
        found: dict = {}

        def other(member, tar):
            if clean_name(member.name) != "manifest" or not member.isreg():
                raise LayerError(f"{member.name!r} is at the top of the ACI: only 'manifest' "
                                 "and 'rootfs/' may be")
            if member.size > MAX_MANIFEST:
                raise LayerError("the ACI's manifest is larger than 1 MiB")
            try:
                doc = mf.parse_appc_manifest(tar.extractfile(member).read())
            except ValueError as e:
                raise LayerError(str(e)) from None
            _check_matches(doc, aci)
            found["manifest"] = doc

        def finish() -> dict:
            if "manifest" not in found:
                raise ImageError(f"AppC image {aci.name}: the ACI has no manifest")
            return {"appc_config": runtime.from_appc(found["manifest"]).to_json()}

        layer = LayerSource(open=lambda: self._open(aci),
                            diff_id=key_of(aci.id) if aci.id else None, algorithm="sha512",
                            whiteouts=False, prefix="rootfs", other=other, finish=finish,
                            what=f"AppC image {aci.name}")
        return Resolved(reference, aci.id, None, (layer,))

    def _open(self, aci: AppcImage):
        """A stream of the ACI from the first place that has it."""
        tried = []
        relative = safe_relative(aci.file_name, "AppC image file name")
        if self.store_dir is not None:
            path = os.path.join(self.store_dir, relative)
            if os.path.isfile(path):
                return open(path, "rb")
            tried.append(path)
        if self.prefix is not None:
            if self.prefix.startswith("/"):
                path = self.prefix + relative
                if os.path.isfile(path):
                    return open(path, "rb")
                tried.append(path)
            else:
                return self._download(self.prefix + aci.file_name, aci)
        raise ImageError(f"AppC image {aci.name} not found: no "
                         + (", ".join(tried) if tried else
                            "--appc-store-dir or --appc-simple-discovery-uri-prefix is set"))

    def _download(self, url: str, aci: AppcImage) -> Body:
        for _ in range(6):
            parts = urllib.parse.urlsplit(url)
            cls = http.client.HTTPSConnection if parts.scheme == "https" \
                else http.client.HTTPConnection
            conn = cls(parts.netloc, timeout=self.timeout)
            try:
                conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""),
                             headers={"User-Agent": USER_AGENT})
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise ImageError(f"AppC image {aci.name}: cannot fetch {url}: "
                                 f"{os_reason(e)}") from None
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urllib.parse.urljoin(url, response.getheader("Location"))
                response.close()
                conn.close()
                continue
            if response.status != 200:
                response.close()
                conn.close()
                if response.status == 404:
                    raise ImageError(f"AppC image {aci.name} not found at {url} (404)")
                raise ImageError(f"AppC image {aci.name}: {url} answered {response.status} "
                                 f"{response.reason}")
            return Body(response, conn, url)
        raise ImageError(f"AppC image {aci.name}: too many redirects from {url}")


def config_of(meta: dict) -> runtime.ImageConfig:
    """The runtime config kept in an AppC layer's metadata."""
    doc = (meta.get("extra") or {}).get("appc_config")
    if not isinstance(doc, dict):
        raise ImageError("the AppC image in the store has lost its manifest; remove "
                         "the store's layer or fetch the image again")
    return runtime.ImageConfig.from_json(doc)


def _check_matches(doc: mf.AppcManifest, aci: AppcImage) -> None:
    if doc.name != aci.name:
        raise LayerError(f"the ACI's manifest names {doc.name!r}, not {aci.name!r}")
    for key in ("os", "arch"):
        if key in doc.labels and doc.labels[key] != aci.labels[key]:
            raise LayerError(f"the ACI is for {key} {doc.labels[key]!r}, not "
                             f"{aci.labels[key]!r}")
    if doc.dependencies:
        raise LayerError("the ACI has dependencies, which are not supported: "
                         + json.dumps([json.loads(d) for d in doc.dependencies])[:200])
