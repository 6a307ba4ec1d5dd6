"""Tests of the fetcher against a real HTTP server on 127.0.0.1 and real archives on disk."""

from __future__ import annotations

import collections
import gzip
import http.server
import io
import os
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import zipfile

import pytest

from agent.fetcher import FetchError, Fetcher, archive_kind

ROOT = os.geteuid() == 0


# --- a real HTTP server ----------------------------------------------------------------------


class Server:
    """Serves files from `directory`; counts GETs per path; /redirect/x → /x; /slow/x waits."""

    def __init__(self, directory):
        self.directory = directory
        self.hits = collections.Counter()
        self.lock = threading.Lock()
        self.release = threading.Event()  # lets /slow and /hang requests finish
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(directory), **kwargs)

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                with server.lock:
                    server.hits[path] += 1
                if path.startswith("/redirect/"):
                    self.send_response(302)
                    self.send_header("Location", path[len("/redirect"):])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if path.startswith("/slow/"):
                    server.release.wait(0.3)
                    self.path = path[len("/slow"):]
                if path == "/hang":
                    server.release.wait(10)
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,),
                                       daemon=True)
        self.thread.start()

    def url(self, path):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{path}"

    def write(self, name, data):
        path = self.directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return self.url(name)

    def stop(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server(tmp_path):
    (tmp_path / "www").mkdir()
    s = Server(tmp_path / "www")
    yield s
    s.stop()


@pytest.fixture
def fetcher(tmp_path):
    return Fetcher(str(tmp_path / "cache"), cache_size=1 << 20, timeout=5.0)


@pytest.fixture
def sandbox(tmp_path):
    path = tmp_path / "box" / "sandbox"
    path.mkdir(parents=True)
    return path


def tar_bytes(entries, mode="w:gz"):
    """A tar archive; entries are (TarInfo, data or None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def member(name, kind=tarfile.REGTYPE, linkname="", mode=0o644):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, mode
    return info


def zip_bytes(entries):
    """A zip archive; entries are (name, data, unix mode or None)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.external_attr = mode << 16
            z.writestr(info, data)
    return buf.getvalue()


def tree(path):
    """Every path under `path`, relative, as a sorted list."""
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), path))
    return sorted(out)


# --- plain downloads -------------------------------------------------------------------------


def test_download_lands_as_output_file(server, fetcher, sandbox):
    """An http URI with output_file is written under that (nested) name, and its path returned."""
    url = server.write("blob.bin", b"x" * 5000)
    paths = fetcher.fetch([{"value": url, "output_file": "sub/dir/data.bin"}], str(sandbox))
    assert paths == [str(sandbox / "sub/dir/data.bin")]
    assert (sandbox / "sub/dir/data.bin").read_bytes() == b"x" * 5000
    assert tree(sandbox) == ["sub", "sub/dir", "sub/dir/data.bin"]


def test_basename_of_url_drops_the_query_string(server, fetcher, sandbox):
    """Without output_file the file is named after the URL's last path segment, sans query."""
    url = server.write("tool.sh", b"#!/bin/sh\n")
    fetcher.fetch([{"value": url + "?version=3&x=y"}], str(sandbox))
    assert tree(sandbox) == ["tool.sh"]
    assert stat.S_IMODE(os.stat(sandbox / "tool.sh").st_mode) == 0o644


def test_redirects_are_followed(server, fetcher, sandbox):
    """A 302 is followed to the file, which keeps the name of the URI asked for."""
    server.write("real.txt", b"moved")
    fetcher.fetch([{"value": server.url("redirect/real.txt")}], str(sandbox))
    assert (sandbox / "real.txt").read_bytes() == b"moved"
    assert server.hits["/redirect/real.txt"] == 1 and server.hits["/real.txt"] == 1


