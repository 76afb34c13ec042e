"""Restore: flatten a restore point's disks into standalone images, or stream them over NBD.

A chain view says, for every guest range, whether it is data (in which file) or zeros. Restore
reads only the data ranges, in large sequential pieces, checks every cluster against the digest
the index recorded when the cluster was stored, and writes only clusters that are not all zero:

- qcow2: a new thin image with no backing file (lbstore's Qcow2Writer);
- raw: a sparse file (holes wherever the disk reads as zeros);
- NBD: `nbd://HOST:PORT/EXPORT` or `nbd+unix:///EXPORT?socket=PATH` with libnbd, several
  requests in flight; ranges that read as zeros are zeroed on the target (it may hold old data).

Files are written under temporary names in the target folder and renamed only when every disk
and the VM definition are complete, so a failure leaves nothing partial behind.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from lbrestore.restore_target import (
    RestoreError,
    RestoreTargetError,
    StagedFolder,
    check_target_folder,
)
from lbrestore.vmdef import HostDefinition, RestoredDisk, write_host_definition
from lbstore.checksums import zero_digest
from lbstore.errors import Qcow2Error
from lbstore.integrity import StoredSetCheck
from lbstore.model import RestorePoint
from lbstore.names import check_vm_name
from lbstore.qcow2.writer import Qcow2Writer
from lbstore.readpipe import (
    BATCH_BYTES,
    RING_BUFFERS,
    FileRead,
    HashCheck,
    Problem,
    ReadHashWorker,
    Slots,
)
from lbstore.store import Store
from lbstore.view import ChainView, ViewKind, ViewRun

_ZEROS = bytes(1 << 20)

NBD_IN_FLIGHT = 8
NBD_MAX_ZERO = 1 << 30
FORMATS = ("qcow2", "raw")

Progress = Callable[[int], None]


class RestoreChecksumError(RestoreError):
    """A cluster read from the store does not match its recorded checksum (the store is damaged;
    `lbrestore verify` says which restore points are affected)."""

    def __init__(self, vm: str, point_id: int, disk: str, cluster: int, path: Path | None) -> None:
        super().__init__(
            f"{vm}@#{point_id} disk {disk}: cluster {cluster} (in {path}) does not match its "
            "checksum; nothing was restored (run `lbrestore verify`)"
        )
        self.vm, self.point_id, self.disk, self.cluster, self.path = (
            vm,
            point_id,
            disk,
            cluster,
            path,
        )


@dataclass(slots=True)
class DiskResult:
    """One restored disk: where it went and how much was written."""

    name: str
    target: str
    format: str
    virtual_size: int
    data_bytes: int = 0
    verified_clusters: int = 0

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready form."""
        return {
            "name": self.name,
            "target": self.target,
            "format": self.format,
            "virtual_size": self.virtual_size,
            "data_bytes": self.data_bytes,
            "verified_clusters": self.verified_clusters,
        }


