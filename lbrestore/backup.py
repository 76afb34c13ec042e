"""The backup job: a running VM's disks (lbqemu) into one restore point of the store (lbstore).

One backup, in order:
1. connect to QMP, remove what a killed receiver left in QEMU, discover disks and the VM
   definition, begin a restore point (its id names the new checkpoint bitmaps);
2. plan each disk once (incremental, or resync / full when the bitmap cannot be trusted or the
   store cannot build on its previous file), open its new file, and tidy this store's bitmaps;
3. one QMP transaction (inside a guest filesystem freeze when `--qga` is given): new bitmaps,
   frozen old ones, fleecing views; export the views over NBD;
4. pull each disk (dirty clusters, or everything) into the store, commit;
5. tear the views down, delete the old bitmaps.
Any failure before the commit (NBD, QMP, store, Ctrl-C) aborts the point, tears the views down
and merges every new bitmap back into its old one: nothing is committed, no write is forgotten.

NBD reads run in a worker thread, the checksums of long runs on another; every store call
stays on the event loop's thread (the store's SQLite connection belongs to it). Reading,
hashing and storing overlap through a small queue of batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lbqemu import bitmaps
from lbqemu.bitmaps import DiskPlan
from lbqemu.discovery import DiskInfo, choose_disks, list_disks, vm_definition
from lbqemu.fleece import PointInTimeView, nbd_endpoint, remove_leftovers
from lbqemu.nbd import DEFAULT_CHUNK, DEFAULT_DEPTH, ZERO, NbdSource, Run, pull
from lbqemu.qmp import QmpSession
from lbrestore.errors import AppError
from lbstore.checksums import cluster_digests
from lbstore.ingest import DiskIngest, Ingest
from lbstore.model import RestorePoint
from lbstore.store import Store

QUEUE_CHUNKS = 4
HASH_THREAD_MIN = 1 << 20
"""Runs from this size on are hashed on the hasher thread; shorter ones (an incremental's
scattered clusters) on the reader, where a hand-off would cost more than the hash."""
Digests = Future[list[bytes]] | list[bytes]
BATCH_RUNS = 256
"""Most runs the reader hands over at once (small runs of an incremental travel together, so
the event loop wakes once per batch, not once per cluster)."""


@dataclass(frozen=True)
class BackupOptions:
    """What `lbrestore backup` was asked to do."""

    vm: str
    qmp: str
    connect_timeout: float = 10.0
    disks: tuple[str, ...] = ()
    full: bool = False
    qga: str | None = None
    qga_timeout: float = 10.0
    nbd: str | None = None
    tls_creds: str | None = None
    insecure_tcp: bool = False
    scratch_dir: Path | None = None
    chunk: int = DEFAULT_CHUNK
    depth: int = DEFAULT_DEPTH


@dataclass
class BackupHooks:
    """Callbacks into the job (all optional, all called on the event loop's thread).

    `plan(disk, runs)`: once per disk before its pull, with what will be read.
    `progress(disk, offset, length)`: after each run is handed to the store (progress bars;
    tests use it to write into the VM or to slow the pull down at a known instant)."""

    plan: Callable[[str, list[Run]], None] | None = None
    progress: Callable[[str, int, int], None] | None = None


@dataclass
class DiskSummary:
    """One disk of a finished backup."""

    name: str
    mode: str
    reason: str | None
    virtual_size: int
    bytes_read: int = 0
    bytes_zero: int = 0
    bytes_stored: int = 0


@dataclass
class BackupSummary:
    """What a backup did; `to_json()` is the `--json` output."""

    vm: str
    point_id: int | None = None
    kind: str | None = None
    disks: list[DiskSummary] = field(default_factory=list)
    duration: float = 0.0
    leftovers_removed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    guest_freeze: dict[str, Any] | None = None  # lbqemu.guest.FreezeReport.to_dict() (--qga)

    @property
    def bytes_read(self) -> int:
        return sum(d.bytes_read for d in self.disks)

    @property
    def bytes_stored(self) -> int:
        return sum(d.bytes_stored for d in self.disks)

    @property
    def throughput(self) -> float:
        """Bytes read per second of the whole job."""
        return self.bytes_read / self.duration if self.duration > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            bytes_read=self.bytes_read,
            bytes_stored=self.bytes_stored,
            throughput=round(self.throughput),
            duration=round(self.duration, 3),
        )
        return data


def newest_by_disk(points: list[RestorePoint]) -> dict[str, tuple[int, int]]:
    """disk name -> (id, virtual size) in the newest committed point that holds it."""
    result: dict[str, tuple[int, int]] = {}
    for point in sorted(points, key=lambda p: (p.created, p.id)):
        for disk in point.disks:
            result[disk.name] = (point.id, disk.virtual_size)
    return result


def plan_disks(
    store: Store, ingest: Ingest, disks: list[DiskInfo], force_full: bool
) -> list[tuple[DiskPlan, DiskIngest]]:
    """Each disk's mode, decided once, before anything changes in QEMU.

    QEMU's bitmaps say what the pull can trust (incremental, or resync / full); the store then
    opens the disk's file and says what it can build on (a resync whose previous chain cannot
    be read becomes a full). The plan takes the store's answer, so the pull, the summary and
    the event log all tell what really happened."""
    store_id = store.identity()["id"]
    newest = newest_by_disk(store.restore_points(ingest.vm))
    planned = []
    for disk in disks:
        last_point, last_size = newest.get(disk.name, (None, None))
        plan = bitmaps.plan_disk(
            disk,
            store_id=store_id,
            token=str(ingest.point_id),
            last_size=last_size,
            last_point=last_point,
            force_full=force_full,
        )
        dingest = ingest.add_disk(disk.name, disk.virtual_size, mode=plan.mode)
        if dingest.mode != plan.mode:
            plan = bitmaps.with_mode(plan, dingest.mode, dingest.reason)
        planned.append((plan, dingest))
    return planned


def _freeze(
    options: BackupOptions, summary: BackupSummary
) -> Callable[[], AbstractAsyncContextManager[Any]] | None:
    """The guest filesystem freeze around the transaction, when `--qga` is given.

    Its report goes into the summary: a refused freeze still gives a (crash-consistent) point,
    and the summary and the event log say why."""
    if not options.qga:
        return None
    from lbqemu import guest

    address, timeout = options.qga, options.qga_timeout

    @contextlib.asynccontextmanager
    async def frozen_and_reported() -> AsyncGenerator[Any, None]:
        async with guest.frozen(address, timeout) as report:
            yield report
        summary.guest_freeze = report.to_dict()

    return frozen_and_reported


def _tls_object(options: BackupOptions, token: str) -> dict[str, Any] | None:
    if not options.tls_creds:
        return None
    from lbqemu import tls

    tls.check_creds_dir(options.tls_creds)
    return dict(tls.tls_creds_object(options.tls_creds, endpoint="server", id=f"lbr-tls-{token}"))


def _check_transport(options: BackupOptions) -> None:
    """Refuse a bad NBD address, plain TCP without opt-in or bad TLS credentials up front,
    before anything in QEMU or the store is touched."""
    nbd_endpoint(
        options.nbd,
        Path("."),
        tls_creds_dir=options.tls_creds,
        insecure_tcp=options.insecure_tcp,
    )
    if options.tls_creds:
        from lbqemu import tls

        tls.check_creds_dir(options.tls_creds)


def _source(view: PointInTimeView, export: str) -> NbdSource:
    endpoint = view.endpoint
    if endpoint.path is not None:
        return NbdSource.unix(endpoint.path, export)
    assert endpoint.host is not None and endpoint.port is not None
    return NbdSource.tcp(endpoint.host, endpoint.port, export, endpoint.tls_creds_dir)


async def run_backup(
    store: Store, options: BackupOptions, hooks: BackupHooks | None = None
) -> BackupSummary:
    """Back up the VM behind `options.qmp` into `store` (opened for writing)."""
    hooks = hooks or BackupHooks()
    _check_transport(options)
    summary = BackupSummary(vm=options.vm)
    started = time.monotonic()
    async with QmpSession(options.qmp, connect_timeout=options.connect_timeout) as session:
        summary.leftovers_removed = await remove_leftovers(session)
        all_disks = await list_disks(session)
        chosen = choose_disks(all_disks, options.disks)
        if not chosen:
            raise AppError(f"the VM behind {options.qmp} has no writable disk to back up")
        # The definition's queries travel while the view is set up and the disks are pulled
        # (QMP matches replies by id); the ingest gets it just before its commit.
        definition = asyncio.ensure_future(vm_definition(session, all_disks))
        try:
            with store.begin(options.vm) as ingest:
                planned = plan_disks(store, ingest, chosen, options.full)
                plans = [plan for plan, _ in planned]
                await bitmaps.prepare(session, plans)
                job = _Job(session, options, hooks, planned, summary)
                point = await job.run(ingest, definition)
        except Exception as exc:
            record_failure(store, options.vm, exc)
            raise
        finally:
            await _settle(definition)
    summary.point_id, summary.kind = point.id, point.kind
    summary.duration = time.monotonic() - started
    record_events(store, summary)
    return summary


def record_failure(store: Store, vm: str, exc: Exception) -> None:
    """A failed backup leaves no restore point, but the event log says what happened."""
    with contextlib.suppress(Exception):  # e.g. the store's own disk is full
        store.record_event(vm, "backup-failed", f"{type(exc).__name__}: {exc}")


def record_events(store: Store, summary: BackupSummary) -> None:
    """Resyncs, leftovers and cleanup problems go into the store's event log."""
    for disk in summary.disks:
        if disk.mode != "incremental":
            store.record_event(
                summary.vm,
                disk.mode,
                f"disk {disk.name}: {disk.mode} ({disk.reason})",
                point_id=summary.point_id,
                disk=disk.name,
                reason=disk.reason,
            )
    if summary.leftovers_removed:
        store.record_event(
            summary.vm,
            "leftovers",
            "removed what an interrupted backup left in QEMU",
            removed=summary.leftovers_removed,
        )
    for problem in summary.problems:
        store.record_event(summary.vm, "backup-problem", problem, point_id=summary.point_id)
    freeze = summary.guest_freeze
    if freeze is not None and not freeze["frozen"]:
        store.record_event(
            summary.vm,
            "guest-not-frozen",
            f"crash-consistent: {freeze['refused']}",
            point_id=summary.point_id,
            refused=freeze["refused"],
        )


