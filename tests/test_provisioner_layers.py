"""Layer tars unpacked safely into the store: whiteouts, metadata, hostile tars, digests."""

import bz2
import gzip
import hashlib
import io
import lzma
import os
import shutil
import stat
import subprocess
import tarfile
import threading

import pytest

from agent.containerizer.provisioner import layers as lz
from agent.containerizer.provisioner.errors import ImageError
from agent.containerizer.provisioner.store import LayerSource, Store, plan_collection

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking layers as they are "
                                "(owners, device nodes, trusted.* xattrs) needs root")

MTIME = 1700000000


def tar_bytes(entries) -> bytes:
    """A PAX tar of (name, kind, extra) entries: kind is 'f' (extra = data), 'd', 'l'
    (symlink to extra), 'h' (hard link to extra), 'c' (char device (major, minor)), 'p'."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            name, kind, extra = (entry + (None,))[:3] if len(entry) < 3 else entry[:3]
            options = entry[3] if len(entry) > 3 else {}
            info = tarfile.TarInfo(name)
            info.mtime = MTIME
            info.mode = options.get("mode", 0o755 if kind == "d" else 0o644)
            info.uid, info.gid = options.get("owner", (0, 0))
            info.pax_headers = options.get("pax", {})
            data = None
            if kind == "f":
                data = extra or b""
                info.size = len(data)
            elif kind == "d":
                info.type = tarfile.DIRTYPE
            elif kind == "l":
                info.type, info.linkname = tarfile.SYMTYPE, extra
            elif kind == "h":
                info.type, info.linkname = tarfile.LNKTYPE, extra
            elif kind == "c":
                info.type = tarfile.CHRTYPE
                info.devmajor, info.devminor = extra
            elif kind == "p":
                info.type = tarfile.FIFOTYPE
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def unpack(tmp_path, data: bytes, **kwargs) -> str:
    dest = tmp_path / "layer"
    dest.mkdir()
    lz.unpack(lz.decompressed(io.BytesIO(data)), str(dest), **kwargs)
    return str(dest)


def test_whiteouts_become_overlayfs_whiteouts(tmp_path):
    """`.wh.NAME` becomes a 0/0 char device, `.wh..wh..opq` the opaque xattr, aufs
    bookkeeping is skipped."""
    root = unpack(tmp_path, tar_bytes([
        ("etc", "d"), ("etc/.wh.doomed", "f"), ("data", "d"), ("data/.wh..wh..opq", "f"),
        ("data/new", "f", b"n"), ("deep/er/.wh.gone", "f"),
        (".wh..wh.plnk", "d"), (".wh..wh.plnk/123.456", "f", b"x")]))
    st = os.lstat(os.path.join(root, "etc/doomed"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert not os.path.exists(os.path.join(root, "etc/.wh.doomed"))
    assert os.getxattr(os.path.join(root, "data"), lz.OPAQUE_XATTR) == b"y"
    assert os.listdir(os.path.join(root, "data")) == ["new"]
    assert stat.S_ISCHR(os.lstat(os.path.join(root, "deep/er/gone")).st_mode)
    assert not os.path.exists(os.path.join(root, ".wh..wh.plnk"))


def test_whiteouts_stay_files_when_asked(tmp_path):
    """AppC has no whiteouts: with whiteouts off a `.wh.` file is just a file."""
    root = unpack(tmp_path, tar_bytes([("a/.wh.b", "f", b"x")]), whiteouts=False)
    assert open(os.path.join(root, "a/.wh.b"), "rb").read() == b"x"


def test_owners_modes_times_devices_links_and_xattrs_are_kept(tmp_path):
    """Everything the tar says about an entry survives unpacking as root."""
    root = unpack(tmp_path, tar_bytes([
        ("srv", "d", None, {"owner": (1000, 1001), "mode": 0o750}),
        ("srv/suid", "f", b"#!", {"mode": 0o4755, "owner": (1000, 1001)}),
        ("srv/sgid-sticky", "d", None, {"mode": 0o3777}),
        ("srv/cap", "f", b"x", {"pax": {"SCHILY.xattr.user.agora": "yes",
                                         "SCHILY.xattr.security.capability":
                                             "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00"
                                             "\x00\x00\x00\x00\x00\x00\x00\x00"}}),
        ("srv/hard", "h", "srv/suid"),
        ("srv/sym", "l", "/etc/passwd", {"owner": (5, 6)}),
        ("dev/null", "c", (1, 3), {"mode": 0o666}),
        ("dev/fifo", "p"),
    ]))
    srv = os.lstat(os.path.join(root, "srv"))
    assert (srv.st_uid, srv.st_gid, stat.S_IMODE(srv.st_mode)) == (1000, 1001, 0o750)
    assert srv.st_mtime == MTIME
    suid = os.lstat(os.path.join(root, "srv/suid"))
    assert (stat.S_IMODE(suid.st_mode), suid.st_uid, suid.st_mtime) == (0o4755, 1000, MTIME)
    assert stat.S_IMODE(os.lstat(os.path.join(root, "srv/sgid-sticky")).st_mode) == 0o3777
    assert os.getxattr(os.path.join(root, "srv/cap"), "user.agora") == b"yes"
    assert len(os.getxattr(os.path.join(root, "srv/cap"), "security.capability")) == 20
    assert os.lstat(os.path.join(root, "srv/hard")).st_ino == suid.st_ino
    sym = os.lstat(os.path.join(root, "srv/sym"))
    assert os.readlink(os.path.join(root, "srv/sym")) == "/etc/passwd"
    assert (sym.st_uid, sym.st_gid) == (5, 6)
    null = os.lstat(os.path.join(root, "dev/null"))
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666
    assert stat.S_ISFIFO(os.lstat(os.path.join(root, "dev/fifo")).st_mode)


def test_later_entries_replace_earlier_ones(tmp_path):
    """A tar may name a path twice: the last entry wins, whatever the kinds."""
    root = unpack(tmp_path, tar_bytes([
        ("x", "l", "/"), ("x", "d"), ("x/f", "f", b"1"), ("y", "d"), ("y/z", "f"),
        ("y", "f", b"file now"), ("x/f", "f", b"2")]))
    assert os.path.isdir(os.path.join(root, "x")) and not os.path.islink(
        os.path.join(root, "x"))
    assert open(os.path.join(root, "x/f"), "rb").read() == b"2"
    assert open(os.path.join(root, "y"), "rb").read() == b"file now"


@pytest.mark.parametrize("entries, words", [
    ([("../escape", "f", b"x")], "outside the layer"),
    ([("a/../../escape", "f", b"x")], "outside the layer"),
    ([("link", "l", "OUTSIDE"), ("link/planted", "f", b"x")], "through the symlink"),
    ([("link", "l", "."), ("link/x", "d")], "through the symlink"),
    ([("hard", "h", "../../etc/passwd")], "outside the layer"),
    ([("hard", "h", "etc/passwd")], "does not hold"),
    ([("d", "d"), ("hard", "h", "d")], "does not hold"),
    ([("file", "f"), ("file/below", "f")], "not a directory"),
    ([("x", "f", b"", {"pax": {"SCHILY.xattr.trusted.overlay.redirect": "/etc"}})],
     "overlayfs xattr"),
    ([(".wh.", "f")], "names nothing"),
    ([(".", "f", b"x")], "replace the layer's root"),
])
def test_hostile_tars_are_refused_and_write_nothing_outside(tmp_path, entries, words):
    """Entries that climb out, go through symlinks or link outside refuse the layer."""
    outside = tmp_path / "outside"
    outside.mkdir()
    fixed = [tuple(str(outside) if e == "OUTSIDE" else e for e in entry) for entry in entries]
    with pytest.raises(lz.LayerError) as e:
        unpack(tmp_path, tar_bytes(fixed))
    assert words in str(e.value)
    assert os.listdir(outside) == []
    assert not (tmp_path / "escape").exists()


def test_absolute_names_land_inside_the_layer(tmp_path):
    """An absolute member name counts from the layer root, as Docker reads it."""
    root = unpack(tmp_path, tar_bytes([("/abs/file", "f", b"inside"), ("./rel", "f")]))
    assert open(os.path.join(root, "abs/file"), "rb").read() == b"inside"
    assert os.path.exists(os.path.join(root, "rel"))


def _zstd(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True,
                          check=True).stdout


@pytest.mark.parametrize("compress", [
    lambda d: d, gzip.compress, bz2.compress, lzma.compress,
    lambda d: gzip.compress(d[:1000]) + gzip.compress(d[1000:]),
    pytest.param(_zstd, marks=pytest.mark.skipif(shutil.which("zstd") is None,
                                                 reason="the zstd command is not installed")),
], ids=["plain", "gzip", "bzip2", "xz", "gzip-members", "zstd"])
def test_compression_is_told_by_magic_bytes(tmp_path, compress):
    """Plain, gzip (also multi-member), bzip2, xz and zstd layers unpack the same."""
    data = tar_bytes([("big", "f", os.urandom(300_000)), ("small", "f", b"s")])
    root = unpack(tmp_path, compress(data))
    assert os.path.getsize(os.path.join(root, "big")) == 300_000


def test_a_truncated_gzip_layer_is_refused(tmp_path):
    """A gzip stream that stops early is an error, not a short layer."""
    data = gzip.compress(tar_bytes([("big", "f", os.urandom(100_000))]))
    with pytest.raises(lz.LayerError, match="gzip"):
        unpack(tmp_path, data[:len(data) // 2])


def _source(data: bytes, *, opened=None, **kwargs) -> LayerSource:
    def open_blob():
        if opened is not None:
            opened.append(1)
        return io.BytesIO(data)
    fields = {"diff_id": None, "digest": None}
    fields.update(kwargs)
    return LayerSource(open=open_blob, **fields)


def test_the_store_checks_every_digest_and_keeps_nothing_bad(tmp_path):
    """A wrong blob digest, blob size or diff_id refuses the layer; no directory is left."""
    plain = tar_bytes([("f", "f", b"x")])
    blob = gzip.compress(plain)
    diff_id = "sha256:" + hashlib.sha256(plain).hexdigest()
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    store = Store(str(tmp_path / "store"))
    wrong = "sha256:" + "0" * 64
    for kwargs, words in [({"diff_id": diff_id, "digest": wrong}, "has digest"),
                          ({"diff_id": diff_id, "digest": digest, "size": 3}, "bytes were"),
                          ({"diff_id": wrong, "digest": digest}, "not the expected")]:
        with pytest.raises(ImageError, match=words):
            store.add_layer(_source(blob, **kwargs))
        assert not store.has_layer(kwargs["diff_id"])
    assert os.listdir(tmp_path / "store" / "tmp") == []
    assert store.add_layer(_source(blob, diff_id=diff_id, digest=digest,
                                   size=len(blob))) == diff_id
    assert open(os.path.join(store.layer_path(diff_id), "f"), "rb").read() == b"x"


def test_concurrent_adds_of_one_layer_fetch_it_once(tmp_path):
    """Eight threads adding one layer at once open (download) and unpack it once."""
    plain = tar_bytes([("f", "f", os.urandom(200_000))])
    diff_id = "sha256:" + hashlib.sha256(plain).hexdigest()
    store = Store(str(tmp_path / "store"))
    opened, results = [], []
    barrier = threading.Barrier(8)

    def add():
        barrier.wait()
        results.append(store.add_layer(_source(gzip.compress(plain), diff_id=diff_id,
                                               opened=opened)))

    threads = [threading.Thread(target=add) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [diff_id] * 8
    assert len(opened) == 1


def test_a_layer_learns_its_key_when_none_is_given(tmp_path):
    """Without a diff_id (AppC without an id) the key is the digest of what was unpacked."""
    plain = tar_bytes([("f", "f", b"x")])
    store = Store(str(tmp_path / "store"))
    key = store.add_layer(_source(plain, algorithm="sha512"))
    assert key == "sha512:" + hashlib.sha512(plain).hexdigest()
    assert store.has_layer(key) and os.path.basename(store.layer_path(key)) == key[7:]


@pytest.mark.parametrize("images, sizes, kept, used, budget, want", [
    # under budget: nothing goes
    ({"a": (("l1",), 1.0)}, {"l1": 10}, set(), set(), 10, ([], [])),
    # least recently used first, and only as much as needed
    ({"old": (("l1",), 1.0), "new": (("l2",), 2.0)}, {"l1": 10, "l2": 10}, set(), set(), 10,
     (["old"], ["l1"])),
    # a shared layer stays while another image has it
    ({"old": (("s", "l1"), 1.0), "new": (("s", "l2"), 2.0)}, {"s": 50, "l1": 10, "l2": 10},
     set(), set(), 60, (["old"], ["l1"])),
    # unreferenced layers go first
    ({"a": (("l1",), 1.0)}, {"l1": 10, "orphan": 10}, set(), set(), 10, ([], ["orphan"])),
    # live containers' images and layers are never removed, even over budget
    ({"a": (("l1",), 1.0), "b": (("l2",), 2.0)}, {"l1": 10, "l2": 10}, {"l1"}, {"a"}, 0,
     (["b"], ["l2"])),
    # a layer pinned by a provision under way stays, its image may go
    ({"a": (("l1",), 1.0)}, {"l1": 10}, {"l1"}, set(), 0, (["a"], [])),
])
def test_collection_plans(images, sizes, kept, used, budget, want):
    """GC removes LRU unused images and unreferenced layers, never kept ones."""
    assert plan_collection(images, sizes, kept, used, budget) == want


def test_using_an_image_is_recorded_in_memory_at_once_and_on_disk_each_minute(tmp_path):
    """touch() updates last use in memory; the disk record only after TOUCH_INTERVAL (no
    fsync on every launch of a cached image). A restarted store reads what is on disk."""
    from agent.containerizer.provisioner.runtime import ImageConfig
    from agent.containerizer.provisioner.store import TOUCH_INTERVAL, ImageRecord

    now = [1000.0]
    store = Store(str(tmp_path / "store"), clock=lambda: now[0])
    record = store.put_image(ImageRecord("docker:x", "sha256:" + "a" * 64, (), ImageConfig()))
    now[0] += 10
    assert store.touch(record).last_used == 1010.0
    assert Store(str(tmp_path / "store")).image("docker:x").last_used == 1000.0
    now[0] += TOUCH_INTERVAL
    store.touch(record)
    assert Store(str(tmp_path / "store")).image("docker:x").last_used == 1070.0
