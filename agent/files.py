"""Mesos's `/files/*` endpoints: browse, read and download files in attached sandboxes.

    GET /files/browse?path=P                   [{"path","nlink","size","mtime","mode","uid","gid"}]
    GET /files/read?path=P&offset=N&length=M   {"data": "...", "offset": N}
    GET /files/download?path=P                 the raw bytes, as an attachment
    GET /files/debug                           {"<virtual path>": "<real directory>", ...}

(`/files/browse.json`, `/files/read.json`, `/files/download.json` and `/files/debug.json` are
the same endpoints under their old Mesos names.) The Mesos web UI and `dcos task log/ls` use them.

Nothing is served unless it is *attached*: `Files.attach(virtual_path, real_dir)` maps a
virtual path onto a real directory (or a single file). The agent attaches each executor run
under its real path and under `/frameworks/<fid>/executors/<eid>/runs/latest`, as Mesos does.
A request path resolves by the longest attached virtual prefix; the rest is joined to the
real directory, symlinks are resolved, and the result must still lie inside the attachment:

- a `..` segment or a NUL byte is refused (400) before anything touches the disk; query
  values are percent-decoded exactly once, so `%2e%2e` is `..` and is refused too;
- a path that resolves outside its attachment (a symlink in the sandbox pointing at
  `/etc/passwd`, say) is refused (403), dangling or not; a path under no attachment, or that
  does not exist, is 404;
- what is finally opened is opened with O_NOFOLLOW and O_NONBLOCK (a FIFO left by a task
  cannot stall the reactor), then checked again through `/proc/self/fd`, so swapping a file
  for a symlink between the check and the open gets a 403, not the link's target; only
  regular files are read or downloaded.

Choices where Mesos is silent or odd:

- `read` without `offset` means offset -1, as in Mesos: the answer is the file's size as
  `offset` and empty `data` (how tailing clients learn where the end is). A `length` beyond
  `max_read_length` (1 MiB by default; Mesos caps at 16 pages) is cut to it, and so is a
  missing one: clients read again from `offset + len(data)` until `data` is empty.
- `data` is the bytes decoded as UTF-8 with undecodable bytes replaced by U+FFFD (Mesos puts
  the raw bytes in its JSON string, which is UTF-8 text in practice). A read that would end in
  the middle of a multi-byte character stops before it, so chunk boundaries do not garble
  text. As with Mesos, a client that advances by the *characters* it got, not the bytes,
  re-reads part of any non-ASCII text.
- `browse` of a file lists that one file, like `ls -l FILE` (Mesos answers `[]`). In a
  listing, a symlink is described by its target when the target is inside the attachment,
  else as the link itself (`lrwxrwxrwx`), so a listing says nothing about files outside.
  `mtime` is whole seconds; `uid`/`gid` are user and group names (numbers when unknown).
  Names that are not UTF-8 are shown with U+FFFD and cannot be requested back.
- `download` of a file up to `max_read_length` is one response with Content-Length; a larger
  one is streamed in chunks, paced by the socket (the next chunk is read only when the last
  went out), and ends at the size the file had when the download began (if the file shrinks
  meanwhile, the connection is cut so that the client sees an incomplete body).
- No `jsonp` parameter, no authentication (Mesos's are optional).

The endpoints only read the disk, in bounded amounts, in the reactor thread.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import stat
from functools import lru_cache
from typing import Callable
from urllib.parse import quote

from twisted.logger import Logger

from agora.http import HTTPError, Request, Response, Stream, StreamingResponse, json_response

__all__ = ["Files", "routes", "MAX_READ_LENGTH", "DOWNLOAD_CHUNK"]

log = Logger()

#: Most bytes one /files/read answers with, and the largest download sent in one response.
MAX_READ_LENGTH = 1024 * 1024
#: Bytes per chunk of a streamed download.
DOWNLOAD_CHUNK = 64 * 1024

_INTEGER = re.compile(r"-?[0-9]{1,19}\Z")
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


class Files:
    """The attachment table and the `/files/*` handlers over it."""

    def __init__(self, max_read_length: int = MAX_READ_LENGTH,
                 download_chunk: int = DOWNLOAD_CHUNK) -> None:
        if max_read_length < 1 or download_chunk < 1:
            raise ValueError("max_read_length and download_chunk must be positive")
        self.max_read_length = max_read_length
        self.download_chunk = download_chunk
        self._attached: dict[str, str] = {}  # virtual path -> realpath of the directory

    # --- attachments ----------------------------------------------------------------------

    def attach(self, virtual_path: str, real_dir: str) -> None:
        """Serve `real_dir` (a directory or one file) under `virtual_path`.

        Attaching a virtual path again replaces the old attachment (how `runs/latest` moves
        to a new run). `real_dir` is resolved now, as in Mesos; FileNotFoundError if it does
        not exist, ValueError if `virtual_path` is not absolute or has a `..` segment.
        """
        virtual = _normalize_virtual(virtual_path)
        real = os.path.realpath(real_dir)
        if not os.path.exists(real):
            raise FileNotFoundError(f"cannot attach {real_dir!r} as {virtual_path!r}: "
                                    "it does not exist")
        self._attached[virtual] = real

    def detach(self, virtual_path: str) -> None:
        """Stop serving `virtual_path`; nothing happens if it is not attached."""
        try:
            self._attached.pop(_normalize_virtual(virtual_path), None)
        except ValueError:
            pass

    def detach_under(self, real_path: str) -> list[str]:
        """Detach every virtual path whose directory is `real_path` or below it.

        Meant for the sandbox collector's `on_removed`: a run's real-path attachment and its
        `runs/latest` attachment go, unless `latest` was re-attached to a newer run meanwhile.
        Returns the virtual paths detached.
        """
        root = os.path.realpath(real_path)
        gone = [v for v, real in self._attached.items() if _within(real, root)]
        for virtual in gone:
            del self._attached[virtual]
        return gone

    def attachments(self) -> dict[str, str]:
        """A copy of the table: virtual path -> real path."""
        return dict(self._attached)

    def resolve(self, path: str) -> tuple[str, str, str]:
        """`(virtual, real, root)` for a request path, or HTTPError (400, 403 or 404).

        `virtual` is the normalized request path, `real` the resolved path on disk (it may
        not exist), `root` the real directory of the attachment it lies in.
        """
        if "\0" in path:
            raise HTTPError(400, "The path contains a NUL byte")
        segments = [s for s in path.split("/") if s not in ("", ".")]
        if ".." in segments:
            raise HTTPError(400, f"The path {path!r} has a '..' segment; ask for the "
                                 "path itself (see /files/debug for what is attached)")
        virtual = "/" + "/".join(segments)
        for i in range(len(segments), -1, -1):
            root = self._attached.get("/" + "/".join(segments[:i]))
            if root is not None:
                break
        else:
            raise HTTPError(404, f"{virtual} is not in any attached directory "
                                 "(see /files/debug)")
        rest = segments[i:]
        if not rest:
            return virtual, root, root
        real = os.path.realpath(os.path.join(root, *rest))
        if not _within(real, root):
            raise HTTPError(403, f"{virtual} leads outside its sandbox")
        return virtual, real, root

    # --- handlers ---------------------------------------------------------------------------

    def browse(self, request: Request) -> Response:
        """GET /files/browse?path=P: the entries of a directory (or the one file P)."""
        virtual, real, root = self.resolve(_required(request, "path"))
        fd = _open_inside(real, root, virtual)
        try:
            st = os.fstat(fd)
            if not stat.S_ISDIR(st.st_mode):
                return json_response([_file_info(virtual, st)])
            listing = []
            with os.scandir(fd) as entries:
                for entry in entries:
                    name = _display_name(entry.name)
                    info = self._entry_stat(entry, real, root)
                    if info is not None:
                        listing.append(_file_info(_join_virtual(virtual, name), info))
        finally:
            os.close(fd)
        listing.sort(key=lambda e: e["path"])
        return json_response(listing)

    def read(self, request: Request) -> Response:
        """GET /files/read?path=P&offset=N&length=M: up to M bytes from N, as JSON text."""
        path = _required(request, "path")
        offset = _integer(request, "offset")
        length = _integer(request, "length")
        virtual, real, root = self.resolve(path)
        f = self._open_file(real, root, virtual, "read")
        with f:
            size = os.fstat(f.fileno()).st_size
            if offset == -1:
                offset = size
            if length == -1:
                length = size - offset
            length = min(length, self.max_read_length)
            if offset >= size:
                return json_response({"data": "", "offset": size})
            data = os.pread(f.fileno(), length, offset) if length > 0 else b""
        data = _whole_characters(data)
        return json_response({"data": data.decode("utf-8", "replace"), "offset": offset})

    def download(self, request: Request) -> Response | StreamingResponse:
        """GET /files/download?path=P: the file's bytes as application/octet-stream."""
        virtual, real, root = self.resolve(_required(request, "path"))
        f = self._open_file(real, root, virtual, "download")
        headers = (("Content-Disposition", _content_disposition(os.path.basename(real))),)
        size = os.fstat(f.fileno()).st_size
        if size <= self.max_read_length:
            with f:
                body = os.pread(f.fileno(), size, 0) if size else b""
            return Response(200, body, headers, "application/octet-stream")
        if request.method == "HEAD":
            f.close()  # the server never starts a HEAD stream: only the headers go out
            return StreamingResponse(lambda stream: None, 200, headers, "application/octet-stream")
        sender = _FileSender(f, size, self.download_chunk)
        return StreamingResponse(sender.start, 200, headers, "application/octet-stream")

    def debug(self, request: Request) -> Response:
        """GET /files/debug: the attachment table."""
        return json_response(dict(sorted(self._attached.items())))

    # --- helpers ----------------------------------------------------------------------------

    def _open_file(self, real: str, root: str, virtual: str, what: str):
        fd = _open_inside(real, root, virtual)
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise HTTPError(400, f"Cannot {what} {virtual}: it is a directory; "
                                     "list it with /files/browse")
            if not stat.S_ISREG(mode):
                raise HTTPError(400, f"Cannot {what} {virtual}: it is not a regular file")
        except BaseException:
            os.close(fd)
            raise
        return os.fdopen(fd, "rb", buffering=0)

    @staticmethod
    def _entry_stat(entry: os.DirEntry, directory: str, root: str) -> os.stat_result | None:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            return None  # gone since the listing was read
        if stat.S_ISLNK(st.st_mode):
            # Describe the target only if it is ours to show.
            target = os.path.realpath(os.path.join(directory, entry.name))
            if _within(target, root):
                try:
                    st = os.stat(target)
                except OSError:
                    pass
        return st


