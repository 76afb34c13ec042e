"""Removing one restore point while every other point reads exactly as before (`merge`).

For each disk of the point P being removed:
- no successor (P is the newest point holding the disk): the file is simply dropped;
- successor S (the point whose file backs onto P's): either
  * "up": P's clusters that S lacks are written into S's file in place (every reader of S and
    above got exactly those bytes through the backing file before), then S's backing name is
    switched to P's backing (or removed: S becomes the new full) with one sector write; or
  * "down", when S stores fewer clusters than P and no reader holds P: S's clusters are written
    into P's file (in place: P is being removed and nobody reads it), and P's file is renamed
    over S's name. Overlays above S keep their backing name; readers that opened S keep its
    old inode. This is what makes removing a big full under a small incremental cheap.
Either way the cost follows the clusters stored in P or S, never the disk's size, and every
cluster copied is read back verified against the digest the index recorded for it.

Crash safety: P is entered in the merge journal (index table `merges`, with each disk's plan)
before any file changes, so readers refuse to open it. The file steps are idempotent and are
simply run again by `finish_interrupted_merges` (a "down" rename is recognised by the inode
recorded in the plan). One index transaction then hands P's place to its successors (backing,
checksum rows as the union, stored bytes, kind) and removes P's rows; P's leftover files are
deleted and the journal row goes. Writers run `finish_interrupted_merges` when they open the
store (for their VM), and so does `check --repair` (for all).
"""

from __future__ import annotations

import bisect
import contextlib
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lbstore.checksums import (
    CHUNK_CLUSTERS,
    ChecksumChunk,
    ChecksumRow,
    DigestLookup,
    cluster_digest,
    encode_zero_runs,
)
from lbstore.errors import DamagedClusterError, Qcow2Error, StoreBusyError, StoreError
from lbstore.fsutil import fsync_dir
from lbstore.index import MergedDisk
from lbstore.integrity import file_zero_runs
from lbstore.lock import PointLock
from lbstore.model import DiskRecord, RestorePoint
from lbstore.qcow2.editor import ClusterEdit, Qcow2Editor, check_editable
from lbstore.qcow2.reader import Qcow2Image, RunKind
from lbstore.readpipe import StoredCluster, VerifiedSpan, read_verified

if TYPE_CHECKING:
    from lbstore.store import Store

BATCH_BYTES = 32 << 20
"""Guest bytes edited per crash-safe editor batch (each batch costs a few fsyncs)."""
STOP_AFTER_ENV = "LBRESTORE_TEST_MERGE_STOP_AFTER"
"""Test seam: the merge kills its own process (SIGKILL) after this many durable steps."""


class MergeError(StoreError):
    """A restore point cannot be merged away (damaged data, a file layout the editor refuses)."""


@dataclass
class DiskMergeResult:
    """What the merge did to one disk."""

    disk: str
    successor: int | None
    direction: str  # up | down | drop
    clusters_copied: int = 0
    bytes_copied: int = 0


@dataclass
class MergeResult:
    """What `merge_point` did; `to_json()` is `lbrestore merge --json`."""

    vm: str
    point_id: int
    successors: list[int] = field(default_factory=list)
    disks: list[DiskMergeResult] = field(default_factory=list)
    duration: float = 0.0
    finished_interrupted: bool = False

    @property
    def bytes_copied(self) -> int:
        return sum(d.bytes_copied for d in self.disks)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(bytes_copied=self.bytes_copied, duration=round(self.duration, 3))
        return data


class _Steps:
    """Counts durable steps; the test seam stops the process after the configured one."""

    def __init__(self) -> None:
        raw = os.environ.get(STOP_AFTER_ENV)
        self.stop_after = int(raw) if raw and raw.isdigit() else None
        self.count = 0

    def done(self, _name: str = "") -> None:
        self.count += 1
        if self.stop_after is not None and self.count >= self.stop_after:
            os.kill(os.getpid(), 9)


# --- planning -----------------------------------------------------------------------------------


