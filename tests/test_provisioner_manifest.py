"""Image documents: references, manifests, indexes, configs and AppC manifests (pure)."""

import json
import subprocess
import sys

import pytest

from agent.containerizer.provisioner import manifest as mf

D1 = "sha256:" + "a" * 64
D2 = "sha256:" + "b" * 64
D3 = "sha256:" + "c" * 64


@pytest.mark.parametrize("name, registry, repository, tag, digest", [
    ("busybox", None, "library/busybox", "latest", None),
    ("busybox:1.35", None, "library/busybox", "1.35", None),
    ("ctrverify/busybox", None, "ctrverify/busybox", "latest", None),
    ("docker.io/busybox", None, "library/busybox", "latest", None),
    ("index.docker.io/library/busybox:x", None, "library/busybox", "x", None),
    ("localhost/busybox", "localhost", "busybox", "latest", None),
    ("localhost:5000/a/b:c", "localhost:5000", "a/b", "c", None),
    ("127.0.0.1:5055/ctrverify/busybox:v2s2", "127.0.0.1:5055", "ctrverify/busybox", "v2s2",
     None),
    ("quay.io/coreos/etcd", "quay.io", "coreos/etcd", "latest", None),
    ("registry:5000/x", "registry:5000", "x", "latest", None),
    (f"busybox@{D1}", None, "library/busybox", None, D1),
    (f"busybox:1@{D1}", None, "library/busybox", "1", D1),
    ("ab/c.d-e__f_g", None, "ab/c.d-e__f_g", "latest", None),
    ("a.b/c", "a.b", "c", "latest", None),
])
def test_references_follow_docker_name_rules(name, registry, repository, tag, digest):
    """Registry host, library/ prefix, default tag and digests as Docker normalizes them."""
    ref = mf.parse_reference(name)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == \
        (registry, repository, tag, digest)
    assert ref.ref == (digest or tag)


@pytest.mark.parametrize("name, words", [
    ("", "empty"),
    ("Busybox", "not valid"),
    ("busybox:", "tag"),
    ("busybox:-x", "tag"),
    ("a//b", "component ''"),
    ("busybox@sha256:123", "not a digest"),
    ("bad host!/x", "spaces"),
    ("host:port:/x", "not a valid registry host"),
    ("a/..b", "not valid"),
])
def test_bad_references_say_what_is_wrong(name, words):
    """A malformed name is refused with a message naming the bad part."""
    with pytest.raises(ValueError, match=None) as e:
        mf.parse_reference(name)
    assert words in str(e.value)


def _manifest(media_type=mf.DOCKER_MANIFEST, body_type=True, layers=None, config=None):
    doc = {"schemaVersion": 2,
           "config": config or {"mediaType": mf.DOCKER_CONFIG if media_type ==
                                mf.DOCKER_MANIFEST else mf.OCI_CONFIG, "digest": D1, "size": 9},
           "layers": layers if layers is not None else [
               {"mediaType": mf.DOCKER_LAYER if media_type == mf.DOCKER_MANIFEST
                else mf.OCI_LAYERS[1], "digest": D2, "size": 100}]}
    if body_type:
        doc["mediaType"] = media_type
    return json.dumps(doc).encode()


def test_schema2_and_oci_manifests_parse():
    """Docker schema2 and OCI manifests give the config and the layers, bottom first."""
    m = mf.parse_manifest(_manifest())
    assert m.media_type == mf.DOCKER_MANIFEST
    assert m.config.digest == D1 and [layer.digest for layer in m.layers] == [D2]
    o = mf.parse_manifest(_manifest(mf.OCI_MANIFEST), mf.OCI_MANIFEST)
    assert o.media_type == mf.OCI_MANIFEST


def test_an_oci_manifest_without_media_type_is_told_by_content_type_or_shape():
    """umoci writes no top-level mediaType: the Content-Type (or the shape) says what it is."""
    data = _manifest(mf.OCI_MANIFEST, body_type=False)
    assert mf.parse_manifest(data, mf.OCI_MANIFEST + "; charset=utf-8").media_type == \
        mf.OCI_MANIFEST
    assert mf.parse_manifest(data, "application/octet-stream").media_type == mf.OCI_MANIFEST
    assert mf.parse_manifest(data).media_type == mf.OCI_MANIFEST


