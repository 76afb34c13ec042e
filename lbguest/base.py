"""What every filesystem reader shares: path walking, caches, locking, guard rails, errors.

A backend (ext, FAT, exFAT, NTFS, XFS) answers four questions about its own node objects: the
root, the children of a folder, the entry of a node, and where a regular file's bytes lie (runs
of (byte offset on the volume | None for a hole, length)). Everything else lives here, once:

- paths are walked from the root through cached folder listings (bounded caches);
- one lock per filesystem (the parsers seek a shared stream);
- every request runs under a read budget (stream.ReadBudget), so a loop in damaged metadata
  ends in DamagedFilesystemError instead of a hang;
- the parsers signal garbage through many built-in exceptions (struct, EOF, index, value,
  recursion...): exactly those, raised while parsing, become DamagedFilesystemError.
"""

from __future__ import annotations

import errno
import stat
import struct
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from dissect.cstruct.exceptions import Error as CstructError
from dissect.extfs.exceptions import Error as ExtfsError
from dissect.fat.exceptions import Error as FatError
from dissect.ntfs.exceptions import Error as NtfsError
from dissect.xfs.exceptions import Error as XfsError

from lbguest.errors import DamagedFilesystemError, GuestError, GuestPathError
from lbguest.model import EntryKind, GuestEntry
from lbguest.stream import ReadBudget, SourceStream

Node = TypeVar("Node")
Run = tuple[int | None, int]

PARSER_ERRORS: tuple[type[BaseException], ...] = (
    CstructError,
    ExtfsError,
    FatError,
    NtfsError,
    XfsError,
    EOFError,
    struct.error,
    ValueError,  # UnicodeDecodeError too
    IndexError,
    KeyError,
    OverflowError,
    ZeroDivisionError,
    RecursionError,
    NotImplementedError,
    MemoryError,
)
"""What the dissect parsers raise on garbage (their own errors and the built-in ones)."""

META_BUDGET = 64 << 20
"""Bytes one metadata request (entry, listdir) may read: a huge folder fits, a loop does not."""
MAX_FOLDER_ENTRIES = 1 << 20
CACHE_FOLDERS = 4096
CACHE_RUNS = 1024
FOLDER_MODE = stat.S_IFDIR | 0o755
FILE_MODE = stat.S_IFREG | 0o644
SYMLINK_MODE = stat.S_IFLNK | 0o777


def kind_of(mode: int) -> EntryKind:
    """The EntryKind of a st_mode."""
    if stat.S_ISDIR(mode):
        return EntryKind.FOLDER
    if stat.S_ISREG(mode):
        return EntryKind.FILE
    if stat.S_ISLNK(mode):
        return EntryKind.SYMLINK
    return EntryKind.OTHER


def split_path(path: str) -> list[str]:
    """The components of a relative path ("" and "/" are the root); "." and ".." refused."""
    parts = [part for part in path.strip("/").split("/") if part]
    if any(part in (".", "..") for part in parts):
        raise GuestPathError(path)
    return parts