def test_executable_sets_mode_and_does_not_extract(server, fetcher, sandbox):
    """executable: the file is 0755 and, even with an archive name, left unextracted."""
    url = server.write("run.tar.gz", tar_bytes([(member("inner"), b"i")]))
    fetcher.fetch([{"value": url, "executable": True}], str(sandbox))
    assert stat.S_IMODE(os.stat(sandbox / "run.tar.gz").st_mode) == 0o755
    assert tree(sandbox) == ["run.tar.gz"]


def test_file_uri_and_absolute_path_are_copied(tmp_path, fetcher, sandbox):
    """file:// URIs and plain absolute paths are copied into the sandbox."""
    src = tmp_path / "local dir"
    src.mkdir()
    (src / "a.txt").write_bytes(b"A")
    (src / "b.txt").write_bytes(b"B")
    fetcher.fetch([{"value": "file://" + str(src / "a.txt").replace(" ", "%20")},
                   {"value": str(src / "b.txt")}], str(sandbox))
    assert (sandbox / "a.txt").read_bytes() == b"A" and (sandbox / "b.txt").read_bytes() == b"B"


def test_relative_path_needs_a_frameworks_home(tmp_path, sandbox):
    """A relative URI is an error, unless a frameworks home is given to resolve it against."""
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "r.txt").write_bytes(b"R")
    with pytest.raises(FetchError, match="relative path"):
        Fetcher(str(tmp_path / "c1")).fetch([{"value": "r.txt"}], str(sandbox))
    Fetcher(str(tmp_path / "c2"), frameworks_home=str(tmp_path / "home")).fetch(
        [{"value": "r.txt"}], str(sandbox))
    assert (sandbox / "r.txt").read_bytes() == b"R"


def test_missing_local_file_is_an_error(tmp_path, fetcher, sandbox):
    """A local path that does not exist fails, naming it."""
    with pytest.raises(FetchError, match="does not exist") as e:
        fetcher.fetch([{"value": str(tmp_path / "nope.txt")}], str(sandbox))
    assert "nope.txt" in str(e.value)


# --- errors ----------------------------------------------------------------------------------


def test_404_names_the_status_and_the_uri(server, fetcher, sandbox):
    """A 404 is a FetchError that says 404 and which URI; nothing is left in the sandbox."""
    url = server.url("missing.tgz")
    with pytest.raises(FetchError) as e:
        fetcher.fetch([{"value": url}], str(sandbox))
    assert "404" in str(e.value) and url in str(e.value)
    assert tree(sandbox) == []


def test_connection_refused(fetcher, sandbox):
    """A port nobody listens on gives 'connection refused'."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FetchError, match="connection refused"):
        fetcher.fetch([{"value": f"http://127.0.0.1:{port}/x"}], str(sandbox))


def test_timeout(tmp_path, server, sandbox):
    """A server that never answers fails the fetch after the timeout."""
    fetcher = Fetcher(str(tmp_path / "cache"), timeout=0.2)
    with pytest.raises(FetchError, match="timed out"):
        fetcher.fetch([{"value": server.url("hang")}], str(sandbox))


def test_unknown_scheme_is_named(fetcher, sandbox):
    """hdfs:// and friends are refused up front, naming the scheme."""
    with pytest.raises(FetchError, match="'hdfs' scheme is not supported"):
        fetcher.fetch([{"value": "hdfs://namenode/data/x.tgz"}], str(sandbox))


def test_output_file_may_not_leave_the_sandbox(server, fetcher, sandbox):
    """output_file with '..' or an absolute path is refused before anything is fetched."""
    url = server.write("f.txt", b"f")
    for bad in ("../f.txt", "a/../../f.txt", "/tmp/f.txt"):
        with pytest.raises(FetchError, match="output_file"):
            fetcher.fetch([{"value": url, "output_file": bad}], str(sandbox))
    assert server.hits["/f.txt"] == 0
    assert tree(sandbox.parent) == ["sandbox"]


def test_a_bad_archive_is_an_error(server, fetcher, sandbox):
    """A .tar.gz that is not one fails with 'cannot extract'."""
    url = server.write("broken.tar.gz", b"not a tarball at all")
    with pytest.raises(FetchError, match="cannot extract broken.tar.gz"):
        fetcher.fetch([{"value": url}], str(sandbox))


