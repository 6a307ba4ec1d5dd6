"""Each image store end to end against real images: registry (schema2, OCI, lists), docker
archives, OCI layouts and archives, AppC ACIs; both backends; auth; GC; recovery."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading

import pytest

from agent.containerizer.provisioner import Provisioner, Rootfs
from agent.containerizer.provisioner.errors import ImageError
from tests.cluster import REPO, wait_for
from tests.images import CMD, IMAGE_ENV, WORKING_DIR, busybox_images, tree  # noqa: F401

OVERLAY_CONFIG = ("/bin/sh", "-c", "cat /etc/agora-image")


@pytest.fixture
def provisioner(tmp_path, busybox_images):
    """A Provisioner on a fresh store that knows every test image location."""
    return make(tmp_path, busybox_images)


def make(tmp_path, images, name="store", **kwargs) -> Provisioner:
    options = {"oci_image_dir": images.oci_image_dir, "appc_store_dir": images.aci_store_dir}
    options.update(kwargs)
    return Provisioner(str(tmp_path / name), **options)


SOURCE_IDS = ["registry-v2s2", "registry-oci", "registry-zstd", "registry-list", "registry-index",
              "docker-archive", "oci-layout", "oci-archive", "appc-store", "appc-discovery"]


def source(images, which):
    """(image JSON, provisioner options) for one way of getting the busybox image."""
    return {
        "registry-v2s2": (images.docker_image(images.v2s2_name), {}),
        "registry-oci": (images.docker_image(images.oci_name), {}),
        "registry-zstd": (images.docker_image(images.zstd_name), {}),
        "registry-list": (images.docker_image(images.list_name), {}),
        "registry-index": (images.docker_image(images.index_name), {}),
        "docker-archive": (images.docker_image(images.docker_archive_name),
                           {"docker_registry": images.docker_archive_dir}),
        "oci-layout": ({"type": "OCI", "oci": {"name": images.oci_layout_name}}, {}),
        "oci-archive": ({"type": "OCI", "oci": {"name": images.oci_archive_name}}, {}),
        "appc-store": (images.appc_image(), {}),
        "appc-discovery": (images.appc_image(with_id=False),
                           {"appc_store_dir": None,
                            "appc_simple_discovery_uri_prefix": images.aci_prefix}),
    }[which]


def overlay_tree(rootfs: Rootfs, mount_point: str) -> dict:
    """The tree of `rootfs` mounted as overlay in a private mount namespace (the way the
    launcher does: from the layers' directory, relative lowerdirs)."""
    base = os.path.dirname(rootfs.layers[0])
    lower = ":".join(os.path.relpath(layer, base) for layer in rootfs.layers)
    data = f"lowerdir={lower},upperdir={rootfs.upper},workdir={rootfs.work}"
    code = (f"import json, os, subprocess, sys; sys.path.insert(0, {REPO!r});"
            "from tests.images import tree;"
            f"os.chdir({base!r});"
            f"subprocess.run(['mount', '-t', 'overlay', 'overlay', '-o', {data!r}, "
            f"{mount_point!r}], check=True);"
            f"print(json.dumps(tree({mount_point!r})))")
    done = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c",
                           code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not os.path.ismount(mount_point)  # it lived only in that namespace
    return json.loads(done.stdout)


def expected(images) -> dict:
    """The image as umoci unpacks it (whiteouts applied), as tree() sees it through JSON."""
    return json.loads(json.dumps(tree(images.rootfs)))


@pytest.mark.parametrize("which", SOURCE_IDS)
def test_every_source_gives_the_image_with_the_copy_backend(tmp_path, busybox_images, which):
    """Copied rootfs = umoci's unpack of the image: files, owners, modes, links, devices,
    xattrs; the whiteouts of layer 2 applied."""
    image, options = source(busybox_images, which)
    p = make(tmp_path, busybox_images, backend="copy", **options)
    rootfs = p.provision("c1", image)
    assert rootfs.kind == "bind" and rootfs.layers == ()
    assert json.loads(json.dumps(tree(rootfs.path))) == expected(busybox_images)
    assert not os.path.exists(os.path.join(rootfs.path, "etc/doomed"))
    assert os.listdir(os.path.join(rootfs.path, "data")) == ["new.txt"]
    links = os.lstat(os.path.join(rootfs.path, "etc/agora-image")).st_ino, \
        os.lstat(os.path.join(rootfs.path, "etc/agora-link")).st_ino
    assert links[0] == links[1]
    p.destroy("c1")
    assert not os.path.exists(rootfs.path)


@pytest.mark.parametrize("which", SOURCE_IDS)
def test_every_source_stacks_as_overlay_layers(tmp_path, busybox_images, which):
    """The overlay layers, mounted as the launcher will, show exactly the image."""
    image, options = source(busybox_images, which)
    p = make(tmp_path, busybox_images, **options)
    rootfs = p.provision("c1", image)
    assert rootfs.kind == "overlay"
    assert len(rootfs.layers) == (1 if which.startswith("appc") else 2)
    assert all(os.path.dirname(layer) == os.path.dirname(rootfs.layers[0])
               for layer in rootfs.layers)
    assert os.listdir(rootfs.upper) == [] and os.listdir(rootfs.work) == []
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    assert overlay_tree(rootfs, str(mount_point)) == expected(busybox_images)
    p.destroy("c1")
    assert not os.path.exists(rootfs.upper)
    assert all(os.path.isdir(layer) for layer in rootfs.layers)  # the store keeps them


@pytest.mark.parametrize("which", SOURCE_IDS)
def test_every_source_gives_the_image_config(tmp_path, busybox_images, which):
    """Cmd, Env and WorkingDir come through from every source (AppC also its user)."""
    image, options = source(busybox_images, which)
    config = make(tmp_path, busybox_images, **options).provision("c1", image).config
    assert (config.cmd, config.env, config.working_dir) == (CMD, IMAGE_ENV, WORKING_DIR)
    assert config.user == ("0:0" if which.startswith("appc") else None)


def test_lists_and_indexes_resolve_to_the_amd64_manifest(provisioner, busybox_images):
    """The manifest list and the OCI index give the same image as the amd64 tags (not the
    arm64 image beside it)."""
    ids = {name: provisioner.provision(f"c{i}", busybox_images.docker_image(name)).image_id
           for i, name in enumerate((busybox_images.v2s2_name, busybox_images.list_name,
                                     busybox_images.oci_name, busybox_images.index_name))}
    assert ids[busybox_images.list_name] == ids[busybox_images.v2s2_name]
    assert ids[busybox_images.index_name] == ids[busybox_images.oci_name]


def test_an_image_for_another_cpu_is_refused(provisioner, busybox_images):
    """The arm64 image, asked for by its own tag, is refused with the reason."""
    name = f"{busybox_images.registry}/ctrverify/busybox:arm64-oci"
    with pytest.raises(ImageError, match="arm64 CPUs; this host is amd64"):
        provisioner.provision("c1", busybox_images.docker_image(name))


def test_images_share_layers_and_concurrent_provisions_pull_once(tmp_path, busybox_images):
    """Six containers of two images sharing their layers, provisioned at once: each layer
    is downloaded from the registry and unpacked exactly once."""
    messages = []
    p = make(tmp_path, busybox_images, progress=messages.append)
    server = busybox_images.registry_server
    before = {d: server.blob_gets(d) for d in busybox_images.layer_digests}
    names = [busybox_images.v2s2_name, busybox_images.oci_name] * 3
    barrier = threading.Barrier(len(names))
    results, errors = {}, []

    def provision(i, name):
        barrier.wait()
        try:
            results[i] = p.provision(f"c{i}", busybox_images.docker_image(name))
        except Exception as e:  # noqa: BLE001 — reported below
            errors.append(e)

    threads = [threading.Thread(target=provision, args=(i, n)) for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len({r.layers for r in results.values()}) == 1  # one set of layer directories
    assert len({r.upper for r in results.values()}) == len(names)
    done = [m for m in messages if m.endswith(" MB") and ": done, " in m]
    assert len(done) == len(busybox_images.layer_digests), messages
    wait_for(lambda: all(server.blob_gets(d) >= before[d] + 1 for d in before),
             timeout=10, what="the registry's access log")
    assert {d: server.blob_gets(d) - before[d] for d in before} == \
        {d: 1 for d in before}


def test_cached_images_skip_the_registry_and_cached_false_refetches_the_manifest(
        provisioner, busybox_images):
    """A second provision uses the image record; `cached: false` asks the registry for the
    manifest again but still takes the layers from the store."""
    server = busybox_images.registry_server
    path = "/v2/ctrverify/busybox/manifests/v2s2"
    image = busybox_images.docker_image(busybox_images.v2s2_name)
    provisioner.provision("c1", image)
    wait_for(lambda: server.gets(path), what="the first manifest GET in the log")
    manifests = server.gets(path)
    blobs = {d: server.blob_gets(d) for d in busybox_images.layer_digests}
    provisioner.provision("c2", image)
    provisioner.provision("c3", {**image, "cached": False})
    wait_for(lambda: server.gets(path) == manifests + 1, timeout=10,
             what="exactly one more manifest GET")
    assert {d: server.blob_gets(d) for d in blobs} == blobs


@pytest.mark.parametrize("kind", ["basic", "token"])
def test_registry_auth_works_and_fails_clearly(tmp_path, busybox_images, kind):
    """Basic and bearer-token registries: the right credential pulls, a wrong one and none
    fail with messages that say so."""
    host = getattr(busybox_images, f"{kind}_registry")
    good = getattr(busybox_images, f"{kind}_credentials")
    name = f"{host}/ctrverify/busybox:v2s2"
    p = make(tmp_path, busybox_images)
    with pytest.raises(ImageError, match="requires authentication"):
        p.provision("c1", busybox_images.docker_image(name))
    with pytest.raises(ImageError, match=f"authentication failed for registry {host}"):
        p.provision("c1", busybox_images.docker_image(name, ("nobody", "wrong")))
    rootfs = p.provision("c1", busybox_images.docker_image(name, good))
    assert rootfs.config.cmd == CMD
    if kind == "token":
        assert "repository:ctrverify/busybox:pull" in busybox_images.token_server.issued


def test_registry_credentials_from_the_agent_flag(tmp_path, busybox_images):
    """--docker-credentials {host: (user, password)} is used when the image has none."""
    host = busybox_images.token_registry
    p = make(tmp_path, busybox_images,
             docker_credentials={host: busybox_images.token_credentials})
    assert p.provision("c1", busybox_images.docker_image(f"{host}/ctrverify/busybox:oci"))


@pytest.mark.parametrize("image, options, words", [
    ("registry-missing-tag", {}, "not found in registry"),
    ("registry-missing-repo", {}, "not found in registry"),
    ("archive-missing", {"docker_registry": "ARCHIVES"}, "there is no"),
    ({"type": "OCI", "oci": {"name": "busybox:nope"}}, {}, "its tags: latest"),
    ({"type": "OCI", "oci": {"name": "nothing"}}, {}, "neither"),
    ({"type": "OCI", "oci": {"name": "../etc:x"}}, {}, "without '..'"),
    ({"type": "APPC", "appc": {"name": "example.com/nothing"}},
     {"appc_store_dir": None, "appc_simple_discovery_uri_prefix": "PREFIX"}, "404"),
    ({"type": "APPC", "appc": {"name": "Bad Name"}}, {}, "AC identifier"),
    ({"type": "APPC", "appc": {"name": "a/b", "id": "sha512-12"}}, {}, "not an image id"),
    ({"type": "DOCKER", "docker": {}}, {}, "docker.name"),
    ({"type": "DOCKER", "docker": {"name": "UPPER/case"}}, {}, "not valid"),
    ({"type": "FTP"}, {}, "unsupported image type"),
])
def test_missing_or_malformed_images_fail_with_a_clear_message(tmp_path, busybox_images,
                                                               image, options, words):
    """Every way of naming an image that is not there says what was looked for."""
    if image == "registry-missing-tag":
        image = busybox_images.docker_image(f"{busybox_images.registry}/ctrverify/busybox:no")
    elif image == "registry-missing-repo":
        image = busybox_images.docker_image(f"{busybox_images.registry}/nobody/here")
    elif image == "archive-missing":
        image = busybox_images.docker_image("ctrverify/missing:latest")
    options = {k: {"ARCHIVES": busybox_images.docker_archive_dir,
                   "PREFIX": busybox_images.aci_prefix}.get(v, v) for k, v in options.items()}
    p = make(tmp_path, busybox_images, **options)
    with pytest.raises(ImageError) as e:
        p.provision("c1", image)
    assert words in str(e.value)
    assert p.store.containers() == {}


def test_a_corrupt_blob_in_an_oci_layout_is_refused(tmp_path, busybox_images):
    """A layer blob whose content does not match its digest refuses the image; nothing of
    it stays in the store."""
    directory = tmp_path / "oci"
    shutil.copytree(os.path.join(busybox_images.oci_image_dir, "busybox"),
                    directory / "busybox")
    index = json.loads((directory / "busybox/index.json").read_text())
    manifest_hex = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((directory / "busybox/blobs/sha256" / manifest_hex).read_text())
    layer = directory / "busybox/blobs/sha256" / manifest["layers"][1]["digest"].split(":")[1]
    data = bytearray(layer.read_bytes())
    data[-20] ^= 0xFF
    layer.write_bytes(bytes(data))
    p = make(tmp_path, busybox_images, oci_image_dir=str(directory))
    with pytest.raises(ImageError, match="digest|gzip"):
        p.provision("c1", {"type": "OCI", "oci": {"name": "busybox"}})
    assert os.listdir(os.path.join(p.store.root, "tmp")) == []
    assert p.store.containers() == {}


def test_a_docker_archive_whose_layers_do_not_match_its_config_is_refused(tmp_path,
                                                                          busybox_images):
    """The diff_ids in the config are checked against the (uncompressed) archive layers."""
    src = os.path.join(busybox_images.docker_archive_dir, "ctrverify", "busybox:latest.tar")
    out = tmp_path / "archives" / "bad:latest.tar"
    out.parent.mkdir()
    with tarfile.open(src) as tin, tarfile.open(out, "w") as tout:
        entry = json.loads(tin.extractfile("manifest.json").read())[0]
        for member in tin.getmembers():
            data = tin.extractfile(member).read() if member.isreg() else None
            if member.name == entry["Config"]:
                config = json.loads(data)
                config["rootfs"]["diff_ids"].reverse()
                data = json.dumps(config).encode()
                member.size = len(data)
            tout.addfile(member, io.BytesIO(data) if data is not None else None)
    p = make(tmp_path, busybox_images, docker_registry=str(out.parent))
    with pytest.raises(ImageError, match="not the expected"):
        p.provision("c1", busybox_images.docker_image("bad"))


def test_an_appc_image_whose_id_does_not_match_is_refused(tmp_path, busybox_images):
    """`appc.id` is checked against the sha512 of the ACI's tar."""
    image = busybox_images.appc_image()
    image["appc"]["id"] = "sha512-" + "0" * 128
    with pytest.raises(ImageError, match="not the expected sha512:0000"):
        make(tmp_path, busybox_images).provision("c1", image)


@pytest.mark.parametrize("change, words", [
    ("extra", "only 'manifest' and 'rootfs/'"),
    ("name", "names 'example.com/other'"),
    ("relative-exec", "not an absolute path"),
])
def test_bad_acis_are_refused(tmp_path, busybox_images, change, words):
    """An ACI with a stray top-level file, another name, or a relative exec is refused."""
    store = tmp_path / "aci"
    path = store / "example.com" / "busybox-1.35.0-linux-amd64.aci"
    path.parent.mkdir(parents=True)
    src = os.path.join(busybox_images.aci_store_dir, "example.com",
                       "busybox-1.35.0-linux-amd64.aci")
    with tarfile.open(src) as tin, tarfile.open(path, "w") as tout:
        for member in tin:
            data = tin.extractfile(member).read() if member.isreg() else None
            if member.name == "manifest":
                doc = json.loads(data)
                if change == "name":
                    doc["name"] = "example.com/other"
                if change == "relative-exec":
                    doc["app"]["exec"] = ["bin/sh"]
                data = json.dumps(doc).encode()
                member.size = len(data)
            tout.addfile(member, io.BytesIO(data) if data is not None else None)
        if change == "extra":
            info = tarfile.TarInfo("README")
            tout.addfile(info)
    p = make(tmp_path, busybox_images, appc_store_dir=str(store))
    with pytest.raises(ImageError) as e:
        p.provision("c1", busybox_images.appc_image(with_id=False))
    assert words in str(e.value)
    assert os.listdir(os.path.join(p.store.root, "layers")) == []


def test_gc_removes_least_recently_used_unused_images_and_keeps_live_ones(tmp_path,
                                                                          busybox_images):
    """Over budget, GC removes the least recently used unused image first, with its layers,
    until the store fits; what a live container uses stays even over budget."""
    docker_image = busybox_images.docker_image(busybox_images.v2s2_name)
    p = make(tmp_path, busybox_images)  # no budget: nothing is ever collected
    docker = p.provision("c1", docker_image)
    appc = p.provision("c2", busybox_images.appc_image())  # used after the docker one
    appc_size = p.store.layer_size("sha512:" + os.path.basename(appc.layers[0]))
    p.destroy("c1")
    p.destroy("c2")
    assert all(os.path.isdir(layer) for layer in docker.layers + appc.layers)
    # restarted with a budget that holds one of the two images
    p = make(tmp_path, busybox_images, image_gc_budget=appc_size + 1000)
    p.recover(set())
    assert not any(os.path.exists(layer) for layer in docker.layers)  # least recently used
    assert os.path.isdir(appc.layers[0])
    assert p.store.image(p.docker.reference(docker_image)) is None
    assert p.store.size() <= appc_size + 1000
    # budget 0: provisioning the docker image again evicts the (unused) AppC image, while
    # the docker image itself stays for its live container
    p = make(tmp_path, busybox_images, image_gc_budget=0)
    again = p.provision("c3", docker_image)
    assert not os.path.exists(appc.layers[0])
    assert all(os.path.isdir(layer) for layer in again.layers)
    p.collect()
    assert all(os.path.isdir(layer) for layer in again.layers)
    p.destroy("c3")
    assert os.listdir(os.path.join(p.store.root, "layers")) == []


def test_without_a_budget_nothing_is_collected(provisioner, busybox_images):
    """image_gc_budget=None: unused images stay."""
    rootfs = provisioner.provision("c1", busybox_images.docker_image(busybox_images.v2s2_name))
    provisioner.destroy("c1")
    provisioner.collect()
    assert all(os.path.isdir(layer) for layer in rootfs.layers)


def test_recover_destroys_what_is_not_live_and_keeps_the_rest(tmp_path, busybox_images):
    """After a restart (a new Provisioner on the same store), recover keeps the live
    containers' filesystems and layers, and removes the others'."""
    p = make(tmp_path, busybox_images, image_gc_budget=0)
    live = p.provision("live", busybox_images.docker_image(busybox_images.v2s2_name))
    dead = p.provision("dead", busybox_images.appc_image())
    with open(os.path.join(live.upper, "written-by-task"), "w") as f:
        f.write("x")
    restarted = make(tmp_path, busybox_images, image_gc_budget=0)
    restarted.recover({"live"})
    assert os.path.exists(os.path.join(live.upper, "written-by-task"))
    assert all(os.path.isdir(layer) for layer in live.layers)
    assert not os.path.exists(dead.upper)
    assert not os.path.exists(dead.layers[0])  # budget 0: unused layers go at once
    assert set(restarted.store.containers()) == {"live"}


def test_destroy_is_idempotent_and_reprovision_gives_a_fresh_upper(provisioner,
                                                                   busybox_images):
    """destroy twice is fine; provisioning a container again starts from an empty upper."""
    image = busybox_images.docker_image(busybox_images.v2s2_name)
    first = provisioner.provision("c1", image)
    open(os.path.join(first.upper, "scratch"), "w").close()
    second = provisioner.provision("c1", image)
    assert os.listdir(second.upper) == []
    provisioner.destroy("c1")
    provisioner.destroy("c1")
    provisioner.destroy("never-provisioned")
    with pytest.raises(ImageError, match="container id"):
        provisioner.provision("../escape", image)