class _Lru(OrderedDict[str, Any]):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def put(self, key: str, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


class TreeFilesystem(ABC, Generic[Node]):
    """A GuestFilesystem over a backend's nodes; subclasses implement the `_` hooks."""

    fs_type: str = "unknown"

    def __init__(self, name: str, stream: SourceStream, budget: ReadBudget) -> None:
        self.name = name
        self.journal = "no journal"
        self._stream = stream
        self._budget = budget
        self._lock = threading.RLock()
        self._folders: _Lru = _Lru(CACHE_FOLDERS)
        self._runs: _Lru = _Lru(CACHE_RUNS)
        self._last_file: tuple[str, tuple[GuestEntry, Node, list[Run] | None]] | None = None

    # -- hooks -------------------------------------------------------------------------------

    @abstractmethod
    def _root(self) -> Node:
        """The root folder's node."""

    @abstractmethod
    def _children(self, node: Node) -> Iterator[tuple[str, Node]]:
        """(name, node) of each entry of a folder, "." and ".." left out, any order."""

    @abstractmethod
    def _entry(self, name: str, node: Node) -> GuestEntry:
        """The entry of a node, with its metadata as stored."""

    @abstractmethod
    def _file_runs(self, node: Node, entry: GuestEntry) -> list[Run] | None:
        """Where a regular file's bytes lie: (volume byte offset | None for a hole, length);
        None when they do not lie in runs (resident, inline, compressed): then `_read_other`."""

    def _read_other(self, node: Node, entry: GuestEntry, offset: int, length: int) -> bytes:
        """Bytes of a file whose `_file_runs` is None; a filesystem whose files always lie in
        runs never gets here, so reaching it means its metadata does not add up."""
        raise DamagedFilesystemError(self.name, f"inode {entry.inode}: no data runs")

    def _fingerprint(self, node: Node) -> tuple[EntryKind, int, bytes] | None:
        """The kind, ctime and raw metadata bytes of a node (see `fingerprints`); None: unknown."""
        return None

    # -- the GuestFilesystem interface ---------------------------------------------------------

    def entry(self, path: str) -> GuestEntry:
        """The entry at `path` ("" is the root folder)."""
        return self._guarded(path, META_BUDGET, lambda: self._lookup(path)[0])

    def listdir(self, path: str) -> list[GuestEntry]:
        """The entries of a folder, sorted by name."""

        def listing() -> list[GuestEntry]:
            entry, _node = self._lookup(path)
            if entry.kind is not EntryKind.FOLDER:
                raise GuestPathError(path, errno.ENOTDIR)
            folder = self._folder(path)
            return [self._parsed(name, child) for name, child in folder.items()]

        return self._guarded(path, META_BUDGET, listing)

    def fingerprints(self, path: str) -> dict[str, tuple[EntryKind, int, bytes]] | None:
        """name -> (kind, ctime_ns, the raw on-disk bytes of the entry's metadata) for a folder's
        entries, without parsing them; equal bytes in two versions of this filesystem mean an
        equal entry. None when this filesystem cannot tell (lbguest.diff then compares parsed
        entries)."""

        def collect() -> dict[str, tuple[EntryKind, int, bytes]] | None:
            entry, _node = self._lookup(path)
            if entry.kind is not EntryKind.FOLDER:
                raise GuestPathError(path, errno.ENOTDIR)
            found = {}
            for name, (_entry, node) in self._folder(path).items():
                print_ = self._fingerprint(node)
                if print_ is None:
                    return None
                found[name] = print_
            return found

        return self._guarded(path, META_BUDGET, collect)

    def read(self, path: str, offset: int, length: int) -> bytes:
        """Bytes of a regular file; short only at its end."""
        budget = META_BUDGET + 2 * max(0, length)
        return self._guarded(path, budget, lambda: self._read(path, offset, length))

    def read_into(self, path: str, offset: int, dest: memoryview) -> int:
        """Fill `dest` with bytes of a regular file from `offset`; bytes filled (short only at
        its end). The zero-copy form of `read`, for the FUSE adapter."""
        entry, _node, runs = self._guarded(path, META_BUDGET, lambda: self._file(path))
        if runs is None or offset < 0:
            budget = META_BUDGET + 2 * len(dest)
            filled: int = self._guarded(path, budget, lambda: self._read_into(path, offset, dest))
            return filled
        # The runs are known: the bytes are read without the filesystem's lock (the sources are
        # thread-safe), so the kernel's parallel requests for one file are served at once.
        with self._budget.limit(2 * len(dest) + (1 << 20)):
            return self._copy_runs(path, entry, runs, offset, dest)

    def holes(self, path: str) -> list[tuple[int, int]]:
        """Sparse ranges of a regular file, merged, inside its size."""

        def find() -> list[tuple[int, int]]:
            entry, _node, runs = self._file(path)
            found: list[tuple[int, int]] = []
            position = 0
            for where, length in runs or []:
                length = min(length, entry.size - position)
                if length <= 0:
                    break
                if where is None:
                    if found and found[-1][0] + found[-1][1] == position:
                        found[-1] = (found[-1][0], found[-1][1] + length)
                    else:
                        found.append((position, length))
                position += length
            return found

        return self._guarded(path, META_BUDGET, find)

    # -- machinery ---------------------------------------------------------------------------

    def _guarded(self, path: str, budget: int, work: Callable[[], Any]) -> Any:
        with self._lock, self._budget.limit(budget):
            try:
                return work()
            except GuestError:
                raise
            except PARSER_ERRORS as exc:
                raise DamagedFilesystemError(
                    self.name, f"damaged {self.fs_type} metadata at {path or '/'}: {exc!r}"
                ) from exc

    def _lookup(self, path: str) -> tuple[GuestEntry, Node]:
        parts = split_path(path)
        if not parts:
            root = self._root()
            entry = self._entry("", root)
            if entry.kind is not EntryKind.FOLDER:
                raise DamagedFilesystemError(self.name, "the root is not a folder")
            return entry, root
        parent = "/".join(parts[:-1])
        if parts[:-1]:
            entry, _ = self._lookup(parent)
            if entry.kind is not EntryKind.FOLDER:
                raise GuestPathError(path, errno.ENOTDIR)
        found = self._folder(parent).get(parts[-1])
        if found is None:
            raise GuestPathError(path)
        return self._parsed(parts[-1], found), found[1]

    def _parsed(self, name: str, child: list[Any]) -> GuestEntry:
        """The entry of a folder's child, parsed on first use (a lookup of one file does not
        parse its siblings)."""
        if child[0] is None:
            child[0] = self._entry(name, child[1])
        entry: GuestEntry = child[0]
        return entry

    def _folder(self, path: str) -> dict[str, list[Any]]:
        """name -> [entry or None until parsed, node] of a folder's entries, sorted by name
        (cached)."""
        key = "/".join(split_path(path))
        cached = self._folders.get(key)
        if cached is not None:
            self._folders.move_to_end(key)
            return cached
        if key:
            _entry, node = self._lookup(key)
        else:
            node = self._root()
        found: dict[str, list[Any]] = {}
        for name, child in self._children(node):
            if name in (".", "..", "") or "/" in name or "\0" in name or name in found:
                continue
            if len(found) >= MAX_FOLDER_ENTRIES:
                raise DamagedFilesystemError(self.name, f"{key or '/'}: too many entries")
            found[name] = [None, child]
        listing = dict(sorted(found.items()))
        self._folders.put(key, listing)
        return listing

    def _file(self, path: str) -> tuple[GuestEntry, Node, list[Run] | None]:
        hit = self._last_file
        if hit is not None and hit[0] == path:
            return hit[1]
        found = self._file_uncached(path)
        self._last_file = (path, found)
        return found

    def _file_uncached(self, path: str) -> tuple[GuestEntry, Node, list[Run] | None]:
        entry, node = self._lookup(path)
        if entry.kind is EntryKind.FOLDER:
            raise GuestPathError(path, errno.EISDIR)
        if entry.kind is not EntryKind.FILE:
            raise GuestPathError(path, errno.EINVAL)
        key = "/".join(split_path(path))
        if key in self._runs:
            runs = self._runs[key]
        else:
            runs = self._file_runs(node, entry)
            if runs is not None and any(length <= 0 for _where, length in runs):
                raise DamagedFilesystemError(self.name, f"{path}: a data run of no length")
            self._runs.put(key, runs)
        return entry, node, runs

    def _read_into(self, path: str, offset: int, dest: memoryview) -> int:
        entry, _node, runs = self._file(path)
        if offset < 0:
            raise GuestPathError(path, errno.EINVAL)
        end = min(entry.size, offset + len(dest))
        if offset >= end:
            return 0
        if runs is None:
            data = self._read(path, offset, end - offset)
            dest[: len(data)] = data
            return len(data)
        return self._copy_runs(path, entry, runs, offset, dest)

    def _copy_runs(
        self, path: str, entry: GuestEntry, runs: list[Run], offset: int, dest: memoryview
    ) -> int:
        """Fill `dest` from the file's runs at `offset` (holes as zeros); bytes filled."""
        end = min(entry.size, offset + len(dest))
        if offset >= end:
            return 0
        position = 0
        for where, run_length in runs:
            run_end = position + run_length
            if run_end > offset and position < end:
                lo, hi = max(offset, position), min(end, run_end)
                target = dest[lo - offset : hi - offset]
                if where is None:
                    target[:] = bytes(hi - lo)
                elif self._stream.preadinto(where + lo - position, target) != hi - lo:
                    raise DamagedFilesystemError(self.name, f"{path}: data past the volume's end")
            position = run_end
            if position >= end:
                break
        if position < end:
            dest[max(position, offset) - offset : end - offset] = bytes(end - max(position, offset))
        return end - offset

    def _read(self, path: str, offset: int, length: int) -> bytes:
        entry, node, runs = self._file(path)
        if offset < 0 or length < 0:
            raise GuestPathError(path, errno.EINVAL)
        end = min(entry.size, offset + length)
        if offset >= end:
            return b""
        if runs is None:
            data = self._read_other(node, entry, offset, end - offset)[: end - offset]
            if len(data) != end - offset:
                raise DamagedFilesystemError(self.name, f"{path}: data shorter than its size")
            return data
        pieces: list[bytes] = []
        position = 0
        for where, run_length in runs:
            run_end = position + run_length
            if run_end > offset and position < end:
                lo, hi = max(offset, position), min(end, run_end)
                if where is None:
                    pieces.append(bytes(hi - lo))
                else:
                    data = self._stream.pread(where + lo - position, hi - lo)
                    if len(data) != hi - lo:
                        raise DamagedFilesystemError(
                            self.name, f"{path}: data lies past the end of the volume"
                        )
                    pieces.append(data)
            position = run_end
            if position >= end:
                break
        if position < end:  # runs shorter than the size: the rest reads as zeros (a hole)
            pieces.append(bytes(end - max(position, offset)))
        data = b"".join(pieces)
        if len(data) != end - offset:
            raise DamagedFilesystemError(self.name, f"{path}: data runs do not add up")
        return data
