"""Layer tars, unpacked safely as root into their own directory, whiteouts in overlayfs form.

A layer is read as one stream: the blob as stored (hashed, to check its digest), then
decompressed (gzip, zstd, bzip2 or xz, told apart by their magic bytes, never by a media
type: docker-archive layers are plain tars that skopeo calls gzip), hashed again (the
diff_id), and unpacked by `unpack` with tarfile's parser and our own writes:

- no entry lands outside the directory: names are made relative and cleaned, a `..` that
  climbs out refuses the layer, no entry is written below a symlink of the layer, hard links
  point only at what the layer already holds;
- ownership, modes (setuid/setgid/sticky), times, device nodes, FIFOs and xattrs are kept;
- Docker/OCI whiteouts become what overlayfs stacks: `.wh.NAME` → a 0/0 character device
  NAME, `.wh..wh..opq` → `trusted.overlay.opaque=y` on its directory (other `.wh..wh.*`
  names are aufs bookkeeping and are skipped, as Docker does). A layer may not bring its
  own `trusted.overlay.*` xattrs: they would steer the overlay mount.
"""

from __future__ import annotations

import base64
import bz2
import hashlib
import lzma
import os
import shutil
import stat
import subprocess
import tarfile
import threading
import urllib.parse
import zlib
from typing import BinaryIO, Callable

import attrs

CHUNK = 1 << 20
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
_BLOCK = 4096


class LayerError(ValueError):
    """A layer that cannot be unpacked: hostile, corrupt, or not what it claims to be."""


# --- streams ----------------------------------------------------------------------------------


class HashingReader:
    """Reads `raw`, hashing and counting what passes; `progress(bytes)` now and then."""

    def __init__(self, raw: BinaryIO, algorithm: str = "sha256",
                 progress: Callable[[int], None] | None = None, every: int = 8 << 20):
        self.raw = raw
        self.hash = hashlib.new(algorithm)
        self.count = 0
        self._progress = progress
        self._every = every
        self._next = every

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if data:
            self.hash.update(data)
            self.count += len(data)
            if self._progress is not None and self.count >= self._next:
                self._next = self.count + self._every
                self._progress(self.count)
        return data

    def drain(self) -> None:
        """Read to the end (what follows a tar's end-of-archive blocks counts too)."""
        while self.read(CHUNK):
            pass

    def digest(self) -> str:
        return f"{self.hash.name}:{self.hash.hexdigest()}"


class _Decompressed:
    """A file-like reader of a streaming decompressor (zlib/bz2/lzma object)."""

    def __init__(self, raw, head: bytes, make: Callable[[], object], name: str):
        self.raw, self._pending, self._make, self.name = raw, head, make, name
        self._d = make()
        self._buf = bytearray()
        self._eof = False

    def read(self, n: int = -1) -> bytes:
        while not self._eof and (n < 0 or len(self._buf) < n):
            chunk = self._pending or self.raw.read(CHUNK)
            self._pending = b""
            if not chunk:
                if not self._d.eof:
                    raise LayerError(f"the {self.name} stream ends before its end")
                self._eof = True
                break
            try:
                self._buf += self._d.decompress(chunk)
                while self._d.eof and self._d.unused_data:
                    rest = self._d.unused_data  # another member (concatenated gzip)
                    self._d = self._make()
                    self._buf += self._d.decompress(rest)
            except (zlib.error, OSError, lzma.LZMAError, EOFError) as e:
                raise LayerError(f"the layer is not valid {self.name}: {e}") from None
        if n < 0:
            n = len(self._buf)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