def _plan(store: Store, point: RestorePoint, point_lock: PointLock) -> dict[str, Any]:
    """Each disk's successor and direction, with what finishing needs to know later."""
    successors = {row["disk"]: row for row in store.index.successor_disks(point.id)}
    exclusive = point_lock.try_exclusive()
    disks = []
    for record in point.disks:
        entry: dict[str, Any] = {
            "disk": record.name,
            "file": record.file,
            "backing_point_id": record.backing_point_id,
            "successor": None,
            "direction": "drop",
        }
        row = successors.get(record.name)
        if row is not None:
            entry.update(successor=row["point_id"], successor_file=row["file"])
            entry["direction"] = _direction(store, record, row, exclusive)
            if entry["direction"] == "down":
                info = (store.data_dir / record.file).stat()
                entry["inode"] = [info.st_dev, info.st_ino]
        disks.append(entry)
    return {"disks": disks, "reader_held": not exclusive}


def _direction(store: Store, record: DiskRecord, s_row: dict[str, Any], exclusive: bool) -> str:
    """'down' when it is cheaper and allowed (no reader holds P, same geometry, a layout the
    editor can change), else 'up'. The cost of each is what the index says each file stores."""
    if not exclusive or s_row["stored_bytes"] >= record.stored_bytes:
        return "up"
    if (s_row["virtual_size"], s_row["cluster_size"]) != (record.virtual_size, record.cluster_size):
        return "up"
    p_path = store.data_dir / record.file
    try:
        with Qcow2Image.open(p_path, backing=False) as image:
            check_editable(p_path, image.header)
    except Qcow2Error:
        return "up"
    return "down"


# --- the merge ----------------------------------------------------------------------------------


def merge_point(store: Store, point: RestorePoint) -> MergeResult:
    """Remove `point` from the store; every other point reads exactly as before.

    The store must be opened for writing by the point's VM (or the whole store). Readers that
    hold the point (lbstore.lock) keep reading their old files; the merge then takes the way
    that leaves the point's bytes unchanged. Data read back that does not match its recorded
    digest raises DamagedClusterError (see `finish_interrupted_merges` for what remains).
    """
    store.require_vm(point.vm)
    started = time.monotonic()
    if point.id in store.index.merging_point_ids():
        return _finish(store, point.id, started)
    point_lock = PointLock(store.path, point.id)
    newer = _hold_newer_points(store, point)
    try:
        plan = _plan(store, point, point_lock)
        store.index.begin_merge(point.id, point.vm, plan)
        return _run(store, point, plan, _Steps(), started)
    finally:
        point_lock.release()
        for lock in newer:
            lock.release()


def _hold_newer_points(store: Store, point: RestorePoint) -> list[PointLock]:
    """Hold every newer point of the VM exclusively for the merge, or raise StoreBusyError.

    A reader of a point above the removed one checks each file's clusters against the index as
    it reads (lbstore.integrity); the merge changes what the successor maps and lists, so such
    a reader would see damage that is not there. A reader of the removed point itself is fine
    (the merge then leaves that point's file alone); readers of newer points make the merge
    wait up to the store's lock timeout, then refuse; new readers of them wait for the merge.
    """
    held: list[PointLock] = []
    deadline = time.monotonic() + store.lock_timeout
    try:
        for other in store.restore_points(point.vm):
            if other.id == point.id or other.created < point.created:
                continue
            lock = PointLock(store.path, other.id)
            while not lock.try_exclusive():
                if time.monotonic() >= deadline:
                    raise StoreBusyError(
                        store.path,
                        f"a reader of {other.vm}@#{other.id} (mount, restore or verify), whose "
                        f"chain a merge of #{point.id} would change under it",
                        store.lock_timeout,
                    )
                time.sleep(0.05)
            held.append(lock)
    except BaseException:
        for lock in held:
            lock.release()
        raise
    return held