def routes(files: Files) -> list[tuple[str, Callable[[Request], object], tuple[str, ...]]]:
    """`(prefix, handler, methods)` for the agent's Router: `router.add(*route)` each."""
    table = []
    for name, handler in (("browse", files.browse), ("read", files.read),
                          ("download", files.download), ("debug", files.debug)):
        table.append((f"/files/{name}", handler, ("GET",)))
        table.append((f"/files/{name}.json", handler, ("GET",)))
    return table


class _FileSender:
    """Streams a file as a pull producer on the connection: one chunk per drained buffer."""

    def __init__(self, f, size: int, chunk: int) -> None:
        self._file = f
        self._remaining = size
        self._chunk = chunk
        self._stream: Stream | None = None
        self._done = False

    def start(self, stream: Stream) -> None:
        self._stream = stream
        stream.on_close(self._release)
        # A file is best sent pulled: the transport asks for the next chunk only once the
        # last one is written out, which bounds memory for any file size and any reader.
        stream.pull_from(self)  # asks for the first chunk right away

    # IPullProducer
    def resumeProducing(self) -> None:
        if self._done:
            return
        try:
            data = self._file.read(min(self._chunk, self._remaining))
        except OSError as e:
            log.warn("Download failed while reading: {error}", error=e)
            self._stream.abort()  # a cut connection, not a short file that looks complete
            return
        if not data:
            # Truncated since the download began (logrotate's copytruncate, say): cut the
            # connection so the client sees an incomplete body, not a complete short file.
            log.warn("Download cut short: the file shrank by {n} bytes while being sent",
                     n=self._remaining)
            self._stream.abort()
            return
        self._remaining -= len(data)
        self._stream.write(data)
        if self._remaining <= 0:
            self._finish()

    def stopProducing(self) -> None:
        self._release()

    def pauseProducing(self) -> None:
        pass  # a pull producer is only ever asked for more

    def _finish(self) -> None:
        self._release()
        self._stream.stop_pulling()  # before closing: a registered producer holds it open
        self._stream.close()

    def _release(self) -> None:
        if not self._done:
            self._done = True
            self._file.close()


