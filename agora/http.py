"""A small HTTP/1.1 server on Twisted that controls every byte it writes.

Why not twisted.web: Mesos clients depend on details of the wire (spec
specs/mesos-v1-wire.md §2.2, §5.1, §5.2): a stream's status line and headers must go out in
one write, every call reply needs ``Content-Length``, idle keep-alive connections must never be
closed, and the master shares its port with the agents' binary protocol. This module does
exactly that and no more:

- ``Router``: libprocess-style longest-prefix routing on path segments, per-method handlers.
- ``HTTPFactory`` / ``HTTPChannel``: one request at a time per connection, pipelined requests
  queued as raw bytes; ``Content-Length`` and chunked request bodies; bounded header and body
  sizes; no idle timeouts; first-bytes sniffing that hands a connection to another protocol.
- ``Response``, ``StreamingResponse`` / ``Stream``: what handlers return. A streaming response
  owns its connection until it is closed.

Handlers take a ``Request`` and return a ``Response``, a ``StreamingResponse``, a Deferred or a
coroutine of either; raising ``HTTPError`` produces that status.
"""

from __future__ import annotations

import inspect
import json
from http import HTTPStatus
from typing import Any, Callable, Coroutine, Iterable, Sequence, Union
from urllib.parse import parse_qs, unquote

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "HTTPError",
    "Request",
    "Response",
    "StreamingResponse",
    "Stream",
    "Handler",
    "Router",
    "HTTPFactory",
    "HTTPChannel",
    "json_response",
    "text_response",
    "empty_response",
    "listen",
    "DEFAULT_MAX_HEADER_SIZE",
    "DEFAULT_MAX_BODY_SIZE",
]

log = Logger()

DEFAULT_MAX_HEADER_SIZE = 64 * 1024
DEFAULT_MAX_BODY_SIZE = 32 * 1024 * 1024

# While a handler runs, pipelined bytes are buffered; past this much we stop reading the socket
# rather than buffer without bound.
_PIPELINE_BUFFER_LIMIT = 1024 * 1024
_MAX_CHUNK_LINE = 4096
# How long a connection whose request was refused may keep sending before it is closed.
_LINGER_SECONDS = 2.0

_HEX = b"0123456789abcdefABCDEF"
_NO_BODY_STATUSES = frozenset((204, 304))
_PLAIN_TEXT = "text/plain; charset=utf-8"


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode("ascii"))


_STATUS_LINES = {s.value: _status_line(s.value) for s in HTTPStatus}


def _headers_tuple(headers: Any) -> tuple[tuple[str, str], ...]:
    if isinstance(headers, tuple):
        return headers
    if isinstance(headers, dict):
        return tuple(headers.items())
    return tuple(headers)