def test_unknown_user_is_an_error(server, fetcher, sandbox):
    """A user the host does not know fails the fetch."""
    url = server.write("f.txt", b"f")
    with pytest.raises(FetchError, match="unknown user"):
        fetcher.fetch([{"value": url}], str(sandbox), user="no-such-user-agora")


# --- extraction ------------------------------------------------------------------------------


def test_archive_kinds_by_extension():
    """Extensions decide extraction, longest first (.tar.gz is a tar, .gz a single file)."""
    assert [archive_kind(n) for n in ("a.tar.gz", "a.TGZ", "a.tbz2", "a.tar.xz", "a.tar",
                                      "a.zip", "a.txt.gz", "a.txt", ".gz")] == \
        ["tar", "tar", "tar", "tar", "tar", "zip", "gz", None, None]


@pytest.mark.parametrize("suffix,mode", [(".tar.gz", "w:gz"), (".tgz", "w:gz"),
                                         (".tar.bz2", "w:bz2"), (".tar.xz", "w:xz"),
                                         (".tar", "w")])
def test_tarballs_are_extracted_and_kept(server, fetcher, sandbox, suffix, mode):
    """Tarballs are unpacked into the sandbox (dirs, modes, inner symlinks) and kept."""
    data = tar_bytes([(member("app", tarfile.DIRTYPE, mode=0o755), None),
                      (member("app/run.sh", mode=0o755), b"#!/bin/sh\n"),
                      (member("app/conf/x.cfg"), b"cfg"),
                      (member("run", tarfile.SYMTYPE, linkname="app/run.sh"), None)], mode)
    url = server.write("pkg" + suffix, data)
    fetcher.fetch([{"value": url}], str(sandbox))
    assert tree(sandbox) == ["app", "app/conf", "app/conf/x.cfg", "app/run.sh", "pkg" + suffix,
                             "run"]
    assert os.access(sandbox / "app/run.sh", os.X_OK)
    assert (sandbox / "run").read_bytes() == b"#!/bin/sh\n"


def test_extract_false_keeps_the_archive_packed(server, fetcher, sandbox):
    """extract: false leaves a tarball as it came."""
    url = server.write("pkg.tgz", tar_bytes([(member("inner"), b"i")]))
    fetcher.fetch([{"value": url, "extract": False}], str(sandbox))
    assert tree(sandbox) == ["pkg.tgz"]


def test_zip_is_extracted_with_exec_bits(server, fetcher, sandbox):
    """A .zip is unpacked into the sandbox, executable members stay executable."""
    url = server.write("bundle.zip", zip_bytes([("bin/", b"", 0o40755),
                                                ("bin/tool", b"#!/bin/sh\n", 0o100755),
                                                ("README", b"hi", None)]))
    fetcher.fetch([{"value": url}], str(sandbox))
    assert tree(sandbox) == ["README", "bin", "bin/tool", "bundle.zip"]
    assert (sandbox / "README").read_bytes() == b"hi"
    assert stat.S_IMODE(os.stat(sandbox / "bin/tool").st_mode) == 0o755


def test_gz_is_gunzipped_beside_itself(server, fetcher, sandbox):
    """A lone .gz is decompressed to its name without .gz; the .gz stays."""
    url = server.write("data.csv.gz", gzip.compress(b"a,b\n1,2\n"))
    fetcher.fetch([{"value": url, "output_file": "in/data.csv.gz"}], str(sandbox))
    assert (sandbox / "in/data.csv").read_bytes() == b"a,b\n1,2\n"
    assert tree(sandbox) == ["in", "in/data.csv", "in/data.csv.gz"]


# --- hostile archives ------------------------------------------------------------------------


def outside_of(tmp_path):
    """A directory next to the sandbox that archives will aim at."""
    path = tmp_path / "outside"
    path.mkdir(exist_ok=True)
    return path


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink-then-file", "symlink-chain",
                                  "hardlink-out", "device"])
