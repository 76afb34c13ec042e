"""The mfusepy adapter: kernel calls in, `ReadOnlyTree` calls out, VfsError -> errno.

Nothing about restore points lives here; `lbfuse.vfs` defines what the filesystem holds. The
mount is read-only at every level: the `ro` mount flag (the kernel answers most writes with EROFS
itself), and every write-ish callback registered here answers EROFS too (so no call ever falls
through to libfuse's ENOSYS). The files never change, so the kernel may keep their pages and
attributes as long as it likes (`kernel_cache`, long timeouts), and reads are allowed to be large.
Permissions are the kernel's job (`default_permissions`); no `allow_other`: only the mounting
user sees the files.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import mfusepy

from lbfuse.errors import MountFailedError, VfsError
from lbfuse.vfs import ReadOnlyTree

log = logging.getLogger(__name__)

FS_SUBTYPE = "lbrestore"
"""Mounts show as `fuse.lbrestore` in /proc/self/mountinfo: how `umount` recognises ours."""

MAX_READ = 1 << 20
READAHEAD = 4 * MAX_READ
CACHE_TIMEOUT_S = 86400

F = TypeVar("F", bound=Callable[..., Any])


def _translated(method: F) -> F:
    """Turn a VfsError into the FuseOSError of its errno; anything unexpected into EIO."""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except VfsError as exc:
            raise mfusepy.FuseOSError(exc.errno) from exc
        except mfusepy.FuseOSError:
            raise
        except Exception as exc:
            log.exception("%s failed", method.__name__)
            raise mfusepy.FuseOSError(errno.EIO) from exc

    return call  # type: ignore[return-value]


def _refusing(operation: str) -> Callable[..., int]:
    """A callback that answers EROFS (ENOENT for a name that does not exist)."""

    @_translated
    def refuse(self: FuseAdapter, path: str | None, *_args: Any, **_kwargs: Any) -> int:
        self.tree.refuse(path or "", operation)
        return 0  # pragma: no cover - refuse always raises

    refuse.__name__ = operation
    return refuse


class FuseAdapter(mfusepy.Operations):
    """mfusepy operations over a ReadOnlyTree. Times are passed as nanoseconds (`use_ns`)."""

    use_ns = True

    def __init__(self, tree: ReadOnlyTree, mountpoint: Path | None = None) -> None:
        self.tree = tree
        self.mountpoint = mountpoint

    def init_with_config(self, conn: Any, config: Any) -> None:
        """Ask the kernel for large reads and readahead (libfuse 3.14 has no option for these).

        max_read must equal the `max_read` mount option, or libfuse refuses the session.
        """
        if conn is not None:
            conn.max_read = MAX_READ
            conn.max_readahead = MAX_READ
        if self.mountpoint is not None:
            raise_readahead(self.mountpoint)

    @_translated
    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        """stat(2) fields of a path."""
        attrs = self.tree.getattr(path)
        return {
            "st_mode": attrs.mode,
            "st_size": attrs.size,
            "st_uid": attrs.uid,
            "st_gid": attrs.gid,
            "st_nlink": attrs.nlink,
            "st_ino": attrs.inode,
            "st_blocks": attrs.blocks,
            "st_blksize": 1 << 20,
            "st_atime": attrs.time_ns,
            "st_mtime": attrs.time_ns,
            "st_ctime": attrs.time_ns,
        }

    @_translated
    def readdir(self, path: str, fh: int) -> Iterator[str]:
        """The entries of the root folder, with . and .."""
        return iter([".", "..", *self.tree.listdir(path)])

    @_translated
    def access(self, path: str, amode: int) -> int:
        """Write access is refused; the rest is left to the kernel's permission check."""
        self.tree.access(path, amode)
        return 0

    @_translated
    def open(self, path: str, flags: int) -> int:
        """A read-only handle (the returned int becomes the kernel's file handle)."""
        return self.tree.open(path, flags)

    @_translated
    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        """One source read per kernel read."""
        return self.tree.read(fh, offset, size)

    @_translated
    def read_into(self, fh: int, offset: int, dest: memoryview) -> int:
        """Fill the kernel's reply buffer in place (see _DirectReadFUSE)."""
        return self.tree.read_into(fh, offset, dest)

    @_translated
    def release(self, path: str | None, fh: int) -> int:
        """Drop the handle."""
        self.tree.release(fh)
        return 0

    @_translated
    def statfs(self, path: str) -> dict[str, int]:
        """Totals of the restore point's files."""
        return self.tree.statfs()

    @_translated
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        """No extended attributes exist."""
        self.tree.getattr(path)
        raise mfusepy.FuseOSError(mfusepy.ENOATTR)

    @_translated
    def listxattr(self, path: str) -> list[str]:
        """No extended attributes exist."""
        self.tree.getattr(path)
        return []

    chmod = _refusing("chmod")
    chown = _refusing("chown")
    create = _refusing("create")
    fallocate = _refusing("fallocate")
    link = _refusing("link")
    mkdir = _refusing("mkdir")
    mknod = _refusing("mknod")
    removexattr = _refusing("removexattr")
    rename = _refusing("rename")
    rmdir = _refusing("rmdir")
    setxattr = _refusing("setxattr")
    symlink = _refusing("symlink")
    truncate = _refusing("truncate")
    unlink = _refusing("unlink")
    utimens = _refusing("utimens")
    write = _refusing("write")