class _Job:
    """One backup's view, pull and commit, with the bitmap invariant on every path."""

    def __init__(
        self,
        session: QmpSession,
        options: BackupOptions,
        hooks: BackupHooks,
        planned: list[tuple[DiskPlan, DiskIngest]],
        summary: BackupSummary,
    ) -> None:
        self.session = session
        self.options = options
        self.hooks = hooks
        self.planned = planned
        self.plans = [plan for plan, _ in planned]
        self.summary = summary

    async def run(self, ingest: Ingest, definition: asyncio.Future[dict[str, Any]]) -> RestorePoint:
        token = str(ingest.point_id)
        view = PointInTimeView(
            self.session,
            [(p.disk, p.export_bitmap) for p in self.plans],
            endpoint_address=self.options.nbd,
            token=token,
            extra_actions=bitmaps.transaction_actions(self.plans),
            tls_object=_tls_object(self.options, token),
            tls_creds_dir=self.options.tls_creds,
            insecure_tcp=self.options.insecure_tcp,
            scratch_parent=self.options.scratch_dir,
            around_transaction=_freeze(self.options, self.summary),
        )
        committed = False
        try:
            async with view:
                for plan, dingest in self.planned:
                    await self._pull_disk(view, plan, dingest)
                view.check_jobs()
                ingest.definition = await definition
                point: RestorePoint = ingest.commit()
                committed = True
        finally:
            self.summary.problems.extend(view.teardown_problems)
            if committed:
                outcome = await bitmaps.finalize(self.session, self.plans)
            elif view.transaction_done:
                outcome = await _shielded(bitmaps.rollback(self.session, self.plans))
            else:
                outcome = bitmaps.BitmapOutcome()
            self.summary.problems.extend(outcome.problems)
        return point

    async def _pull_disk(self, view: PointInTimeView, plan: DiskPlan, dingest: DiskIngest) -> None:
        disk = plan.disk
        result = DiskSummary(disk.name, plan.mode, plan.reason, disk.virtual_size)
        self.summary.disks.append(result)
        source = _source(view, disk.name)
        pulled = PullSpec(source, plan.export_bitmap, self.options.chunk, self.options.depth)
        await pull_disk(pulled, dingest, result, self.hooks)


