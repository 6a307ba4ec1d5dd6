"""Tests for agent.files: the /files/* endpoints over attached sandboxes.

Unit tests resolve a route on a Router and call the handler with a Request built the way the
server builds it (query values percent-decoded once by parse_qs); socket tests serve the same
routes from the real HTTP server on 127.0.0.1, in a private reactor in a background thread,
and talk to it with requests and raw sockets.
"""

from __future__ import annotations

import http.client
import json
import os
import pwd
import socket
import threading
import time
from urllib.parse import parse_qs, quote

import pytest
import requests
from twisted.internet.threads import blockingCallFromThread

from agent import files as files_mod
from agent.files import Files, routes
from agora.http import (HTTPError, HTTPFactory, Request, Response, Router, StreamingResponse,
                        listen)

DEADLINE = 5.0
LATEST = "/frameworks/fw-1/executors/ex-1/runs/latest"
SECRET = b"top secret outside the sandbox\n"


# -- a sandbox with traps ---------------------------------------------------------------------


@pytest.fixture
def box(tmp_path):
    """A sandbox with ordinary files and every kind of way out, plus its attached Files."""
    sandbox = tmp_path / "runs" / "c-1"
    sandbox.mkdir(parents=True)
    (sandbox / "stdout").write_bytes(b"hello\nworld\n")
    (sandbox / "stderr").write_bytes(b"")
    (sandbox / "sub").mkdir()
    (sandbox / "sub" / "nested.txt").write_bytes(b"nested")
    os.chmod(sandbox / "stdout", 0o644)
    os.symlink("stdout", sandbox / "inside_link")
    os.symlink("/etc/passwd", sandbox / "escape")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    os.symlink(str(outside), sandbox / "outdir")
    os.symlink(str(outside / "missing"), sandbox / "dangling")
    # A sibling whose name starts with the sandbox's: a plain prefix test would let it through.
    sibling = tmp_path / "runs" / "c-10"
    sibling.mkdir()
    (sibling / "secret.txt").write_bytes(SECRET)
    os.symlink("../c-10/secret.txt", sandbox / "sibling")
    os.mkfifo(sandbox / "fifo")
    files = Files()
    files.attach(LATEST, str(sandbox))
    files.attach(str(sandbox), str(sandbox))
    return files, sandbox, tmp_path


def call(files: Files, target: str, method: str = "GET"):
    """Route `target` (path?raw-query) like the server and run the handler: (status, result)."""
    path, _, qs = target.partition("?")
    query = parse_qs(qs, keep_blank_values=True) if qs else {}
    router = Router()
    for route in routes(files):
        router.add(*route)
    request = Request(method, path, query, {}, b"", ("127.0.0.1", 40000), raw_target=target)
    try:
        result = router.resolve(method, path)(request)
    except HTTPError as e:
        return e.status, e.message.encode()
    if isinstance(result, Response):
        return result.status, result
    return 200, result


def body_json(result):
    return json.loads(result.body)


def q(value: str) -> str:
    """`value` percent-encoded as a query value."""
    return quote(value, safe="")


# -- attachments ------------------------------------------------------------------------------


def test_attach_validates_and_debug_shows_the_table(box):
    """attach() needs an absolute, '..'-free virtual path and an existing target; /debug lists."""
    files, sandbox, tmp = box
    with pytest.raises(ValueError):
        files.attach("relative/path", str(sandbox))
    with pytest.raises(ValueError):
        files.attach("/a/../b", str(sandbox))
    with pytest.raises(FileNotFoundError):
        files.attach("/nope", str(tmp / "does-not-exist"))
    status, result = call(files, "/files/debug")
    assert status == 200
    assert body_json(result) == {LATEST: str(sandbox), str(sandbox): str(sandbox)}


def test_reattach_latest_and_detach_under(box):
    """Re-attaching moves `latest`; detach_under drops only what points into the removed run."""
    files, sandbox, tmp = box
    newer = tmp / "runs" / "c-2"
    newer.mkdir()
    files.attach(str(newer), str(newer))
    files.attach(LATEST + "/", str(newer))  # a trailing slash names the same virtual path
    assert files.attachments()[LATEST] == str(newer)
    assert files.detach_under(str(sandbox)) == [str(sandbox)]
    assert set(files.attachments()) == {LATEST, str(newer)}
    files.detach(LATEST)
    files.detach(LATEST)  # detaching twice is harmless
    assert set(files.attachments()) == {str(newer)}