def test_malicious_tar_is_refused_and_writes_nothing_outside(tmp_path, server, fetcher,
                                                             sandbox, case):
    """'..', absolute names, files through an outward symlink, symlink chains that climb out,
    hard links out and devices all fail the fetch; nothing appears outside the sandbox."""
    outside = outside_of(tmp_path)
    entries = {
        "dotdot": [(member("ok"), b"ok"), (member("../escape"), b"x")],
        "absolute": [(member(str(outside / "abs")), b"x")],
        "symlink-then-file": [(member("etc", tarfile.SYMTYPE, linkname=str(outside)), None),
                              (member("etc/passwd"), b"x")],
        "symlink-chain": [(member("a", tarfile.SYMTYPE, linkname="b/.."), None),
                          (member("b", tarfile.SYMTYPE, linkname="."), None)],
        "hardlink-out": [(member("h", tarfile.LNKTYPE, linkname="../outside/f"), None)],
        "device": [(member("null", tarfile.CHRTYPE), None)],
    }[case]
    (outside / "f").write_bytes(b"original")
    before = tree(tmp_path / "box"), tree(outside)
    url = server.write(f"{case}.tar", tar_bytes(entries, "w"))
    with pytest.raises(FetchError, match="unsafe archive"):
        fetcher.fetch([{"value": url}], str(sandbox))
    assert tree(outside) == before[1] and (outside / "f").read_bytes() == b"original"
    assert [p for p in tree(tmp_path / "box") if not p.startswith("sandbox")] == \
        [p for p in before[0] if not p.startswith("sandbox")]


def test_tar_member_cannot_write_through_a_symlink_already_in_the_sandbox(
        tmp_path, server, fetcher, sandbox):
    """A symlink left in the sandbox (here by hand) is never followed by extraction."""
    outside = outside_of(tmp_path)
    os.symlink(str(outside), sandbox / "lib")
    url = server.write("p.tar", tar_bytes([(member("lib/evil"), b"x")], "w"))
    with pytest.raises(FetchError, match="symlink"):
        fetcher.fetch([{"value": url}], str(sandbox))
    assert tree(outside) == []


@pytest.mark.parametrize("name", ["../zipslip", "/tmp/agora-zipslip-abs", "a/../../zipslip"])
def test_zip_slip_is_refused(tmp_path, server, fetcher, sandbox, name):
    """Zip members with '..' or absolute names fail the fetch and write nothing."""
    url = server.write("evil.zip", zip_bytes([("fine.txt", b"ok", None), (name, b"x", None)]))
    with pytest.raises(FetchError, match="unsafe archive"):
        fetcher.fetch([{"value": url}], str(sandbox))
    assert tree(sandbox) == ["evil.zip"]
    assert not os.path.exists(tmp_path / "box" / "zipslip")
    assert not os.path.exists("/tmp/agora-zipslip-abs")


def test_zip_symlink_out_is_refused(tmp_path, server, fetcher, sandbox):
    """A zip symlink member pointing outside fails the fetch."""
    url = server.write("l.zip", zip_bytes([("l", str(outside_of(tmp_path)).encode(),
                                            0o120777)]))
    with pytest.raises(FetchError, match="unsafe archive"):
        fetcher.fetch([{"value": url}], str(sandbox))
    assert not os.path.lexists(sandbox / "l")


# --- the cache -------------------------------------------------------------------------------


def test_cached_uri_is_downloaded_once(tmp_path, server, fetcher):
    """A second fetch of a cached URI, into another sandbox, makes no HTTP request."""
    url = server.write("big.tgz", tar_bytes([(member("inner"), b"i" * 1000)]))
    for n in (1, 2):
        box = tmp_path / f"s{n}"
        box.mkdir()
        fetcher.fetch([{"value": url, "cache": True}], str(box))
        assert (box / "inner").read_bytes() == b"i" * 1000
    assert server.hits["/big.tgz"] == 1
    assert fetcher.cache_usage() == os.path.getsize(server.directory / "big.tgz")
    reopened = Fetcher(str(tmp_path / "cache"), cache_size=1 << 20)
    assert reopened.cache_usage() == fetcher.cache_usage()


