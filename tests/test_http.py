"""Tests for agora.http: bytes on the wire, routing, keep-alive, limits, sniffing and streams.

Two kinds: unit tests drive an HTTPChannel over a StringTransport and look at the exact bytes
and write calls; socket tests run a private (not installed) reactor in a background thread and
talk to it on 127.0.0.1 with the clients Mesos frameworks use (http.client as pymesos does,
requests as mesoshttp does, and http_parser's parser).
"""

from __future__ import annotations

import http.client
import io
import json
import re
import socket
import threading
import time

import pytest
import requests
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import globalLogPublisher

from agora import recordio
from agora.http import (
    HTTPError,
    HTTPFactory,
    Request,
    Response,
    Router,
    Stream,
    StreamingResponse,
    empty_response,
    json_response,
    listen,
    text_response,
)

DEADLINE = 5.0


# -- helpers ----------------------------------------------------------------------------


class RecordingTransport(StringTransport):
    """A StringTransport that also remembers each write call separately."""

    def __init__(self):
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.writes: list[bytes] = []

    def write(self, data):
        self.writes.append(data)
        super().write(data)

    def writeSequence(self, seq):
        for data in seq:
            self.write(data)


class _Unclosable:
    """A file proxy whose close() does nothing, so several responses can be read from it."""

    def __init__(self, f):
        self._f = f

    def __getattr__(self, name):
        return getattr(self._f, name)

    def close(self):
        pass


class _FileSock:
    def __init__(self, f):
        self._f = _Unclosable(f)

    def makefile(self, mode):
        return self._f


def read_responses(data_or_file, methods):
    """Parse consecutive HTTP responses (one per request method) with http.client."""
    f = io.BytesIO(data_or_file) if isinstance(data_or_file, bytes) else data_or_file
    sock = _FileSock(f)
    out = []
    for method in methods:
        resp = http.client.HTTPResponse(sock, method=method)
        resp.begin()
        out.append((resp.status, resp.headers, resp.read()))
    return out


def echo(request: Request) -> Response:
    return json_response({
        "method": request.method, "path": request.path, "query": request.query,
        "headers": request.headers, "body": request.body.decode("latin-1"),
        "peer_port": request.peer[1], "version": request.version,
    })


def make_channel(router: Router, **kwargs):
    factory = HTTPFactory(router, **kwargs)
    transport = RecordingTransport()
    channel = factory.buildProtocol(transport.getPeer())
    channel.makeConnection(transport)
    return channel, transport


def unit_router() -> Router:
    router = Router()
    router.add("/echo", echo)
    router.add("/call", lambda r: empty_response(202, [("Connection", "close")]), methods=("POST",))
    return router


# -- unit: bytes on the wire --------------------------------------------------------------


