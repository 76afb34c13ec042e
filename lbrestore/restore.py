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
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import blake3

from lbrestore.errors import AppError
from lbrestore.vmdef import HostDefinition, RestoredDisk, write_host_definition
from lbstore.index import CHECKSUM_CHUNK_CLUSTERS, DIGEST_SIZE
from lbstore.model import RestorePoint
from lbstore.names import check_vm_name
from lbstore.qcow2.writer import Qcow2Writer
from lbstore.store import Store
from lbstore.view import ChainView, ViewKind, ViewRun, zero_digest

CHUNK = 8 << 20
"""Guest bytes read per step: large sequential reads, bounded memory (a multiple of clusters)."""
PREFETCH_BUFFERS = 3
NBD_IN_FLIGHT = 8
NBD_MAX_ZERO = 1 << 30
FORMATS = ("qcow2", "raw")
TEMP_SUFFIX = ".lbrestore-partial"

Progress = Callable[[int], None]


class RestoreError(AppError):
    """A restore cannot be done or failed; nothing partial is left behind."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


class RestoreTargetError(RestoreError):
    """The target (folder or NBD server) cannot take the restore."""

    def __init__(self, target: str, problem: str) -> None:
        super().__init__(f"restore target {target}: {problem}")
        self.target = target


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
        self.writer = Qcow2Writer(path, virtual_size, cluster_size=cluster_size)

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
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
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
    """Consecutive non-zero runs inside one CHUNK-aligned window of the guest."""

    start: int
    end: int
    runs: list[ViewRun]


def _walk(view: ChainView) -> Iterator[_Batch | tuple[int, int]]:
    """The disk in guest order: batches of data to read, and (offset, length) zero ranges."""
    batch: _Batch | None = None
    for run in view.runs():
        if run.kind is ViewKind.ZERO:
            if batch is not None:
                yield batch
                batch = None
            yield (run.guest_offset, run.length)
            continue
        for piece in _split(run):
            window = piece.guest_offset // CHUNK
            if batch is not None and (
                batch.end != piece.guest_offset or (batch.start // CHUNK) != window
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
    """A run cut at CHUNK-aligned guest offsets."""
    pos, end = run.guest_offset, run.guest_offset + run.length
    while pos < end:
        stop = min(end, (pos // CHUNK + 1) * CHUNK)
        host = None if run.host_offset is None else run.host_offset + (pos - run.guest_offset)
        yield ViewRun(run.kind, pos, stop - pos, run.point_id, run.path, host)
        pos = stop


class _ChainDigests:
    """The recorded digests of every file of a chain, one checksum chunk at a time.

    Restore walks the disk in guest order, so all digests of the current chunk (65536 clusters)
    of all files of the chain are loaded together into one dict, and dropped when the walk moves
    on: memory is bounded by one chunk, and each index row is read once.
    """

    def __init__(self, store: Store, disk: str, point_ids: Sequence[int]) -> None:
        self.index, self.disk, self.point_ids = store.index, disk, point_ids
        self.chunk = -1
        self.digests: dict[tuple[int, int], bytes] = {}

    def get(self, point_id: int, cluster: int) -> bytes | None:
        """The digest recorded for `cluster` in `point_id`'s own file, or None."""
        chunk = cluster // CHECKSUM_CHUNK_CLUSTERS
        if chunk != self.chunk:
            self._load(chunk)
        return self.digests.get((point_id, cluster))

    def _load(self, chunk: int) -> None:
        self.chunk = chunk
        self.digests = {}
        for point_id in self.point_ids:
            row = self.index.checksum_chunk(point_id, self.disk, chunk)
            if row is None:
                continue
            base = chunk * CHECKSUM_CHUNK_CLUSTERS
            position = 0
            for first, count in row.runs:
                for cluster in range(base + first, base + first + count):
                    self.digests[(point_id, cluster)] = row.digests[
                        position : position + DIGEST_SIZE
                    ]
                    position += DIGEST_SIZE


