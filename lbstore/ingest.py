"""Writing one restore point: all disks of a VM from one instant, committed atomically.

`Store.begin(vm)` inserts a pending row (it gives the point its id), each disk is streamed into
`tmp/<id>/<disk>.qcow2` (an overlay whose backing file is that disk's previous point, named
relatively as `<previous id>.qcow2`), and `commit()` does: close and fsync every file, rename
each into `data/<vm>/<disk>/<id>.qcow2`, fsync the directories, then mark the point committed in
one index transaction. A crash before that transaction leaves a pending row, which the next
writer's recovery removes with its files.

Every stored cluster gets its digest (lbstore.checksums: the one digest rule), computed while
writing or handed in by the caller that computed it on another core. Zero clusters are
recognised by that digest and stored as zero clusters (or not at all in a full file), so they
need no data checksum.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from lbstore.checksums import (
    DigestCollector,
    DigestLookup,
    cluster_digests,
    encode_zero_runs,
    zero_digest,
)
from lbstore.errors import (
    IngestError,
    Qcow2Error,
    Qcow2WriteError,
    StoreError,
    StoreIntegrityError,
    StoreSpaceError,
)
from lbstore.fsutil import fsync_dir, rename_noreplace
from lbstore.index import CommitDisk, CommitRecord
from lbstore.integrity import check_chain, file_zero_runs
from lbstore.model import COMPARING_MODES, DISK_MODES, RestorePoint, as_utc, parse_utc
from lbstore.names import check_disk_name
from lbstore.private import COMMITTED_FILE_MODE, PRIVATE_DIR_MODE
from lbstore.qcow2.reader import Qcow2Image
from lbstore.qcow2.writer import Qcow2Writer
from lbstore.sidecar import SIDECAR_SUFFIX, Sidecar, write_sidecar
from lbstore.view import ChainView

if TYPE_CHECKING:
    from lbstore.store import Store

_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _is_space_error(exc: BaseException) -> bool:
    code = getattr(exc, "errno", None)
    return code in _SPACE_ERRNOS


def _point_kind(modes: list[str]) -> str:
    """full when every disk is full; resync when any disk was resynced; else incremental
    (compare, the checksum-compared incremental of import, counts as incremental)."""
    if all(m == "full" for m in modes):
        return "full"
    if "resync" in modes:
        return "resync"
    return "incremental"


MAX_FUTURE = timedelta(minutes=5)
"""How far ahead of this host's clock an explicit restore point time may be (clock skew)."""


def _point_time(vm: str, created: datetime | None, latest_text: str | None) -> datetime:
    """The new point's time: `created`, or now. Points of a VM are in time order, so an
    explicit time older than the newest point is refused, and so is one in the future (it
    would block every later backup); an implicit "now" behind the newest point (the clock was
    set back) is moved up to it instead of failing a backup."""
    now = datetime.now(UTC)
    latest = parse_utc(latest_text) if latest_text is not None else None
    if created is None:
        return max(now, latest) if latest is not None else now
    moment = as_utc(created)
    if moment > now + MAX_FUTURE:
        raise IngestError(vm, f"the restore point time {moment.isoformat()} is in the future")
    if latest is not None and moment < latest:
        raise IngestError(
            vm,
            f"a restore point cannot be older than the VM's newest one ({latest.isoformat()}); "
            f"asked for {moment.isoformat()}",
        )
    return moment