class HTTPError(Exception):
    """Raised by a handler to answer with ``status`` and ``message`` as a text/plain body."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    def response(self) -> Response:
        """The response this error becomes; subclasses may override (e.g. a JSON error body)."""
        return text_response(self.message, self.status, tuple(self.headers.items()))

    def __repr__(self) -> str:
        return "HTTPError(%d, %r)" % (self.status, self.message)


@attrs.frozen
class Request:
    """One parsed HTTP request, body included."""

    method: str
    path: str  # without the query string, percent-decoded
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lower-cased; repeated headers joined with ", "
    body: bytes
    peer: tuple[str, int]
    version: str = "HTTP/1.1"
    raw_target: str = ""  # the request-target as sent (path and query, not decoded)

    def header(self, name: str, default: str | None = None) -> str | None:
        """The value of header ``name`` (any case), or ``default``."""
        return self.headers.get(name.lower(), default)

    def json(self) -> Any:
        """The body parsed as JSON; HTTPError(400) if it is not valid JSON."""
        try:
            return json.loads(self.body)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
            raise HTTPError(400, "Malformed JSON: %s" % (e,)) from None


@attrs.frozen
class Response:
    """A complete response; sent with ``Content-Length``."""

    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_headers_tuple)
    content_type: str | None = None


def json_response(obj: Any, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> Response:
    """``obj`` as compact, ASCII-only JSON."""
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return Response(status, body, headers, "application/json")


def text_response(text: str, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> Response:
    """``text`` as a text/plain UTF-8 body."""
    return Response(status, text.encode("utf-8"), headers, _PLAIN_TEXT)


def empty_response(status: int = 202, headers: Iterable[tuple[str, str]] = ()) -> Response:
    """A response with no body (``Content-Length: 0``)."""
    return Response(status, b"", headers)


class Stream:
    """The open body of a streaming response: each ``write`` becomes one HTTP chunk.

    The stream owns its connection. It ends with ``close()`` (a proper end of the chunked
    body, then the connection closes), ``abort()`` (the TCP connection drops), or when the
    client goes away. ``on_close`` callbacks run once in any of these cases.
    """

    # A client that stops reading may leave at most this much queued before it is dropped,
    # so one stuck subscriber cannot grow the server's memory without bound.
    max_backlog = 64 * 1024 * 1024

    def __init__(self, channel: HTTPChannel, peer: tuple[str, int], chunked: bool) -> None:
        self.peer = peer
        self._channel = channel
        self._transport = channel.transport
        self._chunked = chunked
        self._closed = False
        self._paused = False
        self._backlog = 0  # bytes written since the transport asked us to pause
        try:  # the transport tells a push producer when its buffer is full and drained
            self._transport.registerProducer(self, True)
        except (AttributeError, RuntimeError):
            pass
        self._callbacks: list[Callable[[], None]] = []
        # Until the status line and headers go out, writes collect here so that the first
        # write on the wire carries headers and first chunks together (spec §5.2).
        self._pending: list[bytes] | None = []

    @property
    def closed(self) -> bool:
        """True once the stream was closed, aborted, or the client disconnected."""
        return self._closed

    def write(self, data: bytes) -> None:
        """Send ``data`` as one chunk; ignored when empty or after the stream closed."""
        # An empty chunk would be read as the end of the body, so it is never sent.
        if self._closed or not data:
            return
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        if self._pending is not None:
            self._pending.append(data)
            return
        if self._paused:
            self._backlog += len(data)
            if self._backlog > self.max_backlog:
                log.warn("Dropping stream to {peer}: it stopped reading ({n} bytes queued)",
                         peer=self.peer, n=self._backlog)
                self.abort()
                return
        self._transport.write(data)

    def pull_from(self, producer) -> None:
        """Let an IPullProducer feed this stream at the client's pace (e.g. a file).

        The transport asks `producer.resumeProducing()` for more each time its buffer drains;
        the producer writes with `write()` and calls `stop_pulling()` when it is done.
        """
        if self._transport.producer is not None:
            self._transport.unregisterProducer()
        self._transport.registerProducer(producer, False)

    def stop_pulling(self) -> None:
        """End `pull_from`: a registered producer would hold the connection open."""
        if self._transport.producer is not None:
            self._transport.unregisterProducer()

    # IPushProducer: called by the transport.
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused, self._backlog = False, 0

    def stopProducing(self) -> None:
        self._paused = True

    def close(self) -> None:
        """End the body properly and close the connection."""
        if self._closed:
            return
        if self._chunked:
            if self._pending is not None:
                self._pending.append(b"0\r\n\r\n")
            else:
                self._transport.write(b"0\r\n\r\n")
        if self._pending is None:
            self._transport.loseConnection()
        # else: the channel flushes the pending bytes and then loses the connection.
        self._finish()

    def abort(self) -> None:
        """Drop the TCP connection without ending the body."""
        if self._closed:
            return
        self._pending = None
        self._transport.abortConnection()
        self._finish()

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once when the stream ends (now, if it already has)."""
        if self._closed:
            self._run(callback)
        else:
            self._callbacks.append(callback)

    def _flush_pending(self) -> bytes:
        pending, self._pending = self._pending, None
        return b"".join(pending) if pending else b""

    def _connection_lost(self) -> None:
        if not self._closed:
            self._finish()

    def _finish(self) -> None:
        self._closed = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            self._run(callback)

    @staticmethod
    def _run(callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            log.failure("Stream on_close callback {callback!r} failed", callback=callback)

    def __repr__(self) -> str:
        return "<Stream to %s:%s%s>" % (self.peer[0], self.peer[1], " closed" if self._closed else "")


@attrs.frozen
class StreamingResponse:
    """A response whose body is a ``Stream`` (chunked); ``start`` gets the stream to write to.

    ``start`` runs once the response is committed; chunks it writes synchronously leave in
    the same write as the status line and headers.
    """

    start: Callable[[Stream], None]
    status: int = 200
    headers: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_headers_tuple)
    content_type: str = "application/json"


