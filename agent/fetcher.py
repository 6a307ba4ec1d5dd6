"""The fetcher: puts a task's `CommandInfo.uris` into its sandbox before launch, as Mesos does.

Each URI is Mesos JSON: `{"value", "executable": false, "extract": true, "cache": false,
"output_file": null}`. For each, in order:

    source ──(http/https: urllib, redirects followed; file:// or a path: copied)──┐
       │ cache: true                                                              │
       └─> <cache_dir>/<sha256(user, uri)> (atomic, LRU, one download per key) ───┴─> sandbox/
                                                                     <output_file or basename>
    then: executable → chmod 0755 (no extraction); else extract by extension (.tar, .tgz,
    .tar.gz, .tbz2, .tar.bz2, .txz, .tar.xz, .zip into the sandbox; .gz beside the file),
    keeping the archive; then, when the agent is root and a user is given, chown to that user.

Archives are hostile until proven otherwise: a member that is absolute, has a '..', is a
device or fifo, passes through a symlink, or a link that resolves outside the sandbox fails
the fetch, and nothing is written outside the sandbox (members are checked against the disk
as they are extracted, not only by name, and every symlink is re-resolved at the end).

Blocking and thread-safe: the agent calls `Fetcher.fetch` in a thread (deferToThread) for
several launches at once. No Twisted here; progress goes to the stdlib `logging` logger
`agent.fetcher`. One `Fetcher` per cache directory: the cache's books live in memory (and
are rebuilt from the directory at start).
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import http.client
import logging
import lzma
import os
import pwd
import shutil
import socket
import ssl
import stat
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from typing import BinaryIO

import attrs

log = logging.getLogger(__name__)

_CHUNK = 1 << 16
_MAX_SYMLINK_HOPS = 40  # as Linux's MAXSYMLINKS
_TEMP_PREFIX = ".fetch-"
_USER_AGENT = "agora-fetcher/0.1"

# Longest suffix first: ".tar.gz" must win over ".gz".
_ARCHIVES = (
    (".tar.gz", "tar"), (".tar.bz2", "tar"), (".tar.xz", "tar"),
    (".tgz", "tar"), (".tbz2", "tar"), (".txz", "tar"), (".tar", "tar"),
    (".zip", "zip"),
    (".gz", "gz"),
)


class FetchError(Exception):
    """A URI could not be fetched; the message names the URI and says why."""


class _Unsafe(Exception):
    """An archive member or a path would leave the sandbox (becomes a FetchError)."""


def archive_kind(name: str) -> str | None:
    """'tar', 'zip' or 'gz' for a file name that Mesos would extract; None otherwise."""
    lower = name.lower()
    for suffix, kind in _ARCHIVES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return kind
    return None


def relative_name(name: str, what: str = "path") -> str:
    """`name` normalised as a path inside a directory; _Unsafe when it could leave it."""
    if "\0" in name:
        raise _Unsafe(f"{what} {name!r} contains a NUL byte")
    if name.startswith("/"):
        raise _Unsafe(f"{what} {name!r} is absolute")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _Unsafe(f"{what} {name!r} contains '..'")
    return "/".join(parts)


def cache_key(uri: str, user: str | None) -> str:
    """The cache file name of `uri` fetched for `user`: hex sha256 of both."""
    return hashlib.sha256(f"{user or ''}\0{uri}".encode()).hexdigest()


class Fetcher:
    """Fetches URIs into sandboxes, with a shared download cache.

    `cache_size` bounds the bytes kept in `cache_dir`; `timeout` is the socket timeout of
    each HTTP connect and read (seconds without progress, not a bound on the whole
    download). `frameworks_home` is where relative URIs are looked up (Mesos's
    `--frameworks_home`); without it a relative URI is an error.
    """

    def __init__(self, cache_dir: str, cache_size: int = 2 * 1024**3, timeout: float = 60.0,
                 frameworks_home: str | None = None):
        self._cache = _Cache(cache_dir, cache_size)
        self._timeout = timeout
        self._frameworks_home = frameworks_home
        self._opener = urllib.request.build_opener()
        self._opener.addheaders = [("User-Agent", _USER_AGENT)]

    def cache_usage(self) -> int:
        """Bytes held by cache entries now."""
        return self._cache.usage()

    def fetch(self, uris: list[dict], sandbox: str, user: str | None = None) -> list[str]:
        """Fetch every URI into `sandbox`, in order; the paths of the fetched files.

        One path per URI (the file as fetched; an archive stays beside what it held).
        Blocks; raises FetchError at the first URI that fails, naming it.
        """
        if not os.path.isdir(sandbox):
            raise FetchError(f"Failed to fetch URIs: sandbox {sandbox!r} is not a directory")
        owner = _owner(user)
        # Every URI is checked before any is fetched.
        plans = [self._plan(uri, owner) for uri in uris]
        root = os.path.realpath(sandbox)
        written = []
        for plan in plans:
            try:
                paths = self._fetch_one(plan, root, user)
                if owner is not None and owner.chown:
                    _chown(root, paths, owner.uid, owner.gid)
            except FetchError:
                raise
            except _Unsafe as e:
                raise FetchError(f"Failed to fetch '{plan.value}': {e}") from e
            except OSError as e:
                raise FetchError(f"Failed to fetch '{plan.value}': {_os_reason(e)}") from e
            written.append(os.path.join(sandbox, plan.name))
        return written

    # --- one URI ---------------------------------------------------------------------------

    def _plan(self, uri: dict, owner: _Owner | None) -> _Plan:
        """Check one URI's fields and work out where its file goes; FetchError if it cannot."""
        value = uri.get("value") if isinstance(uri, dict) else None
        if not isinstance(value, str) or not value:
            raise FetchError(f"Failed to fetch URI {uri!r}: it has no 'value'")
        source = self._source(value)
        output = uri.get("output_file") or None
        try:
            if output is not None:
                name = relative_name(str(output), "output_file")
                if not name:
                    raise _Unsafe(f"output_file {output!r} names no file")
            else:
                name = _basename(value, source)
        except _Unsafe as e:
            raise FetchError(f"Failed to fetch '{value}': {e}") from None
        return _Plan(value=value, source=source, name=name,
                     executable=bool(uri.get("executable", False)),
                     extract=bool(uri.get("extract", True)),
                     cache=bool(uri.get("cache", False)),
                     reader=owner if owner is not None and owner.chown else None)

    def _source(self, value: str) -> str:
        """'http' for http(s) URLs, else the local path to copy; FetchError if neither."""
        if "://" not in value:
            if os.path.isabs(value):
                return value
            if self._frameworks_home:
                return os.path.join(self._frameworks_home, value)
            raise FetchError(f"Failed to fetch '{value}': a relative path needs a frameworks "
                             f"home to be resolved against; give an absolute path or a URL")
        scheme = value.split("://", 1)[0].lower()
        if scheme in ("http", "https"):
            return "http"
        if scheme == "file":
            parts = urllib.parse.urlsplit(value)
            if parts.netloc not in ("", "localhost"):
                raise FetchError(f"Failed to fetch '{value}': file:// URIs name no other host "
                                 f"than localhost (got {parts.netloc!r})")
            return urllib.parse.unquote(parts.path)
        raise FetchError(f"Failed to fetch '{value}': the {scheme!r} scheme is not supported "
                         f"(only http, https, file and absolute paths)")

    def _fetch_one(self, plan: _Plan, root: str, user: str | None) -> list[str]:
        """Put one URI's file in place, then chmod or extract; every path written under root."""
        target = os.path.join(root, plan.name)
        created = _make_parents(root, plan.name)
        start = time.monotonic()
        if plan.cache:
            nbytes, outcome = self._through_cache(plan, target, user)
        else:
            nbytes, outcome = self._download(plan, target), "bypassed"
        log.info("fetched %s -> %s: %d bytes in %.3fs (cache %s)", plan.value, target, nbytes,
                 time.monotonic() - start, outcome)
        written = created + [target]
        if plan.executable:
            os.chmod(target, 0o755)
        elif plan.extract:
            written += _extract(plan.value, target, root)
        return written

    def _download(self, plan: _Plan, target: str) -> int:
        """Copy the source straight into the sandbox (atomically); the byte count."""
        with _atomic_file(os.path.dirname(target), target) as out:
            return self._copy(plan, out, limit=None)

    def _through_cache(self, plan: _Plan, target: str, user: str | None) -> tuple[int, str]:
        """Copy the cached bytes into the sandbox, downloading them first on a miss."""
        key = cache_key(plan.value, user)
        with self._cache.key_lock(key):
            entry, outcome = self._cache.pin(key), "hit"
            if entry is None:
                with self._cache.new_file() as temp:
                    nbytes = self._copy(plan, temp.file, limit=self._cache.size)
                    temp.file.flush()
                    os.fsync(temp.file.fileno())
                    entry, outcome = self._cache.admit(key, temp.path, nbytes), "miss"
                    if entry is None:  # no room: the rest of the cache is being copied out
                        log.warning("fetcher cache: no room for %s (%d bytes) while other "
                                    "entries are in use; not keeping it", plan.value, nbytes)
                        return _copy_file(temp.path, target), "miss, not kept"
        try:
            return _copy_file(entry, target), outcome
        finally:
            self._cache.unpin(key)

    def _copy(self, plan: _Plan, out: BinaryIO, limit: int | None) -> int:
        """Write the source's bytes to `out`; how many. FetchError past `limit` bytes."""
        if plan.source == "http":
            stream, length = self._open_http(plan.value)
        else:
            stream = _open_local(plan)
            length = os.fstat(stream.fileno()).st_size
        too_big = (f"Failed to fetch '{plan.value}': the fetcher cache ({limit} bytes) is too "
                   f"small for it; raise the cache size or fetch it with cache: false")
        with stream:
            if limit is not None and length is not None and length > limit:
                raise FetchError(f"{too_big} (it has {length} bytes)")
            nbytes = 0
            try:
                while chunk := stream.read(_CHUNK):
                    nbytes += len(chunk)
                    if limit is not None and nbytes > limit:
                        raise FetchError(too_big)
                    out.write(chunk)
            except (OSError, http.client.HTTPException) as e:
                raise FetchError(f"Failed to fetch '{plan.value}': {_os_reason(e)} after "
                                 f"{nbytes} bytes") from e
        if length is not None and nbytes != length:
            raise FetchError(f"Failed to fetch '{plan.value}': got {nbytes} of {length} bytes "
                             f"(the connection was cut short)")
        return nbytes

    def _open_http(self, value: str) -> tuple[BinaryIO, int | None]:
        """An open 2xx response (redirects followed) and its Content-Length, if any."""
        request = urllib.request.Request(value)
        try:
            response = self._opener.open(request, timeout=self._timeout)
        except urllib.error.HTTPError as e:
            e.close()
            raise FetchError(f"Failed to fetch '{value}': HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise FetchError(f"Failed to fetch '{value}': {_os_reason(e.reason)}") from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise FetchError(f"Failed to fetch '{value}': {_os_reason(e)}") from None
        length = response.headers.get("Content-Length")
        try:
            return response, int(length) if length is not None else None
        except ValueError:
            return response, None


@attrs.frozen
class _Owner:
    """The user a fetch is for: who may read a local source, and who gets the files."""

    name: str
    uid: int
    gid: int
    groups: frozenset[int]
    chown: bool  # only root can give files away

    def may(self, st: os.stat_result, bit: int) -> bool:
        """Whether the mode bits of `st` grant this user `bit` (4 read, 1 search)."""
        if self.uid == 0:
            return True
        shift = 6 if st.st_uid == self.uid else 3 if st.st_gid in self.groups else 0
        return bool((st.st_mode >> shift) & bit)


@attrs.frozen
class _Plan:
    """One URI, checked: what to fetch, from where, to which name, and what to do after."""

    value: str
    source: str  # "http", or the local path to copy
    name: str  # relative to the sandbox
    executable: bool
    extract: bool
    cache: bool
    reader: _Owner | None  # a local source must be readable by this user


def _open_local(plan: _Plan) -> BinaryIO:
    """The local source open for reading, checked to be a regular file the user may read.

    The agent reads as root while Mesos's fetcher reads as the task's user, so without
    this check a task could fetch any file on the host; it goes by mode bits (not ACLs).
    """
    why = None
    try:
        # O_NONBLOCK: a fifo must not hang the fetch; it is refused below.
        fd = os.open(plan.source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        why = f"{plan.source} does not exist"
    except IsADirectoryError:
        why = f"{plan.source} is a directory, not a file"
    if why:
        raise FetchError(f"Failed to fetch '{plan.value}': {why}")
    stream = os.fdopen(fd, "rb")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            why = f"{plan.source} is not a regular file"
        elif plan.reader is not None and not _readable(plan.source, st, plan.reader):
            why = f"user {plan.reader.name!r} may not read {plan.source}"
    except BaseException:
        stream.close()
        raise
    if why:
        stream.close()
        raise FetchError(f"Failed to fetch '{plan.value}': {why}")
    os.set_blocking(fd, True)
    return stream


def _readable(path: str, opened: os.stat_result, owner: _Owner) -> bool:
    """Whether `owner` could open the file at `path` (the one we opened) for reading."""
    real = os.path.realpath(path)
    st = os.stat(real)
    if (st.st_dev, st.st_ino) != (opened.st_dev, opened.st_ino):
        return False  # moved under us
    directory = "/"
    for part in real.strip("/").split("/")[:-1]:
        if not owner.may(os.stat(directory), 1):
            return False
        directory = os.path.join(directory, part)
    return owner.may(os.stat(directory), 1) and owner.may(st, 4)


# --- the cache ---------------------------------------------------------------------------


class _Cache:
    """Content keyed files in one directory, bounded in bytes, least recently used out first.

    Entries being copied into a sandbox are pinned and never evicted; a key lock makes
    concurrent fetches of one key download once (the others wait, then hit).
    """

    def __init__(self, directory: str, size: int):
        self.directory = directory
        self.size = size
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._pins: collections.Counter[str] = collections.Counter()
        self._key_locks: dict[str, list] = {}  # key -> [lock, users]
        self._used = 0
        os.makedirs(directory, mode=0o700, exist_ok=True)
        found = []
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if name.startswith(_TEMP_PREFIX):
                _unlink(path)  # an interrupted download
                continue
            st = os.lstat(path)
            if len(name) == 64 and stat.S_ISREG(st.st_mode):
                found.append((st.st_mtime, name, st.st_size))
        for _, name, nbytes in sorted(found):
            self._entries[name] = nbytes
            self._used += nbytes
        with self._lock:
            self._evict(0)

    def usage(self) -> int:
        with self._lock:
            return self._used

    def key_lock(self, key: str):
        """A context manager holding the lock of one key (dropped when nobody uses it)."""
        return _KeyLock(self, key)

    def pin(self, key: str) -> str | None:
        """The entry's path, pinned and marked most recently used; None on a miss."""
        path = os.path.join(self.directory, key)
        with self._lock:
            if key not in self._entries:
                return None
            if not os.path.exists(path):  # removed behind our back
                self._used -= self._entries.pop(key)
                return None
            self._entries.move_to_end(key)
            self._pins[key] += 1
        try:
            os.utime(path)  # keeps the LRU order across agent restarts
        except OSError:
            pass
        return path

    def unpin(self, key: str) -> None:
        with self._lock:
            self._pins[key] -= 1
            if self._pins[key] <= 0:
                del self._pins[key]

    def new_file(self):
        """A temp file in the cache directory, removed on exit unless admitted."""
        return _CacheTemp(self.directory)

    def admit(self, key: str, temp: str, nbytes: int) -> str | None:
        """Move a complete temp file in as `key`, evicting as needed; pinned path or None."""
        path = os.path.join(self.directory, key)
        with self._lock:
            if not self._evict(nbytes):
                return None
            os.replace(temp, path)
            _fsync_dir(self.directory)
            self._entries[key] = nbytes
            self._used += nbytes
            self._pins[key] += 1
        return path

    def _evict(self, room: int) -> bool:
        """Drop unpinned entries, oldest use first, until `room` more bytes fit (lock held)."""
        for key in list(self._entries):
            if self._used + room <= self.size:
                break
            if self._pins[key]:
                continue
            _unlink(os.path.join(self.directory, key))
            self._used -= self._entries.pop(key)
            self._pins.pop(key, None)
            log.info("fetcher cache: evicted %s", key)
        return self._used + room <= self.size


class _KeyLock:
    def __init__(self, cache: _Cache, key: str):
        self._cache, self._key = cache, key

    def __enter__(self):
        with self._cache._lock:
            slot = self._cache._key_locks.setdefault(self._key, [threading.Lock(), 0])
            slot[1] += 1
        slot[0].acquire()
        self._slot = slot

    def __exit__(self, *exc):
        self._slot[0].release()
        with self._cache._lock:
            self._slot[1] -= 1
            if self._slot[1] == 0:
                del self._cache._key_locks[self._key]


class _CacheTemp:
    def __init__(self, directory: str):
        fd, self.path = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=directory)
        self.file = os.fdopen(fd, "wb")

    def __enter__(self) -> _CacheTemp:
        return self

    def __exit__(self, *exc):
        self.file.close()
        _unlink(self.path)  # a no-op once admitted (renamed away)


class _atomic_file:
    """Write `target` (mode 0644) through a temp file in `directory`, renamed over it.

    The rename replaces whatever is at `target` (a symlink included) instead of writing
    through it; on an error the temp file goes and `target` is untouched. No fsync: a
    sandbox does not outlive a crash of its agent anyway.
    """

    def __init__(self, directory: str, target: str):
        self._directory, self._target = directory, target

    def __enter__(self) -> BinaryIO:
        fd, self._temp = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=self._directory)
        self._file = os.fdopen(fd, "wb")
        return self._file

    def __exit__(self, kind, value, tb):
        try:
            if kind is None:
                os.fchmod(self._file.fileno(), 0o644)
        finally:
            self._file.close()
            if kind is None:
                if os.path.isdir(self._target) and not os.path.islink(self._target):
                    _unlink(self._temp)
                    raise IsADirectoryError(f"{self._target} is a directory")
                os.replace(self._temp, self._target)
            else:
                _unlink(self._temp)


