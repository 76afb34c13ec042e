"""The guest's filesystems on a restore point's disks: find them, open them when first used.

`GuestFiles.open(disks)` reads only partition tables, LVM labels and superblock magics, so that
it returns at once whatever the disks' sizes (a mount must appear at once). A filesystem is
parsed on its first use (`get`, `resolve`), or all at once when `filesystems` or `notes` is
asked for. Nothing here raises for a bad filesystem: an unrecognized volume, or one whose
parsing fails, is left out and described in `notes` (which goes into vm.json "guest_files").

Folder names: `<disk>-part<N>` for a partition (numbered as Linux does), `<disk>` for a
filesystem on a whole disk without a partition table, `<vg>-<lv>` for an LVM logical volume.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dissect.volume.lvm import LVM2
from dissect.volume.lvm.physical import LVM2Device

from lbguest.base import PARSER_ERRORS, TreeFilesystem, split_path
from lbguest.errors import DamagedFilesystemError, GuestError, GuestPathError
from lbguest.extfs import ExtFilesystem, probe_ext
from lbguest.fatfs import ExfatFilesystem, FatFilesystem, probe_exfat, probe_fat
from lbguest.model import ByteSource, GuestFilesystem
from lbguest.ntfsfs import NtfsFilesystem, probe_ntfs
from lbguest.partitions import read_partitions
from lbguest.stream import ReadBudget, SourceStream, StreamSource, SubSource, read_source
from lbguest.xfsfs import XfsFilesystem, probe_xfs

Opener = Callable[[str, ByteSource, ReadBudget], TreeFilesystem[Any]]
LVM_ERRORS: tuple[type[BaseException], ...] = (
    GuestError,
    *PARSER_ERRORS,
    AttributeError,
    TypeError,
)
"""dissect.volume's LVM metadata parser meets garbage with these (a dict lookup on a string...)."""
OPEN_ERRORS: tuple[type[BaseException], ...] = (GuestError, *PARSER_ERRORS)
PROBE_BUDGET = 1 << 24
OPEN_BUDGET = 1 << 28
LVM_LABEL = b"LABELONE"
SWAP_MAGICS = (b"SWAPSPACE2", b"SWAP-SPACE")

PROBES: list[tuple[str, Callable[[ByteSource], bool], Opener]] = [
    ("ext", probe_ext, ExtFilesystem),
    ("xfs", probe_xfs, XfsFilesystem),
    ("ntfs", probe_ntfs, NtfsFilesystem),
    ("exfat", probe_exfat, ExfatFilesystem),
    ("fat", probe_fat, FatFilesystem),
]


@dataclass
class _Pending:
    """A volume whose magic matched: opened on first use."""

    kind: str
    source: ByteSource
    opener: Opener