HandlerResult = Union[Response, StreamingResponse, Deferred, Coroutine[Any, Any, Any]]
Handler = Callable[[Request], HandlerResult]


class _Route:
    __slots__ = ("prefix", "by_method", "any", "allow")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.by_method: dict[str, Handler] = {}
        self.any: Handler | None = None
        self.allow = ""

    def handler_for(self, method: str) -> Handler | None:
        handler = self.by_method.get(method)
        if handler is None:
            # HEAD is GET without a body, as in every HTTP server.
            if method == "HEAD":
                handler = self.by_method.get("GET")
            if handler is None:
                handler = self.any
        return handler


class Router:
    """Maps paths to handlers by longest prefix on path segments, as libprocess does.

    ``/api/v1`` serves ``/api/v1/operator``; ``/state`` does not serve ``/stateful``; an exact
    match beats any prefix. One prefix may have a handler per method; with ``methods=None``
    the handler takes every method not claimed by another handler on that prefix.
    """

    def __init__(self) -> None:
        self._routes: dict[str, _Route] = {}

    def add(self, prefix: str, handler: Handler, methods: tuple[str, ...] | None = None) -> None:
        """Serve ``prefix`` and every path below it with ``handler`` (for ``methods`` only)."""
        prefix = self._normalize(prefix)
        route = self._routes.get(prefix)
        if route is None:
            route = self._routes[prefix] = _Route(prefix)
        if methods is None:
            if route.any is not None:
                raise ValueError("a handler for every method is already registered on %r" % prefix)
            route.any = handler
        else:
            for method in methods:
                method = method.upper()
                if method in route.by_method:
                    raise ValueError("%s %s is already registered" % (method, prefix))
                route.by_method[method] = handler
        allowed = set(route.by_method)
        if "GET" in allowed:
            allowed.add("HEAD")
        route.allow = ", ".join(sorted(allowed))

    def route(self, path: str) -> Handler | None:
        """The handler that serves ``path`` (the catch-all, else GET's, else any), or None."""
        route = self._lookup(path)
        if route is None:
            return None
        if route.any is not None:
            return route.any
        return route.by_method.get("GET") or next(iter(route.by_method.values()))

    def resolve(self, method: str, path: str) -> Handler:
        """The handler for ``method`` on ``path``; HTTPError 404 or 405 (with Allow) if none."""
        route = self._lookup(path)
        if route is None:
            raise HTTPError(404, "No endpoint at %s" % path)
        handler = route.handler_for(method)
        if handler is None:
            raise HTTPError(
                405,
                "Method %s is not allowed on %s; allowed: %s" % (method, path, route.allow),
                {"Allow": route.allow},
            )
        return handler

    def prefixes(self) -> list[str]:
        """Registered prefixes, sorted."""
        return sorted(self._routes)

    def _lookup(self, path: str) -> _Route | None:
        routes = self._routes
        p = path
        while True:
            route = routes.get(p)
            if route is not None:
                return route
            if len(p) <= 1:
                return None
            i = p.rfind("/")
            p = p[:i] if i > 0 else "/"

    @staticmethod
    def _normalize(prefix: str) -> str:
        if not prefix.startswith("/"):
            raise ValueError("route prefixes start with '/': %r" % prefix)
        if len(prefix) > 1:
            prefix = prefix.rstrip("/") or "/"
        return prefix


