"""What lbguest reads from and hands out: byte sources, entries, filesystems.

The interface is shared with its users (lbfuse's `files/` tree, `lbrestore ls/extract/diff`):
see /work/notes/guestlib-api.md. Paths inside a filesystem are "/"-separated, relative, with no
leading "/": "" is the root folder, "etc/fstab" a file in it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class ByteSource(Protocol):
    """A disk or a range of one: `size` and `read(offset, length)` (exact inside `size`)."""

    @property
    def size(self) -> int:
        """Bytes in the source."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset` (the caller stays inside `size`)."""
        ...


class EntryKind(enum.Enum):
    """What an entry of a guest filesystem is; OTHER: a device, fifo or socket."""

    FILE = "file"
    FOLDER = "folder"
    SYMLINK = "symlink"
    OTHER = "other"


@dataclass(frozen=True)
class GuestEntry:
    """One file, folder, symlink or other entry, with its metadata as the filesystem stores it.

    `name` is one path component (undecodable bytes kept with surrogateescape); `mode` the full
    st_mode (FAT, exFAT and NTFS without POSIX modes get 0o40755 / 0o100644 / 0o120777);
    `size` in bytes (a symlink: its target's length); `inode` the filesystem's own id of the entry,
    stable between two points of one filesystem. `change_token`: metadata that, equal in two
    points of the same filesystem, proves equal content; None means no proof (compare bytes).
    """

    name: str
    kind: EntryKind
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    atime_ns: int
    ctime_ns: int
    inode: int
    nlink: int
    symlink_target: str | None = None
    change_token: tuple[object, ...] | None = None


class GuestFilesystem(Protocol):
    """One recognized filesystem: a read-only tree of GuestEntry.

    Methods raise GuestPathError (ENOENT, ENOTDIR, EISDIR) for a path that does not fit and
    DamagedFilesystemError for metadata or data that cannot be read; nothing else on purpose.
    """

    name: str  # folder name under files/: "vda-part2", "vda" (whole disk), "vg0-root" (LVM)
    fs_type: str  # "ext2" "ext3" "ext4" "fat12" "fat16" "fat32" "exfat" "ntfs" "xfs"
    journal: str  # one plain sentence about journal replay

    def entry(self, path: str) -> GuestEntry:
        """The entry at `path` ("" is the root folder)."""
        ...

    def listdir(self, path: str) -> list[GuestEntry]:
        """The entries of a folder, sorted by name; never "." or ".."."""
        ...

    def read(self, path: str, offset: int, length: int) -> bytes:
        """Bytes of a regular file; short only at its end."""
        ...

    def holes(self, path: str) -> list[tuple[int, int]]:
        """(offset, length) ranges of a regular file that are sparse holes (read as zeros)."""
        ...