def test_routes_serve_mesos_names_for_get():
    """routes() gives every endpoint under its Mesos name and its old .json name, GET only."""
    table = routes(Files())
    assert sorted(p for p, _, _ in table) == sorted(
        f"/files/{n}{s}" for n in ("browse", "read", "download", "debug") for s in ("", ".json"))
    assert all(methods == ("GET",) for _, _, methods in table)


# -- browse -----------------------------------------------------------------------------------


def test_browse_lists_a_directory_like_mesos(box):
    """Entries carry path (virtual), nlink, size, mtime, ls-style mode, user and group names."""
    files, sandbox, _ = box
    status, result = call(files, f"/files/browse?path={q(LATEST)}")
    assert status == 200 and result.content_type == "application/json"
    listing = body_json(result)
    names = [e["path"].rsplit("/", 1)[1] for e in listing]
    assert names == sorted(["stdout", "stderr", "sub", "inside_link", "escape", "outdir",
                            "dangling", "sibling", "fifo"])
    by_name = {e["path"].rsplit("/", 1)[1]: e for e in listing}
    st = os.stat(sandbox / "stdout")
    assert by_name["stdout"] == {
        "path": LATEST + "/stdout", "nlink": 1, "size": 12, "mtime": int(st.st_mtime),
        "mode": "-rw-r--r--", "uid": pwd.getpwuid(os.getuid()).pw_name,
        "gid": by_name["stdout"]["gid"]}
    assert by_name["sub"]["mode"].startswith("d")
    assert by_name["fifo"]["mode"].startswith("p")
    # A link inside is described by its target; links out are only shown as links.
    assert by_name["inside_link"]["mode"] == "-rw-r--r--" and by_name["inside_link"]["size"] == 12
    for name in ("escape", "outdir", "dangling", "sibling"):
        assert by_name[name]["mode"].startswith("l"), name
        assert by_name[name]["size"] != len(SECRET)


def test_browse_by_real_path_subdir_and_file(box):
    """The real-path attachment works too; a subdirectory lists; a file lists as itself."""
    files, sandbox, _ = box
    status, result = call(files, f"/files/browse?path={q(str(sandbox) + '/sub/')}")
    assert status == 200
    assert [e["path"] for e in body_json(result)] == [str(sandbox) + "/sub/nested.txt"]
    status, result = call(files, f"/files/browse?path={q(LATEST + '/stdout')}")
    assert status == 200
    assert [(e["path"], e["size"]) for e in body_json(result)] == [(LATEST + "/stdout", 12)]


def test_browse_without_leading_slash_is_absolute(box):
    """A path without its leading '/' is read as absolute, as Mesos does."""
    files, _, _ = box
    status, result = call(files, f"/files/browse?path={q(LATEST.lstrip('/'))}")
    assert status == 200 and len(body_json(result)) == 9


# -- read -------------------------------------------------------------------------------------


def test_read_offsets_and_lengths(box):
    """No offset or -1 gives the size; offset/length slice; past the end gives size and ''."""
    files, _, _ = box
    p = q(LATEST + "/stdout")
    cases = {
        "": {"data": "", "offset": 12},
        "&offset=-1": {"data": "", "offset": 12},
        "&offset=0": {"data": "hello\nworld\n", "offset": 0},
        "&offset=6&length=3": {"data": "wor", "offset": 6},
        "&offset=6&length=-1": {"data": "world\n", "offset": 6},
        "&offset=2&length=0": {"data": "", "offset": 2},
        "&offset=12": {"data": "", "offset": 12},
        "&offset=99&length=5": {"data": "", "offset": 12},
    }
    for extra, expected in cases.items():
        status, result = call(files, f"/files/read?path={p}{extra}")
        assert (status, body_json(result)) == (200, expected), extra


def test_read_is_capped_at_max_read_length(box):
    """A length beyond the cap, or none, returns at most max_read_length bytes."""
    _, sandbox, _ = box
    files = Files(max_read_length=4)
    files.attach("/s", str(sandbox))
    for extra in ("&offset=0", "&offset=0&length=100"):
        status, result = call(files, "/files/read?path=/s/stdout" + extra)
        assert body_json(result) == {"data": "hell", "offset": 0}