def _normalize_virtual(path: str) -> str:
    if not path.startswith("/") or "\0" in path:
        raise ValueError(f"virtual path {path!r} must be absolute and have no NUL byte")
    segments = [s for s in path.split("/") if s not in ("", ".")]
    if ".." in segments:
        raise ValueError(f"virtual path {path!r} must not have a '..' segment")
    return "/" + "/".join(segments)


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _open_inside(real: str, root: str, virtual: str) -> int:
    """An fd for `real`, checked to be the file inside `root` that the path named."""
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except FileNotFoundError:
        raise HTTPError(404, f"{virtual} does not exist") from None
    except NotADirectoryError:
        raise HTTPError(404, f"{virtual} does not exist: a parent is not a directory") from None
    except PermissionError:
        raise HTTPError(403, f"{virtual} is not readable by the agent") from None
    except OSError as e:
        # ELOOP: `real` was resolved without symlinks, so one appeared since: a race we lose
        # safely. Anything else (EIO, ENXIO for a socket) is no content to serve either.
        raise HTTPError(403, f"{virtual} cannot be opened: {e.strerror}") from None
    try:
        opened = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        opened = None  # no /proc: the O_NOFOLLOW open above is the last line
    if opened is not None:
        opened = opened.removesuffix(" (deleted)")
        if not _within(opened, root):
            os.close(fd)
            raise HTTPError(403, f"{virtual} leads outside its sandbox")
    return fd


