"""A store of restore points: its layout, the write lock, recovery on open, and the read API.

STORE/
  index.sqlite                                  the index (lbstore.index)
  lock                                          flock'ed by the one writer (lbstore.lock)
  data/<vm>/<disk>/<restore-point-id>.qcow2     committed files, read-only, relative backing names
  tmp/<restore-point-id>/<disk>.qcow2           files being written

Opening a store for writing recovers from a crash of the previous writer: files of points that
never committed are removed, their index rows forgotten, tmp/ emptied, and committed files are
checked to exist (a missing one is reported as an event, never "repaired" by deleting anything).
Writing a restore point lives in lbstore.ingest, reading one in lbstore.view.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lbstore.chain import disk_chain, parse_address, select_point
from lbstore.checksums import CHUNK_CLUSTERS, ChecksumChunk, DigestLookup, decode_row
from lbstore.closing import Closing
from lbstore.errors import (
    AddressError,
    ReadOnlyStoreError,
    StoreError,
    StoreIntegrityError,
    StoreNotFoundError,
    StorePathError,
)
from lbstore.index import INDEX_NAME, Index
from lbstore.lock import PointLock, StoreLock, VmWriteLock, vm_lock_holders
from lbstore.model import DiskRecord, RestorePoint, parse_utc
from lbstore.names import check_disk_name, check_vm_name, is_valid_name
from lbstore.private import create_private_file, make_private_dir, tighten_store

if TYPE_CHECKING:  # loaded when first used: `list`, `info` and the like never read or write data
    from lbstore.ingest import Ingest
    from lbstore.view import ChainView

__all__ = ["DiskRecord", "RestorePoint", "Store"]


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (renames, creations, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

    # --- creating and opening -------------------------------------------------------------------

    @classmethod
    def init(cls, path: str | os.PathLike[str]) -> None:
        """Create the store layout and index at `path` (idempotent for an existing store)."""
        root = Path(path)
        with os_errors(root):
            if root.exists() and not root.is_dir():
                raise StorePathError(root, "exists and is not a folder")
            if root.is_dir() and not (root / INDEX_NAME).exists() and any(root.iterdir()):
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
    ) -> Store:
        """Open a store; for writing take the lock (waiting up to `lock_timeout`) and recover.

        A writer names the `vm` it writes: it takes that VM's writer lock only (writers of other
        VMs go on meanwhile), recovers only that VM, and may change only that VM. Without `vm`
        a writer takes the whole store (init, check --repair) and recovers everything."""
        root = Path(path)
        with os_errors(root):
            if root.exists() and not root.is_dir():
                raise StorePathError(root, "exists and is not a folder")
            if not (root / INDEX_NAME).is_file():
                raise StoreNotFoundError(root)
        if not write:
            store = cls(root, _open_index_for_reading(root), write=False, lock=None)
            store._reader_timeout = lock_timeout
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
            index = Index.open(root / INDEX_NAME, readonly=False)
        except (OSError, sqlite3.Error) as exc:
            lock.release()
            raise StorePathError(root, f"cannot open the index for writing: {exc}") from exc
        except BaseException:
            lock.release()
            raise
        store = cls(root, index, write=True, lock=lock)
        store.vm = vm
        try:
            store._make_private()
            with os_errors(root):
                store._recover()
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        """Abort an unfinished ingest, close the index, drop the lock."""
        if self._ingest is not None:
            self._ingest.abort()
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
        for row in self._index.pending_points():
            if not self._owns(row["vm"]):
                continue  # another VM's writer may be writing it right now
            removed = self._remove_point_files(row["vm"], row["id"])
            self._index.forget_pending(row["id"])
            self._index.record_event(
                row["vm"],
                "recovered",
                f"discarded uncommitted restore point #{row['id']}",
                point_id=row["id"],
                details={"removed_files": removed},
            )
        leftovers = [p for p in leftovers if p.name not in others]
        for leftover in leftovers:
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        if leftovers:  # an fsync of an unchanged folder still costs a journal commit
            fsync_dir(self.tmp_dir)
        from lbstore.merge import finish_interrupted_merges  # merge builds on this module

        try:
            self.finished_merges = finish_interrupted_merges(self, vm=self.vm)
        except StoreError as exc:  # damage: the point stays marked, check --repair reports it
            self._index.record_event(self.vm, "merge-unfinished", str(exc))
            self.merge_problem = str(exc)
        problems = [p for p in self._file_problems() if self._owns(p[0])]
        self.problems = [message for _, message in problems]
        self._log_new_problems(problems)

    def _owns(self, vm: str) -> bool:
        """True when this writer may recover and change `vm` (its own, or the whole store)."""
        return self.vm is None or vm == self.vm

    def _remove_point_files(self, vm: str, point_id: int) -> list[str]:
        """Delete data/<vm>/*/<id>.qcow2 of an uncommitted point (renamed before a crash)."""
        removed: list[str] = []
        if not is_valid_name(vm):
            return removed
        for path in sorted((self.data_dir / vm).glob(f"*/{point_id}.qcow2")):
            path.unlink(missing_ok=True)
            fsync_dir(path.parent)
            removed.append(str(path.relative_to(self.data_dir)))
        return removed

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


def _open_index_for_reading(root: Path) -> Index:
    """A reader's index: read-write connection when possible (events), else immutable read-only.

    A WAL database on a read-only filesystem cannot be opened normally once its -shm file is gone,
    so there it is opened as immutable: nothing can change it anyway.
    """
    path = root / INDEX_NAME
    try:
        if os.access(root, os.W_OK):
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