def test_read_bad_parameters_are_400(box):
    """Missing path, non-integer or negative offsets/lengths, repeated params: 400 with a reason."""
    files, _, _ = box
    p = q(LATEST + "/stdout")
    for target in ("/files/read", "/files/read?path=", f"/files/read?path={p}&offset=abc",
                   f"/files/read?path={p}&offset=-2", f"/files/read?path={p}&length=-5",
                   f"/files/read?path={p}&offset=1.5", f"/files/read?path={p}&offset=+1",
                   f"/files/read?path={p}&offset=", f"/files/read?path={p}&length=%201",
                   f"/files/read?path={p}&path={p}&offset=0"):
        status, message = call(files, target)
        assert status == 400, target
        assert message, target


def test_read_text_is_utf8_with_replacement_and_whole_characters(box):
    """Valid UTF-8 comes back as text, bad bytes as U+FFFD, and a cut never splits a character."""
    files, sandbox, _ = box
    (sandbox / "utf8").write_bytes("h\u00e9 \u2603".encode() + b"\xff!")
    status, result = call(files, f"/files/read?path={q(LATEST + '/utf8')}&offset=0")
    assert body_json(result)["data"] == "h\u00e9 \u2603\ufffd!"
    # Bytes 0..5 end inside the 3-byte snowman: the read stops before it.
    status, result = call(files, f"/files/read?path={q(LATEST + '/utf8')}&offset=0&length=5")
    assert body_json(result) == {"data": "h\u00e9 ", "offset": 0}


def test_read_directory_and_fifo_are_400_without_blocking(box):
    """Reading a directory or a FIFO is refused at once (a FIFO would otherwise block)."""
    files, _, _ = box
    for name in ("sub", "fifo"):
        started = time.monotonic()
        status, _ = call(files, f"/files/read?path={q(LATEST + '/' + name)}&offset=0")
        assert status == 400 and time.monotonic() - started < 1.0


# -- download and debug -----------------------------------------------------------------------


def test_download_small_file_is_one_response(box):
    """A small file comes whole, as an octet-stream attachment named after it."""
    files, sandbox, _ = box
    status, result = call(files, f"/files/download?path={q(LATEST + '/stdout')}")
    assert status == 200 and isinstance(result, Response)
    assert result.body == b"hello\nworld\n"
    assert result.content_type == "application/octet-stream"
    assert dict(result.headers)["Content-Disposition"] == (
        "attachment; filename=\"stdout\"; filename*=UTF-8''stdout")
    status, _ = call(files, f"/files/download?path={q(LATEST + '/sub')}")
    assert status == 400


def test_download_awkward_file_name_cannot_split_headers(box):
    """A name with quotes, newlines or non-ASCII gets a safe fallback and an exact filename*."""
    files, sandbox, _ = box
    name = 'a"b\nc\u00e9.log'
    (sandbox / name).write_bytes(b"x")
    status, result = call(files, f"/files/download?path={q(LATEST + '/' + name)}")
    disposition = dict(result.headers)["Content-Disposition"]
    assert status == 200 and "\n" not in disposition
    assert disposition == ("attachment; filename=\"a_b_c_.log\"; "
                           "filename*=UTF-8''a%22b%0Ac%C3%A9.log")


def test_download_large_file_is_a_stream(box):
    """Past max_read_length the handler answers with a StreamingResponse (sent paced)."""
    _, sandbox, _ = box
    files = Files(max_read_length=4)
    files.attach("/s", str(sandbox))
    status, result = call(files, "/files/download?path=/s/stdout")
    assert isinstance(result, StreamingResponse)
    assert result.content_type == "application/octet-stream"
    stream = FakeStream()
    result.start(stream)
    while stream.ended is None:
        stream._transport.producer.resumeProducing()
    assert b"".join(stream.chunks) == b"hello\nworld\n" and stream.ended == "closed"


class FakeStream:
    """Just enough of agora.http.Stream for a sender: writes, close, abort and pulling."""

    def __init__(self):
        from twisted.internet.testing import StringTransport
        self._transport = StringTransport()
        self._transport.registerProducer(self, True)  # as agora.http.Stream does
        self.chunks, self.ended = [], None
        self.callbacks = []

    def write(self, data):
        self.chunks.append(data)

    def close(self):
        assert self._transport.producer is None, "the sender must unregister before closing"
        self.ended = "closed"
        for callback in self.callbacks:
            callback()

    def abort(self):
        self.ended = "aborted"
        for callback in self.callbacks:
            callback()

    def on_close(self, callback):
        self.callbacks.append(callback)

    def pull_from(self, producer):
        self._transport.unregisterProducer()
        self._transport.registerProducer(producer, False)

    def stop_pulling(self):
        if self._transport.producer is not None:
            self._transport.unregisterProducer()


