"""What a mounted restore point looks like as a filesystem: a pure, read-only model.

No FUSE here: `lbfuse.mount` only translates kernel calls into the methods below and their
errors (`lbfuse.errors.VfsError`, each naming an errno) into answers. The model is one flat
folder:

    <disk>.raw            the whole disk, read through its chain view
    <disk>-part<N>.raw    the byte range of partition N (numbered as Linux does)
    vm.json               the restore point's metadata
    files/<fs>/...        the guest's own files (lbfuse.guestvfs, lbguest), when asked for

Files are 0o400 and the folder 0o500, owned by the mounting user; every time stamp is the restore
point's creation time. Nothing ever changes, so every change request fails with EROFS.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from lbfuse.errors import (
    BadHandleError,
    EntryNotFoundError,
    IsAFolderError,
    NotAFolderError,
    ReadOnlyError,
    SourceReadError,
    VfsError,
)
from lbfuse.guestvfs import FILES, GuestPathVfsError, GuestView, is_guest_path
from lbguest.files import GuestFiles
from lbguest.model import EntryKind
from lbguest.partitions import read_partitions

FILE_MODE = stat.S_IFREG | 0o400
FOLDER_MODE = stat.S_IFDIR | 0o500
BLOCK_SIZE = 4096
NAME_MAX = 255
ROOT = "/"
NEW_NAME_OPERATIONS = frozenset({"create", "link", "mkdir", "mknod", "symlink"})
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


class DiskSource(Protocol):
    """A disk's bytes: `size` and `read(offset, length)`; a chain view or a raw file."""

    @property
    def size(self) -> int:
        """The disk's virtual size in bytes."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset` (the caller stays inside `size`)."""
        ...


class ReadIntoSource(DiskSource, Protocol):
    """A DiskSource that can also fill a caller's buffer (no intermediate bytes object)."""

    def readinto(self, offset: int, dest: memoryview) -> int:
        """Fill every byte of `dest` from `offset` (zeros included: `dest` holds garbage);
        return the bytes filled."""
        ...


@dataclass(frozen=True, slots=True)
class Attributes:
    """The stat of one entry; times are nanoseconds since the epoch."""

    mode: int
    size: int
    uid: int
    gid: int
    time_ns: int
    nlink: int
    inode: int
    atime_ns: int | None = None
    ctime_ns: int | None = None

    @property
    def is_folder(self) -> bool:
        """True for the root folder."""
        return stat.S_ISDIR(self.mode)

    @property
    def blocks(self) -> int:
        """Size in 512-byte units, as st_blocks counts."""
        return (self.size + 511) // 512


@dataclass(frozen=True, slots=True)
class FileNode:
    """One file: `length` bytes of `source` starting at `start` (a disk, a partition or bytes).

    `cacheable`: the kernel may keep the file's pages (nothing ever changes). Disk and partition
    files are unless the tree is built without `cache_disks`; the adapter (lbfuse.mount) may
    still stream a large cacheable file past the cache when large readahead is not available.
    """

    name: str
    source: DiskSource
    start: int
    length: int
    inode: int
    cacheable: bool = False


class LazyBytesSource:
    """A small in-memory file whose bytes are made on first use (vm.json with guest notes)."""

    def __init__(self, make: Callable[[], bytes]) -> None:
        self._make = make
        self._data: bytes | None = None
        self._lock = threading.Lock()

    def _bytes(self) -> bytes:
        with self._lock:
            if self._data is None:
                self._data = bytes(self._make())
            return self._data

    @property
    def size(self) -> int:
        """Length of the data (made now if needed)."""
        return len(self._bytes())

    def read(self, offset: int, length: int) -> bytes:
        """A slice of the data."""
        return self._bytes()[offset : offset + length]


class BytesSource:
    """A small in-memory file (vm.json), readable through the DiskSource protocol."""

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)

    @property
    def size(self) -> int:
        """Length of the data."""
        return len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        """A slice of the data."""
        return self._data[offset : offset + length]