@pytest.mark.parametrize("data, announced, words", [
    (b"not json", None, "not JSON"),
    (b"[]", None, "not a JSON object"),
    (json.dumps({"schemaVersion": 1, "fsLayers": []}).encode(), None, "schema1"),
    (b"{}", mf.DOCKER_SCHEMA1[1], "schema1"),
    (json.dumps({"schemaVersion": 3}).encode(), None, "schemaVersion"),
    (_manifest(), mf.OCI_MANIFEST, "served as"),
    (_manifest(layers=[{"mediaType": mf.DOCKER_LAYER, "digest": "sha256:12", "size": 1}]),
     None, "not a digest"),
    (_manifest(layers=[{"mediaType": mf.DOCKER_LAYER, "digest": D2, "size": -1}]), None,
     "size"),
    (_manifest(layers=[{"mediaType": "text/plain", "digest": D2, "size": 1}]), None,
     "unsupported media type"),
    (_manifest(layers=[{"mediaType": mf.DOCKER_FOREIGN_LAYER, "digest": D2, "size": 1,
                        "urls": ["http://x"]}]), None, "foreign"),
    (_manifest(config={"mediaType": mf.DOCKER_LAYER, "digest": D1, "size": 1}), None,
     "not an image config"),
    (json.dumps({"schemaVersion": 2, "mediaType": mf.DOCKER_MANIFEST}).encode(), None,
     "no 'config'"),
])
def test_bad_manifests_are_refused_with_the_reason(data, announced, words):
    """Each malformed manifest gets a ValueError that names the problem."""
    with pytest.raises(ValueError) as e:
        mf.parse_manifest(data, announced)
    assert words in str(e.value)


def _index(media_type, platforms):
    return json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": [
        {"mediaType": mf.DOCKER_MANIFEST, "digest": digest, "size": 10,
         "platform": {"os": os_, "architecture": arch}}
        for digest, (os_, arch) in platforms]}).encode()


@pytest.mark.parametrize("media_type", [mf.DOCKER_MANIFEST_LIST, mf.OCI_INDEX])
def test_lists_and_indexes_resolve_to_linux_amd64(media_type):
    """A manifest list / OCI index picks the linux/amd64 entry, whatever its position."""
    index = mf.parse_manifest(_index(media_type, [(D1, ("linux", "arm64")),
                                                  (D2, ("windows", "amd64")),
                                                  (D3, ("linux", "amd64"))]))
    assert isinstance(index, mf.Index)
    assert mf.select_manifest(index).digest == D3


def test_an_index_without_the_platform_lists_what_it_has():
    """No linux/amd64 entry: the error lists the platforms the image does have."""
    index = mf.parse_manifest(_index(mf.OCI_INDEX, [(D1, ("linux", "arm64")),
                                                    (D2, ("linux", "s390x"))]))
    with pytest.raises(ValueError, match="linux/arm64, linux/s390x"):
        mf.select_manifest(index)


def _config(**section):
    return json.dumps({"architecture": "amd64", "os": "linux", "config": section,
                       "rootfs": {"type": "layers", "diff_ids": [D1, D2]}}).encode()


def test_configs_give_the_runtime_fields_and_diff_ids():
    """Entrypoint, Cmd, Env, WorkingDir, User and the diff_ids come out of a config."""
    c = mf.parse_config(_config(Entrypoint=["/bin/app"], Cmd=["-v"], Env=["A=1", "B=x=y"],
                                WorkingDir="/srv", User="nobody:nogroup"))
    assert c.diff_ids == (D1, D2)
    assert (c.entrypoint, c.cmd, c.env, c.working_dir, c.user) == \
        (("/bin/app",), ("-v",), ("A=1", "B=x=y"), "/srv", "nobody:nogroup")
    assert (c.os, c.architecture) == ("linux", "amd64")
    empty = mf.parse_config(_config(WorkingDir="", User=""))
    assert (empty.entrypoint, empty.cmd, empty.working_dir, empty.user) == ((), (), None, None)


