"""A store of restore points: its layout, the write lock, recovery on open, and the read API.

STORE/
  index.sqlite                                  the index (lbstore.index)
  lock                                          flock'ed by the one writer (lbstore.lock)
  last-point-id                                 the highest restore point id ever given
  data/<vm>/<disk>/<restore-point-id>.qcow2     committed files, read-only, relative backing names
  data/<vm>/<disk>/<restore-point-id>.point     its sidecar: metadata + checksums (lbstore.sidecar)
  tmp/<restore-point-id>/<disk>.qcow2           files being written

Opening a store for writing recovers from a crash of the previous writer: a point whose files
and sidecars all reached data/ is committed from its sidecars (its index transaction was lost
or never ran); files of other points that never committed are removed, their index rows
forgotten, tmp/ emptied; committed files are checked to exist (a missing one is reported as an
event, never "repaired" by deleting anything), and committed points without a sidecar (stores
made before sidecars existed) get one. A store whose index is missing, empty or damaged while
data/ holds points, or whose data/ holds points the index does not know, is refused for
writing until `lbrestore check --repair` (lbstore.check) has reconciled them: otherwise a new
point could take an id, and so a file name, that is already used.

Point ids are never reused: a new id is above every id the index ever gave, above every id
named in data/, and above the high-water mark in `last-point-id` (which survives the index).
Writing a restore point lives in lbstore.ingest, reading one in lbstore.view.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lbstore.chain import disk_chain, parse_address, select_point
from lbstore.checksums import (
    CHUNK_CLUSTERS,
    ChecksumChunk,
    DigestLookup,
    decode_row,
    decode_zero_runs,
)
from lbstore.closing import Closing
from lbstore.errors import (
    AddressError,
    IndexDamagedError,
    ReadOnlyStoreError,
    StoreError,
    StoreIntegrityError,
    StoreNeedsRepairError,
    StoreNotFoundError,
    StorePathError,
)
from lbstore.fsutil import fsync_dir, rename_noreplace, replace_durably
from lbstore.index import INDEX_NAME, CommitDisk, Index, MergedDisk, probe_index
from lbstore.lock import PointLock, StoreLock, VmWriteLock, names_a_live_holder, vm_lock_holders
from lbstore.model import DiskRecord, RestorePoint, parse_utc
from lbstore.names import check_disk_name, check_vm_name, is_valid_name
from lbstore.private import (
    PRIVATE_FILE_MODE,
    create_private_file,
    make_private_dir,
    tighten_store,
)
from lbstore.rebuild import RebuildReport, adopt_points, point_names, rebuild_index, scan_data
from lbstore.sidecar import (
    SIDECAR_SUFFIX,
    Sidecar,
    rewrite_sidecar,
    sidecar_path_of_file,
    write_sidecar,
)

if TYPE_CHECKING:  # loaded when first used: `list`, `info` and the like never read or write data
    from lbstore.ingest import Ingest
    from lbstore.view import ChainView

__all__ = ["HIGH_WATER_NAME", "DiskRecord", "RestorePoint", "Store", "fsync_dir"]

HIGH_WATER_NAME = "last-point-id"
LOST_AND_FOUND = "lost+found"
"""Where `check --repair` moves files of data/ that nothing describes (never deleted)."""


@contextlib.contextmanager
def os_errors(root: Path) -> Iterator[None]:
    """Turn an OSError met while looking at the store's folders (a folder at mode 000, a
    store under another user's private folder) into one StorePathError naming the path."""
    try:
        yield
    except OSError as exc:
        where = exc.filename or root
        raise StorePathError(where, exc.strerror or str(exc)) from exc


def _file_problem(path: Path) -> str | None:
    """None for a committed file that is there, else what is wrong with it (for messages)."""
    try:
        return None if path.is_file() else "missing file"
    except OSError as exc:  # e.g. its folder at mode 000
        return f"unreadable ({exc.strerror}):"


def _point_from_rows(row: dict[str, Any], disk_rows: list[dict[str, Any]]) -> RestorePoint:
    disks = tuple(
        DiskRecord(
            name=d["disk"],
            virtual_size=d["virtual_size"],
            cluster_size=d["cluster_size"],
            stored_bytes=d["stored_bytes"],
            file=d["file"],
            backing_point_id=d["backing_point_id"],
            mode=d["mode"],
        )
        for d in disk_rows
    )
    definition = json.loads(row["definition"]) if row["definition"] else None
    return RestorePoint(
        id=row["id"],
        vm=row["vm"],
        created=parse_utc(row["created"]),
        kind=row["kind"],
        disks=disks,
        definition=definition,
    )