def finish_interrupted_merges(store: Store, vm: str | None = None) -> list[MergeResult]:
    """Finish every merge the journal lists (of `vm`, or all): run by writers when they open
    the store and by `check --repair`. A merge that cannot be finished raises MergeError."""
    results = []
    for row in store.index.merges(vm):
        results.append(_finish(store, row["point_id"], time.monotonic()))
    _forget_unread_retired(store, vm)
    return results


def _forget_unread_retired(store: Store, vm: str | None) -> None:
    """Drop the kept checksum rows of removed points that no reader holds any more."""
    for point_id in store.index.retired_points(vm):
        point_lock = PointLock(store.path, point_id)
        if point_lock.try_exclusive():
            try:
                store.index.forget_retired(point_id)
            finally:
                point_lock.release()


def _finish(store: Store, point_id: int, started: float) -> MergeResult:
    row = next(r for r in store.index.merges() if r["point_id"] == point_id)
    if row["step"] == "indexed":
        result = MergeResult(row["vm"], point_id, finished_interrupted=True)
        _drop_files(store, row["plan"], result)
        _release_leaks(store, row["plan"])
        store.index.end_merge(point_id)
        return result
    try:
        point = store.point(point_id)
    except StoreError as exc:
        raise MergeError(f"the interrupted merge of #{point_id} cannot be finished: {exc}") from exc
    result = _run(store, point, row["plan"], _Steps(), started, resumed=True)
    result.finished_interrupted = True
    _release_leaks(store, row["plan"])
    return result


def _run(
    store: Store,
    point: RestorePoint,
    plan: dict[str, Any],
    steps: _Steps,
    started: float,
    *,
    resumed: bool = False,
) -> MergeResult:
    """Verify what will be copied, then the file steps of every disk, the one index
    transaction, and cleanup. Damage found while verifying ends the merge before any file
    changed: the journal row goes and the point stays whole."""
    steps.done("journal")
    try:
        for entry in plan["disks"]:
            _verify_source(store, point, entry)
    except StoreError:
        if not resumed:
            store.index.end_merge(point.id)
        raise
    result = MergeResult(point.vm, point.id)
    merged: list[MergedDisk] = []
    for entry in plan["disks"]:
        disk_result = DiskMergeResult(entry["disk"], entry["successor"], entry["direction"])
        result.disks.append(disk_result)
        if entry["direction"] == "drop":
            continue
        successor = store.point(entry["successor"])
        zeros = _zero_clusters(store.data_dir / entry["successor_file"])
        if entry["direction"] == "up":
            _fold_up(store, point, successor, entry, disk_result, steps)
        else:
            _fold_down(store, point, successor, entry, disk_result, steps)
        merged.append(
            replace(
                _merged_disk(store, point, successor, entry, zeros),
                zero_runs=_zero_runs_blob(store.data_dir / entry["successor_file"]),
            )
        )
        if successor.id not in result.successors:
            result.successors.append(successor.id)
    retire = bool(plan.get("reader_held"))
    successors = _with_kinds(store, merged)
    store.rewrite_sidecars_for_merge(successors)  # sidecars first: the index follows them
    store.index.remove_merged_point(point.id, successors, retire=retire)
    steps.done("index")
    _drop_files(store, plan, result)
    store.index.end_merge(point.id)
    result.duration = time.monotonic() - started
    store.record_event(
        point.vm,
        "merged",
        f"removed restore point #{point.id}"
        + (f" into #{', #'.join(map(str, result.successors))}" if result.successors else ""),
        point_id=point.id,
        disks=[asdict(d) for d in result.disks],
    )
    return result


def _with_kinds(store: Store, merged: list[MergedDisk]) -> list[MergedDisk]:
    """A successor with no backing file left on any disk is the new full; else 'merged'."""
    out = []
    for disk in merged:
        successor = store.point(disk.point_id)
        others = [
            d.backing_point_id
            for d in successor.disks
            if d.name not in {m.name for m in merged if m.point_id == disk.point_id}
        ]
        backed = [m.backing_point_id for m in merged if m.point_id == disk.point_id]
        kind = "full" if all(b is None for b in [*others, *backed]) else "merged"
        out.append(
            MergedDisk(
                disk.point_id,
                disk.name,
                disk.backing_point_id,
                disk.stored_bytes,
                disk.mode,
                kind,
                disk.checksums,
                disk.zero_runs,
            )
        )
    return out


