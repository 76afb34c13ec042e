"""XFS through dissect.xfs; the extent maps are read here (unwritten extents read as zeros).

The XFS log is not replayed: `journal` says so. A filesystem that was cleanly unmounted, or
whose log holds nothing newer than its metadata, reads exactly; otherwise recent changes may be
missing, and the sentence says so plainly.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from typing import Any

from dissect.xfs import XFS
from dissect.xfs.xfs import fsb_to_bb

from lbguest.base import Run, TreeFilesystem, kind_of
from lbguest.errors import DamagedFilesystemError
from lbguest.model import ByteSource, GuestEntry
from lbguest.stream import ReadBudget, SourceStream

FMT_LOCAL = 1
FMT_EXTENTS = 2
FMT_BTREE = 3


def probe_xfs(source: ByteSource) -> bool:
    """Whether `source` starts with an XFS superblock."""
    return source.size >= 1 << 20 and source.read(0, 4) == b"XFSB"


class XfsFilesystem(TreeFilesystem[Any]):
    """An XFS filesystem read through dissect.xfs."""

    fs_type = "xfs"

    def __init__(self, name: str, source: ByteSource, budget: ReadBudget) -> None:
        stream = SourceStream(source, budget)
        with budget.limit(1 << 28):
            self.fs = XFS(stream)
        super().__init__(name, stream, budget)
        self.journal = "shown without log replay"

    def _root(self) -> Any:
        return self.fs.root

    def _children(self, node: Any) -> Iterator[tuple[str, Any]]:
        if not stat.S_ISDIR(node.inode.di_mode):
            return
        for child in node.iterdir():
            yield child.filename, child

    def _entry(self, name: str, node: Any) -> GuestEntry:
        raw = node.inode
        mode = raw.di_mode
        size = node.size
        target = None
        if stat.S_ISLNK(mode):
            target = node.link
        ctime, mtime = node.ctime_ns, node.mtime_ns
        return GuestEntry(
            name=name,
            kind=kind_of(mode),
            mode=mode,
            uid=raw.di_uid,
            gid=raw.di_gid,
            size=size,
            mtime_ns=mtime,
            atime_ns=node.atime_ns,
            ctime_ns=ctime,
            inode=node.inum,
            nlink=raw.di_nlink,
            symlink_target=target,
            change_token=(node.inum, raw.di_gen, ctime, mtime, size),
        )

    def _file_runs(self, node: Any, entry: GuestEntry) -> list[Run] | None:
        raw = node.inode
        if raw.di_format == FMT_LOCAL:
            return None
        if raw.di_format not in (FMT_EXTENTS, FMT_BTREE):
            raise DamagedFilesystemError(self.name, f"inode {node.inum}: data fork {raw.di_format}")
        sb = self.fs.sb
        block = self.fs.block_size
        total_blocks = sb.sb_dblocks
        extents = sorted(node._iter_blocks())
        runs: list[Run] = []
        position = 0
        for logical, fsblock, count, unwritten in extents:
            if logical < position:
                raise DamagedFilesystemError(self.name, f"inode {node.inum}: overlapping extents")
            if logical > position:
                runs.append((None, (logical - position) * block))
            agnum, agblock = fsb_to_bb(fsblock, sb.sb_agblklog)
            linear = agnum * sb.sb_agblocks + agblock
            if unwritten:
                runs.append((None, count * block))
            else:
                if agnum >= sb.sb_agcount or linear + count > total_blocks:
                    raise DamagedFilesystemError(self.name, f"inode {node.inum}: extent outside")
                runs.append((linear * block, count * block))
            position = logical + count
        return runs

    def _read_other(self, node: Any, entry: GuestEntry, offset: int, length: int) -> bytes:
        data = node.datafork().read(entry.size)
        return bytes(data[offset : offset + length])