class _DirectReadFUSE(mfusepy.FUSE):
    """mfusepy's FUSE with one change: reads fill libfuse's buffer in place.

    mfusepy's own read wants a bytes object and copies it into the buffer; here the buffer is
    zeroed and handed to the tree as a memoryview, saving an allocation and two copies of
    every byte served.
    """

    def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        address = ctypes.addressof(buf.contents)
        ctypes.memset(address, 0, size)
        dest = memoryview((ctypes.c_char * size).from_address(address)).cast("B")
        try:
            return int(self.operations.read_into(fip.contents.fh, offset, dest))
        finally:
            dest.release()


def mount_device(mountpoint: Path) -> str | None:
    """The `major:minor` of the mount at `mountpoint` (from /proc/self/mountinfo), if any."""
    # Never stat the mountpoint itself: during init the kernel would wait for this very thread.
    absolute = os.path.abspath(mountpoint)
    parent, name = os.path.split(absolute)
    target = os.path.join(os.path.realpath(parent), name).encode()
    device = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape(fields[4]) == target:
                device = fields[2].decode()
    return device


def _unescape(field: bytes) -> bytes:
    """Undo mountinfo's octal escapes (space, tab, newline, backslash)."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)


def raise_readahead(mountpoint: Path) -> bool:
    """Let the kernel read ahead MAX_READ bytes on this mount; True when that was allowed.

    The kernel starts a FUSE mount at 128 KiB of readahead, so sequential reads arrive as small
    requests; 1 MiB makes them several times faster. Only root may change a mount's
    `read_ahead_kb` in sysfs: for other users this quietly does nothing.
    """
    device = mount_device(mountpoint)
    if device is None:
        return False
    try:
        Path(f"/sys/class/bdi/{device}/read_ahead_kb").write_text(f"{READAHEAD // 1024}\n")
    except OSError as exc:
        log.debug("readahead of %s left as it is: %s", mountpoint, exc)
        return False
    return True


def fuse_options(fsname: str, *, debug: bool = False) -> dict[str, Any]:
    """The mount and libfuse options: read-only, owner-only, cached, large reads."""
    return {
        "foreground": True,
        "debug": debug,
        "ro": True,
        "default_permissions": True,
        "fsname": fsname,
        "subtype": FS_SUBTYPE,
        "kernel_cache": True,
        "entry_timeout": CACHE_TIMEOUT_S,
        "attr_timeout": CACHE_TIMEOUT_S,
        "negative_timeout": CACHE_TIMEOUT_S,
        "max_read": MAX_READ,
        "max_threads": 4,
        "max_idle_threads": 2,
    }


def serve(tree: ReadOnlyTree, mountpoint: Path, *, fsname: str, debug: bool = False) -> None:
    """Mount `tree` at `mountpoint` and serve it until unmounted (blocks; foreground).

    libfuse handles SIGINT/SIGTERM/SIGHUP by unmounting and returning. A mount that cannot be
    made raises MountFailedError.
    """
    try:
        adapter = FuseAdapter(tree, mountpoint)
        _DirectReadFUSE(adapter, str(mountpoint), **fuse_options(fsname, debug=debug))
    except RuntimeError as exc:
        raise MountFailedError(mountpoint, f"FUSE mount failed (libfuse status {exc})") from exc