class ReadOnlyTree:
    """A read-only folder of files, with open handles and bounded reads.

    Reads of one source are serialised (sources such as chain views need not be thread-safe)
    unless the source has a true `thread_safe` attribute; reads of different sources may run
    at once.
    """

    def __init__(
        self,
        nodes: list[FileNode],
        *,
        uid: int,
        gid: int,
        time_ns: int,
        guest: GuestFiles | None = None,
    ) -> None:
        self._nodes = {node.name: node for node in nodes}
        self._guest = GuestView(guest, uid=uid, gid=gid, time_ns=time_ns) if guest else None
        self._uid, self._gid, self._time_ns = uid, gid, time_ns
        self._handles: dict[int, FileNode | str] = {}
        self._next_handle = 1
        self._handles_lock = threading.Lock()
        self._source_locks: dict[int, threading.Lock | contextlib.nullcontext[None]] = {
            id(node.source): _lock_for(node.source) for node in nodes
        }

    # -- lookups --------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The names in the root folder, sorted."""
        return sorted([*self._nodes, *([FILES] if self._guest else [])])

    def getattr(self, path: str) -> Attributes:
        """The attributes of the root folder, of one file, or of an entry under files/."""
        if path == ROOT:
            return Attributes(FOLDER_MODE, 0, self._uid, self._gid, self._time_ns, 2, 1)
        if self._guest is not None and is_guest_path(path):
            return self._guest_attributes(path)
        node = self._node(path)
        return Attributes(
            FILE_MODE, _length(node), self._uid, self._gid, self._time_ns, 1, node.inode
        )

    def _guest_attributes(self, path: str) -> Attributes:
        assert self._guest is not None
        entry = self._guest.entry(path)
        if entry is None:
            mode, uid, gid, time_ns, nlink = self._guest.folder_attributes()
            return Attributes(mode, 0, uid, gid, time_ns, nlink, 0)
        return Attributes(
            entry.mode,
            entry.size if entry.kind is not EntryKind.FOLDER else 0,
            entry.uid,
            entry.gid,
            entry.mtime_ns,
            max(1, entry.nlink),
            entry.inode,
            atime_ns=entry.atime_ns,
            ctime_ns=entry.ctime_ns,
        )

    def listdir(self, path: str) -> list[str]:
        """The names in a folder: the root, files/ or a folder under it."""
        if self._guest is not None and is_guest_path(path):
            return self._guest.listdir(path)
        if path != ROOT:
            self._node(path)
            raise NotAFolderError(path)
        return self.names()

    def readlink(self, path: str) -> str:
        """A guest symlink's target as stored; anything else is EINVAL."""
        if self._guest is not None and is_guest_path(path):
            return self._guest.readlink(path)
        self.getattr(path)
        raise GuestPathVfsError(path, errno.EINVAL, "not a symlink")

    def _node(self, path: str) -> FileNode:
        """The file at `path`; folders and missing names raise the matching VfsError."""
        if path == ROOT or (self._guest is not None and path == "/" + FILES):
            raise IsAFolderError(path)
        name = path[1:] if path.startswith("/") else path
        node = self._nodes.get(name)
        if node is None:
            if "/" in name and name.split("/", 1)[0] in self._nodes:
                raise NotAFolderError(path)
            raise EntryNotFoundError(path)
        return node

    # -- access, open, read, release ----------------------------------------------------------

    def access(self, path: str, mode: int) -> None:
        """Refuse write access; the kernel checks the permission bits itself."""
        if self._guest is not None and is_guest_path(path):
            self.getattr(path)
        elif path != ROOT:
            self._node(path)
        if mode & os.W_OK:
            raise ReadOnlyError(path, "access for writing")

    def open(self, path: str, flags: int) -> int:
        """A handle for reading a file; any write-ish flag is refused with EROFS."""
        node: FileNode | str
        if self._guest is not None and is_guest_path(path):
            self._guest.file_entry(path)
            node = path
        else:
            node = self._node(path)
        if flags & WRITE_FLAGS:
            raise ReadOnlyError(path, "open for writing")
        with self._handles_lock:
            handle = self._next_handle
            self._next_handle += 1
            self._handles[handle] = node
        return handle

    def cacheable(self, path: str) -> bool:
        """Whether the kernel should cache the file's pages (see FileNode); guest files may
        (nothing changes), the adapter still streams large ones past the cache."""
        if self._guest is not None and is_guest_path(path):
            return True
        return self._node(path).cacheable

    def release(self, handle: int) -> None:
        """Forget a handle (unknown handles are ignored: release must not fail)."""
        with self._handles_lock:
            self._handles.pop(handle, None)

    def read(self, handle: int, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset` of an open file: one source read, short at its end."""
        node = self._handles.get(handle)
        if node is None:
            raise BadHandleError(handle)
        if isinstance(node, str):
            return self._read_guest(node, offset, length)
        return self._read_node(node, offset, length)

    def _read_guest(self, path: str, offset: int, length: int) -> bytes:
        assert self._guest is not None
        if offset < 0 or length < 0:
            raise VfsError(path, "negative offset or length")
        return self._guest.read(path, offset, length)

    def read_into(self, handle: int, offset: int, dest: memoryview) -> int:
        """Fill `dest` (garbage on entry) from `offset` of an open file; bytes filled.

        The fast path for the FUSE adapter: the kernel's reply buffer is filled in place.
        """
        node = self._handles.get(handle)
        if node is None:
            raise BadHandleError(handle)
        if isinstance(node, str):
            assert self._guest is not None
            if offset < 0:
                raise VfsError(node, "negative offset")
            return self._guest.read_into(node, offset, dest)
        if offset < 0:
            raise VfsError(node.name, "negative offset")
        length = max(0, min(len(dest), _length(node) - offset))
        if length == 0:
            return 0
        readinto = getattr(node.source, "readinto", None)
        if readinto is None:
            dest[:length] = self._read_node(node, offset, length)
            return length
        try:
            with self._source_locks[id(node.source)]:
                got = readinto(node.start + offset, dest[:length])
        except Exception as exc:
            raise SourceReadError("/" + node.name, exc) from exc
        if got != length:
            raise SourceReadError("/" + node.name, EOFError(f"short read {got}/{length}"))
        return length

    def read_path(self, path: str, offset: int, length: int) -> bytes:
        """Like `read`, by path (for tests and callers without a handle)."""
        if self._guest is not None and is_guest_path(path):
            self._guest.file_entry(path)
            return self._read_guest(path, offset, length)
        return self._read_node(self._node(path), offset, length)

    def _read_node(self, node: FileNode, offset: int, length: int) -> bytes:
        """Clamp to the file, then read its bytes from the source in one call."""
        if offset < 0 or length < 0:
            raise VfsError(node.name, "negative offset or length")
        length = min(length, _length(node) - offset)
        if length <= 0:
            return b""
        try:
            with self._source_locks[id(node.source)]:
                data = node.source.read(node.start + offset, length)
        except VfsError:
            raise
        except Exception as exc:
            raise SourceReadError("/" + node.name, exc) from exc
        if len(data) != length:
            raise SourceReadError("/" + node.name, EOFError(f"short read {len(data)}/{length}"))
        return data

    def statfs(self) -> dict[str, int]:
        """Filesystem totals: all bytes used, none free, names up to NAME_MAX."""
        total = sum(_length(node) for node in self._nodes.values())
        return {
            "f_bsize": BLOCK_SIZE,
            "f_frsize": BLOCK_SIZE,
            "f_blocks": (total + BLOCK_SIZE - 1) // BLOCK_SIZE,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": len(self._nodes) + 1,
            "f_ffree": 0,
            "f_favail": 0,
            "f_namemax": NAME_MAX,
        }

    def refuse(self, path: str, operation: str) -> None:
        """Every change request ends here: EROFS, but ENOENT first for a name that is not there."""
        if path not in (ROOT, "") and operation not in NEW_NAME_OPERATIONS:
            if self._guest is not None and is_guest_path(path):
                self.getattr(path)
            else:
                self._node(path)
        raise ReadOnlyError(path, operation)


def _length(node: FileNode) -> int:
    """A file's length; -1 in a FileNode means "the source's size" (made on first use)."""
    return node.length if node.length >= 0 else node.source.size


def _lock_for(source: DiskSource) -> threading.Lock | contextlib.nullcontext[None]:
    """A lock that serialises reads of `source`, unless it says it is `thread_safe`."""
    return contextlib.nullcontext() if getattr(source, "thread_safe", False) else threading.Lock()


def build_restore_point_tree(
    disks: Mapping[str, DiskSource],
    vm_json: bytes | Callable[[], bytes],
    created: datetime,
    *,
    uid: int,
    gid: int,
    partitions: bool = True,
    cache_disks: bool = True,
    guest: GuestFiles | None = None,
) -> ReadOnlyTree:
    """The folder of one restore point: each disk, each of its partitions, vm.json, and with
    `guest` the files/ folder of the guest's filesystems.

    `cache_disks` marks disk and partition files cacheable (see FileNode); vm.json always is.
    `vm_json` may be a function: then it is called on first use of vm.json (its guest notes
    need the filesystems opened, which must not happen at mount time).
    """
    nodes: list[FileNode] = []
    inode = _counter(2)
    for disk_name in sorted(disks):
        source = disks[disk_name]
        whole = FileNode(f"{disk_name}.raw", source, 0, source.size, inode(), cache_disks)
        nodes.append(whole)
        if not partitions:
            continue
        taken = {f"{name}.raw" for name in disks}
        for part in read_partitions(source.read, source.size):
            name = f"{disk_name}-part{part.number}.raw"
            if name in taken:  # a disk really named like this partition keeps the name
                continue
            nodes.append(FileNode(name, source, part.start, part.length, inode(), cache_disks))
    if callable(vm_json):
        lazy = LazyBytesSource(vm_json)
        nodes.append(FileNode("vm.json", lazy, 0, -1, inode(), cacheable=True))
    else:
        meta = BytesSource(vm_json)
        nodes.append(FileNode("vm.json", meta, 0, meta.size, inode(), cacheable=True))
    return ReadOnlyTree(nodes, uid=uid, gid=gid, time_ns=_epoch_ns(created), guest=guest)


def _epoch_ns(moment: datetime) -> int:
    """Nanoseconds since the epoch; a naive datetime is taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000


def _counter(first: int) -> Callable[[], int]:
    """A function returning first, first + 1, ... (inode numbers)."""
    state = [first - 1]

    def step() -> int:
        state[0] += 1
        return state[0]

    return step
