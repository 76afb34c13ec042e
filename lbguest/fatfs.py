"""FAT12/16/32 through dissect.fat, and exFAT through its exFAT parser, with bounded chains.

dissect follows cluster chains without looking for loops; here every chain is walked once, by
us, with a visited set and the volume's cluster count as bounds, and handed to the parser as the
entry's run list. FAT has no owners, modes or symlinks: folders are 0o40755, files 0o100644,
owned by 0:0; times are the stored local times read as UTC. An entry's `inode` is a stable
number derived from its path (FAT has none), and there is no `change_token` (2-second times).
"""

from __future__ import annotations

import datetime as dt
import struct
import zlib
from collections.abc import Iterator
from typing import Any

from dissect.fat import exfat as dissect_exfat
from dissect.fat import fat as dissect_fat
from dissect.fat.exceptions import Error as FatError

from lbguest.base import FILE_MODE, FOLDER_MODE, Run, TreeFilesystem
from lbguest.errors import DamagedFilesystemError
from lbguest.model import ByteSource, EntryKind, GuestEntry
from lbguest.stream import ReadBudget, SourceStream

FAT_TYPES = {12: "fat12", 16: "fat16", 32: "fat32"}
NT_LOWER_BASE = 0x08
NT_LOWER_EXT = 0x10
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def probe_fat(source: ByteSource) -> bool:
    """Whether `source` starts with a FAT boot sector (a BPB that dissect.fat accepts)."""
    if source.size < 64 * 512:
        return False
    sector = source.read(0, 512)
    if sector[510:512] != b"\x55\xaa" or sector[3:11] in (b"NTFS    ", b"EXFAT   "):
        return False
    try:
        dissect_fat.validate_bpb(dissect_fat.c_fat.Bpb(sector[: len(dissect_fat.c_fat.Bpb)]))
    except (FatError, EOFError, ValueError):
        return False
    return True


def probe_exfat(source: ByteSource) -> bool:
    """Whether `source` starts with an exFAT boot sector."""
    return source.size >= 1 << 20 and source.read(3, 8) == b"EXFAT   "


def path_inode(path: str) -> int:
    """A stable inode number for a filesystem without them (>= 2; the root is 1)."""
    return (zlib.crc32(path.encode("utf-8", "surrogateescape")) << 1) + 2 if path else 1


def _ns(moment: dt.datetime | None) -> int:
    if moment is None:
        return 0
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    delta = moment - EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


def _plain_entry(
    name: str, path: str, folder: bool, size: int, times: tuple[int, int, int]
) -> GuestEntry:
    return GuestEntry(
        name=name,
        kind=EntryKind.FOLDER if folder else EntryKind.FILE,
        mode=FOLDER_MODE if folder else FILE_MODE,
        uid=0,
        gid=0,
        size=0 if folder else size,
        mtime_ns=times[0],
        atime_ns=times[1],
        ctime_ns=times[2],
        inode=path_inode(path),
        nlink=2 if folder else 1,
    )


def _short_name(entry: Any) -> str:
    """An 8.3 name as Linux shows it: lower case where the NT flags say (0x08 base, 0x10 ext)."""
    flags = entry.dirent.DIR_NTRes
    base, dot, ext = entry.short_name.partition(".")
    base = base.lower() if flags & NT_LOWER_BASE else base
    ext = ext.lower() if flags & NT_LOWER_EXT else ext
    return base + dot + ext


class FatFilesystem(TreeFilesystem[Any]):
    """A FAT12/16/32 filesystem read through dissect.fat."""

    def __init__(self, name: str, source: ByteSource, budget: ReadBudget) -> None:
        stream = SourceStream(source, budget)
        with budget.limit(1 << 28):
            self.fs = dissect_fat.FATFS(stream, encoding="cp437")
        super().__init__(name, stream, budget)
        self.fs_type = FAT_TYPES[self.fs.fat.bits_per_entry]
        self.journal = "no journal (FAT)"
        self._data_offset = self.fs.first_data_sector * self.fs.sector_size

    def _root(self) -> Any:
        root = self.fs.root
        if root.cluster is not None and root._runlist is None:
            root._runlist = self._chain(root.cluster, None)
        return root

    def _children(self, node: Any) -> Iterator[tuple[str, Any]]:
        if node is not self.fs.root and node._runlist is None:
            node._runlist = self._chain(node.cluster, None)
        for child in node.iterdir():
            if child.is_volume_id() or child.name in (".", ".."):
                continue
            yield (child.name if child.ldirents else _short_name(child)), child

    def _entry(self, name: str, node: Any) -> GuestEntry:
        if node is self.fs.root:
            return _plain_entry("", "", True, 0, (0, 0, 0))
        times = (_ns(node.mtime), _ns(node.atime), _ns(node.ctime))
        path = node.path.replace("\\", "/")
        return _plain_entry(name, path, node.is_directory(), node.size, times)

    def _file_runs(self, node: Any, entry: GuestEntry) -> list[Run]:
        if entry.size == 0:
            return []
        clusters = self._chain(node.cluster, entry.size)
        size = self.fs.cluster_size
        return [(self._data_offset + start * size, count * size) for start, count in clusters]

    def _chain(self, first: int, size: int | None) -> list[tuple[int, int]]:
        """(cluster - 2, count) runs of a chain, loop-safe; at least `size` bytes when given."""
        table = self.fs.fat
        bits = table.bits_per_entry
        end_min = dissect_fat.mask(dissect_fat.END_OF_CLUSTER_MIN, bits)
        limit = table.entry_count
        runs: list[tuple[int, int]] = []
        seen: set[int] = set()
        cluster = first
        while True:
            if not 2 <= cluster < limit or cluster in seen:
                raise DamagedFilesystemError(self.name, f"broken cluster chain at {cluster}")
            seen.add(cluster)
            if runs and runs[-1][0] + runs[-1][1] == cluster - 2:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((cluster - 2, 1))
            if size is not None and len(seen) * self.fs.cluster_size >= size:
                return runs
            value = table.get(cluster)
            if value >= end_min or (bits == 12 and value >= 0xFF8):
                break
            cluster = value
        if size is not None:
            raise DamagedFilesystemError(self.name, "cluster chain shorter than the file")
        return runs