class Store(Closing):
    """An opened store. Use `Store.open(path, write=...)` as a context manager."""

    def __init__(
        self, path: Path, index: Index, *, write: bool, lock: StoreLock | VmWriteLock | None
    ) -> None:
        self.path = path
        self.data_dir = path / "data"
        self.tmp_dir = path / "tmp"
        self.write = write
        self._index = index
        self._lock = lock
        self.vm: str | None = None
        """The one VM a writer opened the store for (None: the whole store, or a reader)."""
        self._reader_timeout = 10.0
        self._point_locks: dict[int, PointLock] = {}
        self.finished_merges: list[Any] = []
        """Interrupted merges this writer finished when it opened the store (MergeResult)."""
        self.merge_problem: str | None = None
        """Why an interrupted merge could not be finished on open, if one could not."""
        self._ingest: Ingest | None = None
        self._index_lock = threading.Lock()
        self.problems: list[str] = []
        """Disagreements between index and data/ found when opened (also logged as events)."""
        self.warnings: list[str] = []
        """Things the command should tell the user although it succeeded (one line each)."""
        self.lock_timeout = 10.0
        self.rebuilt: RebuildReport | None = None
        """What `open(repair=True)` rebuilt, when the index was unusable."""
        self.recovery_actions: list[str] = []
        """What recovery did when the store was opened for writing (one line each)."""

    # --- creating and opening -------------------------------------------------------------------

    @classmethod
    def init(cls, path: str | os.PathLike[str]) -> None:
        """Create the store layout and index at `path`: a new or empty folder only.

        A folder that already holds a store (an index or data/, even an emptied index) or any
        other file is refused: a new index over old data would hand out ids already used.
        """
        root = Path(path)
        with os_errors(root):
            if root.exists() and not root.is_dir():
                raise StorePathError(root, "exists and is not a folder")
            entries = {entry.name for entry in root.iterdir()} if root.is_dir() else set()
        if entries & {INDEX_NAME, "data", HIGH_WATER_NAME}:
            raise StorePathError(
                root, "already holds a store (nothing changed; `lbrestore check` examines it)"
            )
        if entries:
            raise StorePathError(root, "folder is not empty and holds no store")
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            for folder in (root, root / "data", root / "tmp"):
                make_private_dir(folder)
            create_private_file(root / "lock")
            create_private_file(root / INDEX_NAME)  # SQLite gives -wal and -shm its mode
            Index.create(root / INDEX_NAME).close()
            tighten_store(root)
            fsync_dir(root)
        except OSError as exc:
            raise StorePathError(root, f"cannot create the store: {exc.strerror or exc}") from exc

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        write: bool = False,
        lock_timeout: float = 10.0,
        purpose: str | None = None,
        vm: str | None = None,
        repair: bool = False,
        readonly_index: bool = False,
    ) -> Store:
        """Open a store; for writing take the lock (waiting up to `lock_timeout`) and recover.

        A writer names the `vm` it writes: it takes that VM's writer lock only (writers of other
        VMs go on meanwhile), recovers only that VM, and may change only that VM. Without `vm`
        a writer takes the whole store (init, check --repair) and recovers everything.

        A writer is refused (StoreNeedsRepairError) while the index and data/ disagree, unless
        `repair` (what `check --repair` does, holding the whole store: it rebuilds an unusable
        index first). `readonly_index` opens a reader's index read-only (`check` records
        nothing)."""
        if repair and (vm is not None or not write):
            raise ValueError("repair needs the whole store opened for writing")
        root = Path(path)
        with os_errors(root):
            if root.exists() and not root.is_dir():
                raise StorePathError(root, "exists and is not a folder")
            if not repair:
                _check_index_usable(root)
        if not write:
            index = _open_index_for_reading(root, readonly=readonly_index)
            store = cls(root, index, write=False, lock=None)
            store._reader_timeout = lock_timeout
            if not readonly_index:  # check (read-only index) reports them itself
                try:
                    with os_errors(root):
                        store._refuse_unknown_points(reading=True)
                except BaseException:
                    store.close()
                    raise
            return store
        lock: StoreLock | VmWriteLock
        if vm is not None:
            lock = VmWriteLock(root, check_vm_name(vm))
            lock.acquire(lock_timeout, purpose)
        else:
            lock = StoreLock(root / "lock")
            lock.acquire(lock_timeout, purpose, holders=lambda: vm_lock_holders(root))
        try:
            if not os.access(root, os.W_OK):
                raise StorePathError(root, "the store folder is not writable")
            rebuilt = None
            if not repair:
                _check_index_usable(root)  # again: it may have changed while we waited
            elif probe_index(root / INDEX_NAME, thorough=True) != "ok":
                rebuilt = rebuild_index(root, _high_water(root))
            index = Index.open(root / INDEX_NAME, readonly=False)
        except (OSError, sqlite3.Error) as exc:
            lock.release()
            raise StorePathError(root, f"cannot open the index for writing: {exc}") from exc
        except BaseException:
            lock.release()
            raise
        store = cls(root, index, write=True, lock=lock)
        store.vm = vm
        store.lock_timeout = lock_timeout
        store.rebuilt = rebuilt
        try:
            store._make_private()
            with os_errors(root):
                store._recover()
            if not repair:
                store._refuse_unknown_points()
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        """Abort an unfinished ingest, checkpoint what was written, close the index, unlock."""
        if self._ingest is not None:
            self._ingest.abort()
        if self.write:
            with contextlib.suppress(sqlite3.Error, StoreError):
                self._index.checkpoint(0.0)  # events written after the last commit; no waiting
        self._index.close()
        for point_lock in self._point_locks.values():
            point_lock.release()
        self._point_locks.clear()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # --- recovery -------------------------------------------------------------------------------

    def _make_private(self) -> None:
        """Take group and other permissions away from a store made before stores were private."""
        try:
            changed = tighten_store(self.path)
        except OSError as exc:
            raise StorePathError(self.path, f"cannot make the store private: {exc}") from exc
        if changed:
            self._index.record_event(
                None, "private", f"removed group/other permissions from {changed} entries"
            )

    def _recover(self) -> None:
        """Remove what uncommitted points left behind, then cross-check index and data/."""
        make_private_dir(self.data_dir)
        make_private_dir(self.tmp_dir)
        if self._lock is not None and self._lock.stale_holder is not None:
            self._index.record_event(
                None,
                "stale-lock",
                f"took over the lock of {self._lock.stale_holder}, which ended without "
                "releasing it",
            )
        leftovers = list(self.tmp_dir.iterdir())  # listed before pending rows are read
        others = {str(r["id"]) for r in self._index.pending_points() if not self._owns(r["vm"])}
        self._recover_pending()
        leftovers = [p for p in leftovers if p.name not in others]
        for leftover in leftovers:
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        if leftovers:  # an fsync of an unchanged folder still costs a journal commit
            fsync_dir(self.tmp_dir)
            self.recovery_actions += [f"removed tmp/{p.name}" for p in leftovers]
        from lbstore.merge import finish_interrupted_merges  # merge builds on this module

        try:
            self.finished_merges = finish_interrupted_merges(self, vm=self.vm)
        except StoreError as exc:  # damage: the point stays marked, check --repair reports it
            self._index.record_event(self.vm, "merge-unfinished", str(exc))
            self.merge_problem = str(exc)
        self.recovery_actions += [
            f"finished the interrupted merge of {r.vm}@#{r.point_id}" for r in self.finished_merges
        ]
        problems = [p for p in self._file_problems() if self._owns(p[0])]
        self.problems = [message for _, message in problems]
        self._log_new_problems(problems)
        self._write_missing_sidecars()

    def _recover_pending(self) -> None:
        """Finish or discard every point begun and never committed.

        Files and sidecars are renamed into data/ only after all are fsynced, and only then is
        the index told; a point whose files and sidecars are all in data/ is therefore whole,
        and it is committed from its sidecars (its transaction was lost, e.g. with the WAL, or
        never ran). Anything less is discarded with its files.
        """
        pending = [r for r in self._index.pending_points() if self._owns(r["vm"])]
        if not pending:
            return  # another VM's pending point may be being written right now: not ours
        scan = scan_data(self.data_dir, only_ids={row["id"] for row in pending})
        for row in pending:
            entry = scan.points.get(row["id"])
            if entry is not None and entry.vm == row["vm"]:
                self._index.forget_pending(row["id"])
                report = RebuildReport()
                adopt_points(self._index, scan, [row["id"]], report)
                if report.recovered:
                    message = (
                        f"committed restore point #{row['id']} from its sidecars "
                        "(its files were complete; the index had not recorded the commit)"
                    )
                    self.recovery_actions.append(message)
                    self._index.record_event(
                        row["vm"],
                        "recovered",
                        message,
                        point_id=row["id"],
                        details={"removed_files": []},
                    )
                    continue
            else:
                self._index.forget_pending(row["id"])
            removed = self._remove_point_files(row["vm"], row["id"])
            self.recovery_actions.append(
                f"discarded uncommitted restore point #{row['id']} ({len(removed)} files)"
            )
            self._index.record_event(
                row["vm"],
                "recovered",
                f"discarded uncommitted restore point #{row['id']}",
                point_id=row["id"],
                details={"removed_files": removed},
            )

    def _owns(self, vm: str) -> bool:
        """True when this writer may recover and change `vm` (its own, or the whole store)."""
        return self.vm is None or vm == self.vm

    def _remove_point_files(self, vm: str, point_id: int) -> list[str]:
        """Delete data/<vm>/*/<id>.{qcow2,point} of an uncommitted point (renamed before a
        crash, incomplete); the index holds no committed row for this id."""
        removed: list[str] = []
        if not is_valid_name(vm) or self._index.committed_point(point_id) is not None:
            return removed
        for suffix in (".qcow2", SIDECAR_SUFFIX):
            for path in sorted((self.data_dir / vm).glob(f"*/{point_id}{suffix}")):
                path.unlink(missing_ok=True)
                fsync_dir(path.parent)
                removed.append(str(path.relative_to(self.data_dir)))
        return removed

    def _refuse_unknown_points(self, *, reading: bool = False) -> None:
        """Refuse a store whose data/ names points the index does not know (a commit lost with
        its WAL, an index restored from an older copy): a writer could reuse their ids, a
        reader would answer without them. StoreNeedsRepairError for writers, IndexDamagedError
        for readers; both name `lbrestore check --repair`."""
        unknown = self._unknown_points()
        if not unknown:
            return
        shown = ", ".join(f"#{i}" for i in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        if reading:
            raise IndexDamagedError(
                self.path / INDEX_NAME,
                f"the index does not know {len(unknown)} restore point(s) that data/ holds "
                f"({shown})",
            )
        raise StoreNeedsRepairError(
            self.path,
            f"data/ holds {len(unknown)} restore point(s) the index does not know ({shown})",
        )

    def _unknown_points(self) -> list[int]:
        """Ids named in data/ that the index has no row (or merge journal entry) for.

        data/ is listed before the index is read: a writer's pending row is committed before
        its files are placed, and a merge's journal row outlives the removed point's rows until
        its files are gone. A merge that ends between the two reads is ruled out by looking
        once more."""
        unknown: list[int] = []
        for _ in range(2):
            names = point_names(self.data_dir)
            known = self._index.point_ids() | self._index.merging_point_ids()
            unknown = sorted(set(names) - known) + self._lost_commits(names)
            if not unknown:
                break
        return sorted(set(unknown))

    def _lost_commits(self, names: dict[int, list[str]]) -> list[int]:
        """Pending points whose sidecars are already in data/ while no writer of their VM is
        alive: their commit was lost (a damaged or lost WAL), not still on its way. (A writer
        places files and sidecars just before it commits, holding its VM's lock.)"""
        if self.write:
            return []  # a writer's recovery commits them from their sidecars
        lost = []
        for row in self._index.pending_points():
            placed = any(n.endswith(SIDECAR_SUFFIX) for n in names.get(row["id"], []))
            if placed and not _writer_alive(self.path, row["vm"]):
                lost.append(row["id"])
        return lost

    def _write_missing_sidecars(self) -> None:
        """Give every committed file without a sidecar one, from the index (older stores)."""
        identity = self._index.identity().get("id")
        disks_of: dict[int, list[dict[str, Any]]] = {}
        for row in self._index.point_disks():
            disks_of.setdefault(row["point_id"], []).append(row)
        for point_id, rows in disks_of.items():
            for row in rows:
                path = sidecar_path_of_file(self.data_dir, row["file"])
                if path.exists() or not (self.data_dir / row["file"]).is_file():
                    continue
                sidecar = self.sidecar_from_index(point_id, row["disk"], identity)
                temporary = self.tmp_dir / f"backfill-{point_id}-{row['disk']}{SIDECAR_SUFFIX}"
                temporary.unlink(missing_ok=True)
                write_sidecar(temporary, sidecar)
                os.chmod(temporary, (self.data_dir / row["file"]).stat().st_mode & 0o777)
                rename_noreplace(temporary, path)
                fsync_dir(path.parent)
                self.recovery_actions.append(
                    f"wrote the missing sidecar of {sidecar.vm}@#{point_id} disk {row['disk']}"
                )

    def sidecar_from_index(self, point_id: int, disk: str, store_id: str | None) -> Sidecar:
        """The sidecar a committed point's disk has according to the index."""
        point = self.point(point_id)
        record = point.disk(disk)
        if record is None:
            raise StoreError(f"{point.vm}@#{point_id} has no disk {disk!r}")
        chunks = tuple(self._index.checksum_rows(point_id, disk))
        return Sidecar(
            store_id=store_id,
            point_id=point_id,
            vm=point.vm,
            created=point.created,
            kind=point.kind,
            definition=point.definition,
            point_disks=tuple(d.name for d in point.disks),
            disk=CommitDisk(
                name=record.name,
                file=record.file,
                backing_point_id=record.backing_point_id,
                mode=record.mode,
                virtual_size=record.virtual_size,
                cluster_size=record.cluster_size,
                stored_bytes=record.stored_bytes,
                checksums=chunks,
                zero_runs=self._index.zero_runs(point_id, disk),
            ),
        )

    def rewrite_sidecars_for_merge(self, merged: Sequence[MergedDisk]) -> None:
        """Before a merge's index transaction: give each successor the sidecars it will have
        after it (its new kind on every disk; new backing, mode, size and checksums on the
        merged disks), each replaced atomically (lbstore.sidecar.rewrite_sidecar). A crash
        leaves old or new sidecars; the merge journal finishes the merge either way."""
        store_id = self.identity().get("id")
        for point_id in sorted({m.point_id for m in merged}):
            point = self.point(point_id)
            changes = {m.name: m for m in merged if m.point_id == point_id}
            kind = next(iter(changes.values())).point_kind
            for record in point.disks:
                old = self.sidecar_from_index(point_id, record.name, store_id)
                disk = old.disk
                change = changes.get(record.name)
                if change is not None:
                    disk = dataclasses.replace(
                        disk,
                        backing_point_id=change.backing_point_id,
                        stored_bytes=change.stored_bytes,
                        mode=change.mode,
                        checksums=change.checksums,
                        zero_runs=change.zero_runs,
                    )
                rewrite_sidecar(self.data_dir, dataclasses.replace(old, kind=kind, disk=disk))

    def remove_sidecar(self, file: str) -> None:
        """After a merge's index transaction: delete the removed point's sidecar of the data
        file `file` (relative to data/); its folder is fsynced by the caller."""
        sidecar_path_of_file(self.data_dir, file).unlink(missing_ok=True)

    # --- point ids and durability ----------------------------------------------------------------

    def high_water(self) -> int:
        """The highest point id ever given in this store, as far as anything on disk says."""
        return _high_water(self.path)

    def reserve_point_id(self, point_id: int) -> None:
        """Record `point_id` as the high-water mark before any file carries it."""
        replace_durably(self.path / HIGH_WATER_NAME, f"{point_id}\n".encode(), PRIVATE_FILE_MODE)

    def make_durable(self) -> None:
        """Checkpoint the index so committed transactions live in the main database file.

        Waits up to the lock timeout for readers on an older snapshot; if they still hold it,
        the commit stays in the WAL (durable there, and in the sidecars) and a warning says so.
        """
        if not self._index.checkpoint(self.lock_timeout):
            self.warnings.append(
                f"{self.path / INDEX_NAME}: a reader kept an old snapshot open for "
                f"{self.lock_timeout:g}s, so the last commit is still only in the WAL file "
                "(its sidecars hold it too; `lbrestore check --repair` restores it if the WAL "
                "is lost)"
            )

    def check_files(self) -> list[str]:
        """Problems between index and data/: committed files missing, unknown .qcow2 files."""
        return [message for _, message in self._file_problems()]

    def _file_problems(self) -> list[tuple[str, str]]:
        """(VM, problem) for every disagreement between the index and data/."""
        known = {row["file"] for row in self._index.point_disks()}
        problems = [
            (f.split("/", 1)[0], f"{problem} data/{f}")
            for f in sorted(known)
            if (problem := _file_problem(self.data_dir / f)) is not None
        ]
        if self.data_dir.is_dir():
            for path in sorted(self.data_dir.glob("*/*/*.qcow2")):
                relative = str(path.relative_to(self.data_dir))
                if relative not in known:
                    problems.append(
                        (
                            relative.split("/", 1)[0],
                            f"unknown file data/{relative} (not in the index; left alone)",
                        )
                    )
        return problems

    def _log_new_problems(self, problems: list[tuple[str, str]]) -> None:
        logged = {e["message"] for e in self._index.events(kind="integrity")}
        for vm, problem in problems:
            if problem not in logged:
                self._index.record_event(vm, "integrity", problem)

    # --- reading --------------------------------------------------------------------------------

    def restore_points(self, vm: str | None = None) -> list[RestorePoint]:
        """Committed restore points (of one VM or all), oldest first."""
        if vm is not None:
            check_vm_name(vm)
        rows = self._index.committed_points(vm)
        disks: dict[int, list[dict[str, Any]]] = {}
        for disk_row in self._index.point_disks([r["id"] for r in rows] if vm else None):
            disks.setdefault(disk_row["point_id"], []).append(disk_row)
        return [_point_from_rows(r, disks.get(r["id"], [])) for r in rows]

    def point(self, point_id: int) -> RestorePoint:
        """The committed restore point with this id."""
        row = self._index.committed_point(point_id)
        if row is None:
            raise StoreError(f"no committed restore point #{point_id}")
        return _point_from_rows(row, self._index.point_disks([point_id]))

    def vms(self) -> list[str]:
        """Names of VMs with committed restore points."""
        return self._index.vm_names()

    def resolve(self, address: str, *, now: datetime | None = None) -> RestorePoint:
        """The restore point a `VM@SPEC` address names; AddressError says what exists."""
        parsed = parse_address(address, now or datetime.now(UTC))
        points = self.restore_points(parsed.vm)
        if not points:
            vms = self.vms()
            known = f"VMs in this store: {', '.join(vms)}" if vms else "the store is empty"
            raise AddressError(address, f"no VM named {parsed.vm!r} has restore points; {known}")
        return select_point(parsed, points)

    def chain(self, point: RestorePoint, disk: str) -> list[RestorePoint]:
        """The points whose files form `disk`'s chain at `point`, top first."""
        by_id = {p.id: p for p in self.restore_points(point.vm)}
        try:
            ids = disk_chain(point, disk, by_id)
        except KeyError as exc:
            raise StoreError(f"{point.vm}@#{point.id}: {exc.args[0]}") from None
        return [by_id[i] for i in ids]

    def file_path(self, point: RestorePoint, disk: str) -> Path:
        """Absolute path of the file that `point` stores for `disk`."""
        record = point.disk(disk)
        if record is None:
            names = ", ".join(d.name for d in point.disks) or "none"
            raise StoreError(f"{point.vm}@#{point.id} has no disk {disk!r} (disks: {names})")
        parts = record.file.split("/")
        if (
            len(parts) != 3
            or parts[:2] != [point.vm, disk]
            or not parts[2].endswith(".qcow2")
            or not is_valid_name(parts[2])
        ):  # an index naming a file elsewhere is refused before that name becomes a path
            raise StoreIntegrityError(
                f"data/{record.file}",
                f"the index names a file outside data/{point.vm}/{disk}/ for "
                f"{point.vm}@#{point.id}: refused",
            )
        return self.data_dir / record.file

    def view(self, point: RestorePoint, disk: str) -> ChainView:
        """A read view of `disk` at `point` across its chain (close it, or use `with`).

        A reader holds the point's reader lock from its first view until the store closes, so
        a merge never changes the bytes it reads (lbstore.lock); a point being merged away
        cannot be opened."""
        self.file_path(point, disk)
        if not self.write:
            self._hold_point(point)
        layers = [(p.id, self.file_path(p, disk)) for p in self.chain(point, disk)]
        with os_errors(self.path):  # a folder of data/ at mode 000: one line, not a traceback
            for _, path in layers:
                if not path.is_file():
                    raise StoreIntegrityError(
                        path, "a file of this restore point's chain is missing"
                    )
        from lbstore.view import ChainView

        return ChainView.open(layers)

    def _hold_point(self, point: RestorePoint) -> None:
        """Take the reader lock of `point`, then make sure no merge is removing it."""
        if point.id in self._point_locks:
            return
        point_lock = PointLock(self.path, point.id)
        if not point_lock.acquire_shared(self._reader_timeout):
            return  # a read-only store: nothing can merge it
        self._point_locks[point.id] = point_lock
        with self._index_lock:
            gone = (
                point.id in self._index.merging_point_ids()
                or self._index.committed_point(point.id) is None
            )
        if gone:
            point_lock.release()
            del self._point_locks[point.id]
            raise StoreError(
                f"{point.vm}@#{point.id} is being merged away; open another restore point"
            )

    def stored_clusters(
        self, point: RestorePoint, disk: str, first: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, bytes]]:
        """(guest cluster index, digest) of every cluster the index lists as stored in the
        point's own file (within clusters [first, stop) when given), in guest order."""
        check_disk_name(disk)
        self.file_path(point, disk)
        if first == 0 and stop is None:
            with self._index_lock:
                rows = self._index.checksum_rows(point.id, disk)
            where = f"{point.vm}@#{point.id} disk {disk}"
            for row in rows:
                yield from decode_row(row, where).clusters()
            return
        record = point.disk(disk)
        assert record is not None
        end = stop if stop is not None else -(-record.virtual_size // record.cluster_size)
        for chunk in range(first // CHUNK_CLUSTERS, -(-end // CHUNK_CLUSTERS)):
            decoded = self.checksum_chunk(point.id, disk, chunk)
            if decoded is None:
                continue
            for cluster, digest in decoded.clusters():
                if cluster >= end:
                    break
                if cluster >= first:
                    yield cluster, digest

    def checksum_chunk(self, point_id: int, disk: str, chunk: int) -> ChecksumChunk | None:
        """One chunk of the digests stored for `point_id`'s own file of `disk` (decoded and
        checked: an unknown algorithm or a damaged row raises ChecksumRowError), or None when
        the file stores no cluster in that chunk. Safe to call from any thread."""
        with self._index_lock:
            row = self._index.checksum_row(point_id, disk, chunk)
        return None if row is None else decode_row(row, f"#{point_id} disk {disk}")

    def zero_runs(self, point_id: int, disk: str) -> tuple[tuple[int, int], ...] | None:
        """The zero clusters `point_id`'s own file of `disk` stores, as sorted (first, count)
        runs (decoded and checked), or None when they were not recorded (a point committed
        before they were). Safe to call from any thread."""
        with self._index_lock:
            blob = self._index.zero_runs(point_id, disk)
        return None if blob is None else decode_zero_runs(blob, f"#{point_id} disk {disk}")

    def digest_lookup(self, disk: str, *, cached_chunks: int = 64) -> DigestLookup:
        """Digests of `disk`'s stored clusters by (point id, guest cluster), cached by chunk
        (one lookup per view or walk; usable from any one thread at a time)."""
        check_disk_name(disk)
        return DigestLookup(
            lambda point_id, chunk: self.checksum_chunk(point_id, disk, chunk),
            cached_chunks=cached_chunks,
        )

    def checksum_state(self, point: RestorePoint, disk: str) -> dict[str, int]:
        """How many clusters of the point's own file have checksums (and what the index pays)."""
        return self._index.checksum_state(point.id, disk)

    def events(self, vm: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        """The event log, oldest first."""
        return self._index.events(vm, kind)

    def identity(self) -> dict[str, str]:
        """The store's id and creation time."""
        return self._index.identity()

    def index_rows(self) -> dict[str, int]:
        """Rows per index table."""
        return self._index.row_counts()

    # --- writing --------------------------------------------------------------------------------

    def record_event(self, vm: str | None, kind: str, message: str, **details: Any) -> None:
        """Append an event to the store's log (needs a writable index)."""
        if self._index.readonly:
            raise ReadOnlyStoreError("recording an event")
        point_id = details.pop("point_id", None)
        with self._index_lock:  # a mount reports damage from its FUSE threads
            self._index.record_event(vm, kind, message, point_id=point_id, details=details)

    def begin(
        self,
        vm: str,
        *,
        created: datetime | None = None,
        definition: dict[str, Any] | None = None,
    ) -> Ingest:
        """Start writing a restore point of `vm` (write mode only; one at a time)."""
        if not self.write:
            raise ReadOnlyStoreError("writing a restore point")
        if self._ingest is not None:
            raise StoreError("another restore point is being written in this store session")
        self.require_vm(vm)
        from lbstore.ingest import Ingest

        self._ingest = Ingest.begin(self, check_vm_name(vm), created, definition)
        return self._ingest

    def require_vm(self, vm: str) -> None:
        """Refuse a change to `vm` by a writer that holds another VM's lock only."""
        if not self.write:
            raise ReadOnlyStoreError(f"changing {vm}")
        if self.vm is not None and vm != self.vm:
            raise StoreError(f"this writer holds the lock of {self.vm}, not of {vm}")

    def _ingest_finished(self, ingest: Ingest) -> None:
        if self._ingest is ingest:
            self._ingest = None

    @property
    def index(self) -> Index:
        """The index (for lbstore's own modules: ingest, verify, merge)."""
        return self._index


def _writer_alive(root: Path, vm: str) -> bool:
    """True when the store's lock file or `vm`'s writer lock file names a live process."""
    return names_a_live_holder((root / "lock", root / "locks" / f"vm-{vm}.lock"))


def _high_water(root: Path) -> int:
    """The highest point id named by last-point-id, data/, lost+found/ or tmp/ (0 for none)."""
    try:
        text = (root / HIGH_WATER_NAME).read_text().strip()
        recorded = int(text) if text.isdigit() else 0
    except FileNotFoundError:
        recorded = 0
    except OSError as exc:
        raise StorePathError(root, f"cannot read {HIGH_WATER_NAME}: {exc}") from exc
    seen = [recorded, *point_names(root / "data"), *point_names(root / LOST_AND_FOUND)]
    if (root / "tmp").is_dir():
        seen += [int(p.name) for p in (root / "tmp").iterdir() if p.name.isdigit()]
    return max(seen)


def _check_index_usable(root: Path) -> None:
    """Refuse a store whose index is missing, empty or unreadable while data/ holds points.

    Without this, a writer would create a fresh index over old data (ids from 1 again, so file
    names already used) and readers would say "no restore points" about a full store.
    """
    path = root / INDEX_NAME
    state = probe_index(path)
    if state == "ok":
        return
    holds_points = bool(point_names(root / "data"))
    if state == "missing":
        if holds_points:
            raise IndexDamagedError(path, "the index is missing while data/ holds restore points")
        raise StoreNotFoundError(root)
    if state == "damaged":
        raise IndexDamagedError(path, "the index is damaged (not readable as SQLite)")
    if holds_points:
        raise IndexDamagedError(path, "the index is empty while data/ holds restore points")


def _open_index_for_reading(root: Path, *, readonly: bool = False) -> Index:
    """A reader's index: read-write connection when possible (events), else read-only.

    A WAL database on a read-only filesystem cannot be opened normally once its -shm file is gone,
    so there it is opened as immutable: nothing can change it anyway.
    """
    path = root / INDEX_NAME
    try:
        if readonly and os.access(root, os.W_OK):
            index = Index.open(path, readonly=True)
        elif os.access(root, os.W_OK):
            index = Index.open(path, readonly=False, migrate=False)
        else:
            index = Index.open(path, readonly=True, immutable=True)
        if not index.schema_is_current():
            index.close()
            raise StoreError(f"{root}: the index needs an upgrade; open the store for writing once")
        return index
    except sqlite3.Error as exc:
        raise StorePathError(root, f"cannot read the index: {exc}") from exc
    except OSError as exc:
        if exc.errno == errno.EACCES:
            raise StorePathError(root, "permission denied") from exc
        raise
