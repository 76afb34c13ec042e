"""Rebuild the index from data/ and the sidecars: what makes a lost index survivable.

Every committed file `data/<vm>/<disk>/<id>.qcow2` has a sidecar `<id>.point` beside it
(lbstore.sidecar) that holds the point's metadata and the file's checksums. `scan_data` reads
them all; a point can be recovered when every disk its sidecars name has an intact sidecar and
a file whose qcow2 header agrees with it (virtual size, cluster size, backing name), and its
backing point is recovered too. `rebuild_index` moves a missing, empty or damaged index aside
(never deleting it) and builds a new one from the recoverable points, keeping their ids, the
store's identity and every id ever used; `adopt_points` adds recoverable points that an
otherwise readable index does not know (a commit lost with the WAL). Both say what they could
not recover and why; files they cannot place are left where they are.
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from lbstore.errors import Qcow2Error, StoreError
from lbstore.index import INDEX_NAME, CommitRecord, Index
from lbstore.names import is_valid_name
from lbstore.private import create_private_file
from lbstore.sidecar import SIDECAR_SUFFIX, Sidecar, SidecarError, read_sidecar

if TYPE_CHECKING:
    from lbstore.qcow2.reader import Qcow2Image

_POINT_FILE = re.compile(r"^([1-9][0-9]{0,18})\.(qcow2|point)$")


@dataclass
class PointFiles:
    """What data/ holds for one point id: per disk, its file and its sidecar (or the error)."""

    point_id: int
    vm: str
    files: dict[str, Path] = field(default_factory=dict)
    sidecars: dict[str, Sidecar] = field(default_factory=dict)
    bad_sidecars: dict[str, str] = field(default_factory=dict)
    sidecar_paths: dict[str, Path] = field(default_factory=dict)


@dataclass
class DataScan:
    """Everything found under data/: points by id, and entries that are not point files."""

    points: dict[int, PointFiles] = field(default_factory=dict)
    strays: list[Path] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)

    @property
    def max_id(self) -> int:
        """The highest point id named by any file in data/ (0 for none)."""
        return max(self.points, default=0)


def _entries(data_dir: Path) -> Iterator[tuple[str, str, Path]]:
    """(vm, disk, path) of everything at data/<vm>/<disk>/<name>; misplaced entries get
    empty vm or disk names."""
    if not data_dir.is_dir():
        return
    for vm_dir in sorted(data_dir.iterdir()):
        if not (vm_dir.is_dir() and not vm_dir.is_symlink() and is_valid_name(vm_dir.name)):
            yield "", "", vm_dir
            continue
        for disk_dir in sorted(vm_dir.iterdir()):
            usable = disk_dir.is_dir() and not disk_dir.is_symlink()
            if not (usable and is_valid_name(disk_dir.name)):
                yield vm_dir.name, "", disk_dir
            else:
                for path in sorted(disk_dir.iterdir()):
                    yield vm_dir.name, disk_dir.name, path


def point_names(data_dir: Path) -> dict[int, list[str]]:
    """Point id -> files (`vm/disk/7.qcow2`, `vm/disk/7.point`) named in data/, by name only
    (cheap: no file is read; every writer's open runs this)."""
    names: dict[int, list[str]] = {}
    for vm, disk, path in _entries(data_dir):
        match = _POINT_FILE.match(path.name)
        if disk and match is not None:
            names.setdefault(int(match.group(1)), []).append(f"{vm}/{disk}/{path.name}")
    return names


def scan_data(data_dir: Path, only_ids: set[int] | None = None) -> DataScan:
    """Walk data/<vm>/<disk>/ and read every sidecar (corrupt ones are recorded, not raised);
    with `only_ids`, only the files of those points are looked at."""
    scan = DataScan()
    for vm, disk, path in _entries(data_dir):
        if not disk:
            scan.strays.append(path)
            continue
        match = _POINT_FILE.match(path.name)
        if only_ids is not None and (match is None or int(match.group(1)) not in only_ids):
            continue
        _scan_entry(scan, vm, disk, path)
    return scan


def _scan_entry(scan: DataScan, vm: str, disk: str, path: Path) -> None:
    match = _POINT_FILE.match(path.name)
    if match is None or not path.is_file() or path.is_symlink():
        scan.strays.append(path)
        return
    point_id = int(match.group(1))
    entry = scan.points.setdefault(point_id, PointFiles(point_id, vm))
    if entry.vm != vm:  # one id under two VMs: never ours; keep both out of any rebuild
        scan.duplicates.append(f"point id {point_id} appears under {entry.vm} and {vm}")
        scan.strays.append(path)
        return
    if match.group(2) == "qcow2":
        entry.files[disk] = path
        return
    entry.sidecar_paths[disk] = path
    try:
        sidecar = read_sidecar(path)
    except SidecarError as exc:
        entry.bad_sidecars[disk] = exc.problem
        return
    if (sidecar.point_id, sidecar.vm, sidecar.disk.name) != (point_id, vm, disk):
        entry.bad_sidecars[disk] = "describes another point or disk than its name says"
        return
    entry.sidecars[disk] = sidecar


def point_record(
    entry: PointFiles, known_disks: set[tuple[int, str]]
) -> tuple[CommitRecord, datetime] | str:
    """The index record of a point found in data/, or why it cannot be recovered.

    `known_disks` holds (point id, disk) of files already in the index or recovered, so a
    point whose backing file is not is refused (its chain would be broken).
    """
    if entry.bad_sidecars:
        bad_disk, reason = sorted(entry.bad_sidecars.items())[0]
        return f"sidecar of disk {bad_disk} is unusable: {reason}"
    if not entry.sidecars:
        return "no sidecar (nothing says what the file is)"
    first = next(iter(entry.sidecars.values()))
    expected = set(first.point_disks)
    if set(entry.sidecars) != expected:
        missing = sorted(expected - set(entry.sidecars))
        extra = sorted(set(entry.sidecars) - expected)
        return f"sidecars do not match the point's disks (missing {missing}, extra {extra})"
    for disk, sidecar in sorted(entry.sidecars.items()):
        problem = _disk_problem(entry, disk, sidecar, first, known_disks)
        if problem is not None:
            return f"disk {disk}: {problem}"
    record = CommitRecord(
        point_id=entry.point_id,
        vm=entry.vm,
        kind=first.kind,
        definition=first.definition,
        disks=tuple(entry.sidecars[d].disk for d in sorted(entry.sidecars)),
    )
    return record, first.created


def _disk_problem(
    entry: PointFiles,
    disk: str,
    sidecar: Sidecar,
    first: Sidecar,
    known_disks: set[tuple[int, str]],
) -> str | None:
    """Why one disk of a point found in data/ cannot be recovered, or None."""
    if (sidecar.created, sidecar.kind, sidecar.point_disks) != (
        first.created,
        first.kind,
        first.point_disks,
    ):
        return "its sidecar disagrees with the point's other sidecars"
    path = entry.files.get(disk)
    if path is None:
        return "the data file is missing"
    if sidecar.disk.file != f"{entry.vm}/{disk}/{entry.point_id}.qcow2":
        return f"the sidecar names another file ({sidecar.disk.file})"
    backing = sidecar.disk.backing_point_id
    if backing is not None and (backing, disk) not in known_disks:
        return f"its backing point #{backing} is not recovered"
    return header_problem(path, sidecar.disk.virtual_size, sidecar.disk.cluster_size, backing)


def header_problem(
    path: Path, virtual_size: int, cluster_size: int, backing_point_id: int | None
) -> str | None:
    """Why a data file's qcow2 header disagrees with its record, or None when it agrees."""
    from lbstore.qcow2.reader import Qcow2Image  # the data path: not loaded by `list`

    try:
        with Qcow2Image.open(path, backing=False) as image:
            return image_header_problem(image, virtual_size, cluster_size, backing_point_id)
    except Qcow2Error as exc:
        return f"the data file cannot be opened: {exc.problem}"
    except OSError as exc:
        return f"the data file cannot be read: {exc.strerror or exc}"


def image_header_problem(
    image: Qcow2Image, virtual_size: int, cluster_size: int, backing_point_id: int | None
) -> str | None:
    """Why an opened file's header disagrees with its record (backing file named relatively
    as `<backing id>.qcow2`, format qcow2, sizes), or None."""
    expected = None if backing_point_id is None else f"{backing_point_id}.qcow2"
    if image.backing_file != expected:
        return f"backing file {image.backing_file!r}, expected {expected!r}"
    if expected is not None and image.backing_format != "qcow2":
        return f"backing format {image.backing_format!r}, expected 'qcow2'"
    if image.virtual_size != virtual_size:
        return f"virtual size {image.virtual_size}, expected {virtual_size}"
    if image.cluster_size != cluster_size:
        return f"cluster size {image.cluster_size}, expected {cluster_size}"
    return None


@dataclass
class RebuildReport:
    """What a rebuild or adoption recovered, and what it could not (with reasons)."""

    recovered: list[CommitRecord] = field(default_factory=list)
    not_recovered: dict[int, str] = field(default_factory=dict)
    moved_aside: list[str] = field(default_factory=list)

    @property
    def vms(self) -> list[str]:
        """VMs with recovered points."""
        return sorted({r.vm for r in self.recovered})

    @property
    def disk_count(self) -> int:
        """Disks (VM, disk name) with recovered points."""
        return len({(r.vm, d.name) for r in self.recovered for d in r.disks})

    def summary(self) -> str:
        """One line: points, VMs, disks recovered, and how many points were not."""
        text = (
            f"recovered {len(self.recovered)} restore points of {len(self.vms)} VMs "
            f"({self.disk_count} disks)"
        )
        if self.not_recovered:
            text += f"; could not recover {len(self.not_recovered)}"
        return text


def adopt_points(index: Index, scan: DataScan, point_ids: list[int], report: RebuildReport) -> None:
    """Insert the points `point_ids` found in data/ into `index`, oldest id first.

    A point is inserted only when `point_record` accepts it; its backing point must be in the
    index already or adopted before it.
    """
    known = {(row["point_id"], row["disk"]) for row in index.point_disks()}
    for point_id in sorted(point_ids):
        result = point_record(scan.points[point_id], known)
        if isinstance(result, str):
            report.not_recovered[point_id] = result
            continue
        record, created = result
        index.insert_committed_point(record, created)
        known.update((record.point_id, d.name) for d in record.disks)
        report.recovered.append(record)


def rebuild_index(root: Path, high_water: int) -> RebuildReport:
    """Replace STORE/index.sqlite by one built from data/ and the sidecars.

    The old index (and its -wal/-shm) is renamed to `index.sqlite.broken-<time>`, never deleted.
    The store keeps its identity (the store id most sidecars name) and the new index's id
    sequence starts above `high_water` and every id in data/, so no id is ever given twice.
    Call it with every lock of the store held.
    """
    data_dir = root / "data"
    scan = scan_data(data_dir)
    report = RebuildReport()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    for suffix in ("", "-wal", "-shm"):
        old = root / f"{INDEX_NAME}{suffix}"
        if old.exists():
            aside = root / f"{INDEX_NAME}.broken-{stamp}{suffix}"
            os.rename(old, aside)
            report.moved_aside.append(aside.name)
    try:
        create_private_file(root / INDEX_NAME, exclusive=True)  # SQLite gives -wal its mode
        index = Index.create(root / INDEX_NAME)
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"{root}: cannot create a new index: {exc}") from exc
    try:
        store_ids = Counter(
            s.store_id for p in scan.points.values() for s in p.sidecars.values() if s.store_id
        )
        if store_ids:
            index.set_identity(store_ids.most_common(1)[0][0])
        with index.batch():  # one transaction (one fsync), not one per point
            adopt_points(index, scan, list(scan.points), report)
        top = max(high_water, scan.max_id)
        if top > index.max_point_id():
            index.raise_id_sequence(top)
        index.record_event(
            None,
            "rebuilt",
            f"index rebuilt from data/: {report.summary()}",
            details={
                "not_recovered": report.not_recovered,
                "old_index": report.moved_aside,
            },
        )
        index.checkpoint(10.0)
    finally:
        index.close()
    return report


__all__ = [
    "SIDECAR_SUFFIX",
    "DataScan",
    "PointFiles",
    "RebuildReport",
    "adopt_points",
    "header_problem",
    "image_header_problem",
    "point_names",
    "point_record",
    "rebuild_index",
    "scan_data",
]