def test_file_sender_sends_when_pulled_and_cuts_a_shrunk_file(tmp_path):
    """One chunk per pull, then close; a file that shrank mid-way ends with an abort."""
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    stream = FakeStream()
    sender = files_mod._FileSender(open(path, "rb", buffering=0), 10, 4)
    sender.start(stream)
    assert stream._transport.producer is sender and not stream._transport.streaming
    while stream.ended is None:
        sender.resumeProducing()
    assert (stream.chunks, stream.ended) == ([b"0123", b"4567", b"89"], "closed")
    stream = FakeStream()
    sender = files_mod._FileSender(open(path, "rb", buffering=0), 14, 8)
    sender.start(stream)
    while stream.ended is None:
        sender.resumeProducing()
    assert (stream.chunks, stream.ended) == ([b"01234567", b"89"], "aborted")
    assert sender._file.closed


# -- ways out ---------------------------------------------------------------------------------


def escape_targets(sandbox):
    """(query string for path=..., expected status) for every escape we know."""
    real = str(sandbox)
    return [
        (q(LATEST + "/../../../../../../../../etc/passwd"), 400),
        (q(LATEST + "/sub/../stdout"), 400),  # even a harmless '..' is refused
        ("%2e%2e%2f%2e%2e%2fetc%2fpasswd", 400),
        (q(LATEST) + "%2f%2e%2e%2f%2e%2e%2fc-10%2fsecret.txt", 400),
        (q(real) + "/..%2fc-10/secret.txt", 400),
        (q(LATEST + "/stdout") + "%00", 400),
        (q(LATEST) + "%00%2f..%2fetc%2fpasswd", 400),
        (q("/etc/passwd"), 404),
        (q("/"), 404),
        (q(LATEST + "/%2e%2e/%2e%2e/etc/passwd"), 404),  # double-encoded: just a strange name
        (q(LATEST + "/escape"), 403),
        (q(real + "/escape"), 403),
        (q(LATEST + "/outdir/secret.txt"), 403),
        (q(LATEST + "/outdir"), 403),
        (q(LATEST + "/dangling"), 403),
        (q(LATEST + "/sibling"), 403),
        (q(LATEST + "/stdout/x"), 404),
        (q(LATEST + "x/stdout"), 404),  # a prefix of a segment is not an attachment
    ]


@pytest.mark.parametrize("endpoint", ["browse", "read", "download"])
def test_every_escape_is_4xx_without_content(box, endpoint):
    """'..', %2e%2e, NUL, outside paths and symlinks out all fail with the right 4xx, no bytes."""
    files, sandbox, _ = box
    for path_query, expected in escape_targets(sandbox):
        status, result = call(files, f"/files/{endpoint}?path={path_query}&offset=0")
        assert status == expected, (endpoint, path_query, status)
        assert isinstance(result, bytes), path_query  # an error message, not a response
        assert b"top secret" not in result and b"root:x" not in result


def test_open_inside_refuses_links_swapped_in_after_the_check(box):
    """Even past resolve(), opening a symlink or through a linked directory is refused (403)."""
    files, sandbox, tmp = box
    root = str(sandbox)
    with pytest.raises(HTTPError) as e:
        files_mod._open_inside(os.path.join(root, "escape"), root, "/x/escape")
    assert e.value.status == 403
    with pytest.raises(HTTPError) as e:
        files_mod._open_inside(os.path.join(root, "outdir", "secret.txt"), root, "/x/s")
    assert e.value.status == 403


def test_attached_file_serves_only_itself(box):
    """An attached single file is served; paths below it are not found."""
    files, sandbox, _ = box
    files.attach("/log", str(sandbox / "stdout"))
    status, result = call(files, "/files/read?path=/log&offset=0")
    assert body_json(result)["data"] == "hello\nworld\n"
    status, _ = call(files, "/files/read?path=/log/x&offset=0")
    assert status == 404


# -- through the real server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def reactor():
    """A private epoll reactor in a background thread (the global reactor stays untouched)."""
    from twisted.internet.epollreactor import EPollReactor

    r = EPollReactor()
    thread = threading.Thread(target=r.run, kwargs={"installSignalHandlers": False}, daemon=True)
    thread.start()
    yield r
    r.callFromThread(r.stop)
    thread.join(DEADLINE)