def test_cache_evicts_least_recently_used(tmp_path, server):
    """Over its size the cache drops the entry used longest ago, and keeps recent ones."""
    fetcher = Fetcher(str(tmp_path / "cache"), cache_size=250)
    urls = {n: server.write(n, n.encode() * 100) for n in "abc"}
    box = tmp_path / "s"
    box.mkdir()

    def get(name):
        fetcher.fetch([{"value": urls[name], "cache": True}], str(box))

    get("a"), get("b"), get("a")  # a is now the most recent
    assert fetcher.cache_usage() == 200
    get("c")  # needs room: b goes
    assert fetcher.cache_usage() == 200
    get("a")
    assert server.hits["/a"] == 1
    get("b")
    assert server.hits["/b"] == 2
    assert len(os.listdir(tmp_path / "cache")) == 2


def test_file_larger_than_the_cache_is_an_error(tmp_path, server, sandbox):
    """A cached URI bigger than the whole cache fails, saying the cache is too small."""
    fetcher = Fetcher(str(tmp_path / "cache"), cache_size=100)
    url = server.write("huge.bin", b"h" * 101)
    with pytest.raises(FetchError, match="too small") as e:
        fetcher.fetch([{"value": url, "cache": True}], str(sandbox))
    assert url in str(e.value)
    assert fetcher.cache_usage() == 0 and os.listdir(tmp_path / "cache") == []


def test_concurrent_fetches_of_one_cached_uri_download_once(tmp_path, server, fetcher):
    """Eight threads fetching one cached (slow) URI at once cause one download."""
    server.write("slow.bin", b"s" * 4096)
    url = server.url("slow/slow.bin")
    boxes = [tmp_path / f"t{i}" for i in range(8)]
    errors = []
    barrier = threading.Barrier(len(boxes))

    def run(box):
        box.mkdir()
        barrier.wait()
        try:
            fetcher.fetch([{"value": url, "cache": True}], str(box))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(b,)) for b in boxes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == []
    assert server.hits["/slow/slow.bin"] == 1
    assert all((b / "slow.bin").read_bytes() == b"s" * 4096 for b in boxes)


# --- users -----------------------------------------------------------------------------------


@pytest.mark.skipif(not ROOT, reason="chown to another user needs root")
def test_fetched_files_belong_to_the_user(server, fetcher, sandbox):
    """As root with user 'nobody', the file, what it held and the dirs made are nobody's."""
    import pwd
    nobody = pwd.getpwnam("nobody")
    url = server.write("p.tgz", tar_bytes([(member("d/f"), b"f"),
                                           (member("l", tarfile.SYMTYPE, linkname="d/f"), None)]))
    fetcher.fetch([{"value": url, "output_file": "sub/p.tgz", "cache": True}], str(sandbox),
                  user="nobody")
    for rel in tree(sandbox):
        st = os.lstat(sandbox / rel)
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid), rel
    assert os.stat(sandbox).st_uid == 0


@pytest.mark.skipif(not ROOT, reason="reading on behalf of another user matters only as root")
def test_local_file_the_user_cannot_read_is_refused(tmp_path, fetcher, sandbox):
    """As root, a local file that 'nobody' could not read is not fetched for nobody."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"s")
    os.chmod(secret, 0o600)
    with pytest.raises(FetchError, match="may not read"):
        fetcher.fetch([{"value": str(secret)}], str(sandbox), user="nobody")
    assert tree(sandbox) == []


def test_module_imports_no_twisted():
    """The fetcher runs in threads and imports no Twisted."""
    code = ("import sys, agent.fetcher; "
            "sys.exit(any(m.startswith('twisted') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(
        os.path.dirname(os.path.abspath(__file__)))).returncode == 0