def _drop_files(store: Store, plan: dict[str, Any], result: MergeResult) -> None:
    """Delete the removed point's files ("down" files were renamed already)."""
    folders = set()
    for entry in plan["disks"]:
        store.remove_sidecar(entry["file"])
        folders.add((store.data_dir / entry["file"]).parent)
        if entry["direction"] == "down":
            continue
        path = store.data_dir / entry["file"]
        if path.exists():
            path.unlink()
            folders.add(path.parent)
    for folder in folders:
        fsync_dir(folder)


@contextlib.contextmanager
def _writable(path: Path) -> Iterator[None]:
    """Let the owner write a committed file (0400) while the merge edits it, then restore its
    mode. Readers are not affected: permission bits are checked at open only."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & stat.S_IWUSR:
        yield
        return
    os.chmod(path, mode | stat.S_IWUSR)
    try:
        yield
    finally:
        os.chmod(path, mode)


def _release_leaks(store: Store, plan: dict[str, Any]) -> None:
    """An interrupted edit may have left leaked clusters in a successor's file: release them."""
    for entry in plan["disks"]:
        path = store.data_dir / entry.get("successor_file", "")
        if entry["direction"] != "drop" and path.is_file():
            with _writable(path), Qcow2Editor.open(path) as editor:
                editor.release_leaks()


# --- reading verified clusters ------------------------------------------------------------------


class _Batcher:
    """Gathers edits and hands them to `apply` a batch of about BATCH_BYTES at a time."""

    def __init__(self, apply: Callable[[list[ClusterEdit]], None], size: int) -> None:
        self._apply = apply
        self._size = size
        self._edits: list[ClusterEdit] = []

    def add(self, edits: Iterable[ClusterEdit]) -> None:
        self._edits.extend(edits)
        if len(self._edits) * self._size >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._edits:
            edits, self._edits = self._edits, []
            self._apply(edits)


