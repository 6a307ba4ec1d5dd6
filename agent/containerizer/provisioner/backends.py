"""Provisioner backends: how a container's root filesystem is made from the store's layers.

- `overlay` (the default): nothing is copied. The container gets the layer directories (top
  first) as overlay lowerdirs plus a fresh, empty upper and work directory of its own. The
  launcher mounts `overlay` inside the container's mount namespace, so no mount outlives
  the container on the host; we only prepare directories and say what to mount. Overlay's
  mount data is one page (4096 bytes): layer directories are `<store>/layers/<64 hex>`, so
  a launcher that chdirs to `<store>/layers` and passes relative lowerdirs fits ~60 layers.
- `copy`: one rootfs directory per container, the layers copied into it bottom first with
  their whiteouts applied (a 0/0 character device deletes the path below it, an opaque
  directory replaces the content below it), for hosts without overlayfs. Slow and big, but
  it works anywhere; the launcher bind-mounts it.

A backend's contract: `prepare(layers, directory) -> dict` makes what a container needs in
its (empty, existing) `directory` and returns the Rootfs fields: kind, layers, upper, work,
path. Removing `directory` undoes it.
"""

from __future__ import annotations

import os
import shutil
import stat

from agent.containerizer.provisioner.layers import OPAQUE_XATTR


class OverlayBackend:
    name = "overlay"

    def prepare(self, layers: list[str], directory: str) -> dict:
        """`layers` bottom first; the Rootfs fields (layers top first)."""
        upper, work = os.path.join(directory, "upper"), os.path.join(directory, "work")
        os.mkdir(upper, 0o755)
        os.mkdir(work, 0o700)
        return {"kind": "overlay", "layers": tuple(reversed(layers)), "upper": upper,
                "work": work, "path": None}


class CopyBackend:
    name = "copy"

    def prepare(self, layers: list[str], directory: str) -> dict:
        rootfs = os.path.join(directory, "rootfs")
        os.mkdir(rootfs, 0o755)
        for layer in layers:
            copy_layer(layer, rootfs)
        return {"kind": "bind", "layers": (), "upper": None, "work": None, "path": rootfs}


BACKENDS = {"overlay": OverlayBackend, "copy": CopyBackend}


def backend(name: str):
    try:
        return BACKENDS[name]()
    except KeyError:
        raise ValueError(f"unknown provisioner backend {name!r} (known: "
                         f"{', '.join(sorted(BACKENDS))})") from None


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def copy_layer(layer: str, rootfs: str) -> None:
    """Apply one unpacked layer (overlay form) on top of `rootfs`.

    Never writes through what is already in `rootfs`: an entry that replaces something of
    another kind removes it first, so a symlink left by a lower layer is replaced, not
    followed. Hard links inside the layer stay hard links.
    """
    links: dict[tuple[int, int], str] = {}
    _copy_dir_entries(layer, rootfs, links)


def _copy_dir_entries(source: str, target: str, links: dict) -> None:
    with os.scandir(source) as entries:
        for entry in entries:
            src = entry.path
            dst = os.path.join(target, entry.name)
            st = entry.stat(follow_symlinks=False)
            if is_whiteout(st):
                _remove(dst)
                continue
            if stat.S_ISDIR(st.st_mode):
                opaque = _xattr(src, OPAQUE_XATTR) == b"y"
                existing = _lstat(dst)
                if existing is not None and (opaque or not stat.S_ISDIR(existing.st_mode)):
                    _remove(dst)
                    existing = None
                if existing is None:
                    os.mkdir(dst, 0o700)
                _copy_dir_entries(src, dst, links)
                _metadata(src, dst, st, skip={OPAQUE_XATTR})
                continue
            _remove(dst)
            if st.st_nlink > 1 and (st.st_dev, st.st_ino) in links:
                os.link(links[(st.st_dev, st.st_ino)], dst, follow_symlinks=False)
                continue
            if stat.S_ISREG(st.st_mode):
                with open(src, "rb") as fin:
                    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                 0o600)
                    with os.fdopen(fd, "wb") as fout:
                        shutil.copyfileobj(fin, fout, 1 << 20)
            elif stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(src), dst)
            elif stat.S_ISFIFO(st.st_mode):
                os.mkfifo(dst, 0o600)
            else:  # character and block devices
                os.mknod(dst, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev)
            if st.st_nlink > 1:
                links[(st.st_dev, st.st_ino)] = dst
            _metadata(src, dst, st)


def _metadata(src: str, dst: str, st: os.stat_result, skip=frozenset()) -> None:
    os.lchown(dst, st.st_uid, st.st_gid)
    link = stat.S_ISLNK(st.st_mode)
    if not link:
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError:
        names = []
    for name in names:
        if name not in skip:
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False),
                        follow_symlinks=False)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _xattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def _lstat(path: str):
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _remove(path: str) -> None:
    st = _lstat(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)
