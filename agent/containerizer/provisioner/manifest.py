"""Image documents, parsed and checked: references, manifests, indexes, configs, AppC manifests.

Pure: every function takes the bytes (or strings) it is given and returns attrs values, or
raises ValueError with a message that says what is wrong. No I/O.

Covered:
- Docker image references (`[registry/]repository[:tag][@sha256:...]`) by Docker's rules;
- Docker schema2 manifests and OCI image manifests (umoci writes no top-level `mediaType`:
  the HTTP Content-Type or the descriptor that pointed here says which it is);
- Docker manifest lists and OCI image indexes, and the choice of a platform's manifest;
- Docker and OCI image configs (Entrypoint, Cmd, Env, WorkingDir, User, rootfs.diff_ids);
- AppC image manifests (appc/spec `aci.md`, plus the absolute `exec` that actool forgets).
"""

from __future__ import annotations

import json
import re

import attrs

# --- media types ------------------------------------------------------------------------------

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYERS = tuple(f"application/vnd.oci.image.{kind}.v1.tar{suffix}"
                   for kind in ("layer", "layer.nondistributable")
                   for suffix in ("", "+gzip", "+zstd"))

MANIFESTS = (DOCKER_MANIFEST, OCI_MANIFEST)
INDEXES = (DOCKER_MANIFEST_LIST, OCI_INDEX)
#: What a puller sends as Accept: all four, always (a registry answers an OCI tag with 404
#: unless the OCI type is accepted, and downgrades schema2 to schema1 unless Docker's is).
ACCEPT = (DOCKER_MANIFEST, OCI_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX)
CONFIGS = (DOCKER_CONFIG, OCI_CONFIG)
LAYERS = (DOCKER_LAYER,) + OCI_LAYERS

REF_NAME = "org.opencontainers.image.ref.name"

# --- references -------------------------------------------------------------------------------

DEFAULT_REGISTRY = "registry-1.docker.io"
DEFAULT_TAG = "latest"
_DOCKER_HUB = {"docker.io", "index.docker.io", "registry-1.docker.io"}
# distribution/reference: path components are lowercase alphanumerics joined by separators.
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
_TAG = re.compile(r"[\w][\w.-]{0,127}\Z")
_HOST = re.compile(r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)"
                   r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?\Z"
                   r"|\[[0-9a-fA-F:.]+\](?::[0-9]+)?\Z")
_DIGEST = re.compile(r"(sha256):([0-9a-f]{64})\Z|(sha512):([0-9a-f]{128})\Z")


@attrs.frozen
class Reference:
    """A Docker image reference, normalized: `registry` is None for the default one."""

    registry: str | None
    repository: str  # as the registry knows it: `library/busybox` for `busybox` on Docker Hub
    tag: str | None  # None only when a digest is given without a tag
    digest: str | None
    written: str  # the repository as the user wrote it (local archives are named after it)

    @property
    def ref(self) -> str:
        """What to ask the registry for: the digest if there is one, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        host = f"{self.registry}/" if self.registry else ""
        tag = f":{self.tag}" if self.tag else ""
        digest = f"@{self.digest}" if self.digest else ""
        return f"{host}{self.repository}{tag}{digest}"


def parse_reference(name: str) -> Reference:
    """Parse a Docker image name: the first component is a registry host when it contains
    '.' or ':' or is 'localhost'; a single-component name on Docker Hub gets `library/`; the
    tag defaults to `latest` (unless a digest is given)."""
    if not isinstance(name, str) or not name:
        raise ValueError("the image name is empty")
    if len(name) > 512 or any(c.isspace() for c in name):
        raise ValueError(f"image name {name!r} is not valid: it is too long or has spaces")
    rest, digest = name, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        parse_digest(digest, what=f"the digest of image {name!r}")
    registry = None
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        if not _HOST.match(first):
            raise ValueError(f"image name {name!r}: {first!r} is not a valid registry host")
        registry, rest = first, remainder
    tag = None
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > last_slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not _TAG.match(tag):
            raise ValueError(f"image name {name!r}: tag {tag!r} is not valid (letters, digits, "
                             "'_', '.', '-', at most 128, not starting with '.' or '-')")
    if not rest:
        raise ValueError(f"image name {name!r} has no repository")
    for component in rest.split("/"):
        if not _COMPONENT.match(component):
            raise ValueError(
                f"image name {name!r}: repository component {component!r} is not valid "
                "(lowercase letters and digits, separated by '.', '_', '__' or '-')")
    if len(rest) > 255:
        raise ValueError(f"image name {name!r}: the repository is longer than 255 characters")
    written = rest
    if registry in _DOCKER_HUB:
        registry = None
    if registry is None and "/" not in rest:
        rest = f"library/{rest}"
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, rest, tag, digest, written)


def parse_digest(value, what: str = "digest") -> tuple[str, str]:
    """(algorithm, hex) of `sha256:<64 hex>` (or `sha512:<128 hex>`); ValueError otherwise."""
    m = _DIGEST.match(value) if isinstance(value, str) else None
    if not m:
        raise ValueError(f"{what} {value!r} is not a digest (sha256:<64 lowercase hex digits>)")
    return (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))


# --- manifests and indexes --------------------------------------------------------------------


@attrs.frozen
class Platform:
    os: str
    architecture: str
    variant: str | None = None


@attrs.frozen
class Descriptor:
    """What points at a blob: its media type, digest and size (plus platform / annotations)."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: dict = attrs.field(factory=dict, eq=False)
    urls: tuple = ()


