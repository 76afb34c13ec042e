"""The mfusepy adapter: kernel calls in, `ReadOnlyTree` calls out, VfsError -> errno.

Nothing about restore points lives here; `lbfuse.vfs` defines what the filesystem holds. The
mount is read-only at every level: the `ro` mount flag (the kernel answers most writes with EROFS
itself), and every write-ish callback registered here answers EROFS too (so no call ever falls
through to libfuse's ENOSYS). Permissions are the kernel's job (`default_permissions`); no
`allow_other`: only the mounting user sees the files.

Caching: nothing ever changes, so names and attributes are cached for a day and vm.json keeps
its pages (`kernel_cache`, `keep_cache`). Disk and partition files are cached only when asked
(`kernel_cache=True`, `lbrestore mount --kernel-cache`), else opened `direct_io`: their bytes
already sit in the page cache as the store's files, and a second copy costs more than it saves
on large reads. Direct reads arrive as the application asks, up to `max_read` (1 MiB) per
request, and are served straight into the reader's buffer; such files cannot be mmap()ed
(libfuse 3.14 cannot allow it).

A cached FUSE file is filled in steps of its device's readahead, which the kernel caps at
128 KiB whatever the daemon offers; at that size a depth-25 chain streamed at a fifth of the
direct speed. So a caching mount raises its readahead to READAHEAD (4 MiB; the kernel then asks
1 MiB per request, several in flight) through /sys/class/bdi, which only root may write. Even
so, cached reads cost ~60% more CPU per byte (page-cache allocation and one more copy) and ran
at 0.6-1.0x the direct speed on 2 shared cores: bench/bench_mount_read.py (1 GiB, depth-25
chain, best of 5, 3 runs) read 2440-3160 MiB/s streamed (ratio to qemu-img 0.47-0.62,
0.36-0.42 CPU s/GiB) but 1580-2650 MiB/s cached with 4 MiB readahead (ratio 0.31-0.50,
0.66 CPU s/GiB) and ~900 MiB/s with the kernel's 128 KiB. 2 or 8 MiB of readahead, 2 or 8
threads, more views per disk and splice replies (read_buf) did not do better. Hence streaming
is the default; caching wins on repeated reads and allows mmap.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import mfusepy

from lbfuse.errors import MountFailedError, VfsError
from lbfuse.mountpoints import FS_SUBTYPE, find_mount
from lbfuse.vfs import ReadOnlyTree

log = logging.getLogger(__name__)

MAX_READ = 1 << 20
READAHEAD = 4 << 20
"""Readahead asked for the mount's backing device (see `raise_readahead`)."""
SMALL_FILE = 1 << 20
"""Files up to this size are always cached: streaming them past the cache would gain nothing."""
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

    def __init__(
        self,
        tree: ReadOnlyTree,
        mountpoint: Path | None = None,
        *,
        kernel_cache: bool = False,
    ) -> None:
        """`kernel_cache`: True caches every cacheable file (and raises the readahead), False
        streams large files past the page cache (`direct_io`)."""
        self.tree = tree
        self.mountpoint = mountpoint
        self.kernel_cache = kernel_cache

    def init_with_config(self, conn: Any, config: Any) -> None:
        """Ask the kernel for large reads and readahead (libfuse 3.14 has no option for these).

        max_read must equal the `max_read` mount option, or libfuse refuses the session. The
        kernel takes the smaller of the offered `max_readahead` and its device's readahead
        (128 KiB), so the device's readahead is raised first: this runs before libfuse replies
        to the kernel's INIT, when the mount exists already.
        """
        if conn is not None:
            conn.max_read = MAX_READ
            conn.max_readahead = READAHEAD
        if self.mountpoint is not None and self.kernel_cache:
            raise_readahead(self.mountpoint, READAHEAD)

    def caches(self, path: str) -> bool:
        """Whether the kernel keeps the pages of `path` (else the file is opened `direct_io`)."""
        if not self.tree.cacheable(path):
            return False
        return self.kernel_cache or self.tree.getattr(path).size <= SMALL_FILE

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
            "st_atime": attrs.time_ns if attrs.atime_ns is None else attrs.atime_ns,
            "st_mtime": attrs.time_ns,
            "st_ctime": attrs.time_ns if attrs.ctime_ns is None else attrs.ctime_ns,
        }

    @_translated
    def readdir(self, path: str, fh: int) -> Iterator[str]:
        """The entries of a folder, with . and .."""
        return iter([".", "..", *self.tree.listdir(path)])

    @_translated
    def readlink(self, path: str) -> str:
        """A guest symlink's target, exactly as stored."""
        return self.tree.readlink(path)

    @_translated
    def access(self, path: str, amode: int) -> int:
        """Write access is refused; the rest is left to the kernel's permission check."""
        self.tree.access(path, amode)
        return 0

    @_translated
    def open(self, path: str, fi: Any) -> int:
        """A read-only handle; disk and partition files bypass the page cache (`direct_io`).

        Called with the raw fuse_file_info (`raw_fi`), so the handle and cache flags are set
        on it here.
        """
        fi.fh = self.tree.open(path, fi.flags)
        cacheable = self.caches(path)
        fi.direct_io = 0 if cacheable else 1
        fi.keep_cache = 1 if cacheable else 0
        return 0

    @_translated
    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        """One source read per kernel read."""
        return self.tree.read(fh, offset, size)

    @_translated
    def read_into(self, fh: int, offset: int, dest: memoryview) -> int:
        """Fill the kernel's reply buffer in place (see _DirectReadFUSE)."""
        return self.tree.read_into(fh, offset, dest)

    @_translated
    def release(self, path: str | None, fi: Any) -> int:
        """Drop the handle (`fi` is the raw fuse_file_info)."""
        self.tree.release(fi.fh)
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
    handed to the tree as a memoryview, saving an allocation and two copies of every byte
    served. The tree fills every byte it reports (zeros included), so the buffer is not
    cleared first.
    """

    def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        address = ctypes.addressof(buf.contents)
        dest = memoryview((ctypes.c_char * size).from_address(address)).cast("B")
        try:
            return int(self.operations.read_into(fip.contents.fh, offset, dest))
        finally:
            dest.release()


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


def serve(
    tree: ReadOnlyTree,
    mountpoint: Path,
    *,
    fsname: str,
    kernel_cache: bool = False,
    debug: bool = False,
) -> None:
    """Mount `tree` at `mountpoint` and serve it until unmounted (blocks; foreground).

    libfuse handles SIGINT/SIGTERM/SIGHUP by unmounting and returning. A mount that cannot be
    made raises MountFailedError.
    """
    try:
        mountpoint = Path(os.path.realpath(mountpoint))  # as mountinfo shows it; not once mounted
        adapter = FuseAdapter(tree, mountpoint, kernel_cache=kernel_cache)
        _DirectReadFUSE(adapter, str(mountpoint), raw_fi=True, **fuse_options(fsname, debug=debug))
    except RuntimeError as exc:
        raise MountFailedError(mountpoint, f"FUSE mount failed (libfuse status {exc})") from exc


def raise_readahead(mountpoint: Path, size: int) -> bool:
    """Set the readahead of the FUSE mount at `mountpoint` to `size` bytes; whether it worked.

    Best effort: the mount's backing device (`/sys/class/bdi/MAJOR:MINOR`, found through
    /proc/self/mountinfo: a stat() of the mountpoint would wait for the INIT this runs in, so
    `mountpoint` must be a real path already) is writable by root only.
    """
    try:
        entry = find_mount(mountpoint)
        if entry is None:
            return False
        Path(f"/sys/class/bdi/{entry.device}/read_ahead_kb").write_text(f"{size // 1024}\n")
    except OSError as exc:
        log.debug("cannot raise the readahead of %s: %s", mountpoint, exc)
        return False
    return True
