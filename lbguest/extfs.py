"""ext2/ext3/ext4 through dissect.extfs, with the block maps and folders read here.

dissect.extfs parses the superblock, the group descriptors and the inodes. The block map of a
file (extent tree or ext2/3 indirect blocks) and folder entries are read here, bounded: extent
trees deeper than the format allows, extents that overlap or run backwards, and indirect blocks
outside the volume are damage. Holes (missing extents, zero pointers, uninitialized extents)
are reported as holes and read as zeros. Before anything is read, the jbd2 journal is replayed
in memory when the filesystem needs recovery (lbguest.jbd2).
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Iterator

from dissect.extfs import ExtFS
from dissect.extfs.c_ext import c_ext
from dissect.extfs.extfs import INode, _parse_ns_ts

from lbguest.base import Run, TreeFilesystem, kind_of
from lbguest.errors import DamagedFilesystemError
from lbguest.jbd2 import replay_journal
from lbguest.model import ByteSource, EntryKind, GuestEntry
from lbguest.stream import ReadBudget, SourceStream

EXT_MAGIC = 0xEF53
SUPERBLOCK_OFFSET = 1024
COMPAT_HAS_JOURNAL = 0x4
INCOMPAT_RECOVER = 0x4
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_EXTENTS = 0x40
INCOMPAT_FLEX_BG = 0x200
INCOMPAT_64BIT = 0x80
RO_COMPAT_HUGE_FILE = 0x8
RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_METADATA_CSUM = 0x400
EXT4_ONLY_INCOMPAT = INCOMPAT_EXTENTS | INCOMPAT_FLEX_BG | INCOMPAT_64BIT
EXT4_ONLY_RO_COMPAT = RO_COMPAT_HUGE_FILE | RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM
EXTENTS_FL = 0x80000
INLINE_DATA_FL = 0x10000000
EXTENT_MAGIC = 0xF30A
MAX_EXTENT_DEPTH = 5
UNINIT_EXTENT = 0x8000
DIRENT = struct.Struct("<IHBB")
EXTENT_HEADER = struct.Struct("<HHHHI")
EXTENT = struct.Struct("<IHHI")
EXTENT_INDEX = struct.Struct("<IIHH")
I_BLOCK_SIZE = 60
RAW_CTIME = 0x0C  # i_ctime in the on-disk inode
RAW_CTIME_EXTRA = 0x84  # i_ctime_extra: epoch bits and nanoseconds (inodes over 128 bytes)


def probe_ext(source: ByteSource) -> bool:
    """Whether `source` starts like an ext2/3/4 filesystem (superblock magic)."""
    if source.size < SUPERBLOCK_OFFSET + 1024:
        return False
    raw = source.read(SUPERBLOCK_OFFSET + 0x38, 2)
    return len(raw) == 2 and struct.unpack("<H", raw)[0] == EXT_MAGIC


class ExtFilesystem(TreeFilesystem[INode]):
    """An ext2/3/4 filesystem read through dissect.extfs (journal replayed when needed)."""

    def __init__(self, name: str, source: ByteSource, budget: ReadBudget) -> None:
        raw = SourceStream(source, budget)
        with budget.limit(1 << 30):
            plain = ExtFS(raw)
            sb = plain.sb
            self.block_size = plain.block_size
            stream, journal = raw, "no journal"
            if sb.s_feature_compat & COMPAT_HAS_JOURNAL:
                journal = "journal clean"
                if sb.s_feature_incompat & INCOMPAT_RECOVER:
                    if sb.s_feature_incompat & INCOMPAT_JOURNAL_DEV or not sb.s_journal_inum:
                        journal = "shown without journal replay (external journal)"
                    else:
                        overlay, transactions = replay_journal(plain, name)
                        stream = SourceStream(
                            source, budget, overlay=overlay, block_size=self.block_size
                        )
                        journal = f"journal replayed in memory ({transactions} transactions)"
            self.fs = ExtFS(stream) if stream is not raw else plain
        super().__init__(name, stream, budget)
        self.journal = journal
        self.fs_type = _ext_kind(self.fs)
        self._filetype_in_dirents = bool(self.fs.sb.s_feature_incompat & 0x2)

    # -- hooks -------------------------------------------------------------------------------

    def _root(self) -> INode:
        return self.fs.get_inode(2)

    def _children(self, node: INode) -> Iterator[tuple[str, INode]]:
        if not stat.S_ISDIR(node.inode.i_mode):
            return
        size = node.size
        if node.inode.i_flags & INLINE_DATA_FL:
            # inline folder: the parent's inode number, then entries in i_block and system.data
            i_block = bytes(node.inode.i_block)
            regions = [i_block[4:], self._inline_xattr(node)]
        else:
            regions = [self._read_runs(self._runs_of(node, size), size)]
        for region in regions:
            yield from self._dirents(region, min(self.block_size, len(region)) or 1)

    def _dirents(self, data: bytes, block: int) -> Iterator[tuple[str, INode]]:
        """(name, inode) of the folder entries in `data`, records never crossing `block`."""
        inodes_count = self.fs.sb.s_inodes_count
        offset = 0
        while offset + DIRENT.size <= len(data):
            inum, rec_len, name_len, file_type = DIRENT.unpack_from(data, offset)
            if rec_len < DIRENT.size or rec_len % 4 or offset % block + rec_len > block:
                # a broken record: skip to the next block, as the kernel's readdir does
                offset = (offset // block + 1) * block
                continue
            if not self._filetype_in_dirents:
                name_len |= file_type << 8
            if 0 < inum <= inodes_count and 0 < name_len <= rec_len - DIRENT.size:
                raw = data[offset + DIRENT.size : offset + DIRENT.size + name_len]
                yield raw.decode("utf-8", "surrogateescape"), self.fs.get_inode(inum)
            offset += rec_len

    def _inline_xattr(self, node: INode) -> bytes:
        """The part of inline data beyond i_block: the `system.data` extended attribute."""
        for attribute in node.xattr:
            if attribute.name == "system.data":
                return bytes(attribute.value)
        return b""

    def _entry(self, name: str, node: INode) -> GuestEntry:
        raw = node.inode
        mode = raw.i_mode
        size = node.size
        target = None
        if stat.S_ISLNK(mode):
            target = self._symlink(node, size)
        uid = raw.i_uid | (raw.i_uid_high << 16)
        gid = raw.i_gid | (raw.i_gid_high << 16)
        ctime = node.ctime_ns
        mtime = node.mtime_ns
        return GuestEntry(
            name=name,
            kind=kind_of(mode),
            mode=mode,
            uid=uid,
            gid=gid,
            size=size,
            mtime_ns=mtime,
            atime_ns=node.atime_ns,
            ctime_ns=ctime,
            inode=node.inum,
            nlink=raw.i_links_count,
            symlink_target=target,
            change_token=(node.inum, raw.i_generation, ctime, mtime, size),
        )

    def _file_runs(self, node: INode, entry: GuestEntry) -> list[Run] | None:
        if node.inode.i_flags & INLINE_DATA_FL:
            return None  # the bytes are in the inode: _read_other
        return self._runs_of(node, entry.size)

    def _read_other(self, node: INode, entry: GuestEntry, offset: int, length: int) -> bytes:
        data = bytes(node.inode.i_block) + self._inline_xattr(node)
        if len(data) < entry.size:
            raise DamagedFilesystemError(self.name, f"inode {node.inum}: inline data too short")
        return data[offset : min(offset + length, entry.size)]

    def _fingerprint(self, node: INode) -> tuple[EntryKind, int, bytes]:
        """The kind, the ctime (as `_entry` gives it) and the inode number with the inode's raw
        bytes, read from its table as dissect's INode finds it, but not parsed."""
        sb = self.fs.sb
        group, index = divmod(node.inum - 1, sb.s_inodes_per_group)
        desc = self.fs._read_group_desc(group)
        table = desc.bg_inode_table_lo
        if self.fs._group_desc_struct == c_ext.ext4_group_desc:
            table |= desc.bg_inode_table_hi << 32
        raw = self._stream.pread(table * self.block_size + index * sb.s_inode_size, sb.s_inode_size)
        if len(raw) < min(sb.s_inode_size, RAW_CTIME_EXTRA + 4):
            raise DamagedFilesystemError(self.name, f"inode {node.inum} lies past the volume")
        mode, ctime = struct.unpack_from("<H", raw)[0], struct.unpack_from("<I", raw, RAW_CTIME)[0]
        large = len(raw) >= RAW_CTIME_EXTRA + 4  # inodes over 128 bytes carry the ns and epoch
        extra = struct.unpack_from("<I", raw, RAW_CTIME_EXTRA)[0] if large else 0
        return kind_of(mode), _parse_ns_ts(ctime, extra), node.inum.to_bytes(8, "little") + raw

    # -- block maps --------------------------------------------------------------------------

    def _symlink(self, node: INode, size: int) -> str:
        raw = node.inode
        if raw.i_flags & INLINE_DATA_FL:
            data = (bytes(raw.i_block) + self._inline_xattr(node))[:size]
        elif size < I_BLOCK_SIZE and not raw.i_flags & EXTENTS_FL:
            data = bytes(raw.i_block)[:size]
        else:
            data = self._read_runs(self._runs_of(node, size), size)
        return data.decode("utf-8", "surrogateescape")

    def _read_runs(self, runs: list[Run], size: int) -> bytes:
        pieces = []
        for where, length in runs:
            pieces.append(bytes(length) if where is None else self._stream.pread(where, length))
        return b"".join(pieces)[:size]

    def _runs_of(self, node: INode, size: int) -> list[Run]:
        """Byte runs of an inode's data up to `size` (holes as None)."""
        raw = node.inode
        block = self.block_size
        blocks = (size + block - 1) // block
        if raw.i_flags & INLINE_DATA_FL:
            raise DamagedFilesystemError(self.name, f"inode {node.inum}: inline data has no blocks")
        if raw.i_flags & EXTENTS_FL:
            mapped = self._extent_runs(bytes(raw.i_block), MAX_EXTENT_DEPTH + 1, node.inum)
        else:
            mapped = self._indirect_runs(bytes(raw.i_block), blocks, node.inum)
        runs: list[Run] = []
        position = 0
        for logical, physical, count in sorted(mapped):
            if logical >= blocks:
                break
            if logical < position:
                raise DamagedFilesystemError(self.name, f"inode {node.inum}: overlapping extents")
            if logical > position:
                runs.append((None, (logical - position) * block))
            count = min(count, blocks - logical)
            runs.append((None if physical is None else physical * block, count * block))
            position = logical + count
        if position < blocks:
            runs.append((None, (blocks - position) * block))
        return _merge(runs)

    def _check_block(self, physical: int, count: int, inum: int) -> None:
        if physical + count > self.fs.block_count or physical <= 0:
            raise DamagedFilesystemError(self.name, f"inode {inum}: block {physical} outside")

    def _extent_runs(
        self, node: bytes, depth_left: int, inum: int
    ) -> Iterator[tuple[int, int | None, int]]:
        """(logical block, physical block | None, count) of an extent tree node."""
        magic, entries, _max, depth, _gen = EXTENT_HEADER.unpack_from(node, 0)
        if magic != EXTENT_MAGIC or depth >= depth_left or 12 + entries * 12 > len(node):
            raise DamagedFilesystemError(self.name, f"inode {inum}: bad extent tree node")
        for index in range(entries):
            at = 12 + index * 12
            if depth == 0:
                logical, length, start_hi, start_lo = EXTENT.unpack_from(node, at)
                physical = (start_hi << 32) | start_lo
                if length > UNINIT_EXTENT:
                    yield logical, None, length - UNINIT_EXTENT  # preallocated: reads as zeros
                    continue
                self._check_block(physical, length, inum)
                yield logical, physical, length
            else:
                _logical, leaf_lo, leaf_hi, _unused = EXTENT_INDEX.unpack_from(node, at)
                leaf = (leaf_hi << 32) | leaf_lo
                self._check_block(leaf, 1, inum)
                child = self._stream.pread(leaf * self.block_size, self.block_size)
                yield from self._extent_runs(child, depth, inum)

    def _indirect_runs(
        self, i_block: bytes, blocks: int, inum: int
    ) -> Iterator[tuple[int, int | None, int]]:
        """(logical, physical | None, 1) for each block of an ext2/3 block map."""
        pointers = struct.unpack("<15I", i_block[:60])
        per_block = self.block_size // 4
        logical = 0
        for pointer in pointers[:12]:
            if logical >= blocks:
                return
            yield logical, pointer or None, 1
            logical += 1
        for level, pointer in enumerate(pointers[12:], start=1):
            span = per_block**level
            if logical >= blocks:
                return
            yield from self._indirect_level(pointer, level, logical, blocks, inum)
            logical += span

    def _indirect_level(
        self, pointer: int, level: int, logical: int, blocks: int, inum: int
    ) -> Iterator[tuple[int, int | None, int]]:
        per_block = self.block_size // 4
        span = per_block ** (level - 1)
        if pointer == 0:
            yield logical, None, min(per_block * span, blocks - logical)
            return
        self._check_block(pointer, 1, inum)
        table = struct.unpack(f"<{per_block}I", self._stream.pread(pointer * self.block_size,
                                                                   self.block_size))  # fmt: skip
        for index, child in enumerate(table):
            at = logical + index * span
            if at >= blocks:
                return
            if level == 1:
                yield at, child or None, 1
            else:
                yield from self._indirect_level(child, level - 1, at, blocks, inum)


def _merge(runs: list[Run]) -> list[Run]:
    """Adjacent runs joined (contiguous data, or holes next to holes)."""
    merged: list[Run] = []
    for where, length in runs:
        if merged:
            last_where, last_length = merged[-1]
            if where is None and last_where is None:
                merged[-1] = (None, last_length + length)
                continue
            if where is not None and last_where is not None and last_where + last_length == where:
                merged[-1] = (last_where, last_length + length)
                continue
        merged.append((where, length))
    return merged


def _ext_kind(fs: ExtFS) -> str:
    """ext4 when any ext4-only feature is on, ext3 with a journal, else ext2."""
    sb = fs.sb
    if sb.s_feature_incompat & EXT4_ONLY_INCOMPAT or sb.s_feature_ro_compat & EXT4_ONLY_RO_COMPAT:
        return "ext4"
    if sb.s_feature_compat & COMPAT_HAS_JOURNAL:
        return "ext3"
    return "ext2"
