"""Durable file placement: no-replace renames, atomic rewrites, directory fsyncs.

A committed file of the store is never overwritten, so every file that enters `data/` is placed
with `rename_noreplace`: the kernel's renameat2(RENAME_NOREPLACE) where the filesystem supports
it, else a hard link (which fails when the target exists) and an unlink of the source. Either
way an existing target is left exactly as it was and the caller gets FileExistsError.

`replace_durably` is the one sanctioned way to change a file in place (a sidecar rewritten by a
merge, the point-id high-water mark): write a temporary file beside it, fsync, rename over the
old one, fsync the directory, so a crash leaves the old content or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

_AT_FDCWD = -100
RENAME_NOREPLACE = 1
"""renameat2 flag: fail with EEXIST instead of replacing the target."""
RENAME_EXCHANGE = 2
"""renameat2 flag: swap the two names atomically (both must exist)."""
_NO_RENAMEAT2_ERRNOS = (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP)


def _load_renameat2() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """glibc's renameat2 (2.28 and later), or None where the C library lacks it."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    function.argtypes += [ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_libc_renameat2 = _load_renameat2()


def renameat2(source: Path, target: Path, flags: int) -> None:
    """renameat2(2) with RENAME_NOREPLACE or RENAME_EXCHANGE, which os.rename cannot ask for.

    OSError on failure; ENOSYS where the C library has no renameat2, EINVAL where the
    filesystem does not support the flag (callers that can do without it fall back).
    """
    if _libc_renameat2 is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS), str(source), None, str(target))
    if _libc_renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(source), None, str(target))


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (renames, creations, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename_noreplace(source: Path, target: Path) -> None:
    """Move `source` to `target`, failing with FileExistsError if `target` exists (any type).

    Neither directory is fsynced here: callers placing several files fsync each folder once.
    """
    try:
        renameat2(source, target, RENAME_NOREPLACE)
        return
    except OSError as exc:
        if exc.errno not in _NO_RENAMEAT2_ERRNOS:
            raise
    # The filesystem has no RENAME_NOREPLACE: a hard link never replaces an existing name.
    os.link(source, target, follow_symlinks=False)
    os.unlink(source)


def _write_synced(fd: int, content: bytes, mode: int) -> None:
    """Give an open file `mode`, write all of `content`, fsync it, close it."""
    try:
        os.fchmod(fd, mode)
        view = memoryview(content)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(path: Path, content: bytes, mode: int = 0o600) -> None:
    """Atomically replace (or create) `path` with `content`: temp file, fsync, rename, fsync dir."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        _write_synced(fd, content, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    fsync_dir(path.parent)


def write_new_durably(path: Path, content: bytes, mode: int = 0o600) -> None:
    """Create `path` with `content` and fsync it; FileExistsError if it exists (never replaced).

    The directory is not fsynced (the caller renames or fsyncs the folder afterwards).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        _write_synced(fd, content, mode)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)  # ours: O_EXCL created it
        raise
