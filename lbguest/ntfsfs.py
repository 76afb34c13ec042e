"""NTFS through dissect.ntfs.

NTFS keeps no POSIX modes or owners here (ntfs-3g's default): folders 0o40755, files
0o100644, symlinks 0o120777, owner 0:0. Symlinks are either ntfs-3g's Interix links (a system
file holding "IntxLNK\\x01" and the UTF-16 target, what ntfs-3g writes by default) or Windows
symlink reparse points. The NTFS system files (MFT records below 24, "$MFT", "$Extend"...) are
left out, as ntfs-3g leaves them out. Resident and compressed data are read through dissect's
stream; plain non-resident data straight from its runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from dissect.ntfs import NTFS
from dissect.ntfs.c_ntfs import ATTRIBUTE_TYPE_CODE, IO_REPARSE_TAG

from lbguest.base import FILE_MODE, FOLDER_MODE, SYMLINK_MODE, Run, TreeFilesystem
from lbguest.model import ByteSource, EntryKind, GuestEntry
from lbguest.stream import ReadBudget, SourceStream

ROOT_RECORD = 5
FIRST_USER_RECORD = 24
INTERIX_SYMLINK = b"IntxLNK\x01"
FILE_ATTRIBUTE_SYSTEM = 0x4
MAX_INTERIX_TARGET = 8192
COMPRESSED_OR_ENCRYPTED = 0x40FF  # ATTRIBUTE_FLAG_COMPRESSION_MASK | ATTRIBUTE_FLAG_ENCRYPTED


def probe_ntfs(source: ByteSource) -> bool:
    """Whether `source` starts with an NTFS boot sector."""
    return source.size >= 1 << 20 and source.read(3, 8) == b"NTFS    "


class NtfsFilesystem(TreeFilesystem[Any]):
    """An NTFS filesystem read through dissect.ntfs."""

    fs_type = "ntfs"

    def __init__(self, name: str, source: ByteSource, budget: ReadBudget) -> None:
        stream = SourceStream(source, budget)
        with budget.limit(1 << 28):
            self.fs = NTFS(stream)
            self._root_record = self.fs.mft.get(ROOT_RECORD)
        super().__init__(name, stream, budget)
        self.journal = "shown without $LogFile replay"

    def _root(self) -> Any:
        return self._root_record

    def _children(self, node: Any) -> Iterator[tuple[str, Any]]:
        if not node.is_dir():
            return
        for index_entry in node.iterdir(ignore_dos=True):
            reference = index_entry.dereference()
            if reference.segment < FIRST_USER_RECORD:
                continue
            yield index_entry.attribute.file_name, reference

    def _entry(self, name: str, node: Any) -> GuestEntry:
        info = node.attributes[ATTRIBUTE_TYPE_CODE.STANDARD_INFORMATION]
        info = info[0] if info else None
        mtime = info.last_modification_time_ns if info else 0
        atime = info.last_access_time_ns if info else 0
        ctime = info.last_change_time_ns if info else 0
        folder = node.is_dir()
        target = None if folder else self._symlink_target(node, info)
        if folder:
            mode, kind, size = FOLDER_MODE, EntryKind.FOLDER, 0
        elif target is not None:
            mode, kind, size = (
                SYMLINK_MODE,
                EntryKind.SYMLINK,
                len(target.encode("utf-8", "surrogateescape")),
            )
        else:
            mode, kind = FILE_MODE, EntryKind.FILE
            size = node.size() if node.has_stream("") else 0
        return GuestEntry(
            name=name,
            kind=kind,
            mode=mode,
            uid=0,
            gid=0,
            size=size,
            mtime_ns=mtime,
            atime_ns=atime,
            ctime_ns=ctime,
            inode=node.segment,
            nlink=node.header.ReferenceCount,
            symlink_target=target,
            change_token=(node.segment, node.header.SequenceNumber, mtime, ctime, size),
        )

    def _symlink_target(self, node: Any, info: Any) -> str | None:
        if node.is_reparse_point():
            reparse = node.attributes[ATTRIBUTE_TYPE_CODE.REPARSE_POINT]
            if reparse and reparse.tag in (IO_REPARSE_TAG.SYMLINK, IO_REPARSE_TAG.MOUNT_POINT):
                return str(reparse.print_name or reparse.substitute_name)
            return None
        if info is None or not info.file_attributes & FILE_ATTRIBUTE_SYSTEM:
            return None
        if not node.has_stream("") or node.size() > MAX_INTERIX_TARGET:
            return None
        data = node.open().read(MAX_INTERIX_TARGET)
        if not data.startswith(INTERIX_SYMLINK):
            return None
        return data[len(INTERIX_SYMLINK) :].decode("utf-16-le", "surrogatepass").rstrip("\0")

    def _file_runs(self, node: Any, entry: GuestEntry) -> list[Run] | None:
        if entry.size == 0:
            return []
        attributes = node.attributes.find("", ATTRIBUTE_TYPE_CODE.DATA)
        if any(attr.resident or attr.header.flags & COMPRESSED_OR_ENCRYPTED for attr in attributes):
            return None  # resident or compressed/encrypted: through dissect's stream
        cluster = self.fs.cluster_size
        runs: list[Run] = []
        for lcn, count in node.dataruns():
            runs.append((None if lcn is None else lcn * cluster, count * cluster))
        return runs

    def _read_other(self, node: Any, entry: GuestEntry, offset: int, length: int) -> bytes:
        stream = node.open()
        stream.seek(offset)
        return bytes(stream.read(length))