class _Zstd:
    """zstd through the `zstd` command (the standard library has no zstd before 3.14)."""

    def __init__(self, raw, head: bytes):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise LayerError("the layer is zstd-compressed and the `zstd` command is not "
                             "installed (apt-get install zstd)")
        self.proc = subprocess.Popen([zstd, "-dcq"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._error: BaseException | None = None

        def feed():
            try:
                data = head
                while data:
                    self.proc.stdin.write(data)
                    data = raw.read(CHUNK)
            except BrokenPipeError:
                pass
            except BaseException as e:  # noqa: BLE001 — surfaces on the reading side
                self._error = e
            finally:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass

        self._feeder = threading.Thread(target=feed, name="zstd-feed", daemon=True)
        self._feeder.start()

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n) if n >= 0 else self.proc.stdout.read()
        if not data:
            self._feeder.join()
            rc = self.proc.wait()
            if self._error is not None:
                raise self._error
            if rc != 0:
                raise LayerError("the layer is not valid zstd: "
                                 + self.proc.stderr.read().decode(errors="replace").strip())
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._feeder.join()
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()


def decompressed(raw: BinaryIO) -> BinaryIO:
    """`raw` uncompressed, whatever it was compressed with (or not)."""
    head = raw.read(6)
    if head[:2] == b"\x1f\x8b":
        return _Decompressed(raw, head, lambda: zlib.decompressobj(wbits=31), "gzip")
    if head[:4] == b"\x28\xb5\x2f\xfd":
        return _Zstd(raw, head)
    if head[:3] == b"BZh":
        return _Decompressed(raw, head, bz2.BZ2Decompressor, "bzip2")
    if head == b"\xfd7zXZ\x00":
        return _Decompressed(raw, head, lzma.LZMADecompressor, "xz")
    return _Prefixed(head, raw)


class _Prefixed:
    def __init__(self, head: bytes, raw):
        self._head, self.raw = head, raw

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n < 0:
                out, self._head = self._head + self.raw.read(), b""
                return out
            out, self._head = self._head[:n], self._head[n:]
            if len(out) < n:
                out += self.raw.read(n - len(out))
            return out
        return self.raw.read(n)


# --- unpacking --------------------------------------------------------------------------------


@attrs.frozen
class Unpacked:
    size: int  # bytes on disk, roughly (files rounded up to blocks, plus one block per entry)
    entries: int


def clean_name(name: str) -> str:
    """A tar member name relative to the layer root ('' for the root itself); LayerError if
    it climbs out of it. Absolute names count from the layer root, as Docker reads them."""
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise LayerError(f"entry {name!r} points outside the layer")
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


class _Tree:
    """What this layer has written so far: path → 'd' (dir), 'l' (symlink), 'o' (other)."""

    def __init__(self, root: str):
        self.root = root
        self.kinds: dict[str, str] = {"": "d"}

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def parent_ready(self, rel: str, entry: str) -> None:
        """Make sure every parent of `rel` is a real directory of this layer."""
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            kind = self.kinds.get(prefix)
            if kind == "d":
                continue
            if kind == "l":
                raise LayerError(f"entry {entry!r} would be written through the symlink "
                                 f"{prefix!r}")
            if kind is not None:
                raise LayerError(f"entry {entry!r} is below {prefix!r}, which is not a "
                                 "directory")
            os.mkdir(self.path(prefix), 0o755)
            self.kinds[prefix] = "d"

    def clear(self, rel: str, keep_dir: bool) -> None:
        """Remove what `rel` holds, unless it is a directory and `keep_dir`."""
        kind = self.kinds.get(rel)
        if kind is None or (kind == "d" and keep_dir):
            return
        if rel == "":
            raise LayerError("an entry would replace the layer's root directory")
        full = self.path(rel)
        if kind == "d":
            shutil.rmtree(full)
            below = rel + "/"
            for key in [k for k in self.kinds if k.startswith(below)]:
                del self.kinds[key]
        else:
            os.unlink(full)
        del self.kinds[rel]


def unpack(stream: BinaryIO, dest: str, *, whiteouts: bool = True, prefix: str | None = None,
           other: Callable[[tarfile.TarInfo, tarfile.TarFile], None] | None = None) -> Unpacked:
    """Unpack the (uncompressed) tar `stream` into the existing empty directory `dest`.

    With `prefix`, only entries below it are unpacked (relative to it); the others go to
    `other(member, tar)`, which may read them or raise LayerError (AppC: `manifest` beside
    `rootfs/`). LayerError for anything hostile or broken; `dest` is then half written and
    the caller removes it.
    """
    tree = _Tree(dest)
    dirs: list[tuple[str, tarfile.TarInfo]] = []
    size = entries = 0
    try:
        tar = tarfile.open(fileobj=stream, mode="r|", errors="surrogateescape")
    except tarfile.TarError as e:
        raise LayerError(f"the layer is not a tar archive: {e}") from None
    try:
        for member in tar:
            entries += 1
            rel = clean_name(member.name)
            if prefix is not None:
                if rel == prefix:
                    rel = ""
                elif rel.startswith(prefix + "/"):
                    rel = rel[len(prefix) + 1:]
                else:
                    if other is None:
                        raise LayerError(f"entry {member.name!r} is outside {prefix}/")
                    other(member, tar)
                    continue
            size += _BLOCK
            base = rel.rsplit("/", 1)[-1]
            if whiteouts and WHITEOUT in rel:
                if base == OPAQUE:
                    _opaque(tree, rel, member)
                    continue
                if any(p.startswith(WHITEOUT + WHITEOUT) for p in rel.split("/")):
                    continue  # aufs bookkeeping (.wh..wh.plnk/, .wh..wh.aufs): not content
                if base.startswith(WHITEOUT):
                    _whiteout(tree, rel, base, member)
                    continue
            if member.isdir():
                tree.clear(rel, keep_dir=True)
                if rel and rel not in tree.kinds:
                    tree.parent_ready(rel, member.name)
                    os.mkdir(tree.path(rel), 0o700)
                    tree.kinds[rel] = "d"
                _attributes(tree.path(rel), member)
                dirs.append((tree.path(rel), member))
                continue
            if rel == "":
                raise LayerError(f"entry {member.name!r} would replace the layer's root")
            tree.parent_ready(rel, member.name)
            tree.clear(rel, keep_dir=False)
            path = tree.path(rel)
            if member.isreg():
                _write_file(path, tar.extractfile(member), member)
                size += -(-member.size // _BLOCK) * _BLOCK
                tree.kinds[rel] = "o"
                continue
            elif member.issym():
                os.symlink(member.linkname, path)
                tree.kinds[rel] = "l"
            elif member.islnk():
                target = clean_name(member.linkname)
                if prefix is not None:
                    if not target.startswith(prefix + "/"):
                        raise LayerError(f"hard link {member.name!r} points outside {prefix}/")
                    target = target[len(prefix) + 1:]
                kind = tree.kinds.get(target)
                if kind is None or kind == "d":
                    raise LayerError(f"hard link {member.name!r} points at "
                                     f"{member.linkname!r}, which the layer does not hold "
                                     "(or is a directory)")
                os.link(tree.path(target), path, follow_symlinks=False)
                tree.kinds[rel] = kind
                continue  # a hard link shares its target's inode and attributes
            elif member.ischr() or member.isblk():
                kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
                os.mknod(path, kind | 0o600, os.makedev(member.devmajor, member.devminor))
                tree.kinds[rel] = "o"
            elif member.isfifo():
                os.mkfifo(path, 0o600)
                tree.kinds[rel] = "o"
            else:
                raise LayerError(f"entry {member.name!r} has an unsupported type "
                                 f"{member.type!r}")
            _attributes(path, member)
            os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
    except tarfile.TarError as e:
        raise LayerError(f"the layer is not a valid tar archive: {e}") from None
    except OSError as e:
        raise LayerError(f"could not unpack the layer: {e}") from None
    finally:
        tar.close()
    # Directory times last: creating their entries moved them.
    for path, member in reversed(dirs):
        os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
    return Unpacked(size, entries)


def _opaque(tree: _Tree, rel: str, member: tarfile.TarInfo) -> None:
    tree.parent_ready(rel, member.name)
    os.setxattr(tree.path(rel.rsplit("/", 1)[0] if "/" in rel else ""), OPAQUE_XATTR, b"y")


def _whiteout(tree: _Tree, rel: str, base: str, member: tarfile.TarInfo) -> None:
    name = base[len(WHITEOUT):]
    if not name:
        raise LayerError(f"whiteout {member.name!r} names nothing")
    parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
    tree.parent_ready(rel, member.name)
    target = f"{parent}/{name}" if parent else name
    tree.clear(target, keep_dir=False)
    path = tree.path(target)
    os.mknod(path, stat.S_IFCHR, os.makedev(0, 0))
    os.lchown(path, member.uid, member.gid)
    tree.kinds[target] = "o"


def _write_file(path: str, source, member: tarfile.TarInfo) -> None:
    """A regular file, its attributes set through its descriptor (fewer path lookups: the
    unpacking of a layer of small files is mostly system calls)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        while True:
            chunk = source.read(CHUNK)
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        _attributes(fd, member)
        os.utime(fd, (member.mtime, member.mtime))
    finally:
        os.close(fd)


def _attributes(path, member: tarfile.TarInfo) -> None:
    """Owner, then mode (chown clears setuid bits), then xattrs, of what `member` made
    (`path` may be an open descriptor)."""
    if isinstance(path, int):
        os.fchown(path, member.uid, member.gid)
        os.fchmod(path, member.mode & 0o7777)
    else:
        os.lchown(path, member.uid, member.gid)
        if not member.issym():
            os.chmod(path, member.mode & 0o7777)
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr."):]
            data = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr."):])
            data = base64.b64decode(value + "=" * (-len(value) % 4))
        else:
            continue
        if name.startswith("trusted.overlay."):
            raise LayerError(f"entry {member.name!r} carries the overlayfs xattr {name!r}")
        if isinstance(path, int):
            os.setxattr(path, name, data)
        else:
            os.setxattr(path, name, data, follow_symlinks=False)