def test_stream_head_and_first_chunks_leave_in_one_write():
    """Status line, all headers and the chunks start() writes go out in a single write (spec §5.2)."""
    router = Router()

    def start(stream: Stream) -> None:
        stream.write(recordio.encode_json({"type": "SUBSCRIBED"}))
        stream.write(recordio.encode_json({"type": "HEARTBEAT"}))

    router.add("/api/v1/scheduler", lambda r: StreamingResponse(
        start, headers=(("Mesos-Stream-Id", "sid-1"),)), methods=("POST",))
    channel, transport = make_channel(router)
    channel.dataReceived(
        b"POST /api/v1/scheduler HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Accept: application/json\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
    assert len(transport.writes) == 1
    first = transport.writes[0]
    head, _, body = first.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert b"Transfer-Encoding: chunked" in lines
    assert b"Content-Type: application/json" in lines
    assert b"Mesos-Stream-Id: sid-1" in lines
    assert not any(line.startswith(b"Content-Length") for line in lines)
    sub = recordio.encode_json({"type": "SUBSCRIBED"})
    hb = recordio.encode_json({"type": "HEARTBEAT"})
    assert body == b"%x\r\n%s\r\n%x\r\n%s\r\n" % (len(sub), sub, len(hb), hb)
    assert not transport.disconnecting  # the stream stays open despite "Connection: close"


def test_stream_later_writes_are_chunks_and_close_ends_body():
    """Later writes are single chunks, empty writes are skipped, close() sends 0-chunk and closes."""
    streams = []
    router = Router()
    router.add("/s", lambda r: StreamingResponse(streams.append))
    channel, transport = make_channel(router)
    channel.dataReceived(b"GET /s HTTP/1.1\r\n\r\n")
    (stream,) = streams
    transport.clear()
    transport.writes.clear()
    stream.write(b"hello")
    stream.write(b"")  # must not become the terminating zero-length chunk
    assert transport.writes == [b"5\r\nhello\r\n"]
    closed = []
    stream.on_close(lambda: closed.append(1))
    stream.close()
    assert transport.value() == b"5\r\nhello\r\n0\r\n\r\n"
    assert transport.disconnecting and stream.closed and closed == [1]
    stream.write(b"late")  # ignored after close
    assert transport.value().endswith(b"0\r\n\r\n")


def test_response_has_content_length():
    """Every plain response carries Content-Length, even an empty or error one."""
    channel, transport = make_channel(unit_router())
    channel.dataReceived(b"GET /echo HTTP/1.1\r\n\r\nGET /missing HTTP/1.1\r\n\r\n")
    (s1, h1, b1), (s2, h2, b2) = read_responses(transport.value(), ["GET", "GET"])
    assert (s1, s2) == (200, 404)
    assert int(h1["Content-Length"]) == len(b1) > 0
    assert int(h2["Content-Length"]) == len(b2) > 0
    assert not transport.disconnecting


def test_202_with_connection_close_then_closes():
    """A handler's ("Connection", "close") header gives 202, Content-Length: 0, and a close."""
    channel, transport = make_channel(unit_router())
    channel.dataReceived(b"POST /call HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET /echo HTTP/1.1\r\n\r\n")
    head = transport.value().split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"HTTP/1.1 202 Accepted"
    assert b"Content-Length: 0" in head
    assert head.count(b"Connection: close") == 1
    assert transport.value().endswith(b"\r\n\r\n")  # nothing for the pipelined GET
    assert transport.disconnecting


def test_client_connection_close_and_http10():
    """Connection: close, and HTTP/1.0 without keep-alive, close after the response."""
    for raw in (b"GET /echo HTTP/1.1\r\nConnection: close\r\n\r\n", b"GET /echo HTTP/1.0\r\n\r\n"):
        channel, transport = make_channel(unit_router())
        channel.dataReceived(raw)
        assert b"\r\nConnection: close\r\n" in transport.value()
        assert transport.disconnecting


def test_http10_keep_alive_is_honoured():
    """An HTTP/1.0 client asking for keep-alive gets it, said out loud."""
    channel, transport = make_channel(unit_router())
    channel.dataReceived(b"GET /echo HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
    assert b"\r\nConnection: keep-alive\r\n" in transport.value()
    assert not transport.disconnecting


def test_head_is_get_without_body():
    """HEAD runs the GET handler and sends its headers (with the real length) but no body."""
    channel, transport = make_channel(unit_router())
    channel.dataReceived(b"HEAD /echo HTTP/1.1\r\n\r\nGET /echo HTTP/1.1\r\n\r\n")
    (s1, h1, b1), (s2, h2, b2) = read_responses(transport.value(), ["HEAD", "GET"])
    assert (s1, b1) == (200, b"")
    assert int(h1["Content-Length"]) > 0 and s2 == 200


def test_request_split_at_every_byte_is_parsed():
    """A request (head and chunked body) split at any point parses the same."""
    raw = (b"POST /echo?a=1&a=2&b= HTTP/1.1\r\nHost: h\r\nX-Two: 1\r\nx-two: 2\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nT: v\r\n\r\n")
    for cut in range(1, len(raw)):
        channel, transport = make_channel(unit_router())
        channel.dataReceived(raw[:cut])
        channel.dataReceived(raw[cut:])
        ((status, _, body),) = read_responses(transport.value(), ["POST"])
        got = json.loads(body)
        assert status == 200, cut
        assert got["body"] == "abc0123456789abcdef"
        assert got["query"] == {"a": ["1", "2"], "b": [""]}
        assert got["headers"]["x-two"] == "1, 2"


def test_percent_decoded_path_and_absolute_target():
    """The path is percent-decoded and an absolute-form target is reduced to its path."""
    channel, transport = make_channel(unit_router())
    channel.dataReceived(b"GET /echo/a%20b%2Fc?q=%41 HTTP/1.1\r\n\r\nGET http://h:1/echo/x HTTP/1.1\r\n\r\n")
    (_, _, b1), (_, _, b2) = read_responses(transport.value(), ["GET", "GET"])
    assert json.loads(b1)["path"] == "/echo/a b/c" and json.loads(b1)["query"] == {"q": ["A"]}
    assert json.loads(b2)["path"] == "/echo/x"


def test_expect_100_continue():
    """A client that expects 100-continue (curl, for bodies over 1 KiB) gets it before the body."""
    channel, transport = make_channel(unit_router())
    channel.dataReceived(b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    channel.dataReceived(b"xyz")
    assert b'"body":"xyz"' in transport.value()


@pytest.mark.parametrize("raw, status", [
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    (b"GET /echo\r\n\r\n", 400),
    (b"get /echo HTTP/1.1\r\n\r\n", 400),
    (b"GET /echo HTTP/2.0\r\n\r\n", 505),
    (b"GET /echo HTTP/1.1\r\nNo colon here\r\n\r\n", 400),
    (b"GET /echo HTTP/1.1\r\nBad : space\r\n\r\n", 400),
    (b"GET /echo HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY", 400),
    (b"GET echo HTTP/1.1\r\n\r\n", 400),
])
def test_malformed_requests_get_4xx_and_close(raw, status):
    """Malformed requests get a status that says what is wrong, then the connection closes."""
    channel, transport = make_channel(unit_router())
    channel.dataReceived(raw)
    ((got, headers, body),) = read_responses(transport.value(), ["GET"])
    assert got == status and body
    assert headers["Connection"] == "close" and transport.disconnecting


def test_oversized_head_gets_431():
    """A request head larger than the limit is answered 431 without waiting for its end."""
    channel, transport = make_channel(unit_router(), max_header_size=1024)
    channel.dataReceived(b"GET /echo HTTP/1.1\r\nX-Big: " + b"a" * 2000)
    assert transport.value().startswith(b"HTTP/1.1 431 ")
    assert transport.disconnecting


def test_oversized_bodies_get_413():
    """Bodies over the limit are refused with 413, by Content-Length or as chunks add up."""
    channel, transport = make_channel(unit_router(), max_body_size=10)
    channel.dataReceived(b"POST /echo HTTP/1.1\r\nContent-Length: 11\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ") and transport.disconnecting
    channel, transport = make_channel(unit_router(), max_body_size=10)
    channel.dataReceived(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ") and transport.disconnecting
    channel, transport = make_channel(unit_router(), max_body_size=10)
    channel.dataReceived(b"POST /echo HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789")
    assert transport.value().startswith(b"HTTP/1.1 200 ")


class HalfClosingTransport(RecordingTransport):
    """A RecordingTransport that, like TCP, can stop writing while still reading."""

    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


def test_refused_request_lingers_then_closes():
    """After refusing a request the server half-closes, discards input, and closes later."""
    clock = Clock()
    factory = HTTPFactory(unit_router(), reactor=clock, max_body_size=10)
    transport = HalfClosingTransport()
    channel = factory.buildProtocol(transport.getPeer())
    channel.makeConnection(transport)
    channel.dataReceived(b"POST /echo HTTP/1.1\r\nContent-Length: 1000\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert transport.write_closed and not transport.disconnecting
    channel.dataReceived(b"x" * 1000)  # the rest of the refused body is read and dropped
    assert transport.value().count(b"HTTP/1.1") == 1
    clock.advance(10)
    assert transport.disconnecting


def test_linger_ends_when_the_client_closes():
    """A client that closes during the linger cancels the pending forced close."""
    clock = Clock()
    factory = HTTPFactory(unit_router(), reactor=clock)
    transport = HalfClosingTransport()
    channel = factory.buildProtocol(transport.getPeer())
    channel.makeConnection(transport)
    channel.dataReceived(b"NONSENSE\r\n\r\n")
    assert clock.getDelayedCalls()
    channel.connectionLost(None)
    assert not clock.getDelayedCalls()


def test_handler_results_deferred_coroutine_and_errors():
    """Deferreds and coroutines are awaited; HTTPError gives its status; other failures give 500."""
    pending = defer.Deferred()

    async def coro(request):
        return text_response("from coroutine")

    router = Router()
    router.add("/later", lambda r: pending)
    router.add("/coro", coro)
    router.add("/conflict", lambda r: defer.fail(HTTPError(409, "already there", {"X-Why": "dup"})))
    router.add("/broken", lambda r: defer.fail(ZeroDivisionError()))
    router.add("/bad-result", lambda r: 42)
    router.add("/json", lambda r: json_response(r.json()))
    channel, transport = make_channel(router)
    channel.dataReceived(b"GET /later HTTP/1.1\r\n\r\nGET /coro HTTP/1.1\r\n\r\n")
    assert transport.value() == b""  # the pipelined request waits for the first
    pending.callback(text_response("done"))
    channel.dataReceived(
        b"GET /conflict HTTP/1.1\r\n\r\nGET /broken HTTP/1.1\r\n\r\nGET /bad-result HTTP/1.1\r\n\r\n"
        b"POST /json HTTP/1.1\r\nContent-Length: 5\r\n\r\n{bad}")
    results = read_responses(transport.value(), ["GET"] * 6)
    assert [r[0] for r in results] == [200, 200, 409, 500, 500, 400]
    assert results[0][2] == b"done" and results[1][2] == b"from coroutine"
    assert results[2][2] == b"already there" and results[2][1]["X-Why"] == "dup"
    assert results[5][2].startswith(b"Malformed JSON: ")
    assert not transport.disconnecting


def test_handler_failures_are_logged():
    """A handler's unexpected exception is logged with its traceback, not swallowed."""
    router = Router()
    router.add("/boom", boom)
    channel, transport = make_channel(router)
    failures = []

    def observer(event):
        if "log_failure" in event:
            failures.append(event["log_failure"])

    globalLogPublisher.addObserver(observer)
    try:
        channel.dataReceived(b"GET /boom HTTP/1.1\r\n\r\n")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert transport.value().startswith(b"HTTP/1.1 500 ")
    assert [f.type for f in failures] == [RuntimeError]


def test_response_header_injection_is_refused():
    """A handler header value with CR/LF cannot split the response: it becomes a 500."""
    router = Router()
    router.add("/x", lambda r: Response(200, b"", (("X-A", "1\r\nSet-Cookie: evil"),)))
    channel, transport = make_channel(router)
    channel.dataReceived(b"GET /x HTTP/1.1\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 500 ")
    assert b"evil" not in transport.value()


def test_stream_over_http10_is_raw_body_ended_by_close():
    """HTTP/1.0 has no chunks: a stream is sent raw and closed to end it."""
    router = Router()
    router.add("/s", lambda r: StreamingResponse(lambda s: (s.write(b"abc"), s.close())))
    channel, transport = make_channel(router)
    channel.dataReceived(b"GET /s HTTP/1.0\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert body == b"abc" and transport.disconnecting


def test_stream_start_failure_is_500_and_disconnect_fires_on_close():
    """A start() that raises yields 500; a client disconnect fires on_close exactly once."""
    router = Router()
    router.add("/bad", lambda r: StreamingResponse(lambda s: 1 / 0))
    channel, transport = make_channel(router)
    channel.dataReceived(b"GET /bad HTTP/1.1\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 500 ")

    streams = []
    router.add("/s", lambda r: StreamingResponse(streams.append))
    channel, transport = make_channel(router)
    channel.dataReceived(b"GET /s HTTP/1.1\r\n\r\n")
    calls = []
    streams[0].on_close(lambda: calls.append("closed"))
    channel.dataReceived(b"GET /s HTTP/1.1\r\n\r\n")  # ignored: the connection belongs to the stream
    channel.connectionLost(None)
    assert calls == ["closed"] and streams[0].closed and len(streams) == 1
    streams[0].abort()  # no second callback
    assert calls == ["closed"]


# -- unit: routing --------------------------------------------------------------------------


def test_router_longest_prefix_on_segments():
    """Routes match by longest prefix on whole path segments; exact beats prefix."""
    router = Router()
    api, state, master_state, root, op = object(), object(), object(), object(), object()
    router.add("/api/v1", api)
    router.add("/api/v1/operator/", op)  # trailing slash is the same prefix
    router.add("/state", state)
    router.add("/master/state", master_state)
    assert router.route("/api/v1") is api
    assert router.route("/api/v1/scheduler") is api
    assert router.route("/api/v1/operator") is op
    assert router.route("/api/v1/operator/x/y") is op
    assert router.route("/api/v1/") is api
    assert router.route("/state") is state
    assert router.route("/master/state") is master_state
    assert router.route("/stateful") is None
    assert router.route("/api/v10") is None
    assert router.route("/") is None
    router.add("/", root)
    assert router.route("/stateful") is root and router.route("/") is root


def test_router_methods_404_405():
    """Per-method handlers share a prefix; wrong method is 405 with Allow; no route is 404."""
    get, post = object(), object()
    router = Router()
    router.add("/v2/apps", get, methods=("GET",))
    router.add("/v2/apps", post, methods=("POST",))
    assert router.resolve("GET", "/v2/apps/x") is get
    assert router.resolve("HEAD", "/v2/apps") is get
    assert router.resolve("POST", "/v2/apps") is post
    with pytest.raises(HTTPError) as e:
        router.resolve("DELETE", "/v2/apps")
    assert e.value.status == 405 and e.value.headers == {"Allow": "GET, HEAD, POST"}
    with pytest.raises(HTTPError) as e:
        router.resolve("GET", "/v3")
    assert e.value.status == 404
    with pytest.raises(ValueError):
        router.add("/v2/apps", get, methods=("GET",))


# -- unit: sniffing ---------------------------------------------------------------------------


class Collect(Protocol):
    """Records what it is given; answers b"ack:" + data (the stand-in agent protocol)."""

    def connectionMade(self):
        self.received = b""
        self.factory.made.append(self)

    def dataReceived(self, data):
        self.received += data
        self.transport.write(b"ack:" + data)

    def connectionLost(self, reason):
        self.factory.lost.append(self)


class CollectFactory(Factory):
    protocol = Collect

    def __init__(self):
        self.made, self.lost = [], []


def test_sniffed_prefix_split_across_reads_goes_to_other_protocol():
    """A prefix arriving in pieces still hands the connection over, with every byte."""
    other = CollectFactory()
    channel, transport = make_channel(unit_router(), sniffers=[(b"AGORA1\n", other)])
    channel.dataReceived(b"AG")
    channel.dataReceived(b"ORA")
    assert other.made == []
    channel.dataReceived(b"1\nfirst")
    channel.dataReceived(b"second")
    (proto,) = other.made
    assert proto.received == b"AGORA1\nfirstsecond"
    assert proto.transport is transport
    channel.connectionLost(None)
    assert other.lost == [proto]


def test_sniffing_falls_back_to_http():
    """Bytes that stop matching every prefix are served as HTTP."""
    other = CollectFactory()
    channel, transport = make_channel(unit_router(), sniffers=[(b"AGORA1\n", other)])
    channel.dataReceived(b"G")
    channel.dataReceived(b"ET /echo HTTP/1.1\r\n\r\n")
    assert other.made == [] and transport.value().startswith(b"HTTP/1.1 200 ")


# -- socket tests -----------------------------------------------------------------------------


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


class Server:
    """The live server's router state, shared with the tests."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.streams: list[Stream] = []
        self.closed_streams: list[Stream] = []
        self.sniffed = CollectFactory()

    def slow(self, request):
        d = defer.Deferred()
        self.reactor.callLater(0.05, d.callback, text_response("slow " + request.query["n"][0]))
        return d

    def subscribe(self, request: Request):
        body = request.json()

        def start(stream: Stream):
            self.streams.append(stream)
            stream.on_close(lambda: self.closed_streams.append(stream))
            stream.write(recordio.encode_json({"type": "SUBSCRIBED", "subscribed": {
                "framework_id": {"value": "fw-1"}, "heartbeat_interval_seconds": 15.0}}))
            stream.write(recordio.encode_json({"type": "HEARTBEAT"}))
            if body.get("then_close"):
                stream.write(recordio.encode_json({"type": "ERROR", "error": {"message": "naïve ☃"}}))
                stream.close()

        return StreamingResponse(start, headers=(("Mesos-Stream-Id", "stream-%d" % len(self.streams)),))


def boom(request):
    raise RuntimeError("handler bug")


@pytest.fixture(scope="module")
def server(reactor):
    """One live server on a free port: routes for every socket test, plus a sniffed prefix."""
    state = Server(reactor)
    router = Router()
    router.add("/echo", echo)
    router.add("/slow", state.slow)
    router.add("/boom", boom)
    router.add("/api/v1/scheduler", state.subscribe, methods=("POST",))
    router.add("/api/v1", lambda r: json_response({"served_by": "/api/v1", "path": r.path}))
    router.add("/state", lambda r: json_response({"served_by": "/state"}), methods=("GET",))
    router.add("/master/state", lambda r: json_response({"served_by": "/master/state"}), methods=("GET",))
    router.add("/call", lambda r: empty_response(202, (("Connection", "close"),)), methods=("POST",))
    big = bytes(range(256)) * (12 * 1024)  # 3 MiB, like a large /state
    router.add("/big", lambda r: Response(200, big, content_type="application/octet-stream"))
    state.big = big
    factory = HTTPFactory(router, sniffers=[(b"AGORA1\n", state.sniffed)], reactor=reactor)
    port = blockingCallFromThread(reactor, listen, reactor, 0, factory)
    state.port = port.getHost().port
    state.url = "http://127.0.0.1:%d" % state.port
    yield state
    blockingCallFromThread(reactor, port.stopListening)


def wait_for(predicate, what):
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.005)


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE)
    return sock


def test_keep_alive_like_pymesos(server):
    """Many calls reuse one http.client connection, with no Accept header, as pymesos does."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=DEADLINE)
    ports = set()
    sock = None
    for i in range(20):
        body = json.dumps({"type": "ACKNOWLEDGE", "i": i})
        conn.request("POST", "/echo", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        got = json.loads(resp.read())
        assert resp.status == 200 and got["body"] == body and "accept" not in got["headers"]
        ports.add(got["peer_port"])
        sock = sock or conn.sock
        assert conn.sock is sock
    assert len(ports) == 1
    conn.close()


def test_202_connection_close_lets_http_client_reconnect(server):
    """After a 202 with Connection: close, http.client reconnects by itself (spec §5.1 #2)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=DEADLINE)
    for _ in range(3):
        conn.request("POST", "/call", body=b"{}", headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 202 and resp.read() == b""
        assert resp.headers["Content-Length"] == "0" and resp.headers["Connection"] == "close"
    conn.close()


def test_routing_over_the_wire(server):
    """Longest-prefix routes, 404 and 405 (with Allow) as a client sees them."""
    assert requests.get(server.url + "/api/v1/operator").json() == {"served_by": "/api/v1", "path": "/api/v1/operator"}
    assert requests.get(server.url + "/state").json() == {"served_by": "/state"}
    assert requests.get(server.url + "/master/state").json() == {"served_by": "/master/state"}
    assert requests.get(server.url + "/stateful").status_code == 404
    resp = requests.delete(server.url + "/state")
    assert resp.status_code == 405 and resp.headers["Allow"] == "GET, HEAD"


def test_large_response_arrives_whole(server):
    """A multi-megabyte response arrives intact with its Content-Length, and the connection is reused."""
    with requests.Session() as session:
        for _ in range(2):
            resp = session.get(server.url + "/big")
            assert resp.status_code == 200 and resp.content == server.big
            assert int(resp.headers["Content-Length"]) == len(server.big)


def test_pipelined_requests_answered_in_order(server):
    """Requests sent back to back are answered in order, even when the first is slow."""
    sock = connect(server)
    sock.sendall(b"GET /slow?n=1 HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
                 b"GET /slow?n=3 HTTP/1.1\r\n\r\n"
                 b"GET /echo?n=4 HTTP/1.1\r\n\r\n")
    results = read_responses(sock.makefile("rb"), ["GET", "POST", "GET", "GET"])
    assert [r[0] for r in results] == [200] * 4
    assert results[0][2] == b"slow 1" and results[2][2] == b"slow 3"
    assert json.loads(results[1][2])["body"] == "abc"
    assert json.loads(results[3][2])["query"] == {"n": ["4"]}
    sock.close()


def test_chunked_request_body_over_the_wire(server):
    """http.client's chunked request body arrives whole."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=DEADLINE)
    conn.request("POST", "/echo", body=iter([b"ab", b"cd", b"e" * 5000]), encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["body"] == "abcd" + "e" * 5000
    conn.close()


def test_garbage_and_oversized_head_do_not_hurt_the_server(server):
    """Garbage gets 400, a huge head 431, and the server keeps serving."""
    sock = connect(server)
    sock.sendall(b"\x00\x01\x02 hello\r\n\r\n")
    assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")
    sock.close()
    sock = connect(server)
    try:
        sock.sendall(b"GET /echo HTTP/1.1\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n")
    except OSError:
        pass  # the server may close before we finish sending
    assert sock.recv(65536).startswith(b"HTTP/1.1 431 ")
    sock.close()
    assert requests.get(server.url + "/echo").status_code == 200


def test_oversized_body_413_reaches_a_client_still_sending(server):
    """A client still uploading a refused body reads the 413 instead of a connection reset."""
    sock = connect(server)
    sock.sendall(b"POST /echo HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (40 * 1024 * 1024))
    sock.sendall(b"x" * (1024 * 1024))
    ((status, headers, body),) = read_responses(sock.makefile("rb"), ["POST"])
    assert status == 413 and b"exceeds the limit" in body and headers["Connection"] == "close"
    sock.close()


def test_handler_exception_is_500_and_connection_survives(server):
    """A handler bug is a 500 with a short message; the same connection keeps working."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=DEADLINE)
    conn.request("GET", "/boom")
    resp = conn.getresponse()
    assert resp.status == 500 and resp.read() == b"Internal server error: RuntimeError"
    sock = conn.sock
    conn.request("GET", "/echo")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() and conn.sock is sock
    conn.close()


def test_sniffed_and_http_connections_share_the_port(server):
    """A connection opening with the agent prefix reaches the other protocol; HTTP still works."""
    sock = connect(server)
    sock.sendall(b"AGORA1\nhello")
    data = b""
    while len(data) < len(b"ack:AGORA1\nhello"):
        data += sock.recv(1024)
    assert data == b"ack:AGORA1\nhello"
    assert requests.get(server.url + "/echo").status_code == 200
    sock.sendall(b"more")
    assert sock.recv(1024) == b"ack:more"
    sock.close()
    wait_for(lambda: len(server.sniffed.lost) == 1, "the sniffed protocol to see the close")
    assert server.sniffed.made[0].received == b"AGORA1\nhellomore"


def test_requests_iter_lines_reads_recordio_like_mesoshttp(server):
    """mesoshttp's way (requests stream + iter_lines, slicing by characters) reads every event."""
    resp = requests.post(
        server.url + "/api/v1/scheduler", json={"type": "SUBSCRIBE", "then_close": True}, stream=True,
        headers={"Accept": "application/json", "Connection": "keep-alive"})
    assert resp.status_code == 200
    assert resp.headers["Transfer-Encoding"] == "chunked"
    assert resp.headers["Mesos-Stream-Id"].startswith("stream-")
    events = []
    count = None
    for line in resp.iter_lines():  # as mesoshttp client.py:730-803 does
        line = line.decode("utf-8")
        if count is None:
            count = int(line)
            continue
        events.append(json.loads(line[:count]))
        rest = line[count:]
        count = int(rest) if rest else None
    assert [e["type"] for e in events] == ["SUBSCRIBED", "HEARTBEAT", "ERROR"]
    assert events[2]["error"]["message"] == "naïve ☃"
    resp.close()


def test_http_parser_reads_stream_like_pymesos(server):
    """pymesos's raw SUBSCRIBE and http_parser-based reader get a chunked RecordIO stream."""
    from http_parser.http import HttpParser

    body = json.dumps({"type": "SUBSCRIBE", "subscribe": {"framework_info": {"user": "root", "name": "t"}}})
    sock = connect(server)
    sock.sendall(
        ("POST /api/v1/scheduler HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
         "Accept: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
         % (server.port, len(body), body)).encode("ascii"))
    parser = HttpParser(kind=1)  # as pymesos process.py builds it: responses only
    pattern = re.compile(rb"^\d+\n")
    buffered, events = b"", []
    deadline = time.monotonic() + DEADLINE
    while len(events) < 2 and time.monotonic() < deadline:
        data = sock.recv(1024)
        assert data, "stream closed early"
        assert parser.execute(data, len(data)) == len(data)
        if not parser.is_headers_complete():
            continue
        assert parser.get_status_code() == 200 and parser.is_chunked()
        headers = {k.upper(): v for k, v in parser.get_headers().items()}
        assert headers["MESOS-STREAM-ID"].startswith("stream-")
        if parser.is_partial_body():
            buffered += parser.recv_body()
            while (m := pattern.match(buffered)) and len(buffered) >= m.end() + int(m.group(0)):
                length = int(m.group(0))
                events.append(json.loads(buffered[m.end():m.end() + length].decode("utf-8")))
                buffered = buffered[m.end() + length:]
    assert [e["type"] for e in events] == ["SUBSCRIBED", "HEARTBEAT"]
    assert events[0]["subscribed"]["framework_id"] == {"value": "fw-1"}
    assert not parser.is_message_complete()  # the stream stays open
    sock.close()


def test_pymesos_connection_reads_the_stream(server):
    """pymesos's own Connection class (non-blocking socket + http_parser) subscribes and reads events."""
    import select

    from pymesos.process import Connection

    body = json.dumps({"type": "SUBSCRIBE", "subscribe": {"framework_info": {
        "user": "root", "name": "t", "failover_timeout": 100}}})

    class Callback:
        stream_id = None

        def __init__(self):
            self.events, self.closed = [], False

        def gen_request(self):  # the exact bytes pymesos scheduler.py:495-518 writes
            return ("POST /api/v1/scheduler HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                    "Accept: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                    % (server.port, len(body), body)).encode("ascii")

        def process_event(self, event):
            self.events.append(event)

        def on_close(self):
            self.closed = True

        def change_master(self, master):
            raise AssertionError("unexpected redirect to %s" % master)

    callback = Callback()
    conn = Connection("127.0.0.1:%d" % server.port, callback)
    deadline = time.monotonic() + DEADLINE
    select.select([], [conn.fileno()], [], DEADLINE)
    assert conn.handle_connect_event() == ""
    while conn.want_write():
        assert conn.write()
    while len(callback.events) < 2 and time.monotonic() < deadline:
        readable, _, _ = select.select([conn.fileno()], [], [], 0.5)
        if readable:
            assert conn.read(), "pymesos saw the stream end"
    assert [e["type"] for e in callback.events] == ["SUBSCRIBED", "HEARTBEAT"]
    assert callback.stream_id.startswith("stream-")
    conn.close()
    assert callback.closed


def test_client_disconnect_fires_stream_on_close(server):
    """When the subscriber goes away the stream's on_close runs and later writes are ignored."""
    sock = connect(server)
    sock.sendall(b"POST /api/v1/scheduler HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
    assert sock.recv(4096).startswith(b"HTTP/1.1 200 OK\r\n")
    wait_for(lambda: server.streams and not server.streams[-1].closed, "the stream to start")
    stream = server.streams[-1]
    sock.close()
    wait_for(lambda: stream in server.closed_streams, "on_close after the client disconnected")
    assert stream.closed
    blockingCallFromThread(server.reactor, stream.write, b"ignored")


def test_stream_to_a_client_that_stops_reading_is_dropped():
    """A stream whose client stops reading is aborted once its backlog passes the cap."""
    from twisted.internet.testing import StringTransport

    router = Router()
    streams = []
    router.add("/s", lambda request: StreamingResponse(start=streams.append))
    channel = HTTPFactory(router).buildProtocol(("127.0.0.1", 1))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
    stream = streams[0]
    stream.max_backlog = 1000
    closed = []
    stream.on_close(lambda: closed.append(True))
    transport.producer.pauseProducing()  # what a full socket buffer does
    stream.write(b"x" * 600)
    assert not stream.closed
    transport.producer.resumeProducing()
    stream.write(b"x" * 600)  # the backlog restarts after a resume
    transport.producer.pauseProducing()
    stream.write(b"x" * 600)
    stream.write(b"x" * 600)
    assert stream.closed and closed == [True]