class _Prefetcher:
    """Walks a view and reads its data batches in a thread, PREFETCH_BUFFERS ahead.

    The view is used by the reader thread only (it is not thread-safe); the consumer gets
    (zero range, None) or (batch, filled buffer) in guest order and hands each buffer back
    with `release` once written.
    """

    def __init__(self, view: ChainView) -> None:
        self.view = view
        self.free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(PREFETCH_BUFFERS):
            self.free.put(bytearray(CHUNK))
        self.ready: queue.Queue[tuple[object, bytearray | None]] = queue.Queue(PREFETCH_BUFFERS * 4)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._read_all, name="restore-reader", daemon=True)

    def __enter__(self) -> _Prefetcher:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        while self.thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self.ready.get(timeout=0.1)  # unblock a reader waiting on a full queue
            self.free.put(bytearray(0))  # unblock a reader waiting for a buffer
        self.thread.join()

    def __iter__(self) -> Iterator[tuple[_Batch | tuple[int, int], bytearray | None]]:
        while True:
            item, buffer = self.ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item, buffer  # type: ignore[misc]

    def release(self, buffer: bytearray) -> None:
        """Give a buffer back to the reader."""
        self.free.put(buffer)

    def _read_all(self) -> None:
        try:
            for item in _walk(self.view):
                if self.stopping.is_set():
                    return
                if isinstance(item, tuple):
                    self.ready.put((item, None))
                    continue
                buffer = self.free.get()
                if self.stopping.is_set():
                    return
                # The batch holds only DATA/COMPRESSED runs, so readinto fills all of it.
                self.view.readinto(item.start, memoryview(buffer)[: item.end - item.start])
                self.ready.put((item, buffer))
            self.ready.put((_DONE, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            self.ready.put((exc, None))


_DONE = object()


class _Flattener:
    """Reads a view's data, verifies each cluster's digest and feeds non-zero clusters to a sink."""

    def __init__(
        self, store: Store, point: RestorePoint, disk: str, view: ChainView, *, verify: bool
    ) -> None:
        self.point, self.disk, self.view = point, disk, view
        self.size = view.cluster_size
        self.lookup = _ChainDigests(store, disk, [p.id for p in store.chain(point, disk)])
        self.zero_digest = zero_digest(self.size)
        self.zero_cluster = bytes(self.size)
        self.result = DiskResult(disk, "", "", view.virtual_size)
        self.verify = verify

    def run(self, sink: _Sink, progress: Progress | None) -> None:
        """Copy the whole disk into `sink`: a reader thread walks the view and fills buffers
        while this thread checks digests and writes, so reads and writes overlap."""
        with _Prefetcher(self.view) as prefetched:
            for item, buffer in prefetched:
                if isinstance(item, tuple):
                    sink.zero(*item)
                    done = item[1]
                else:
                    assert buffer is not None
                    view = memoryview(buffer)[: item.end - item.start]
                    if self.verify:
                        nonzero = self._verified_nonzero(item, view)
                    else:
                        nonzero = self._nonzero(view)
                    self._emit(item.start, view, nonzero, sink)
                    prefetched.release(buffer)
                    done = item.end - item.start
                if progress is not None:
                    progress(done)

    def _verified_nonzero(self, batch: _Batch, view: memoryview) -> list[bool]:
        """Per cluster of the batch: True when it holds data; every cluster checked on the way."""
        size = self.size
        first = batch.start // size
        count = -(-(batch.end - batch.start) // size)
        owner = self._owners(batch, first, count)
        nonzero = []
        for i in range(count):
            chunk = view[i * size : (i + 1) * size]
            if len(chunk) < size:
                chunk = memoryview(bytes(chunk) + bytes(size - len(chunk)))
            digest = blake3.blake3(chunk).digest()
            point_id = owner[i]
            if point_id is not None:
                expected = self.lookup.get(point_id, first + i)
                if expected is not None:
                    if digest != expected:
                        raise RestoreChecksumError(
                            self.point.vm, point_id, self.disk, first + i, self._path_of(batch, i)
                        )
                    self.result.verified_clusters += 1
            nonzero.append(digest != self.zero_digest)
        return nonzero

    def _nonzero(self, view: memoryview) -> list[bool]:
        """Per cluster: True when it holds data (no checksums: `--no-verify`)."""
        size = self.size
        result = []
        for at in range(0, len(view), size):
            # store data is almost never zero: its first byte usually decides at once
            piece = view[at : at + size]
            result.append(piece[0] != 0 or bytes(piece) != self.zero_cluster[: len(piece)])
        return result

    def _owners(self, batch: _Batch, first: int, count: int) -> list[int | None]:
        """The point whose file stores each whole cluster of the batch (None: mixed or none)."""
        size = self.size
        owner: list[int | None] = [None] * count
        for run in batch.runs:
            lo = -(-run.guest_offset // size)
            hi = (run.guest_offset + run.length) // size
            if run.guest_offset + run.length == self.view.virtual_size:
                hi = -(-(run.guest_offset + run.length) // size)
            for cluster in range(lo, hi):
                owner[cluster - first] = run.point_id
        return owner

    def _path_of(self, batch: _Batch, index: int) -> Path | None:
        offset = batch.start + index * self.size
        for run in batch.runs:
            if run.guest_offset <= offset < run.guest_offset + run.length:
                return run.path
        return None

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


def check_target_folder(target: Path, *, force: bool) -> None:
    """Refuse a target that is not a folder, or a folder with files in it unless `force`."""
    if target.exists() and not target.is_dir():
        raise RestoreTargetError(str(target), "exists and is not a folder")
    if target.is_dir() and not force:
        entries = sorted(p.name for p in target.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise RestoreTargetError(
                str(target), f"folder is not empty ({shown}); use --force to restore into it"
            )


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
    """Restore `point`'s disks into `target` as standalone images plus the VM definition."""
    if fmt not in FORMATS:
        raise RestoreError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    new_name = check_vm_name(name or point.vm)
    names = ordered_disks(point, disks)
    target = target.absolute()
    check_target_folder(target, force=force)
    created = not target.exists()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RestoreTargetError(str(target), exc.strerror or str(exc)) from exc
    result = RestoreResult(point)
    temps: list[tuple[Path, Path]] = []
    try:
        _write_disks(store, point, target, fmt, names, result, temps, progress, verify)
        restored = [RestoredDisk(d.name, Path(d.target), fmt, d.virtual_size) for d in result.disks]
        result.definition = write_host_definition(
            point.definition, restored, target, name=new_name, file_suffix=TEMP_SUFFIX
        )
        temps.append(_temp_pair(result.definition.script_path))
        if result.definition.libvirt_xml_path is not None:
            temps.append(_temp_pair(result.definition.libvirt_xml_path))
        for temp, final in temps:
            os.replace(temp, final)
        _fsync_dir(target)
    except BaseException as exc:
        for temp, _ in temps:
            temp.unlink(missing_ok=True)
        if created:
            shutil.rmtree(target, ignore_errors=True)
        if isinstance(exc, OSError):
            raise RestoreTargetError(str(target), exc.strerror or str(exc)) from exc
        raise
    return result


def _temp_pair(final: Path) -> tuple[Path, Path]:
    return final.with_name(final.name + TEMP_SUFFIX), final


def _write_disks(
    store: Store,
    point: RestorePoint,
    target: Path,
    fmt: str,
    names: Sequence[str],
    result: RestoreResult,
    temps: list[tuple[Path, Path]],
    progress: Progress | None,
    verify: bool,
) -> None:
    """Flatten each disk to a temporary file in `target`, remembering (temp, final) pairs."""
    for disk in names:
        final = target / f"{disk}.{fmt}"
        temp, _ = _temp_pair(final)
        temp.unlink(missing_ok=True)  # a leftover of an earlier failed run, never a real file
        temps.append((temp, final))
        record = point.disk(disk)
        assert record is not None
        sink: _Sink
        if fmt == "qcow2":
            sink = _Qcow2Sink(temp, record.virtual_size, record.cluster_size)
        else:
            sink = _RawSink(temp, record.virtual_size)
        disk_result = flatten_disk(store, point, disk, sink, progress, verify=verify)
        disk_result.target, disk_result.format = str(final), fmt
        result.disks.append(disk_result)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- restore to an NBD server ------------------------------------------------------------------


def is_nbd_uri(target: str) -> bool:
    """True when `target` names an NBD server rather than a folder."""
    return target.startswith(("nbd://", "nbd+unix://", "nbds://", "nbds+unix://"))


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
            for piece in range(at, at + count, CHUNK):
                self.data(piece, memoryview(bytes(min(CHUNK, at + count - piece))))

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