@dataclass(frozen=True)
class PullSpec:
    """Where one disk's point-in-time view is read from, and how: `export_bitmap` names the
    dirty bitmap of an incremental (None reads every allocated cluster)."""

    source: NbdSource
    export_bitmap: str | None
    chunk: int = DEFAULT_CHUNK
    depth: int = DEFAULT_DEPTH


async def pull_disk(
    spec: PullSpec, dingest: DiskIngest, result: DiskSummary, hooks: BackupHooks
) -> None:
    """Pull one disk's view into its ingest, counting into `result` (every backup path)."""
    name = result.name

    def store_run(offset: int, length: int, data: Any, digests: list[bytes] | None) -> None:
        if data is ZERO:
            dingest.zero(offset, length)
            result.bytes_zero += length
        else:
            try:
                dingest.write(offset, data.view, digests=digests)
            finally:
                data.release()
            result.bytes_read += length
        result.bytes_stored = dingest.stored_bytes
        if hooks.progress is not None:
            hooks.progress(name, offset, length)

    pulled = _threaded_pull(spec, dingest.cluster_size)
    async with contextlib.aclosing(pulled) as items:
        async for item in items:
            if isinstance(item, _Batch):
                for offset, length, data, digests in item.runs:
                    store_run(offset, length, data, await _result(digests))
            elif hooks.plan is not None:
                hooks.plan(name, item)
    result.bytes_stored = dingest.stored_bytes