@attrs.frozen
class Manifest:
    """An image manifest (Docker schema2 or OCI): one config and the layers, bottom first."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@attrs.frozen
class Index:
    """A Docker manifest list or an OCI image index: manifests for several platforms."""

    media_type: str
    manifests: tuple[Descriptor, ...]


def load_json(data: bytes, what: str) -> dict:
    """A JSON object from `data`; ValueError naming `what` if it is not one."""
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not a JSON object")
    return value


def parse_manifest(data: bytes, media_type: str | None = None) -> Manifest | Index:
    """A manifest or index from its bytes. `media_type` is what announced it (the HTTP
    Content-Type, or the descriptor that points at it); the body's own `mediaType`, when
    present, must agree. Without either, the shape decides (`manifests` → an index)."""
    doc = load_json(data, "the manifest")
    announced = _bare(media_type)
    body_type = doc.get("mediaType")
    if body_type is not None and not isinstance(body_type, str):
        raise ValueError("the manifest's mediaType is not a string")
    if doc.get("schemaVersion") == 1 or announced in DOCKER_SCHEMA1 or body_type in DOCKER_SCHEMA1:
        raise ValueError("Docker schema1 manifests are not supported: push the image again "
                         "as Docker schema2 or OCI")
    if doc.get("schemaVersion") != 2:
        raise ValueError(f"the manifest's schemaVersion is {doc.get('schemaVersion')!r}, not 2")
    known = MANIFESTS + INDEXES
    if announced not in known:
        announced = None  # e.g. application/json or application/octet-stream from a server
    if body_type and announced and body_type != announced:
        raise ValueError(f"the manifest says it is {body_type} but was served as {announced}")
    kind = body_type or announced or (OCI_INDEX if "manifests" in doc else OCI_MANIFEST)
    if kind not in known:
        raise ValueError(f"unsupported manifest media type {kind!r} (supported: "
                         f"{', '.join(known)})")
    if kind in INDEXES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise ValueError("the image index has no 'manifests' list")
        return Index(kind, tuple(_descriptor(e, f"manifests[{i}]", with_platform=True)
                                 for i, e in enumerate(entries)))
    if "config" not in doc or "layers" not in doc:
        raise ValueError("the manifest has no 'config' or no 'layers'")
    config = _descriptor(doc["config"], "config")
    if config.media_type not in CONFIGS:
        raise ValueError(f"the manifest's config has media type {config.media_type!r}, not an "
                         "image config (" + ", ".join(CONFIGS) + ")")
    layers = doc["layers"]
    if not isinstance(layers, list):
        raise ValueError("the manifest's 'layers' is not a list")
    parsed = []
    for i, entry in enumerate(layers):
        layer = _descriptor(entry, f"layers[{i}]")
        if layer.media_type == DOCKER_FOREIGN_LAYER or layer.urls:
            raise ValueError(f"layer {layer.digest} is a foreign layer (fetched from "
                             "elsewhere than the registry): not supported")
        if layer.media_type not in LAYERS:
            raise ValueError(f"layer {layer.digest} has unsupported media type "
                             f"{layer.media_type!r}")
        parsed.append(layer)
    return Manifest(kind, config, tuple(parsed))


def select_manifest(index: Index, os: str = "linux", architecture: str = "amd64") -> Descriptor:
    """The entry of `index` for the platform; ValueError listing the platforms it has."""
    for entry in index.manifests:
        p = entry.platform
        if p is not None and p.os == os and p.architecture == architecture:
            return entry
    have = sorted({f"{e.platform.os}/{e.platform.architecture}" for e in index.manifests
                   if e.platform is not None})
    raise ValueError(f"the image has no manifest for {os}/{architecture} "
                     f"(it has: {', '.join(have) or 'no platforms'})")


def _bare(media_type: str | None) -> str | None:
    """A Content-Type without parameters (`; charset=utf-8`)."""
    if not media_type:
        return None
    return media_type.split(";", 1)[0].strip().lower() or None


def _descriptor(doc, where: str, with_platform: bool = False) -> Descriptor:
    if not isinstance(doc, dict):
        raise ValueError(f"the manifest's {where} is not an object")
    media_type = doc.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        raise ValueError(f"the manifest's {where} has no mediaType")
    parse_digest(doc.get("digest"), what=f"the manifest's {where} digest")
    size = doc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"the manifest's {where} has no valid size: {size!r}")
    platform = None
    if with_platform and doc.get("platform") is not None:
        p = doc["platform"]
        if (not isinstance(p, dict) or not isinstance(p.get("os"), str)
                or not isinstance(p.get("architecture"), str)):
            raise ValueError(f"the manifest's {where} platform needs 'os' and 'architecture'")
        variant = p.get("variant")
        platform = Platform(p["os"], p["architecture"],
                            variant if isinstance(variant, str) else None)
    annotations = doc.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise ValueError(f"the manifest's {where} annotations are not an object")
    urls = doc.get("urls") or []
    if not isinstance(urls, list):
        raise ValueError(f"the manifest's {where} urls is not a list")
    return Descriptor(media_type, doc["digest"], size, platform, annotations, tuple(urls))


# --- image configs ----------------------------------------------------------------------------


@attrs.frozen
class Config:
    """The parts of a Docker/OCI image config that running it needs."""

    diff_ids: tuple[str, ...]  # sha256 of each uncompressed layer, bottom first
    os: str | None = None
    architecture: str | None = None
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str | None = None
    user: str | None = None


def parse_config(data: bytes) -> Config:
    """An image config (Docker `container.image.v1` or OCI `image.config.v1`)."""
    doc = load_json(data, "the image config")
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise ValueError("the image config has no rootfs of type 'layers'")
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list):
        raise ValueError("the image config's rootfs has no diff_ids list")
    for i, d in enumerate(diff_ids):
        parse_digest(d, what=f"the image config's diff_ids[{i}]")
    section = doc.get("config") or {}
    if not isinstance(section, dict):
        raise ValueError("the image config's 'config' is not an object")

    def strings(key: str) -> tuple[str, ...]:
        value = section.get(key)
        if value is None:
            return ()
        if isinstance(value, str):  # Docker accepts a bare string for Cmd/Entrypoint
            return (value,)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"the image config's {key} is not a list of strings")
        return tuple(value)

    def optional(key: str) -> str | None:
        value = section.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"the image config's {key} is not a string")
        return value or None

    env = strings("Env")
    for item in env:
        if "=" not in item or item.startswith("="):
            raise ValueError(f"the image config's Env entry {item!r} is not NAME=value")
    working_dir = optional("WorkingDir")
    if working_dir is not None and not working_dir.startswith("/"):
        raise ValueError(f"the image config's WorkingDir {working_dir!r} is not absolute")
    return Config(diff_ids=tuple(diff_ids),
                  os=doc.get("os") if isinstance(doc.get("os"), str) else None,
                  architecture=(doc.get("architecture")
                                if isinstance(doc.get("architecture"), str) else None),
                  entrypoint=strings("Entrypoint"), cmd=strings("Cmd"), env=env,
                  working_dir=working_dir, user=optional("User"))


def check_layers_match(manifest: Manifest, config: Config) -> None:
    """A manifest and its config must agree on the number of layers."""
    if len(manifest.layers) != len(config.diff_ids):
        raise ValueError(f"the manifest has {len(manifest.layers)} layers but the image config "
                         f"lists {len(config.diff_ids)} diff_ids")


# --- AppC -------------------------------------------------------------------------------------

_AC_IDENTIFIER = re.compile(r"[a-z0-9]+(?:[-._~/][a-z0-9]+)*\Z")
_SEMVER = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
                     r"(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?\Z")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
APPC_ID = re.compile(r"sha512-[0-9a-f]{128}\Z")
#: appc/spec schema/types/labels.go: the arches valid for os=linux.
APPC_LINUX_ARCHES = ("amd64", "i386", "aarch64", "aarch64_be", "armv6l", "armv7l", "armv7b",
                     "ppc64", "ppc64le", "s390x")


@attrs.frozen
class AppcApp:
    exec: tuple[str, ...]
    user: str
    group: str
    working_directory: str | None = None
    environment: tuple[tuple[str, str], ...] = ()


@attrs.frozen
class AppcManifest:
    """An AppC image manifest: its name, labels (version, os, arch, ...) and app."""

    name: str
    ac_version: str
    labels: dict  # name -> value
    app: AppcApp | None
    dependencies: tuple = ()


def check_ac_identifier(value, what: str) -> str:
    if not isinstance(value, str) or not _AC_IDENTIFIER.match(value):
        raise ValueError(f"{what} {value!r} is not an AC identifier (lowercase letters and "
                         "digits, separated by one of '-._~/')")
    return value


def parse_appc_manifest(data: bytes) -> AppcManifest:
    """An AppC image manifest, checked as appc/spec (and stricter than actool: `exec[0]`
    must be absolute)."""
    doc = load_json(data, "the AppC image manifest")
    if doc.get("acKind") != "ImageManifest":
        raise ValueError(f"the AppC manifest's acKind is {doc.get('acKind')!r}, "
                         "not 'ImageManifest'")
    version = doc.get("acVersion")
    if not isinstance(version, str) or not _SEMVER.match(version):
        raise ValueError(f"the AppC manifest's acVersion {version!r} is not a semantic version")
    name = check_ac_identifier(doc.get("name"), "the AppC manifest's name")
    labels = {}
    for i, label in enumerate(doc.get("labels") or []):
        if not isinstance(label, dict) or not isinstance(label.get("value"), str):
            raise ValueError(f"the AppC manifest's labels[{i}] needs a name and a string value")
        key = check_ac_identifier(label.get("name"), f"the AppC manifest's labels[{i}] name")
        if key == "name":
            raise ValueError("the AppC manifest has a label called 'name', which is reserved")
        if key in labels:
            raise ValueError(f"the AppC manifest has the label {key!r} twice")
        labels[key] = label["value"]
    if "arch" in labels and "os" not in labels:
        raise ValueError("the AppC manifest has an 'arch' label without an 'os' label")
    if labels.get("os") == "linux" and "arch" in labels \
            and labels["arch"] not in APPC_LINUX_ARCHES:
        raise ValueError(f"the AppC manifest's arch {labels['arch']!r} is not valid for linux "
                         f"(valid: {', '.join(APPC_LINUX_ARCHES)})")
    app = None
    if doc.get("app") is not None:
        app = _appc_app(doc["app"])
    dependencies = doc.get("dependencies") or []
    if not isinstance(dependencies, list):
        raise ValueError("the AppC manifest's dependencies is not a list")
    return AppcManifest(name, version, labels, app, tuple(json.dumps(d) for d in dependencies))


def _appc_app(app) -> AppcApp:
    if not isinstance(app, dict):
        raise ValueError("the AppC manifest's app is not an object")
    exe = app.get("exec")
    if (not isinstance(exe, list) or not exe
            or not all(isinstance(a, str) for a in exe) or not exe[0]):
        raise ValueError("the AppC manifest's app.exec must be a non-empty list of strings")
    if not exe[0].startswith("/"):
        raise ValueError(f"the AppC manifest's app.exec[0] {exe[0]!r} is not an absolute path")
    for key in ("user", "group"):
        if not isinstance(app.get(key), str) or not app[key]:
            raise ValueError(f"the AppC manifest's app.{key} is required (a user or group "
                             "name, or a number)")
    working_directory = app.get("workingDirectory") or None
    if working_directory is not None and (not isinstance(working_directory, str)
                                          or not working_directory.startswith("/")):
        raise ValueError(f"the AppC manifest's app.workingDirectory {working_directory!r} "
                         "is not an absolute path")
    environment = []
    for i, var in enumerate(app.get("environment") or []):
        if (not isinstance(var, dict) or not isinstance(var.get("name"), str)
                or not _ENV_NAME.match(var["name"]) or not isinstance(var.get("value"), str)):
            raise ValueError(f"the AppC manifest's app.environment[{i}] needs a variable name "
                             "and a string value")
        environment.append((var["name"], var["value"]))
    return AppcApp(tuple(exe), app["user"], app["group"], working_directory,
                   tuple(environment))