# Connection states.
_SNIFF, _HEAD, _BODY, _CHUNKED, _BUSY, _STREAM, _CLOSED = range(7)
# Chunked request body sub-states.
_C_SIZE, _C_DATA, _C_DATA_END, _C_TRAILER = range(4)


class _Parsed:
    """A request whose head is parsed and whose body is being read."""

    __slots__ = ("method", "target", "version", "headers", "keep_alive")

    def __init__(self, method: str, target: str, version: str, headers: dict[str, str], keep_alive: bool):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class HTTPChannel(Protocol):
    """One server connection: sniffs the first bytes, then speaks HTTP/1.1 (or hands over)."""

    def __init__(self, factory: HTTPFactory) -> None:
        self._factory = factory
        self._router = factory.router
        self._buf = bytearray()
        self._scan = 0  # where to resume looking for the end of the head
        self._state = _SNIFF if factory.sniffers else _HEAD
        self._delegate: Protocol | None = None
        self._peer: tuple[str, int] = ("", 0)
        self._parsed: _Parsed | None = None
        self._remaining = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._chunk_state = _C_SIZE
        self._in_process = False
        self._paused = False
        self._stream: Stream | None = None
        self._request_seq = 0  # identifies the request a (possibly late) response belongs to
        self._linger_call: Any = None

    # -- Protocol -----------------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self._peer = (getattr(peer, "host", str(peer)), getattr(peer, "port", 0))
        # Stream events are small separate writes; Nagle would hold them back.
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            try:
                set_nodelay(True)
            except OSError:
                pass

    def dataReceived(self, data: bytes) -> None:
        if self._delegate is not None:
            self._delegate.dataReceived(data)
            return
        state = self._state
        if state == _STREAM or state == _CLOSED:
            return  # a stream's connection carries nothing more from the client
        self._buf += data
        if state == _SNIFF:
            if not self._sniff():
                return
        elif state == _BUSY:
            self._maybe_pause()
            return
        self._process()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._delegate is not None:
            self._delegate.connectionLost(reason)
            return
        self._state = _CLOSED
        self._buf = bytearray()
        self._body = []
        linger, self._linger_call = self._linger_call, None
        if linger is not None and linger.active():
            linger.cancel()
        stream, self._stream = self._stream, None
        if stream is not None:
            stream._connection_lost()

    # -- sniffing -----------------------------------------------------------------------

    def _sniff(self) -> bool:
        """Decide who gets this connection; True when it is HTTP."""
        buf = self._buf
        waiting = False
        for prefix, factory in self._factory.sniffers:
            if buf.startswith(prefix):
                self._hand_over(factory)
                return False
            if len(buf) < len(prefix) and prefix.startswith(buf):
                waiting = True
        if waiting:
            return False
        self._state = _HEAD
        return True

    def _hand_over(self, factory: Factory) -> None:
        data = bytes(self._buf)
        self._buf = bytearray()
        self._state = _CLOSED
        protocol = factory.buildProtocol(self.transport.getPeer())
        if protocol is None:
            self.transport.loseConnection()
            return
        self._delegate = protocol
        protocol.makeConnection(self.transport)
        protocol.dataReceived(data)

    # -- parsing ------------------------------------------------------------------------

    def _process(self) -> None:
        # A handler whose Deferred has already fired re-enters here through _respond_later;
        # the outer loop then simply carries on with the next pipelined request.
        if self._in_process:
            return
        self._in_process = True
        try:
            while True:
                state = self._state
                if state == _HEAD:
                    progressed = self._parse_head()
                elif state == _BODY:
                    progressed = self._read_body()
                elif state == _CHUNKED:
                    progressed = self._read_chunked()
                else:
                    break
                if not progressed:
                    break
        except _BadRequest as e:
            self._reject(e.status, e.message)
        except Exception:
            log.failure("HTTP connection from {peer} failed", peer=self._peer)
            self._reject(500, "Internal server error")
        finally:
            self._in_process = False

    def _parse_head(self) -> bool:
        buf = self._buf
        # Tolerate empty lines before a request line (RFC 9112 §2.2), e.g. after a POST body
        # that a client terminated with an extra CRLF.
        while buf[:2] == b"\r\n":
            del buf[:2]
        while buf[:1] == b"\n":
            del buf[:1]
        if not buf:
            return False
        start = self._scan
        end = buf.find(b"\r\n\r\n", start)
        # Bare-LF heads are tolerated too; whichever blank line comes first ends the head.
        lf_end = buf.find(b"\n\n", start, end if end >= 0 else len(buf))
        if lf_end >= 0:
            end, body_start = lf_end, lf_end + 2
        elif end >= 0:
            body_start = end + 4
        else:
            if len(buf) > self._factory.max_header_size:
                raise _BadRequest(431, "Request header fields too large (limit %d bytes)"
                                  % self._factory.max_header_size)
            self._scan = max(0, len(buf) - 3)
            return False
        if end > self._factory.max_header_size:
            raise _BadRequest(431, "Request header fields too large (limit %d bytes)"
                              % self._factory.max_header_size)
        head = bytes(buf[:end])
        del buf[:body_start]
        self._scan = 0
        self._parse_request_head(head)
        return True

    def _parse_request_head(self, head: bytes) -> None:
        # One latin-1 decode of the whole head, then str methods: far cheaper than decoding
        # line by line. latin-1 maps bytes 1:1, so nothing is lost or refused here.
        text = head.decode("latin-1")
        if "\r" in text:
            lines = text.split("\r\n")
            # Any CR or LF left inside a line is a bare one: malformed.
            if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
                raise _BadRequest(400, "Malformed line endings in request head; use CRLF")
        else:
            lines = text.split("\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            raise _BadRequest(400, "Malformed request line")
        method, target, version = parts
        if not (method.isalpha() and method.isupper() and method.isascii()):
            raise _BadRequest(400, "Malformed request method")
        if version != "HTTP/1.1" and version != "HTTP/1.0":
            if version.startswith("HTTP/") and len(version) == 8:
                raise _BadRequest(505, "HTTP version %s not supported; use HTTP/1.1" % version)
            raise _BadRequest(400, "Malformed request line")
        if not target or not target.isascii() or not target.isprintable():
            raise _BadRequest(400, "Malformed request target")

        headers: dict[str, str] = {}
        for i in range(1, len(lines)):
            line = lines[i]
            name, sep, value = line.partition(":")
            if not sep or not name or name[0] in " \t" or name[-1] in " \t":
                # Also rejects obsolete line folding, which RFC 9112 lets a server refuse.
                raise _BadRequest(400, "Malformed header line: %r" % line[:80])
            key = name.lower()
            value = value.strip(" \t")
            previous = headers.get(key)
            headers[key] = value if previous is None else previous + ", " + value

        connection = headers.get("connection")
        tokens = connection.lower() if connection else ""
        if version == "HTTP/1.1":
            keep_alive = "close" not in tokens
        else:
            keep_alive = "keep-alive" in tokens
        parsed = _Parsed(method, target, version, headers, keep_alive)
        self._parsed = parsed

        te = headers.get("transfer-encoding")
        cl = headers.get("content-length")
        if te is not None:
            if cl is not None:
                # Both framings at once is how request smuggling starts; refuse it.
                raise _BadRequest(400, "Request has both Transfer-Encoding and Content-Length")
            if te.lower() != "chunked":
                raise _BadRequest(501, "Unsupported Transfer-Encoding %r; use chunked" % te)
            self._body = []
            self._body_size = 0
            self._chunk_state = _C_SIZE
            self._state = _CHUNKED
            self._maybe_continue()
            return
        length = 0
        if cl is not None:
            if "," in cl:
                values = {v.strip() for v in cl.split(",")}
                if len(values) != 1:
                    raise _BadRequest(400, "Conflicting Content-Length headers")
                cl = values.pop()
            if not (cl.isascii() and cl.isdigit()):
                raise _BadRequest(400, "Malformed Content-Length %r" % cl)
            length = int(cl)
            if length > self._factory.max_body_size:
                raise _BadRequest(413, "Request body of %d bytes exceeds the limit of %d bytes"
                                  % (length, self._factory.max_body_size))
        if length == 0:
            self._dispatch(b"")
            return
        self._remaining = length
        self._state = _BODY
        if len(self._buf) < length:
            self._maybe_continue()

    def _maybe_continue(self) -> None:
        # curl waits (1 s) for "100 Continue" before sending a body over 1 KiB.
        parsed = self._parsed
        if (parsed.version == "HTTP/1.1" and parsed.headers.get("expect", "").lower() == "100-continue"
                and not self._buf):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _read_body(self) -> bool:
        buf = self._buf
        n = self._remaining
        if len(buf) < n:
            return False
        body = bytes(buf[:n])
        del buf[:n]
        self._dispatch(body)
        return True

    def _read_chunked(self) -> bool:
        buf = self._buf
        pos = 0
        end = len(buf)
        max_body = self._factory.max_body_size
        try:
            while True:
                cs = self._chunk_state
                if cs == _C_SIZE:
                    nl = buf.find(b"\n", pos)
                    if nl < 0:
                        if end - pos > _MAX_CHUNK_LINE:
                            raise _BadRequest(400, "Malformed chunk size line")
                        return False
                    line = bytes(buf[pos:nl]).rstrip(b"\r")
                    semi = line.find(b";")  # chunk extensions are allowed and ignored
                    if semi >= 0:
                        line = line[:semi]
                    line = line.strip(b" \t")
                    if not line or len(line) > 16 or line.translate(None, _HEX):
                        raise _BadRequest(400, "Malformed chunk size %r" % line[:40])
                    size = int(line, 16)
                    pos = nl + 1
                    if size == 0:
                        self._chunk_state = _C_TRAILER
                        continue
                    self._body_size += size
                    if self._body_size > max_body:
                        raise _BadRequest(413, "Request body exceeds the limit of %d bytes" % max_body)
                    self._remaining = size
                    self._chunk_state = _C_DATA
                elif cs == _C_DATA:
                    take = min(end - pos, self._remaining)
                    if take:
                        self._body.append(bytes(buf[pos:pos + take]))
                        pos += take
                        self._remaining -= take
                    if self._remaining:
                        return False
                    self._chunk_state = _C_DATA_END
                elif cs == _C_DATA_END:
                    if buf[pos:pos + 2] == b"\r\n":
                        pos += 2
                    elif buf[pos:pos + 1] == b"\n":
                        pos += 1
                    elif end - pos < 2:
                        return False
                    else:
                        raise _BadRequest(400, "Chunk data not followed by CRLF")
                    self._chunk_state = _C_SIZE
                else:  # _C_TRAILER: trailer fields are read and ignored
                    nl = buf.find(b"\n", pos)
                    if nl < 0:
                        if end - pos > self._factory.max_header_size:
                            raise _BadRequest(431, "Request trailer too large")
                        return False
                    line = buf[pos:nl].rstrip(b"\r")
                    pos = nl + 1
                    if not line:
                        body = b"".join(self._body)
                        self._body = []
                        del buf[:pos]
                        pos = 0
                        self._dispatch(body)
                        return True
        finally:
            if pos:
                del buf[:pos]

    # -- dispatch -----------------------------------------------------------------------

    def _dispatch(self, body: bytes) -> None:
        parsed = self._parsed
        self._parsed = None
        self._state = _BUSY
        self._request_seq += 1
        seq = self._request_seq
        target = parsed.target
        path, _, qs = target.partition("?")
        if path[:1] != "/":
            if path.startswith(("http://", "https://")):  # absolute-form (sent to proxies)
                slash = path.find("/", path.find("//") + 2)
                path = path[slash:] if slash >= 0 else "/"
            elif path != "*":
                self._reject(400, "Malformed request target")
                return
        if "%" in path:
            path = unquote(path, errors="replace")
        query = parse_qs(qs, keep_blank_values=True) if qs else {}
        request = Request(parsed.method, path, query, parsed.headers, body, self._peer, parsed.version, target)
        try:
            handler = self._router.resolve(request.method, path)
            result = handler(request)
            if inspect.iscoroutine(result):
                result = Deferred.fromCoroutine(result)
        except HTTPError as e:
            self._respond(seq, request, parsed.keep_alive, e.response())
            return
        except Exception:
            self._respond(seq, request, parsed.keep_alive, self._internal_error(request, Failure()))
            return
        if isinstance(result, Deferred):
            result.addCallbacks(
                self._respond_later, self._fail_later,
                callbackArgs=(seq, request, parsed.keep_alive),
                errbackArgs=(seq, request, parsed.keep_alive),
            )
        else:
            self._respond(seq, request, parsed.keep_alive, result)

    def _respond_later(self, result: Any, seq: int, request: Request, keep_alive: bool) -> None:
        self._respond(seq, request, keep_alive, result)
        self._process()

    def _fail_later(self, failure: Failure, seq: int, request: Request, keep_alive: bool) -> None:
        if failure.check(HTTPError):
            response = failure.value.response()
        else:
            response = self._internal_error(request, failure)
        self._respond(seq, request, keep_alive, response)
        self._process()

    @staticmethod
    def _internal_error(request: Request, failure: Failure) -> Response:
        log.failure("Handler for {method} {path} failed", failure=failure,
                    method=request.method, path=request.path)
        return text_response("Internal server error: %s" % failure.type.__name__, 500)

    def _respond(self, seq: int, request: Request, keep_alive: bool, response: Any) -> None:
        if self._state != _BUSY or seq != self._request_seq:
            return  # the client went away while the handler was working
        try:
            if isinstance(response, Response):
                close = self._write_response(request, keep_alive, response)
            elif isinstance(response, StreamingResponse):
                self._start_stream(request, response)
                return
            else:
                raise TypeError("handler returned %r, not a Response or StreamingResponse" % (response,))
        except Exception:
            close = self._write_response(request, keep_alive, self._internal_error(request, Failure()))
        if close:
            self._close_after_response()
        else:
            self._state = _HEAD
            if self._paused:
                self._paused = False
                self.transport.resumeProducing()

    def _write_response(self, request: Request, keep_alive: bool, response: Response) -> bool:
        """Write ``response``; True if the connection must close after it."""
        status = response.status
        head = [_STATUS_LINES.get(status) or _status_line(status), self._factory.server_header]
        has_type = False
        close = not keep_alive
        for name, value in response.headers:
            lname = name.lower()
            if lname == "connection":
                if "close" in value.lower():
                    close = True
                continue  # written below, once
            if lname == "content-length" or lname == "transfer-encoding":
                continue  # we frame the body ourselves
            if lname == "content-type":
                has_type = True
            head.append(_header_line(name, value))
        body = response.body
        if response.content_type is not None and not has_type:
            head.append(b"Content-Type: %s\r\n" % response.content_type.encode("latin-1"))
        if status not in _NO_BODY_STATUSES:
            head.append(b"Content-Length: %d\r\n" % len(body))
        else:
            body = b""
        if close:
            head.append(b"Connection: close\r\n")
        elif request.version == "HTTP/1.0":
            head.append(b"Connection: keep-alive\r\n")
        head.append(b"\r\n")
        if request.method == "HEAD":
            body = b""
        if len(body) <= 65536:
            head.append(body)
            self.transport.write(b"".join(head))
        else:
            self.transport.writeSequence([b"".join(head), body])
        return close

    def _start_stream(self, request: Request, response: StreamingResponse) -> None:
        chunked = request.version == "HTTP/1.1"
        head = [_STATUS_LINES.get(response.status) or _status_line(response.status),
                self._factory.server_header]
        for name, value in response.headers:
            lname = name.lower()
            if lname in ("content-length", "transfer-encoding", "content-type", "connection"):
                continue
            head.append(_header_line(name, value))
        head.append(b"Content-Type: %s\r\n" % response.content_type.encode("latin-1"))
        if chunked:
            head.append(b"Transfer-Encoding: chunked\r\n")
        else:
            # HTTP/1.0 has no chunks: the body is the raw bytes, ended by the close.
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        if request.method == "HEAD":
            # Headers only: start() is never called, and the connection closes because a
            # chunked response's end cannot be marked without a body.
            self.transport.write(b"".join(head))
            self._close_after_response()
            return
        self._state = _STREAM
        self._buf = bytearray()
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()  # so that we notice the client disconnecting
        stream = Stream(self, self._peer, chunked)
        self._stream = stream
        try:
            response.start(stream)
        except Exception:
            failure = Failure()
            if stream._pending is None:  # the stream was aborted before failing
                log.failure("Stream start for {path} failed", failure=failure, path=request.path)
                self._stream = None
                return
            stream._pending = None
            self._state = _BUSY
            self._stream = None
            self._write_response(request, False, self._internal_error(request, failure))
            self._close_after_response()
            stream._connection_lost()
            return
        if stream._pending is None:
            return  # start() aborted the stream
        head.append(stream._flush_pending())
        # Status line, headers and first chunks in a single write (spec §5.2).
        self.transport.write(b"".join(head))
        if stream.closed:
            self.transport.loseConnection()

    def _close_after_response(self) -> None:
        self._state = _CLOSED
        unread, self._buf = self._buf, bytearray()
        if unread:
            self._linger()  # pipelined requests we will not answer; see _linger
        else:
            self.transport.loseConnection()

    def _reject(self, status: int, message: str) -> None:
        """Answer a request we could not parse, then close (its framing is unknown)."""
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        self._buf = bytearray()
        body = message.encode("utf-8")
        self.transport.write(b"".join((
            _STATUS_LINES.get(status) or _status_line(status),
            self._factory.server_header,
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % len(body),
            body,
        )))
        self._linger()

    def _linger(self) -> None:
        # A client may still be sending the request we refused (an oversized body, say).
        # Closing now, with its bytes unread, makes the kernel send RST, and the client may
        # then lose our error response. So only stop writing, discard what still arrives,
        # and close for good once the client does or after a short grace period.
        reactor = self._factory.reactor
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if reactor is None or half_close is None:
            self.transport.loseConnection()
            return
        half_close()
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        self._linger_call = reactor.callLater(_LINGER_SECONDS, self.transport.loseConnection)

    def _maybe_pause(self) -> None:
        if not self._paused and len(self._buf) > _PIPELINE_BUFFER_LIMIT:
            self._paused = True
            self.transport.pauseProducing()


def _header_line(name: str, value: str) -> bytes:
    line = b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("utf-8"))
    # A CR or LF from a handler would let it inject headers or split the response.
    if line.count(b"\n") != 1 or line.count(b"\r") != 1:
        raise ValueError("response header %r contains CR or LF" % name)
    return line