@pytest.mark.parametrize("data, words", [
    (json.dumps({"rootfs": {"type": "layers"}}).encode(), "diff_ids"),
    (json.dumps({"config": {}}).encode(), "rootfs"),
    (_config(Cmd=[1]), "Cmd is not a list of strings"),
    (_config(Env=["NOEQUALS"]), "not NAME=value"),
    (_config(WorkingDir="relative"), "not absolute"),
    (json.dumps({"rootfs": {"type": "layers", "diff_ids": ["md5:x"]}}).encode(), "digest"),
])
def test_bad_configs_are_refused(data, words):
    """A config with wrong types or a relative WorkingDir is refused, saying why."""
    with pytest.raises(ValueError) as e:
        mf.parse_config(data)
    assert words in str(e.value)


def test_layer_count_must_match_diff_ids():
    """A manifest with more layers than its config's diff_ids is refused."""
    manifest = mf.parse_manifest(_manifest())
    with pytest.raises(ValueError, match="1 layers but the image config lists 2"):
        mf.check_layers_match(manifest, mf.parse_config(_config()))


APPC = {"acKind": "ImageManifest", "acVersion": "0.8.11", "name": "example.com/busybox",
        "labels": [{"name": "version", "value": "1.35.0"}, {"name": "os", "value": "linux"},
                   {"name": "arch", "value": "amd64"}],
        "app": {"exec": ["/bin/sh", "-c", "echo hi"], "user": "0", "group": "0",
                "workingDirectory": "/", "environment": [{"name": "PATH", "value": "/bin"}]}}


def _appc(**changes):
    doc = json.loads(json.dumps(APPC))
    for key, value in changes.items():
        target, _, field = key.partition("__")
        if field:
            if value is None:
                doc[target].pop(field)
            else:
                doc[target][field] = value
        elif value is None:
            doc.pop(key)
        else:
            doc[key] = value
    return json.dumps(doc).encode()


def test_appc_manifests_parse():
    """A valid AppC manifest gives its name, labels and app."""
    m = mf.parse_appc_manifest(_appc())
    assert m.name == "example.com/busybox"
    assert m.labels == {"version": "1.35.0", "os": "linux", "arch": "amd64"}
    assert m.app.exec == ("/bin/sh", "-c", "echo hi")
    assert (m.app.user, m.app.group, m.app.working_directory) == ("0", "0", "/")
    assert m.app.environment == (("PATH", "/bin"),)
    minimal = mf.parse_appc_manifest(json.dumps(
        {"acKind": "ImageManifest", "acVersion": "0.8.11", "name": "a/b"}).encode())
    assert minimal.app is None and minimal.labels == {}


@pytest.mark.parametrize("changes, words", [
    ({"acKind": "PodManifest"}, "acKind"),
    ({"acVersion": "latest"}, "semantic version"),
    ({"name": "Example.com/BusyBox"}, "AC identifier"),
    ({"labels": [{"name": "name", "value": "x"}]}, "reserved"),
    ({"labels": [{"name": "os", "value": "linux"}, {"name": "os", "value": "linux"}]},
     "twice"),
    ({"labels": [{"name": "arch", "value": "amd64"}]}, "without an 'os'"),
    ({"labels": [{"name": "os", "value": "linux"}, {"name": "arch", "value": "sparc"}]},
     "not valid for linux"),
    ({"app__user": None}, "app.user is required"),
    ({"app__group": None}, "app.group is required"),
    ({"app__exec": ["bin/sh"]}, "not an absolute path"),  # actool lets this through
    ({"app__exec": []}, "non-empty"),
    ({"app__workingDirectory": "tmp"}, "workingDirectory"),
    ({"app__environment": [{"name": "1X", "value": "v"}]}, "environment[0]"),
])
def test_bad_appc_manifests_are_refused(changes, words):
    """The spec's rules (and an absolute exec) are enforced, each with its own message."""
    with pytest.raises(ValueError) as e:
        mf.parse_appc_manifest(_appc(**changes))
    assert words in str(e.value)


def test_the_pure_modules_import_no_twisted_kazoo_or_msgpack():
    """manifest and runtime stay pure: importing them pulls in no I/O framework."""
    code = ("import sys, agent.containerizer.provisioner.manifest, "
            "agent.containerizer.provisioner.runtime;"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('twisted', 'kazoo', 'msgpack')];"
            "print(bad); sys.exit(bool(bad))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