# --- extraction --------------------------------------------------------------------------


def _extract(value: str, path: str, root: str) -> list[str]:
    """Extract `path` if its name says it is an archive; the paths written under root."""
    kind = archive_kind(os.path.basename(path))
    if kind is None:
        return []
    start = time.monotonic()
    try:
        if kind == "tar":
            written = _extract_tar(path, root)
        elif kind == "zip":
            written = _extract_zip(path, root)
        else:
            written = _gunzip(path)
        _check_links(root, written)
    except (_Unsafe, tarfile.FilterError) as e:
        raise FetchError(f"Failed to fetch '{value}': unsafe archive {os.path.basename(path)}: "
                         f"{e}") from None
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError,
            gzip.BadGzipFile, OSError) as e:
        reason = _os_reason(e) if isinstance(e, OSError) else (str(e) or type(e).__name__)
        raise FetchError(f"Failed to fetch '{value}': cannot extract "
                         f"{os.path.basename(path)}: {reason}") from None
    log.info("extracted %s: %d entries in %.3fs", path, len(written), time.monotonic() - start)
    return written


def _extract_tar(path: str, root: str) -> list[str]:
    written: list[str] = []
    with tarfile.open(path, "r:*") as archive:
        members = archive.getmembers()
        for member in members:  # by name first, so that a bad archive writes nothing
            _check_member_kind(member)
            relative_name(member.name, "member")
            if member.islnk() or member.issym():
                _check_link_name(member)

        def checked(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
            name = relative_name(member.name, "member")
            if not name:
                return None  # "." or "./": the sandbox itself
            _prepare_target(root, name, member.isdir())
            if member.issym():
                _check_symlink(root, name, member.linkname)
            elif member.islnk():
                target = relative_name(member.linkname, "hard link target")
                _no_symlink_parents(root, target)
                try:
                    st = os.lstat(os.path.join(root, target))
                except FileNotFoundError:
                    pass
                else:
                    if not stat.S_ISREG(st.st_mode):
                        raise _Unsafe(f"hard link {name!r} points at {target!r}, which is not "
                                      f"a regular file")
            member = tarfile.data_filter(member.replace(name=name, deep=False), dest)
            written.append(os.path.join(root, name))
            return member

        archive.extractall(root, members=members, filter=checked)
    return written



def _check_member_kind(member: tarfile.TarInfo) -> None:
    if member.ischr() or member.isblk() or member.isfifo():
        raise _Unsafe(f"member {member.name!r} is a device or fifo")
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise _Unsafe(f"member {member.name!r} has an unknown type {member.type!r}")


def _check_link_name(member: tarfile.TarInfo) -> None:
    """Links by name alone: no absolute targets, no symlink target that climbs out lexically."""
    if member.linkname.startswith("/"):
        raise _Unsafe(f"link {member.name!r} points at the absolute path {member.linkname!r}")
    if member.islnk():
        relative_name(member.linkname, "hard link target")
    else:
        name = relative_name(member.name, "member")
        target = os.path.normpath(_join(os.path.dirname(name), member.linkname))
        if target == ".." or target.startswith("../"):
            raise _Unsafe(f"symlink {member.name!r} -> {member.linkname!r} leaves the sandbox")


def _extract_zip(path: str, root: str) -> list[str]:
    written: list[str] = []
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        for info in infos:  # by name first, so that a bad archive writes nothing
            relative_name(info.filename, "member")
        for info in infos:
            name = relative_name(info.filename, "member")
            if not name:
                continue
            mode = info.external_attr >> 16
            target = os.path.join(root, name)
            _prepare_target(root, name, info.is_dir())
            if info.is_dir():
                os.makedirs(target, exist_ok=True)
            elif stat.S_ISLNK(mode):
                linkname = archive.read(info).decode("utf-8", "surrogateescape")
                _check_symlink(root, name, linkname)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.symlink(linkname, target)
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(target, flags, 0o755 if mode & 0o111 else 0o644)
                with os.fdopen(fd, "wb") as out, archive.open(info) as src:
                    shutil.copyfileobj(src, out, _CHUNK)
            written.append(target)
    return written


def _gunzip(path: str) -> list[str]:
    """Decompress `name.gz` to `name` beside it."""
    target = path[:-3]
    with gzip.open(path, "rb") as src, _atomic_file(os.path.dirname(path), target) as out:
        shutil.copyfileobj(src, out, _CHUNK)
    return [target]


def _prepare_target(root: str, name: str, is_dir: bool) -> None:
    """Make `root/name` safe to create: no symlink on the way, nothing to write through.

    An existing non-directory at the name is removed (so that a symlink or a hard link
    left there is replaced, not written through); an existing symlink where a directory
    goes is refused.
    """
    _no_symlink_parents(root, name)
    target = os.path.join(root, name)
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if not is_dir:
            raise _Unsafe(f"member {name!r} would replace a directory")
        return
    if is_dir and stat.S_ISLNK(st.st_mode):
        raise _Unsafe(f"directory {name!r} would be created through a symlink")
    os.unlink(target)


def _no_symlink_parents(root: str, name: str) -> None:
    """_Unsafe if a directory on the way to root/name is a symlink (or not a directory)."""
    path = root
    for part in name.split("/")[:-1]:
        path = os.path.join(path, part)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return  # created as plain directories from here on
        if stat.S_ISLNK(st.st_mode):
            raise _Unsafe(f"{name!r} goes through the symlink {os.path.relpath(path, root)!r}")
        if not stat.S_ISDIR(st.st_mode):
            raise _Unsafe(f"{name!r} goes through {os.path.relpath(path, root)!r}, which is "
                          f"not a directory")


def _check_symlink(root: str, name: str, linkname: str) -> None:
    """_Unsafe unless a symlink at root/name to `linkname` would resolve inside root."""
    if linkname.startswith("/"):
        raise _Unsafe(f"symlink {name!r} points at the absolute path {linkname!r}")
    try:
        _resolve(root, _join(os.path.dirname(name), linkname))
    except _Unsafe as e:
        raise _Unsafe(f"symlink {name!r} -> {linkname!r} {e}") from None


def _resolve(root: str, name: str) -> str:
    """Where `name` (relative to root) leads, following symlinks on disk; _Unsafe (saying
    what is wrong with `name`) if it leaves root, is absolute, or loops. Missing components
    are taken as directories."""
    if name.startswith("/"):
        raise _Unsafe("is absolute")
    parts: list[str] = []
    todo = list(reversed(name.split("/")))
    hops = 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise _Unsafe("leads outside the sandbox")
            parts.pop()
            continue
        path = os.path.join(root, *parts, part)
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            parts.append(part)
            continue
        if not stat.S_ISLNK(st.st_mode):
            parts.append(part)
            continue
        hops += 1
        if hops > _MAX_SYMLINK_HOPS:
            raise _Unsafe("has too many levels of symlinks")
        link = os.readlink(path)
        if link.startswith("/"):
            raise _Unsafe(f"goes through a symlink to the absolute path {link!r}")
        todo.extend(reversed(link.split("/")))
    return "/".join(parts)


def _check_links(root: str, written: list[str]) -> None:
    """Every symlink written resolves inside root, now that the whole archive is out."""
    for path in written:
        if os.path.islink(path):
            name = os.path.relpath(path, root)
            try:
                _resolve(root, name)
            except _Unsafe as e:
                raise _Unsafe(f"symlink {name!r} -> {os.readlink(path)!r} {e}") from None


def _join(directory: str, name: str) -> str:
    return f"{directory}/{name}" if directory else name


# --- files, owners, errors ----------------------------------------------------------------


def _make_parents(root: str, name: str) -> list[str]:
    """Create the directories above root/name that are missing; those created."""
    _no_symlink_parents(root, name)
    created = []
    path = root
    for part in name.split("/")[:-1]:
        path = os.path.join(path, part)
        if not os.path.isdir(path):
            os.mkdir(path)
            created.append(path)
    return created


def _owner(user: str | None) -> _Owner | None:
    """The user a fetch is for, when there is one; FetchError if it is unknown."""
    if user is None:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise FetchError(f"Failed to fetch URIs: unknown user {user!r}") from None
    groups = frozenset(os.getgrouplist(user, entry.pw_gid))
    return _Owner(name=user, uid=entry.pw_uid, gid=entry.pw_gid, groups=groups,
                  chown=os.geteuid() == 0)


def _chown(root: str, paths: list[str], uid: int, gid: int) -> None:
    """lchown each path and the directories between it and root."""
    done = set()
    for path in paths:
        while path != root and path.startswith(root + "/") and path not in done:
            done.add(path)
            os.chown(path, uid, gid, follow_symlinks=False)
            path = os.path.dirname(path)


def _basename(value: str, source: str) -> str:
    """The sandbox name of a URI without output_file: its last path component."""
    if source == "http":
        path = urllib.parse.unquote(urllib.parse.urlsplit(value).path)
    else:
        path = source
    name = path.rsplit("/", 1)[-1]
    if not name or name in (".", "..") or "\0" in name:
        raise _Unsafe("its path has no file name to use in the sandbox; give an output_file")
    return name


def _copy_file(source: str, target: str) -> int:
    """Copy source to target atomically; the byte count."""
    with open(source, "rb") as src, _atomic_file(os.path.dirname(target), target) as out:
        shutil.copyfileobj(src, out, _CHUNK)
        return out.tell()


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _os_reason(error: BaseException | str) -> str:
    """A short human reason for a network or file error."""
    if isinstance(error, str):
        return error
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host ({error.strerror})"
    if isinstance(error, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(error, ssl.SSLError):
        return f"TLS error: {error.reason or error}"
    if isinstance(error, http.client.HTTPException):
        return f"bad HTTP response ({type(error).__name__}: {error})"
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror}{where}"
    return str(error) or type(error).__name__