@dataclass(slots=True)
class RestoreResult:
    """What a restore produced."""

    point: RestorePoint
    disks: list[DiskResult] = field(default_factory=list)
    definition: HostDefinition | None = None

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready form for `restore --json`."""
        return {
            "point": {"id": self.point.id, "vm": self.point.vm},
            "disks": [d.as_dict() for d in self.disks],
            "definition": self.definition.as_dict() if self.definition else None,
        }


# --- sinks: where the flattened disk goes ------------------------------------------------------


class _Sink(Protocol):
    """Receives a disk in guest order: data (non-zero clusters) and ranges that read as zero."""

    def data(self, offset: int, view: memoryview) -> None: ...
    def zero(self, offset: int, length: int) -> None: ...
    def finish(self) -> None: ...
    def abort(self) -> None: ...


class _Qcow2Sink:
    """A standalone thin qcow2: data clusters only; zeros are simply not allocated."""

    def __init__(self, path: Path, virtual_size: int, cluster_size: int) -> None:
        # Buffered writes (the writer starts their writeback early, and close fsyncs): restore's
        # shared buffers are page-aligned, so O_DIRECT would apply, but waiting for the device
        # on this thread measured ~1.7x slower for a 1 GiB restore (bench_restore.py).
        self.writer = Qcow2Writer(path, virtual_size, cluster_size=cluster_size, direct=False)

    def data(self, offset: int, view: memoryview) -> None:
        self.writer.write(offset, view)

    def zero(self, offset: int, length: int) -> None:
        """Nothing to do: an unallocated cluster without backing file reads as zeros."""

    def finish(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        self.writer.abort()


class _RawSink:
    """A sparse raw file: data written with pwritev, zeros left as holes."""

    def __init__(self, path: Path, virtual_size: int) -> None:
        self.path = path
        self.fd: int | None = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        os.ftruncate(self.fd, virtual_size)

    def data(self, offset: int, view: memoryview) -> None:
        assert self.fd is not None
        done = 0
        while done < len(view):
            done += os.pwritev(self.fd, [view[done:]], offset + done)

    def zero(self, offset: int, length: int) -> None:
        """Nothing to do: a new sparse file reads as zeros where nothing was written."""

    def finish(self) -> None:
        assert self.fd is not None
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.path.unlink(missing_ok=True)


# --- flattening --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Batch:
    """Consecutive runs (data and short zero runs) inside one BATCH_BYTES-aligned guest window.

    `slot` is the shared buffer holding its data once read: only clusters with data are read
    into it; the bytes of zero clusters are left as they are (never hashed, never written).
    """

    start: int
    end: int
    runs: list[ViewRun]
    slot: int = -1
    nonzero: list[bool | None] = field(default_factory=list)  # None: decide from the bytes
    checks: list[HashCheck] = field(default_factory=list)


def _walk(view: ChainView) -> Iterator[_Batch | tuple[int, int]]:
    """The disk in guest order: batches to read, and (offset, length) zero ranges.

    Zero runs shorter than BATCH_BYTES stay inside a batch, so a disk whose data alternates with
    holes still moves in BATCH_BYTES steps (one queue hand-over per BATCH_BYTES, not per run).
    """
    batch: _Batch | None = None
    for run in view.runs():
        if run.kind is ViewKind.ZERO and run.length >= BATCH_BYTES:
            if batch is not None:
                yield batch
                batch = None
            yield (run.guest_offset, run.length)
            continue
        for piece in _split(run):
            if (
                batch is not None
                and batch.start // BATCH_BYTES != piece.guest_offset // BATCH_BYTES
            ):
                yield batch
                batch = None
            if batch is None:
                batch = _Batch(piece.guest_offset, piece.guest_offset, [])
            batch.runs.append(piece)
            batch.end = piece.guest_offset + piece.length
    if batch is not None:
        yield batch


def _split(run: ViewRun) -> Iterator[ViewRun]:
    """A run cut at BATCH_BYTES-aligned guest offsets."""
    pos, end = run.guest_offset, run.guest_offset + run.length
    while pos < end:
        stop = min(end, (pos // BATCH_BYTES + 1) * BATCH_BYTES)
        host = None if run.host_offset is None else run.host_offset + (pos - run.guest_offset)
        yield ViewRun(run.kind, pos, stop - pos, run.point_id, run.path, host)
        pos = stop


class _Submitter:
    """A thread that walks a view and submits its batches to the read-and-check worker,
    at most RING_BUFFERS ahead of the writer (one shared buffer each).

    The view is used by this thread only (it is not thread-safe). The consumer gets zero
    ranges and submitted batches in guest order, takes the worker's answers in the same order,
    and puts each batch's slot back into `free` once written.
    """

    def __init__(self, flattener: _Flattener, slots: Slots, worker: ReadHashWorker) -> None:
        self.flattener, self.slots, self.worker = flattener, slots, worker
        self.free: queue.Queue[int] = queue.Queue()
        for slot in range(slots.count):
            self.free.put(slot)
        self.ready: queue.Queue[object] = queue.Queue(RING_BUFFERS * 4)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._walk_all, name="restore-walk", daemon=True)

    def __enter__(self) -> _Submitter:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        while self.thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self.ready.get(timeout=0.1)  # unblock the walker waiting on a full queue
            self.free.put(-1)  # unblock the walker waiting for a buffer
        self.thread.join()

    def __iter__(self) -> Iterator[_Batch | tuple[int, int]]:
        while True:
            item = self.ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]

    def _walk_all(self) -> None:
        check = self.flattener.set_check
        try:
            for item in _walk(self.flattener.view):
                if self.stopping.is_set():
                    return
                if check is not None:  # what each file maps is what the index lists
                    if isinstance(item, _Batch):
                        check.check_range(item.start, item.end - item.start)
                    else:
                        check.check_range(*item)
                if isinstance(item, _Batch):
                    item.slot = self.free.get()
                    if self.stopping.is_set() or item.slot < 0:
                        return
                    self.flattener._submit(item, self.slots, self.worker)
                self.ready.put(item)
            self.ready.put(_DONE)
        except BaseException as exc:  # handed to the consumer, which raises it
            self.ready.put(exc)


_DONE = object()


class _Flattener:
    """Reads a view's data, verifies each cluster's digest and feeds non-zero clusters to a sink.

    A thread walks the view (_Submitter); a forked process (lbstore.readpipe) reads the stored data
    into a ring of shared buffers and checks the digests, up to RING_BUFFERS batches ahead;
    the calling thread writes. Reading, hashing and writing overlap on separate cores. A batch
    is written only once its checks passed. Which clusters are zero comes from the recorded
    digest (the zero cluster's) when it is checked, else from the bytes.
    """

    def __init__(
        self, store: Store, point: RestorePoint, disk: str, view: ChainView, *, verify: bool
    ) -> None:
        self.point, self.disk, self.view = point, disk, view
        self.size = view.cluster_size
        depth = len(store.chain(point, disk))
        # Used by the walking thread only; rows come through the one Store restore opened.
        self.lookup = store.digest_lookup(disk, cached_chunks=max(64, 2 * depth))
        self.zero_digest = zero_digest(self.size)
        self.zero_cluster = bytes(self.size)
        self.result = DiskResult(disk, "", "", view.virtual_size)
        self.verify = verify
        self.set_check = StoredSetCheck(store, point, disk, view) if verify else None

    def run(self, sink: _Sink, progress: Progress | None) -> None:
        """Copy the whole disk into `sink`, in guest order: a thread walks the view and sends
        each batch to the worker process; this thread writes the batches it has checked."""
        slots = Slots(RING_BUFFERS, BATCH_BYTES)
        worker = ReadHashWorker(slots, self.size)  # forked before any thread starts
        closed = False
        try:
            with _Submitter(self, slots, worker) as submitted:
                for item in submitted:
                    if isinstance(item, tuple):
                        self._zero(item, sink, progress)
                        continue
                    self._complete(item, worker, slots, sink)
                    submitted.free.put(item.slot)
                    if progress is not None:
                        progress(item.end - item.start)
            worker.close()
            closed = True
        finally:
            if not closed:
                worker.kill()
            slots.close()

    def _zero(self, item: tuple[int, int], sink: _Sink, progress: Progress | None) -> None:
        sink.zero(*item)
        if progress is not None:
            progress(item[1])

    def _submit(self, batch: _Batch, slots: Slots, worker: ReadHashWorker) -> None:
        """Classify the batch's clusters and send its reads and checks to the worker."""
        size = self.size
        first = batch.start // size
        count = -(-(batch.end - batch.start) // size)
        owner = self._owners(batch, first, count)
        batch.nonzero = [False if point_id == _ZERO else None for point_id in owner]
        reads: list[FileRead] = []
        buffer = slots.view(batch.slot)
        try:
            for run in batch.runs:
                at = run.guest_offset - batch.start
                if run.kind is ViewKind.DATA:
                    assert run.path is not None and run.host_offset is not None
                    reads.append(FileRead(at, str(run.path), run.host_offset, run.length))
                elif run.kind is ViewKind.COMPRESSED:  # rare: decompressed here, in order
                    self.view.readinto(run.guest_offset, buffer[at : at + run.length])
                elif run.guest_offset % size or (run.guest_offset + run.length) % size:
                    _zero_fill(buffer[at : at + run.length])  # zeros inside a data cluster
        finally:
            buffer.release()
        if self.verify:
            self._checks(batch, owner, first)
        worker.submit(batch.slot, reads, batch.checks)

    def _checks(self, batch: _Batch, owner: list[int | None], first: int) -> None:
        """The clusters with a recorded digest: checked by the worker, classified by it."""
        size = self.size
        length = batch.end - batch.start
        for i, point_id in enumerate(owner):
            if point_id is None or point_id == _ZERO:
                continue
            expected = self.lookup.digest(point_id, first + i)
            if expected is not None:
                at = i * size
                batch.checks.append(
                    HashCheck(at, min(size, length - at), expected, point_id, first + i)
                )
                batch.nonzero[i] = expected != self.zero_digest

    def _complete(self, item: _Batch, worker: ReadHashWorker, slots: Slots, sink: _Sink) -> None:
        """Write out a batch once the worker has read and checked it."""
        answer = worker.answer()
        if answer.slot != item.slot:
            raise RuntimeError(f"read process answered slot {answer.slot}, not {item.slot}")
        if answer.problem is not None:
            raise self._problem(item, answer.problem)
        buffer = slots.view(item.slot)
        try:
            view = buffer[: item.end - item.start]
            self._emit(item.start, view, self._nonzero(item, view), sink)
            view.release()
        finally:
            buffer.release()
        self.result.verified_clusters += len(item.checks)

    def _nonzero(self, batch: _Batch, view: memoryview) -> list[bool]:
        """Per cluster: True when it holds data; those not classified by digest are looked at
        (store data is almost never zero: its first byte usually decides at once)."""
        size = self.size
        result = []
        for i, known in enumerate(batch.nonzero):
            if known is None:
                piece = view[i * size : (i + 1) * size]
                known = piece[0] != 0 or bytes(piece) != self.zero_cluster[: len(piece)]
            result.append(known)
        return result

    def _problem(self, batch: _Batch, problem: Problem) -> Exception:
        """The error for what the worker found wrong with `batch`."""
        kind = problem[0]
        if kind == "mismatch":
            check = batch.checks[int(problem[1])]
            path = next(
                (r.path for r in batch.runs if r.point_id == check.point_id and r.path), None
            )
            return RestoreChecksumError(
                self.point.vm, check.point_id, self.disk, check.cluster, path
            )
        path = Path(str(problem[1]))
        if kind == "short":
            return Qcow2Error(path, f"data cluster at {problem[2]:#x} is past end of file")
        return Qcow2Error(path, f"read error: {problem[2]}")

    def _owners(self, batch: _Batch, first: int, count: int) -> list[int | None]:
        """Per cluster: the point whose file stores all of it, None when several files or
        zeros share it (checked by its bytes), _ZERO when it is all zeros."""
        size = self.size
        owner: list[int | None] = [_ZERO] * count
        for run in batch.runs:
            lo = run.guest_offset // size
            hi = -(-(run.guest_offset + run.length) // size)
            whole_lo = -(-run.guest_offset // size)
            whole_hi = (run.guest_offset + run.length) // size
            if run.guest_offset + run.length == self.view.virtual_size:
                whole_hi = hi
            for cluster in range(lo, hi):
                index = cluster - first
                if run.kind is ViewKind.ZERO:
                    if owner[index] != _ZERO:
                        owner[index] = None  # data and zeros share it
                elif whole_lo <= cluster < whole_hi and owner[index] == _ZERO:
                    owner[index] = run.point_id
                else:
                    owner[index] = None
        return owner

    def _emit(self, start: int, view: memoryview, nonzero: list[bool], sink: _Sink) -> None:
        """Coalesce neighbouring clusters of the same kind into one data or zero call each."""
        size = self.size
        i = 0
        while i < len(nonzero):
            j = i
            while j < len(nonzero) and nonzero[j] == nonzero[i]:
                j += 1
            piece = view[i * size : j * size]
            if nonzero[i]:
                sink.data(start + i * size, piece)
                self.result.data_bytes += len(piece)
            else:
                sink.zero(start + i * size, len(piece))
            i = j


_ZERO = -1
"""_Flattener._owners: the cluster reads as zeros (no file stores it)."""


def _zero_fill(dest: memoryview) -> None:
    for start in range(0, len(dest), len(_ZEROS)):
        part = dest[start : start + len(_ZEROS)]
        part[:] = _ZEROS[: len(part)]


def flatten_disk(
    store: Store,
    point: RestorePoint,
    disk: str,
    sink: _Sink,
    progress: Progress | None = None,
    *,
    verify: bool = True,
) -> DiskResult:
    """Copy `disk` at `point` into `sink`, checking every stored cluster against its recorded
    digest unless `verify` is False; abort the sink on any failure."""
    try:
        with store.view(point, disk) as view:
            flattener = _Flattener(store, point, disk, view, verify=verify)
            flattener.run(sink, progress)
        sink.finish()
    except BaseException:
        sink.abort()
        raise
    return flattener.result


# --- restore to a folder -----------------------------------------------------------------------


def ordered_disks(point: RestorePoint, only: Sequence[str] | None = None) -> list[str]:
    """The point's disk names, boot disk first: the definition's order when it has one."""
    names = [d.name for d in point.disks]
    captured = [d.get("name") for d in (point.definition or {}).get("disks") or []]
    ordered = [n for n in captured if n in names] + [n for n in names if n not in captured]
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise RestoreError(
                f"{point.vm}@#{point.id} has no disk {', '.join(unknown)} "
                f"(disks: {', '.join(names)})"
            )
        ordered = [n for n in ordered if n in only]
    return ordered


def restore_to_folder(
    store: Store,
    point: RestorePoint,
    target: Path,
    *,
    fmt: str = "qcow2",
    name: str | None = None,
    force: bool = False,
    disks: Sequence[str] | None = None,
    progress: Progress | None = None,
    verify: bool = True,
) -> RestoreResult:
    """Restore `point`'s disks into `target` as standalone images plus the VM definition.

    The whole set is written into a stage folder beside `target` and switched in at the end
    (lbrestore.restore_target): the target holds the old set or the new one, never a mix.
    """
    if fmt not in FORMATS:
        raise RestoreError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    new_name = check_vm_name(name or point.vm)
    names = ordered_disks(point, disks)
    final = check_target_folder(target, force=force, store=store.path)
    stage = StagedFolder(final)
    result = RestoreResult(point)
    try:
        stage.create()
        _write_disks(store, point, stage.path, final, fmt, names, result, progress, verify)
        restored = [RestoredDisk(d.name, Path(d.target), fmt, d.virtual_size) for d in result.disks]
        definition = write_host_definition(point.definition, restored, stage.path, name=new_name)
        result.definition = definition.moved_to(final)
        written = {d.name + "." + fmt for d in result.disks} | {
            p.name for p in (definition.script_path, definition.libvirt_xml_path) if p is not None
        }
        stage.commit(written, force=force)
    except BaseException as exc:
        stage.abort()
        if isinstance(exc, OSError):
            raise RestoreTargetError(str(target), exc.strerror or str(exc)) from exc
        raise
    return result


def _write_disks(
    store: Store,
    point: RestorePoint,
    stage: Path,
    final: Path,
    fmt: str,
    names: Sequence[str],
    result: RestoreResult,
    progress: Progress | None,
    verify: bool,
) -> None:
    """Flatten each disk into the stage folder; results name their final place."""
    for disk in names:
        path = stage / f"{disk}.{fmt}"
        record = point.disk(disk)
        assert record is not None
        sink: _Sink
        if fmt == "qcow2":
            sink = _Qcow2Sink(path, record.virtual_size, record.cluster_size)
        else:
            sink = _RawSink(path, record.virtual_size)
        disk_result = flatten_disk(store, point, disk, sink, progress, verify=verify)
        disk_result.target, disk_result.format = str(final / path.name), fmt
        result.disks.append(disk_result)


# --- restore to an NBD server ------------------------------------------------------------------


class _NbdSink:
    """Writes to an NBD export with libnbd, keeping several requests in flight."""

    def __init__(self, uri: str, virtual_size: int) -> None:
        import nbd

        self.nbd = nbd
        self.uri = uri
        self.handle = nbd.NBD()
        self.cookies: list[int] = []
        try:
            self.handle.connect_uri(uri)
            size = self.handle.get_size()
            self.can_zero = bool(self.handle.can_zero())
            if self.handle.is_read_only():
                raise RestoreTargetError(uri, "the NBD export is read-only")
        except nbd.Error as exc:
            self._close()
            raise RestoreTargetError(uri, f"cannot connect: {exc.string}") from exc
        except BaseException:
            self._close()
            raise
        if size < virtual_size:
            self._close()
            raise RestoreTargetError(
                uri, f"the export has {size} bytes, the disk needs {virtual_size}"
            )

    def _submit(self, start: Callable[[], int]) -> None:
        """Start a request once fewer than NBD_IN_FLIGHT are outstanding."""
        self._wait_below(NBD_IN_FLIGHT)
        self.cookies.append(start())

    def _wait_below(self, limit: int) -> None:
        """Retire finished requests (raising the first error) until fewer than `limit` remain."""
        while True:
            self.cookies = [c for c in self.cookies if not self.handle.aio_command_completed(c)]
            if len(self.cookies) < limit:
                return
            self.handle.poll(-1)

    def data(self, offset: int, view: memoryview) -> None:
        buffer = self.nbd.Buffer.from_bytearray(view)
        with self._nbd_errors():
            self._submit(lambda: self.handle.aio_pwrite(buffer, offset))

    def zero(self, offset: int, length: int) -> None:
        end = offset + length
        for at in range(offset, end, NBD_MAX_ZERO):
            count = min(end - at, NBD_MAX_ZERO)
            if self.can_zero:
                with self._nbd_errors():
                    self._submit(functools.partial(self.handle.aio_zero, count, at))
                continue
            for piece in range(at, at + count, BATCH_BYTES):
                self.data(piece, memoryview(bytes(min(BATCH_BYTES, at + count - piece))))

    def finish(self) -> None:
        with self._nbd_errors():
            self._wait_below(1)
            if self.handle.can_flush():
                self.handle.flush()
            self.handle.shutdown()
        self._close()

    def abort(self) -> None:
        self._close()

    @contextlib.contextmanager
    def _nbd_errors(self) -> Iterator[None]:
        try:
            yield
        except self.nbd.Error as exc:
            raise RestoreTargetError(self.uri, f"NBD request failed: {exc.string}") from exc

    def _close(self) -> None:
        with contextlib.suppress(Exception):
            self.handle.close()


def restore_to_nbd(
    store: Store,
    point: RestorePoint,
    uri: str,
    *,
    disks: Sequence[str] | None = None,
    progress: Progress | None = None,
    verify: bool = True,
) -> RestoreResult:
    """Stream one disk of `point` to the NBD export at `uri` (which must be large enough)."""
    names = ordered_disks(point, disks)
    if len(names) != 1:
        raise RestoreError(
            f"{point.vm}@#{point.id} has {len(names)} disks ({', '.join(names)}); "
            "an NBD target takes one: choose it with --disk"
        )
    record = point.disk(names[0])
    assert record is not None
    sink = _NbdSink(uri, record.virtual_size)
    disk_result = flatten_disk(store, point, names[0], sink, progress, verify=verify)
    disk_result.target, disk_result.format = uri, "nbd"
    return RestoreResult(point, [disk_result])