def _copy_clusters(
    store: Store,
    source: RestorePoint,
    disk: str,
    image: Qcow2Image,
    wanted: Callable[[int], bool],
    apply: Callable[[list[ClusterEdit]], None],
) -> None:
    """Hand `apply` an edit for every cluster `image` (source's own file) stores for which
    `wanted(cluster)` holds: data read back through the shared read-and-verify pipeline
    (lbstore.readpipe) and checked against the digest recorded for `source`, zero clusters
    as zero edits. Damage raises before anything of its batch reaches `apply`."""
    size = image.cluster_size
    where = f"{source.vm}@#{source.id} disk {disk}"
    lookup = DigestLookup(lambda pid, chunk: store.checksum_chunk(pid, disk, chunk))
    batcher = _Batcher(apply, size)
    stored: list[StoredCluster] = []
    for run in image.runs():
        if run.kind is RunKind.BACKING:
            continue
        first = run.guest_offset // size
        clusters = [c for c in range(first, -(-(run.guest_offset + run.length) // size))]
        clusters = [c for c in clusters if wanted(c)]
        if run.kind is RunKind.ZERO:
            batcher.add(ClusterEdit(c, None) for c in clusters)
            continue
        for cluster in clusters:
            expected = lookup.digest(source.id, cluster)
            if expected is None:
                raise DamagedClusterError(where, cluster, image.path, "has no recorded checksum")
            if run.kind is RunKind.COMPRESSED:
                batcher.add([_compressed_cluster(image, cluster, expected, where)])
            else:
                assert run.host_offset is not None
                host = run.host_offset + (cluster - first) * size
                stored.append(StoredCluster(cluster, host, expected))

    def consume(span: VerifiedSpan) -> None:
        if apply is _discard:
            return  # verifying only: the pipeline has checked the span
        view = span.view
        batcher.add(
            ClusterEdit(entry.cluster, bytes(view[i * size : (i + 1) * size]))
            for i, entry in enumerate(span.clusters)
        )

    read_verified(
        image.path,
        stored,
        cluster_size=size,
        virtual_size=image.virtual_size,
        consume=consume,
        where=where,
    )
    batcher.flush()


def _compressed_cluster(
    image: Qcow2Image, cluster: int, expected: bytes, where: str
) -> ClusterEdit:
    """A compressed cluster, decompressed and checked (the pipeline reads plain clusters)."""
    size = image.cluster_size
    data = image.read(cluster * size, size)
    if cluster_digest(data, size) != expected:
        raise DamagedClusterError(where, cluster, image.path, "does not match its checksum")
    return ClusterEdit(cluster, data)


# --- the two directions -------------------------------------------------------------------------


def _backing_name(entry: dict[str, Any]) -> str | None:
    backing = entry["backing_point_id"]
    return None if backing is None else f"{backing}.qcow2"


def _fold_up(
    store: Store,
    point: RestorePoint,
    successor: RestorePoint,
    entry: dict[str, Any],
    result: DiskMergeResult,
    steps: _Steps,
) -> None:
    """P's clusters that S lacks go into S's file; then S backs onto P's backing."""
    disk = entry["disk"]
    p_path, s_path = store.data_dir / entry["file"], store.data_dir / entry["successor_file"]
    with (
        Qcow2Image.open(p_path, backing=False) as p_image,
        _writable(s_path),
        Qcow2Editor.open(s_path) as editor,
    ):
        editor.on_phase = steps.done

        def apply(batch: list[ClusterEdit]) -> None:
            editor.write_clusters(batch)
            _count(result, batch, p_image.cluster_size)

        _copy_clusters(store, point, disk, p_image, editor.is_unallocated, apply)
        _zero_past_end(store, entry, p_image, editor, result)
        editor.set_backing(_backing_name(entry))


def _zero_past_end(
    store: Store,
    entry: dict[str, Any],
    p_image: Qcow2Image,
    editor: Qcow2Editor,
    result: DiskMergeResult,
) -> None:
    """S read zeros past P's end (QEMU's rule for a grown disk); where P's backing is longer,
    S must now say so itself."""
    backing = entry["backing_point_id"]
    if backing is None or editor.virtual_size <= p_image.virtual_size:
        return
    record = store.point(backing).disk(entry["disk"])
    assert record is not None
    size = editor.cluster_size
    first = -(-p_image.virtual_size // size)
    stop = min(-(-editor.virtual_size // size), -(-record.virtual_size // size))
    edits = [ClusterEdit(c, None) for c in range(first, stop) if editor.is_unallocated(c)]
    editor.write_clusters(edits)
    result.clusters_copied += len(edits)


def _fold_down(
    store: Store,
    point: RestorePoint,
    successor: RestorePoint,
    entry: dict[str, Any],
    result: DiskMergeResult,
    steps: _Steps,
) -> None:
    """S's clusters go into P's file in place; then P's file is renamed over S's name."""
    disk = entry["disk"]
    p_path, s_path = store.data_dir / entry["file"], store.data_dir / entry["successor_file"]
    if not p_path.exists():
        info = s_path.stat()
        if [info.st_dev, info.st_ino] == entry["inode"]:
            return  # renamed before an interruption: this disk is done
        raise MergeError(f"{p_path} is gone but {s_path} is not the merged file")
    with (
        Qcow2Image.open(s_path, backing=False) as s_image,
        _writable(p_path),
        Qcow2Editor.open(p_path) as editor,
    ):
        editor.on_phase = steps.done

        def apply(batch: list[ClusterEdit]) -> None:
            editor.write_clusters(batch, in_place=True)
            _count(result, batch, s_image.cluster_size)

        _copy_clusters(store, successor, disk, s_image, _everything, apply)
    os.rename(p_path, s_path)
    fsync_dir(s_path.parent)
    steps.done("rename")


def _verify_source(store: Store, point: RestorePoint, entry: dict[str, Any]) -> None:
    """Read back every cluster the disk's merge will copy, checked against its digest."""
    if entry["direction"] == "drop":
        return
    if entry["direction"] == "up":
        source, path = point, store.data_dir / entry["file"]
    else:
        source, path = store.point(entry["successor"]), store.data_dir / entry["successor_file"]
        if not path.exists() or not (store.data_dir / entry["file"]).exists():
            return  # renamed already: nothing is left to copy
    with Qcow2Image.open(path, backing=False) as image:
        _copy_clusters(store, source, entry["disk"], image, _everything, _discard)


def _everything(_cluster: int) -> bool:
    return True


def _discard(_edits: list[ClusterEdit]) -> None:
    return None


def _count(result: DiskMergeResult, batch: list[ClusterEdit], size: int) -> None:
    result.clusters_copied += len(batch)
    result.bytes_copied += sum(size for e in batch if e.data is not None)


# --- the successor's new index rows -------------------------------------------------------------


def _merged_disk(
    store: Store,
    point: RestorePoint,
    successor: RestorePoint,
    entry: dict[str, Any],
    zeros: set[int],
) -> MergedDisk:
    """S's rows after the merge: the digests of every data cluster its file now stores.

    That set is P's data clusters, less those S reads as zero (its own zero clusters, in
    `zeros`, taken from its file before it changed), with S's own data clusters on top: exactly
    what either direction leaves in the file. Computed from the index rows, so it costs what
    the two files store, and no walk of the merged file's mapping."""
    disk = entry["disk"]
    digests = dict(store.stored_clusters(point, disk))
    for cluster in zeros:
        digests.pop(cluster, None)
    digests.update(store.stored_clusters(successor, disk))
    record = successor.disk(disk)
    assert record is not None
    backing = entry["backing_point_id"]
    return MergedDisk(
        point_id=successor.id,
        name=disk,
        backing_point_id=backing,
        stored_bytes=len(digests) * record.cluster_size,
        mode="full" if backing is None else record.mode,
        point_kind="merged",
        checksums=_encode(digests),
    )


def _encode(digests: dict[int, bytes]) -> tuple[ChecksumRow, ...]:
    """Digests by guest cluster as the index's rows (lbstore.checksums' codec)."""
    rows = []
    clusters = sorted(digests)
    start = 0
    while start < len(clusters):
        chunk = clusters[start] // CHUNK_CLUSTERS
        stop = bisect.bisect_left(clusters, (chunk + 1) * CHUNK_CLUSTERS, lo=start)
        runs: list[list[int]] = []
        base = chunk * CHUNK_CLUSTERS
        for cluster in clusters[start:stop]:
            if runs and runs[-1][0] + runs[-1][1] == cluster - base:
                runs[-1][1] += 1
            else:
                runs.append([cluster - base, 1])
        blob = b"".join(digests[c] for c in clusters[start:stop])
        rows.append(ChecksumChunk(chunk, tuple((a, b) for a, b in runs), blob).encode())
        start = stop
    return tuple(rows)


def _zero_runs_blob(path: Path) -> bytes:
    """The merged file's own zero clusters, read from the file as the merge left it (whichever
    direction it took), for the index and the sidecar."""
    with Qcow2Image.open(path, backing=False) as image:
        return encode_zero_runs(file_zero_runs(image))


def _zero_clusters(path: Path) -> set[int]:
    """The clusters a file itself reads as zero (zero clusters, not unallocated ones)."""
    with Qcow2Image.open(path, backing=False) as image:
        size = image.cluster_size
        return {
            cluster
            for run in image.runs()
            if run.kind is RunKind.ZERO
            for cluster in range(
                run.guest_offset // size, -(-(run.guest_offset + run.length) // size)
            )
        }


__all__ = [
    "CHUNK_CLUSTERS",
    "DiskMergeResult",
    "MergeError",
    "MergeResult",
    "finish_interrupted_merges",
    "merge_point",
]