def _required(request: Request, name: str) -> str:
    value = _single(request, name)
    if not value:
        raise HTTPError(400, f"Expecting '{name}=value' in query")
    return value


def _integer(request: Request, name: str) -> int:
    value = _single(request, name)
    if value is None:
        return -1
    if not _INTEGER.match(value):
        raise HTTPError(400, f"Failed to parse {name}: {value!r} is not an integer")
    number = int(value)
    if number < -1:
        raise HTTPError(400, f"Negative {name} provided: {number} (only -1, 'unset', is allowed)")
    return number


def _single(request: Request, name: str) -> str | None:
    values = request.query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise HTTPError(400, f"'{name}' is given {len(values)} times; give it once")
    return values[0]


def _whole_characters(data: bytes) -> bytes:
    """`data` without a UTF-8 sequence cut off at its end (unless that is all there is)."""
    for back in range(1, min(3, len(data) - 1) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte: the sequence starts here
            need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else \
                4 if byte & 0xF8 == 0xF0 else 1
            return data[:-back] if need > back else data
    return data


def _file_info(virtual: str, st: os.stat_result) -> dict:
    return {"path": virtual, "nlink": st.st_nlink, "size": st.st_size,
            "mtime": int(st.st_mtime), "mode": stat.filemode(st.st_mode),
            "uid": _user(st.st_uid), "gid": _group(st.st_gid)}


def _join_virtual(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name


def _display_name(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@lru_cache(maxsize=256)
def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@lru_cache(maxsize=256)
def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _content_disposition(filename: str) -> str:
    """RFC 6266: an ASCII fallback name (quoted) and the exact name (RFC 5987)."""
    name = _display_name(filename)
    fallback = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\' else "_" for c in name)
    return "attachment; filename=%s; filename*=UTF-8''%s" % (json.dumps(fallback),
                                                             quote(name, safe=""))