async def _result(digests: Digests | None) -> list[bytes] | None:
    """The checksums of a run, waiting (without blocking the loop) if they are not ready."""
    if digests is None or isinstance(digests, list):
        return digests
    if digests.done():
        return digests.result()
    known: list[bytes] = await asyncio.wrap_future(digests)
    return known


async def _settle(task: asyncio.Future[Any]) -> None:
    """Cancel `task` if it is still running and collect its outcome (no stray warnings)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def _shielded(coro: Any) -> Any:
    """Finish cleanup even when the job is being cancelled (Ctrl-C)."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        return await task


_DONE = object()


@dataclass
class _Batch:
    """Consecutive runs `(offset, length, data, digests)` from the reader, in offset order;
    `digests` (None for a zero run) are the clusters' checksums, or their computation."""

    runs: list[tuple[int, int, Any, Digests | None]] = field(default_factory=list)
    nbytes: int = 0


class _Batcher:
    """Reader side: gathers runs into batches of up to `limit` bytes (or BATCH_RUNS runs).

    A full backup's chunks (`limit` bytes each) go one per batch as before; an incremental's
    scattered clusters go many per batch. Long runs are hashed on the `hasher` thread: BLAKE3
    holds the GIL, but libnbd (on the reader) and the store's writes (on the loop) do not, so
    hashing on its own thread overlaps both. Short runs are hashed right here."""

    def __init__(self, handoff: _Handoff, limit: int, align: int, hasher: Executor) -> None:
        self.handoff = handoff
        self.limit = limit
        self.align = align
        self.hasher = hasher
        self.batch = _Batch()

    def add(self, offset: int, length: int, data: Any) -> None:
        batch = self.batch
        digests: Digests | None = None
        if data is ZERO:
            pass
        elif length >= HASH_THREAD_MIN:
            digests = self.hasher.submit(cluster_digests, data.view, self.align)
        else:
            digests = cluster_digests(data.view, self.align)
        batch.runs.append((offset, length, data, digests))
        if data is not ZERO:
            batch.nbytes += length
        if batch.nbytes >= self.limit or len(batch.runs) >= BATCH_RUNS:
            self.flush()

    def flush(self) -> None:
        if self.batch.runs:
            batch, self.batch = self.batch, _Batch()
            self.handoff.put(batch)