class HTTPFactory(Factory):
    """Builds ``HTTPChannel``s serving ``router``; hands sniffed connections to other factories.

    ``sniffers`` pairs a byte prefix with a factory: a connection whose first bytes start with
    the prefix goes to a protocol from that factory, which receives ``makeConnection`` and then
    every byte read so far, prefix included. Prefixes must not look like an HTTP method.
    """

    protocol = HTTPChannel

    def __init__(
        self,
        router: Router,
        sniffers: Sequence[tuple[bytes, Factory]] = (),
        reactor: Any = None,
        server_name: str = "Agora",
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    ) -> None:
        for prefix, _ in sniffers:
            if not prefix:
                raise ValueError("sniffer prefixes must not be empty")
        self.router = router
        self.sniffers = tuple(sniffers)
        self.reactor = reactor
        self.server_name = server_name
        self.server_header = b"Server: %s\r\n" % server_name.encode("latin-1") if server_name else b""
        self.max_header_size = max_header_size
        self.max_body_size = max_body_size

    def buildProtocol(self, addr: Any) -> HTTPChannel:
        channel = HTTPChannel(self)
        channel.factory = self
        return channel


def listen(reactor: Any, port: int, factory: Factory, interface: str = "127.0.0.1") -> IListeningPort:
    """Listen on ``interface:port`` (0 picks a free port; see ``getHost().port``)."""
    # A deep backlog absorbs bursts of connecting agents and schedulers.
    return reactor.listenTCP(port, factory, backlog=1024, interface=interface)