@pytest.fixture
def server(reactor, box):
    """The /files routes on a free port, over the sandbox fixture (small cap, to stream)."""
    _, sandbox, tmp = box
    files = Files(max_read_length=64 * 1024, download_chunk=16 * 1024)
    files.attach(LATEST, str(sandbox))
    router = Router()
    for route in routes(files):
        router.add(*route)
    factory = HTTPFactory(router, reactor=reactor)
    port = blockingCallFromThread(reactor, listen, reactor, 0, factory)
    url = "http://127.0.0.1:%d" % port.getHost().port
    yield url, port.getHost().port, sandbox
    blockingCallFromThread(reactor, port.stopListening)


def test_http_browse_read_debug(server):
    """browse, read with offset=-1 then a chunk, and debug, as dcos and the web UI ask."""
    url, _, sandbox = server
    listing = requests.get(url + "/files/browse", params={"path": LATEST}, timeout=DEADLINE)
    assert listing.status_code == 200
    assert LATEST + "/stdout" in [e["path"] for e in listing.json()]
    end = requests.get(url + "/files/read", timeout=DEADLINE,
                       params={"path": LATEST + "/stdout", "offset": -1}).json()
    assert end == {"data": "", "offset": 12}
    chunk = requests.get(url + "/files/read.json", timeout=DEADLINE,
                         params={"path": LATEST + "/stdout", "offset": 6, "length": 50}).json()
    assert chunk == {"data": "world\n", "offset": 6}
    debug = requests.get(url + "/files/debug", timeout=DEADLINE).json()
    assert debug == {LATEST: str(sandbox)}


def test_http_download_streams_big_file_intact(server):
    """A file over the cap arrives chunked and byte-identical; a small one has Content-Length."""
    url, _, sandbox = server
    big = os.urandom(256 * 1024) * 12  # 3 MiB
    (sandbox / "big.bin").write_bytes(big)
    r = requests.get(url + "/files/download", params={"path": LATEST + "/big.bin"},
                     timeout=DEADLINE)
    assert r.status_code == 200 and r.content == big
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert r.headers["Transfer-Encoding"] == "chunked"
    assert r.headers["Content-Disposition"].startswith('attachment; filename="big.bin"')
    small = requests.get(url + "/files/download", params={"path": LATEST + "/stdout"},
                         timeout=DEADLINE)
    assert small.content == b"hello\nworld\n" and small.headers["Content-Length"] == "12"
    head = requests.head(url + "/files/download", params={"path": LATEST + "/big.bin"},
                         timeout=DEADLINE)
    assert head.status_code == 200 and head.content == b""


def test_http_raw_escape_attempts_get_4xx(server):
    """Raw request targets with encoded '..' and NUL get 400/403/404 over the wire, no content."""
    _, port, _ = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
    for target, expected in [
        ("/files/read?path=" + q(LATEST) + "/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e"
         "/etc/passwd&offset=0", 400),
        ("/files/download?path=%2Fetc%2Fpasswd", 404),
        ("/files/download?path=" + q(LATEST) + "/escape", 403),
        ("/files/read?path=" + q(LATEST) + "/stdout%00&offset=0", 400),
        ("/files/browse?path=" + q(LATEST) + "/outdir", 403),
    ]:
        conn.request("GET", target)
        response = conn.getresponse()
        body = response.read()
        assert response.status == expected, target
        assert b"root:x" not in body and b"top secret" not in body
    conn.close()


def _fd_of(path: str) -> int | None:
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == path:
                return int(name)
        except OSError:
            pass
    return None


def _wait_for(predicate, what):
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.01)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fdinfo"), reason="needs /proc/self/fdinfo")
def test_http_download_is_paced_by_the_reader_and_closed_on_disconnect(server):
    """A stalled reader keeps the server from reading ahead; hanging up releases the file."""
    _, port, sandbox = server
    path = str(sandbox / "huge.bin")
    size = 256 * 1024 * 1024
    with open(path, "wb") as f:
        f.truncate(size)  # sparse: cheap to create and to read
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.sendall(b"GET /files/download?path=" + q(LATEST + "/huge.bin").encode()
                 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
    _wait_for(lambda: _fd_of(path) is not None, "the server to open the file")
    fd = _fd_of(path)

    def position():
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                return int(f.readline().split()[1])
        except OSError:
            return size  # closed: it read everything, which pacing should have prevented
    # Not reading: the socket buffers fill and the server stops at a few MiB.
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        assert position() < size // 4
        time.sleep(0.02)
    sock.close()
    _wait_for(lambda: _fd_of(path) is None, "the server to close the file")
