"""A private store: folders 0700, files 0600, whatever the umask of whoever writes it.

Backups hold whole disks (keys, password hashes), so no other local user may read, list, move
or lock anything in a store. New folders and files are created with these modes (a umask can
only take bits away from them), and opening a store for writing tightens what older versions
left behind: group and other bits are removed, the owner's are kept (a committed qcow2 file
stays 0400). Nothing here ever adds a permission.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
COMMITTED_FILE_MODE = 0o400
"""Committed qcow2 files: read-only for their owner too (a point's bytes never change)."""
OTHERS = 0o077


def create_private_file(path: Path, *, exclusive: bool = False) -> None:
    """Create `path` as an empty 0600 file unless it exists (`exclusive`: it must not)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    if exclusive:
        flags |= os.O_EXCL
    fd = os.open(path, flags, PRIVATE_FILE_MODE)
    try:
        _tighten_fd(fd)
    finally:
        os.close(fd)


def open_private_file(path: Path, flags: int) -> int:
    """os.open for the store's own small files (lock files): created 0600, never through a
    symbolic link (a planted link raises OSError ELOOP), tightened when older and looser."""
    fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW, PRIVATE_FILE_MODE)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        _tighten_fd(fd, st)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _tighten_fd(fd: int, st: os.stat_result | None = None) -> None:
    st = st or os.fstat(fd)
    if st.st_mode & OTHERS and st.st_uid == os.geteuid():
        os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~OTHERS)


def make_private_dir(path: Path) -> None:
    """mkdir `path` as 0700 (its parents must exist); an existing folder is tightened."""
    try:
        path.mkdir(mode=PRIVATE_DIR_MODE)
    except FileExistsError:
        tighten(path)


def tighten(path: Path) -> bool:
    """Remove group and other bits from `path` itself (never following a link); True when
    something changed. Entries of other owners are left alone (chmod would fail)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not st.st_mode & OTHERS or st.st_uid != os.geteuid():
        return False
    os.chmod(path, stat.S_IMODE(st.st_mode) & ~OTHERS)
    return True


def tighten_store(root: Path) -> int:
    """Tighten the store folder and everything in it; return how many entries changed.

    Called when a store is opened for writing, so a store made by an older version (0755
    folders, 0444 files, a 0644 index) becomes private on its first write.
    """
    changed = int(tighten(root))
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            changed += tighten(Path(folder, name))
    return changed