class _Handoff:
    """Items from the reader thread to the event loop: a bounded thread-safe queue plus a
    wake-up of the loop. The reader never waits for the loop (only for room in the queue),
    so its NBD requests keep moving while the store writes; the loop never blocks."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stop: threading.Event) -> None:
        self.loop = loop
        self.stop = stop
        self.queue: queue.Queue[Any] = queue.Queue(QUEUE_CHUNKS)
        self.ready = asyncio.Event()

    def put(self, item: Any) -> None:
        """Reader side: blocks while the queue is full; gives up once asked to stop."""
        final = item is _DONE or isinstance(item, BaseException)
        while True:
            if self.stop.is_set() and not final:
                return
            try:
                self.queue.put(item, timeout=0.1)
                break
            except queue.Full:
                if self.stop.is_set():
                    return
        with contextlib.suppress(RuntimeError):  # the loop is closing: nobody is waiting
            self.loop.call_soon_threadsafe(self.ready.set)

    async def get(self) -> Any:
        """Loop side: the next item. `ready` is set on the loop's own thread, so clearing it
        before looking at the queue cannot lose a wake-up."""
        # Yield to the loop once per item even when the queue is full: a cancellation (Ctrl-C)
        # is only delivered at a suspension point, and a store slower than the reader would
        # otherwise never suspend until the pull is over.
        await asyncio.sleep(0)
        while True:
            try:
                return self.queue.get_nowait()
            except queue.Empty:
                self.ready.clear()
            if self.queue.empty():
                await self.ready.wait()

    def drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()


async def _threaded_pull(spec: PullSpec, align: int) -> AsyncGenerator[Any, None]:
    """Run lbqemu.nbd.pull in a thread; yield its plan, then its runs, on the loop's thread.

    A plain thread-safe queue joins them, so the reader keeps its NBD requests moving while
    the store writes (it never waits for the event loop). On any exit (error, cancellation)
    the reader is stopped and joined before this generator finishes."""
    source = spec.source
    stop = threading.Event()
    handoff = _Handoff(asyncio.get_running_loop(), stop)
    hasher = ThreadPoolExecutor(1, thread_name_prefix=f"blake3-{source.export}")
    batcher = _Batcher(handoff, spec.chunk, align, hasher)

    def reader() -> None:
        try:
            pull(
                source,
                batcher.add,
                align=align,
                dirty_bitmap=spec.export_bitmap,
                chunk=spec.chunk,
                depth=spec.depth,
                stop=stop,
                on_plan=handoff.put,
            )
            batcher.flush()
            handoff.put(_DONE)
        except BaseException as exc:
            handoff.put(exc)

    thread = threading.Thread(target=reader, name=f"nbd-pull-{source.export}", daemon=True)
    thread.start()
    try:
        while True:
            item = await handoff.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            handoff.drain()
            await asyncio.sleep(0.01)
        hasher.shutdown(wait=True, cancel_futures=True)