class _BoundedExFAT(dissect_exfat.ExFAT):
    """dissect's ExFAT with cluster chains that cannot loop."""

    def get_cluster_chain(self, starting_cluster: int) -> list[int]:
        chain: list[int] = []
        seen: set[int] = set()
        cluster = starting_cluster
        limit = self.vbr.cluster_heap_count + 2
        while 2 <= cluster < limit:
            if cluster in seen:
                raise DamagedFilesystemError("exfat", f"cluster chain loops at {cluster}")
            seen.add(cluster)
            chain.append(cluster)
            self.fat.seek(cluster * 4)
            (cluster,) = struct.unpack("<L", self.fat.read(4))
        return chain


def _exfat_time(stamp: int, tens: int, zone: int) -> int:
    """exFAT timestamp (DOS date/time, 10 ms increments, UTC offset) in ns since the epoch."""
    if not stamp:
        return 0
    try:
        moment = dt.datetime(
            1980 + (stamp >> 25),
            (stamp >> 21) & 0xF,
            (stamp >> 16) & 0x1F,
            (stamp >> 11) & 0x1F,
            (stamp >> 5) & 0x3F,
            (stamp & 0x1F) * 2,
            tzinfo=dt.UTC,
        )
    except ValueError:
        return 0
    ns = _ns(moment) + tens * 10_000_000
    if zone & 0x80:
        offset = zone & 0x7F
        offset = offset - 0x80 if offset & 0x40 else offset
        ns -= offset * 15 * 60 * 1_000_000_000
    return ns


class ExfatFilesystem(TreeFilesystem[Any]):
    """An exFAT filesystem read through dissect.fat's exFAT parser (whole tree at open)."""

    fs_type = "exfat"

    def __init__(self, name: str, source: ByteSource, budget: ReadBudget) -> None:
        stream = SourceStream(source, budget)
        with budget.limit(1 << 28):
            try:
                self.fs = _BoundedExFAT(stream)
            except (AttributeError, TypeError) as exc:
                # dissect's exFAT parser dereferences the volume label, bitmap and upcase
                # entries of the root folder without checking that they were found
                raise DamagedFilesystemError(name, f"damaged exFAT root folder: {exc}") from exc
        super().__init__(name, stream, budget)
        self.journal = "no journal (exFAT)"
        self._root_node = self.fs.files["/"]

    def _root(self) -> Any:
        return self._root_node

    def _children(self, node: Any) -> Iterator[tuple[str, Any]]:
        _file, entries = node
        for key, child in (entries or {}).items():
            yield key.rstrip("/"), child

    def _entry(self, name: str, node: Any) -> GuestEntry:
        file_, _entries = node
        if node is self._root_node:
            return _plain_entry("", "", True, 0, (0, 0, 0))
        meta = file_.metadata
        times = (
            _exfat_time(meta.modified_time, meta.modified_offset, meta.modified_timezone),
            _exfat_time(meta.access_time, 0, meta.access_timezone),
            _exfat_time(meta.create_time, meta.create_offset, meta.create_timezone),
        )
        folder = bool(meta.attributes.directory)
        entry = _plain_entry(name, "", folder, file_.stream.data_length, times)
        inode = file_.stream.location or path_inode(name)
        return GuestEntry(**{**entry.__dict__, "inode": inode})

    def _file_runs(self, node: Any, entry: GuestEntry) -> list[Run]:
        file_, _ = node
        if entry.size == 0:
            return []
        stream = file_.stream
        cluster_size = self.fs.cluster_size
        heap = self.fs.cluster_heap_sector * self.fs.sector_size
        count = (entry.size + cluster_size - 1) // cluster_size
        if stream.flags.not_fragmented:
            if stream.location < 2 or stream.location - 2 + count > self.fs.cluster_count:
                raise DamagedFilesystemError(self.name, "file extends past the cluster heap")
            return [(heap + (stream.location - 2) * cluster_size, count * cluster_size)]
        clusters = self.fs.get_cluster_chain(stream.location)
        if len(clusters) < count:
            raise DamagedFilesystemError(self.name, "cluster chain shorter than the file")
        runs: list[Run] = []
        for cluster in clusters:
            where = heap + (cluster - 2) * cluster_size
            last = runs[-1] if runs else None
            if last is not None and last[0] is not None and last[0] + last[1] == where:
                runs[-1] = (last[0], last[1] + cluster_size)
            else:
                runs.append((where, cluster_size))
        return runs