class DiskIngest:
    """One disk of a restore point being written. Feed it cluster-aligned runs in any order."""

    def __init__(
        self,
        ingest: Ingest,
        name: str,
        writer: Qcow2Writer,
        *,
        virtual_size: int,
        cluster_size: int,
        mode: str,
        backing_point_id: int | None,
        previous: ChainView | None,
        lookup: DigestLookup | None,
    ) -> None:
        self.name = name
        self.mode = mode
        self.virtual_size = virtual_size
        self.cluster_size = cluster_size
        self.backing_point_id = backing_point_id
        self._ingest = ingest
        self._writer = writer
        self._previous = previous
        self._lookup = lookup
        self._digests = DigestCollector()
        self._zero_digest = zero_digest(self.cluster_size)
        self.received_bytes = 0
        self.reason: str | None = None
        """Why `mode` is not the mode the caller asked for (None when it is)."""

    @property
    def stored_bytes(self) -> int:
        """Data bytes stored in this disk's new file so far."""
        return self._writer.stored_bytes

    def _check_run(self, offset: int, length: int, what: str) -> None:
        end = offset + length
        if offset < 0 or length < 0 or end > self.virtual_size:
            raise IngestError(
                self._ingest.vm,
                f"disk {self.name}: {what} [{offset}, {end}) is outside the disk "
                f"({self.virtual_size} bytes)",
            )
        if offset % self.cluster_size or (length % self.cluster_size and end != self.virtual_size):
            raise IngestError(
                self._ingest.vm,
                f"disk {self.name}: {what} [{offset}, {end}) is not aligned to the cluster "
                f"size {self.cluster_size}",
            )

    def write(
        self,
        offset: int,
        data: bytes | bytearray | memoryview,
        *,
        digests: Sequence[bytes] | None = None,
    ) -> None:
        """Store guest data at `offset` (cluster-aligned; whole clusters or up to the disk end).

        `digests`, when given, are the clusters' digests from `checksums.cluster_digests()`,
        computed by the caller elsewhere (e.g. in a read-ahead thread, overlapping the writes).
        """
        view = memoryview(data).cast("B")
        self._check_run(offset, len(view), "write")
        if digests is None:
            digests = cluster_digests(view, self.cluster_size)
        elif len(digests) != (len(view) + self.cluster_size - 1) // self.cluster_size:
            raise IngestError(self._ingest.vm, f"disk {self.name}: one digest per cluster needed")
        self.received_bytes += len(view)
        known = digests
        self._ingest._guard(lambda: self._write_clusters(offset, view, known))

    def zero(self, offset: int, length: int) -> None:
        """Record that `[offset, offset + length)` reads as zeros (cluster-aligned)."""
        self._check_run(offset, length, "zero")
        self.received_bytes += length
        self._ingest._guard(lambda: self._zero_clusters(offset, length))

    def _write_clusters(self, offset: int, view: memoryview, digests: Sequence[bytes]) -> None:
        size = self.cluster_size
        first = offset // size
        pending_start: int | None = None  # first cluster (relative) of a run of data to store
        for i, digest in enumerate(digests):
            store = self._decide(first + i, digest)
            if store == "data":
                self._digests.add(first + i, digest)
                if pending_start is None:
                    pending_start = i
                continue
            if pending_start is not None:
                self._writer.write(
                    (first + pending_start) * size, view[pending_start * size : i * size]
                )
                pending_start = None
            if store == "zero":
                self._writer.write_zeroes((first + i) * size, min(size, len(view) - i * size))
        if pending_start is not None:
            self._writer.write((first + pending_start) * size, view[pending_start * size :])

    def _decide(self, cluster: int, digest: bytes) -> str:
        """'data', 'zero' or 'skip' for one incoming cluster with this digest."""
        is_zero = digest == self._zero_digest
        if self.mode == "full":
            return "skip" if is_zero else "data"
        if self.mode in COMPARING_MODES and self._previous_digest(cluster) == digest:
            return "skip"
        return "zero" if is_zero else "data"

    def _previous_digest(self, cluster: int) -> bytes | None:
        """The digest of `cluster` in the previous point's view (None when unknown)."""
        assert self._previous is not None and self._lookup is not None
        offset = cluster * self.cluster_size
        if offset >= self._previous.virtual_size:
            return self._zero_digest  # the disk grew: past a backing file's end reads zeros
        point_id = self._previous.source_of(offset)
        if point_id is None:
            return self._zero_digest
        return self._lookup.digest(point_id, cluster)

    def _zero_clusters(self, offset: int, length: int) -> None:
        if self.mode == "full" or length == 0:
            return
        if self.mode == "incremental":
            self._writer.write_zeroes(offset, length)
            return
        size = self.cluster_size
        first, count = offset // size, (length + size - 1) // size
        run_start: int | None = None
        for cluster in range(first, first + count + 1):
            needs = cluster < first + count and self._previous_digest(cluster) != self._zero_digest
            if needs and run_start is None:
                run_start = cluster
            elif not needs and run_start is not None:
                end = min(cluster * size, offset + length)
                self._writer.write_zeroes(run_start * size, end - run_start * size)
                run_start = None

    def _close(self) -> None:
        self._writer.close()

    def _abort(self) -> None:
        with contextlib.suppress(Qcow2Error):  # recovery removes tmp/ leftovers on next open
            self._writer.abort()
        if self._previous is not None:
            self._previous.close()
            self._previous = None

    def _commit_record(self, file: str) -> CommitDisk:
        return CommitDisk(
            name=self.name,
            file=file,
            backing_point_id=self.backing_point_id,
            mode=self.mode,
            virtual_size=self.virtual_size,
            cluster_size=self.cluster_size,
            stored_bytes=self._writer.stored_bytes,
            checksums=tuple(chunk.encode() for chunk in self._digests.finish()),
            zero_runs=self._zero_runs(),
        )

    def _zero_runs(self) -> bytes:
        """The zero clusters of the file as written (read back: what readers will see)."""
        try:
            with Qcow2Image.open(self._writer.path, backing=False) as image:
                return encode_zero_runs(file_zero_runs(image))
        except Qcow2Error as exc:
            raise IngestError(self._ingest.vm, f"disk {self.name}: {exc}") from exc