class GuestFiles:
    """The filesystems found on a set of disks, by folder name (see the module docstring)."""

    def __init__(self) -> None:
        self._pending: dict[str, _Pending] = {}
        self._opened: dict[str, GuestFilesystem] = {}
        self._notes: list[dict[str, str]] = []
        self._lock = threading.Lock()

    @classmethod
    def open(cls, disks: Mapping[str, ByteSource]) -> GuestFiles:
        """Find the volumes of `disks` (cheap: tables and magics only); never raises for a bad
        partition table, LVM label or filesystem."""
        found = cls()
        pvs: list[tuple[str, ByteSource]] = []
        for disk_name in sorted(disks):
            disk = disks[disk_name]
            partitions = found._partitions(disk_name, disk)
            if not partitions:
                found._probe(disk_name, disk, pvs, whole_disk=True)
            for number, source in partitions:
                found._probe(f"{disk_name}-part{number}", source, pvs, whole_disk=False)
        found._logical_volumes(pvs)
        return found

    # -- detection -----------------------------------------------------------------------------

    def _partitions(self, disk_name: str, disk: ByteSource) -> list[tuple[int, ByteSource]]:
        try:
            parts = read_partitions(
                lambda offset, length: read_source(disk, offset, length, disk_name), disk.size
            )
        except GuestError as exc:
            self._note(disk_name, f"partition table unreadable: {exc}")
            return []
        return [(part.number, SubSource(disk, part.start, part.length)) for part in parts]

    def _probe(
        self, name: str, source: ByteSource, pvs: list[tuple[str, ByteSource]], *, whole_disk: bool
    ) -> None:
        try:
            if source.size >= 1024 and read_source(source, 512, 8, name) == LVM_LABEL:
                pvs.append((name, source))
                return
            for kind, probe, opener in PROBES:
                if probe(source):
                    self._pending[name] = _Pending(kind, source, opener)
                    return
            if any(magic in read_source(source, 4086, 10, name) for magic in SWAP_MAGICS):
                self._note(name, "swap space (no files)")
            elif not whole_disk or _has_data(source, name):
                self._note(name, "unrecognized filesystem")
        except GuestError as exc:
            self._note(name, f"unreadable: {exc}")

    def _logical_volumes(self, pvs: list[tuple[str, ByteSource]]) -> None:
        groups: dict[str, list[tuple[str, ByteSource]]] = {}
        for name, source in pvs:
            budget = ReadBudget(name)
            try:
                with budget.limit(PROBE_BUDGET):
                    device = LVM2Device(SourceStream(source, budget))
                    vg_name = str(device.metadata and next(iter(device.metadata.keys())))
            except LVM_ERRORS as exc:
                self._note(name, f"damaged LVM2 physical volume: {exc}")
                continue
            groups.setdefault(vg_name, []).append((name, source))
        for vg_name, members in sorted(groups.items()):
            budget = ReadBudget(vg_name)
            try:
                with budget.limit(PROBE_BUDGET):
                    lvm = LVM2([SourceStream(source, budget) for _name, source in members])
                    volumes = [
                        (lv.name, lv.open(), sum(seg.extent_count for seg in lv.segments))
                        for lv in lvm.vg.lv
                        if lv.is_visible
                    ]
                    extent = lvm.vg.extent_size * 512
            except LVM_ERRORS as exc:
                self._note(members[0][0], f"damaged LVM2 volume group {vg_name}: {exc}")
                continue
            for lv_name, stream, extents in volumes:
                name = f"{vg_name}-{lv_name}"
                source = StreamSource(stream, extents * extent)
                self._probe(name, _Budgeted(source, budget), [], whole_disk=False)

    def _note(self, source: str, note: str) -> None:
        self._notes.append({"source": source, "note": note})

    # -- opening -------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Folder names of every filesystem found (not yet opened ones included), sorted."""
        with self._lock:
            return sorted([*self._opened, *self._pending])

    def get(self, name: str) -> GuestFilesystem:
        """The filesystem of folder `name`, opened now if needed.

        GuestPathError (ENOENT) when there is none of that name; DamagedFilesystemError when it
        cannot be parsed (it is then dropped and noted)."""
        with self._lock:
            opened = self._opened.get(name)
            if opened is not None:
                return opened
            pending = self._pending.pop(name, None)
            if pending is None:
                raise GuestPathError(name, errno.ENOENT)
            budget = ReadBudget(name)
            try:
                with budget.limit(OPEN_BUDGET):
                    filesystem = pending.opener(name, pending.source, budget)
                    filesystem.entry("")
            except DamagedFilesystemError as exc:
                self._note(name, f"damaged {pending.kind} filesystem: {exc.problem}")
                raise
            except OPEN_ERRORS as exc:
                self._note(name, f"damaged {pending.kind} filesystem: {exc!r}")
                raise DamagedFilesystemError(
                    name, f"damaged {pending.kind} filesystem: {exc!r}"
                ) from exc
            self._opened[name] = filesystem
            return filesystem

    def settle(self) -> None:
        """Open every filesystem not opened yet (damaged ones become notes)."""
        for name in self.names():
            with contextlib.suppress(DamagedFilesystemError):
                self.get(name)

    @property
    def filesystems(self) -> dict[str, GuestFilesystem]:
        """Every good filesystem by folder name, sorted (opens those not opened yet)."""
        self.settle()
        with self._lock:
            return dict(sorted(self._opened.items()))

    @property
    def notes(self) -> list[dict[str, str]]:
        """What was left out and why: [{"source": "vda-part3", "note": "..."}]."""
        self.settle()
        with self._lock:
            return list(self._notes)

    def summary(self) -> dict[str, object]:
        """What vm.json says under "guest_files": each filesystem's type and journal sentence,
        and the notes."""
        filesystems = self.filesystems
        return {
            "filesystems": [
                {"name": name, "type": fs.fs_type, "journal": fs.journal}
                for name, fs in filesystems.items()
            ],
            "notes": self.notes,
        }

    def resolve(self, path: str) -> tuple[GuestFilesystem, str]:
        """ "vda-part2/etc/fstab" -> (that filesystem, "etc/fstab")."""
        parts = split_path(path)
        if not parts:
            raise GuestPathError(path, errno.EISDIR)
        return self.get(parts[0]), "/".join(parts[1:])


class _Budgeted:
    """A source whose reads are charged to a budget (an LV read through dissect's streams)."""

    def __init__(self, source: ByteSource, budget: ReadBudget) -> None:
        self._source = source
        self._budget = budget
        self.size = source.size

    def read(self, offset: int, length: int) -> bytes:
        self._budget.charge(length)
        return self._source.read(offset, length)


def _has_data(source: ByteSource, name: str) -> bool:
    """Whether the first MiB of a volume holds anything but zeros."""
    head = read_source(source, 0, 1 << 20, name)
    return head.count(0) != len(head)