class Ingest:
    """A restore point being written. A context manager: leaving it uncommitted aborts it."""

    def __init__(
        self,
        store: Store,
        vm: str,
        point_id: int,
        created: datetime,
        definition: dict[str, Any] | None,
    ) -> None:
        self.store = store
        self.vm = vm
        self.point_id = point_id
        self.created = created
        self.definition = definition
        self.tmp_dir = store.tmp_dir / str(point_id)
        self.disks: dict[str, DiskIngest] = {}
        self._done = False

    @classmethod
    def begin(
        cls,
        store: Store,
        vm: str,
        created: datetime | None,
        definition: dict[str, Any] | None,
    ) -> Ingest:
        """Register a pending point and make its tmp folder."""
        moment = _point_time(vm, created, store.index.latest_created(vm))
        try:
            point_id = store.index.begin_point(
                vm, moment, above=store.high_water(), reserve=store.reserve_point_id
            )
        except (sqlite3.Error, OSError) as exc:
            raise _as_store_error(exc, store.path) from exc
        ingest = cls(store, vm, point_id, moment, definition)
        try:
            ingest.tmp_dir.mkdir(mode=PRIVATE_DIR_MODE, parents=True)
        except OSError as exc:
            ingest.abort()
            raise _as_store_error(exc, store.path) from exc
        return ingest

    # --- disks ----------------------------------------------------------------------------------

    def add_disk(
        self,
        name: str,
        virtual_size: int,
        *,
        cluster_size: int | None = None,
        mode: str = "incremental",
    ) -> DiskIngest:
        """Start a disk's file. incremental: an overlay on the disk's previous point (a new disk
        gets a full file); compare: the caller sends every cluster and only clusters whose digest
        differs from the previous point's view are stored; resync: the same, recorded as a
        resync (the dirty bitmap could not be trusted); full: a standalone file.
        `cluster_size` defaults to the previous file's (65536 for a new disk); a different one
        starts a new full file. The disk's `mode` is what the store does and `reason` says why
        when that is not what was asked; callers report those, not their own guess."""
        self._check_open()
        check_disk_name(name)
        if name in self.disks:
            raise IngestError(self.vm, f"disk {name} was added twice")
        if mode not in DISK_MODES:
            raise IngestError(self.vm, f"unknown mode {mode!r} (expected {', '.join(DISK_MODES)})")
        previous = self.store.index.latest_disk(self.vm, name)
        size = cluster_size or (previous["cluster_size"] if previous else 65536)
        asked, reason = mode, None
        if previous is None:
            reason = "disk new to the store"
        elif previous["cluster_size"] != size:
            reason = f"cluster size changed ({previous['cluster_size']} -> {size})"
        if reason is not None or mode == "full":
            mode, previous = "full", None
        view = self._previous_view(name, mode, previous)
        if view is None:
            if previous is not None:
                reason = "the previous chain cannot be read"
            mode, previous = "full", None
        elif mode == "incremental":
            view.close()  # the chain is intact; an incremental does not compare checksums
            view = None
        try:
            disk = self._guard(
                lambda: self._make_disk(name, virtual_size, size, mode, previous, view)
            )
        except BaseException:
            if view is not None:
                view.close()
            raise
        if mode != asked:
            disk.reason = reason
        self.disks[name] = disk
        return disk

    def _previous_view(
        self, name: str, mode: str, previous: dict[str, Any] | None
    ) -> ChainView | None:
        """The previous point's view of the disk, checking its chain reads intact.

        Intact: every file opens, its backing name and geometry are what the index says, and
        it maps exactly the clusters the index lists for its point (lbstore.integrity; no
        data is read: that is verify's job). A new point is never built on a chain that
        reads damaged: an incremental or an import is refused (see _broken_chain), a resync
        starts a new full chain, and the event log says why.
        """
        if previous is None:
            return None
        try:
            point = self.store.point(previous["point_id"])
            view = self.store.view(point, name)
        except StoreError as exc:
            self._broken_chain(name, mode, previous, exc)
            return None
        try:
            check_chain(self.store, point, name, view)
        except StoreError as exc:
            view.close()
            self._broken_chain(name, mode, previous, exc)
            return None
        except BaseException:
            view.close()
            raise
        return view

    def _broken_chain(
        self, name: str, mode: str, previous: dict[str, Any], exc: StoreError
    ) -> None:
        """Refuse an incremental or an import on a damaged chain; a resync starts a full.

        An import is a person's request: it stops, and `--full` says "start a new chain". A
        resync is the unattended backup's answer to an untrusted bitmap: it reads the whole
        disk anyway, so it stores a full file rather than leave the VM without a backup.
        """
        if mode in ("incremental", "compare"):
            advice = "back up with a resync or --full" if mode == "incremental" else "use --full"
            raise StoreIntegrityError(
                self.store.data_dir / previous["file"],
                f"the chain of disk {name} reads damaged ({exc}); a new point cannot build "
                f"on it: {advice} to start a new chain",
            ) from exc
        self.store.record_event(
            self.vm,
            "chain-broken",
            f"disk {name}: previous chain reads damaged, storing a full file",
            disk=name,
            error=str(exc),
        )

    def _make_disk(
        self,
        name: str,
        virtual_size: int,
        cluster_size: int,
        mode: str,
        previous: dict[str, Any] | None,
        view: ChainView | None,
    ) -> DiskIngest:
        backing = None if previous is None else f"{previous['point_id']}.qcow2"
        writer = Qcow2Writer(
            self.tmp_dir / f"{name}.qcow2",
            virtual_size,
            cluster_size=cluster_size,
            backing_file=backing,
            backing_format="qcow2" if backing else None,
            # Long runs from page-aligned buffers (import, backup) skip the page cache: a
            # restore point's data is not read back soon, and copying it into the cache (and
            # reclaiming cache for it) costs more CPU than its checksums.
            direct=True,
            # The file lives in tmp/ until close() has fsynced it whole; recovery removes it
            # from there after a crash, so no flush is needed between data and header.
            header_barrier=False,
        )
        lookup = self.store.digest_lookup(name) if view is not None else None
        return DiskIngest(
            self,
            name,
            writer,
            virtual_size=virtual_size,
            cluster_size=cluster_size,
            mode=mode,
            backing_point_id=None if previous is None else previous["point_id"],
            previous=view,
            lookup=lookup,
        )

    # --- commit and abort -----------------------------------------------------------------------

    def commit(self) -> RestorePoint:
        """Make the point durable and visible: fsync, rename into data/, one index transaction."""
        self._check_open()
        if not self.disks:
            raise IngestError(self.vm, "a restore point needs at least one disk")
        renamed: list[Path] = []
        try:
            record = self._guard(lambda: self._publish_files(renamed))
            self.store.index.commit_point(record)
        except BaseException as exc:
            for path in renamed:
                path.unlink(missing_ok=True)
            self.abort()
            if isinstance(exc, OSError | sqlite3.Error):
                raise _as_store_error(exc, self.store.path) from exc
            raise
        self._finish()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.store.make_durable()
        return self.store.point(self.point_id)

    def _publish_files(self, renamed: list[Path]) -> CommitRecord:
        """Close every file, write its sidecar, move both into data/ and fsync; return what the
        index records.

        Each qcow2 file and then its sidecar are moved with a no-replace rename: a committed
        file of the same name is never overwritten (the move fails instead). Recovery commits
        a point whose files and sidecars all reached data/, and discards any other.
        """
        for disk in self.disks.values():
            disk._close()
        disks = [
            disk._commit_record(f"{self.vm}/{disk.name}/{self.point_id}.qcow2")
            for disk in self.disks.values()
        ]
        record = CommitRecord(
            point_id=self.point_id,
            vm=self.vm,
            kind=_point_kind([d.mode for d in self.disks.values()]),
            definition=self.definition,
            disks=tuple(disks),
        )
        store_id = self.store.identity().get("id")
        for commit_disk in disks:
            sidecar = Sidecar(
                store_id=store_id,
                point_id=self.point_id,
                vm=self.vm,
                created=self.created,
                kind=record.kind,
                definition=self.definition,
                point_disks=tuple(self.disks),
                disk=commit_disk,
            )
            write_sidecar(self.tmp_dir / f"{commit_disk.name}{SIDECAR_SUFFIX}", sidecar)
        for commit_disk in disks:
            target = self.store.data_dir / commit_disk.file
            _make_dirs(target.parent, self.store.data_dir)
            for suffix in (".qcow2", SIDECAR_SUFFIX):
                source = self.tmp_dir / f"{commit_disk.name}{suffix}"
                os.chmod(source, COMMITTED_FILE_MODE)
                placed = target.with_suffix(suffix)
                try:
                    rename_noreplace(source, placed)
                except FileExistsError:
                    raise StoreIntegrityError(
                        placed, "a file of this name already exists; it was left untouched"
                    ) from None
                renamed.append(placed)
        # tmp/<id> itself is not fsynced: it is removed next, and recovery removes it anyway.
        for folder in {p.parent for p in renamed}:
            fsync_dir(folder)
        return record

    def abort(self) -> None:
        """Discard everything written; the point never becomes visible."""
        if self._done:
            return
        self._finish()
        for disk in self.disks.values():
            disk._abort()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        # On e.g. a full disk this fails; the next writer's recovery forgets the pending row.
        with contextlib.suppress(sqlite3.Error):
            self.store.index.forget_pending(self.point_id)

    def _finish(self) -> None:
        self._done = True
        for disk in self.disks.values():
            if disk._previous is not None:
                disk._previous.close()
                disk._previous = None
        self.store._ingest_finished(self)

    def _check_open(self) -> None:
        if self._done:
            raise IngestError(self.vm, "this restore point was already committed or aborted")

    def _guard(self, action: Callable[[], Any]) -> Any:
        """Run a write step; on a full disk abort the whole point and say so."""
        self._check_open()
        try:
            return action()
        except (Qcow2WriteError, OSError) as exc:
            if _is_space_error(exc):
                self.abort()
                raise StoreSpaceError(self.store.path) from exc
            raise

    def __enter__(self) -> Ingest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._done:
            self.abort()


def _make_dirs(folder: Path, root: Path) -> None:
    """mkdir -p below `root`, fsyncing each parent whose entries changed."""
    missing = []
    current = folder
    while not current.exists() and current != root:
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        path.mkdir(mode=PRIVATE_DIR_MODE)
        fsync_dir(path.parent)


def _as_store_error(exc: OSError | sqlite3.Error, path: Path) -> StoreError:
    """An OS or SQLite failure during ingest as one clear StoreError (nothing else is
    converted: any other exception is a bug and shows as one)."""
    if _is_space_error(exc) or (isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)):
        return StoreSpaceError(path)
    if isinstance(exc, OSError):
        return StoreError(f"{path}: {exc.strerror or exc}")
    return StoreError(f"{path}: the index failed: {exc}")
