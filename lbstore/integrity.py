"""Checking what a chain's files map against what the index says each point stored.

A digest only guards the clusters a file still maps. If an L2 entry is zeroed, the cluster it
mapped silently turns into "read the backing file" (or zeros): every digest of what is still
mapped passes, yet the restored bytes are wrong. So readers also check the *set*: within each
checksum chunk, every file of the chain must map (as data or compressed) exactly the clusters
the index lists for its point. A cluster the index lists but the file does not map, or one the
file maps but the index does not list, is damage, named with its point, disk and cluster.

- `StoredSetCheck`: the set check, one checksum chunk (CHUNK_CLUSTERS clusters) at a time and
  each chunk once; restore runs it as its walk advances, a mount as reads arrive.
- `check_chain`: the structural check before a new point builds on a chain (import, backup):
  geometry as the index recorded it, backing names (ChainView.open), and the set check of the
  whole disk. It reads no data: cheap. Data digests are checked by restore, mount and verify.
- `VerifiedView`: a chain view whose reads are checked: the set check for the chunks a read
  touches, then the digest of every whole cluster it returns (read in whole clusters; a
  cluster that matched once is not hashed again by that view); damage raises
  DamagedClusterError instead of returning wrong bytes (a mount answers EIO).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from lbstore.checksums import CHUNK_CLUSTERS, DigestLookup, cluster_digest
from lbstore.closing import Closing
from lbstore.errors import DamagedClusterError, ReadOnlyStoreError, StoreIntegrityError
from lbstore.qcow2.reader import Qcow2Image, RunKind
from lbstore.view import ChainView, ViewKind

if TYPE_CHECKING:
    from lbstore.model import RestorePoint
    from lbstore.store import Store

Runs = list[tuple[int, int]]
"""Sorted, coalesced (first cluster, count) runs."""

OnDamage = Callable[[DamagedClusterError], None]

log = logging.getLogger(__name__)


def mapped_clusters(image: Qcow2Image, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(guest cluster, host offset or -1 if compressed) of the clusters the file itself stores
    (data or compressed) in guest bytes [start, end) (cluster-aligned)."""
    size = image.cluster_size
    for run in image.runs(start, end - start):
        first = run.guest_offset // size
        count = -(-run.length // size)
        if run.kind is RunKind.DATA:
            assert run.host_offset is not None
            base = run.host_offset - (run.guest_offset - first * size)
            for index in range(count):
                yield first + index, base + index * size
        elif run.kind is RunKind.COMPRESSED:
            for index in range(count):
                yield first + index, -1


def _mapped_runs(image: Qcow2Image, start: int, end: int) -> Runs:
    size = image.cluster_size
    runs: Runs = []
    for run in image.runs(start, end - start):
        if run.kind in (RunKind.DATA, RunKind.COMPRESSED):
            first = run.guest_offset // size
            _append(runs, first, -(-(run.guest_offset + run.length) // size) - first)
    return runs


def file_zero_runs(image: Qcow2Image, start: int = 0, end: int | None = None) -> Runs:
    """The zero clusters the file itself stores (QCOW_OFLAG_ZERO entries, not unallocated
    ones) in guest bytes [start, end), as runs of absolute cluster indexes."""
    size = image.cluster_size
    stop = image.virtual_size if end is None else end
    runs: Runs = []
    for run in image.runs(start, stop - start) if start < stop else ():
        if run.kind is RunKind.ZERO:
            first = run.guest_offset // size
            _append(runs, first, -(-(run.guest_offset + run.length) // size) - first)
    return runs


def clip_runs(runs: Sequence[tuple[int, int]], low: int, high: int) -> Runs:
    """The parts of sorted, disjoint cluster runs within clusters [low, high)."""
    clipped: Runs = []
    for first, count in runs[max(0, bisect.bisect_right(runs, (low,)) - 1) :]:
        if first >= high:
            break
        a, b = max(first, low), min(first + count, high)
        if a < b:
            clipped.append((a, b - a))
    return clipped


def zero_run_problems(recorded: Runs, found: Runs) -> Iterator[tuple[int, str]]:
    """(cluster, problem) where a file's zero clusters differ from those its point stored."""
    for cluster, was_recorded in _differences(found, recorded):
        yield (
            cluster,
            (
                "was stored as a zero cluster but the file no longer marks it so (damaged L2 "
                "table?): it would read its backing file's bytes"
                if was_recorded
                else "is marked zero by the file but its point stored no zero cluster there"
            ),
        )


def _append(runs: Runs, first: int, count: int) -> None:
    if runs and runs[-1][0] + runs[-1][1] == first:
        runs[-1] = (runs[-1][0], runs[-1][1] + count)
    else:
        runs.append((first, count))


def _clusters(runs: Runs) -> Iterator[int]:
    for first, count in runs:
        yield from range(first, first + count)


def _differences(mapped: Runs, listed: Runs) -> Iterator[tuple[int, bool]]:
    """Clusters in one set and not the other, in order; True when the index lists it."""
    a, b = _clusters(mapped), _clusters(listed)
    x, y = next(a, None), next(b, None)
    while x is not None or y is not None:
        if x is not None and (y is None or x < y):
            yield x, False
            x = next(a, None)
        elif y is not None and (x is None or y < x):
            yield y, True
            y = next(b, None)
        else:
            x, y = next(a, None), next(b, None)


class StoredSetCheck:
    """The set check of one disk's chain at one point, a checksum chunk at a time.

    Each chunk is compared once; its damaged clusters are remembered, so a read fails only
    when it touches one of them (a mount serves the rest of the disk). Not thread-safe: one
    per view.
    """

    def __init__(self, store: Store, point: RestorePoint, disk: str, view: ChainView) -> None:
        self._store = store
        self._vm = point.vm
        self._disk = disk
        self._layers = view.layers()
        self._size = view.cluster_size
        self._virtual = view.virtual_size
        self._span = self._size * CHUNK_CLUSTERS
        self._bad: dict[int, tuple[list[int], list[DamagedClusterError]]] = {}
        self._zeros: dict[int, tuple[tuple[int, int], ...] | None] = {}

    def where(self, point_id: int) -> str:
        """How errors name a point's file of this disk."""
        return f"{self._vm}@#{point_id} disk {self._disk}"

    def check_range(self, offset: int, length: int) -> None:
        """Raise DamagedClusterError for the first damaged cluster that guest bytes
        [offset, offset + length) touch."""
        end = min(offset + length, self._virtual)
        first, stop = offset // self._size, -(-end // self._size)
        for chunk in range(offset // self._span, -(-end // self._span)):
            bad = self._bad.get(chunk)
            if bad is None:
                bad = self._bad[chunk] = self._compare_chunk(chunk)
            clusters, errors = bad
            i = bisect.bisect_left(clusters, first)
            if i < len(clusters) and clusters[i] < stop:
                raise errors[i]

    def check_all(self) -> None:
        """Check the whole disk."""
        self.check_range(0, self._virtual)

    def _compare_chunk(self, chunk: int) -> tuple[list[int], list[DamagedClusterError]]:
        """Every cluster of the chunk that some file maps without the index listing it, or
        the index lists without the file mapping it (the topmost file's problem wins)."""
        start = chunk * self._span
        found: dict[int, DamagedClusterError] = {}
        for point_id, image in self._layers:
            end = min(start + self._span, image.virtual_size)
            mapped = _mapped_runs(image, start, end) if start < end else []
            listed: Runs = []
            row = self._store.checksum_chunk(point_id, self._disk, chunk)
            if row is not None:
                base = chunk * CHUNK_CLUSTERS
                for first, count in row.runs:
                    _append(listed, base + first, count)
            self._compare_zeros(point_id, image, chunk, found)
            if mapped == listed:
                continue
            for cluster, in_index in _differences(mapped, listed):
                problem = (
                    "is listed in the index but the file no longer maps it (damaged L2 table?)"
                    if in_index
                    else "is mapped by the file but the index lists no checksum for it"
                )
                found.setdefault(
                    cluster,
                    DamagedClusterError(self.where(point_id), cluster, image.path, problem),
                )
        clusters = sorted(found)
        return clusters, [found[c] for c in clusters]

    def _compare_zeros(
        self, point_id: int, image: Qcow2Image, chunk: int, found: dict[int, DamagedClusterError]
    ) -> None:
        """The file's own zero clusters in the chunk against those its point stored (when
        recorded: points committed before they were recorded are not checked)."""
        if point_id not in self._zeros:
            self._zeros[point_id] = self._store.zero_runs(point_id, self._disk)
        recorded = self._zeros[point_id]
        if recorded is None:
            return
        start = chunk * self._span
        end = min(start + self._span, image.virtual_size)
        if start >= end:
            return
        first, stop = start // self._size, -(-end // self._size)
        on_file = file_zero_runs(image, start, end)
        for cluster, problem in zero_run_problems(clip_runs(recorded, first, stop), on_file):
            found.setdefault(
                cluster, DamagedClusterError(self.where(point_id), cluster, image.path, problem)
            )


def check_chain(store: Store, point: RestorePoint, disk: str, view: ChainView) -> None:
    """The structural check of `disk`'s chain at `point` through its open `view` (see the
    module docstring); raises StoreIntegrityError (or DamagedClusterError naming the cluster)
    when it reads damaged."""
    by_id = {p.id: p for p in store.chain(point, disk)}
    for point_id, image in view.layers():
        record = by_id[point_id].disk(disk)
        assert record is not None
        found = (image.virtual_size, image.cluster_size)
        if found != (record.virtual_size, record.cluster_size):
            raise StoreIntegrityError(
                image.path,
                f"virtual size {found[0]} / cluster size {found[1]}, the index says "
                f"{record.virtual_size} / {record.cluster_size}",
            )
    StoredSetCheck(store, point, disk, view).check_all()


class VerifiedView(Closing):
    """A chain view whose every read is checked against the index (see the module docstring).

    Offers what the mount needs of a view (`virtual_size`, `read`, `readinto`, `close`). Not
    thread-safe: one per thread, like ChainView. `on_damage` is told of each damage found
    (logging, the store's event log) before the error is raised.
    """

    def __init__(
        self,
        view: ChainView,
        check: StoredSetCheck,
        lookup: DigestLookup,
        on_damage: OnDamage | None = None,
    ) -> None:
        self._view = view
        self._check = check
        self._lookup = lookup
        self._on_damage = on_damage
        self.virtual_size = view.virtual_size
        self.cluster_size = view.cluster_size
        self._scratch = bytearray()
        # Guest clusters whose digest already matched through this view (one bit each: 2 MiB
        # per TiB): a point's bytes never change, so a re-read is not hashed again.
        self._verified = bytearray(-(-view.virtual_size // view.cluster_size) // 8 + 1)

    def close(self) -> None:
        """Close the chain's files."""
        self._view.close()

    def read(self, offset: int, length: int) -> bytes:
        """Checked guest bytes; like a file, a read past the end returns fewer bytes."""
        end = min(offset + length, self.virtual_size)
        if offset >= end:
            return b""
        out = bytearray(end - offset)
        self.readinto(offset, memoryview(out))
        return bytes(out)

    def readinto(self, offset: int, dest: memoryview) -> int:
        """Fill `dest` from `offset` with checked bytes; returns bytes filled (short past the
        end). Raises DamagedClusterError, filling nothing meaningful, when damage is found."""
        end = min(offset + len(dest), self.virtual_size)
        if offset >= end:
            return 0
        size = self.cluster_size
        lo, hi = offset - offset % size, min(-(-end // size) * size, self.virtual_size)
        try:
            self._check.check_range(lo, hi - lo)
            if (lo, hi) == (offset, end):
                self._read_checked(lo, dest[: end - offset])
            else:
                if len(self._scratch) < hi - lo:
                    self._scratch = bytearray(hi - lo)
                whole = memoryview(self._scratch)[: hi - lo]
                self._read_checked(lo, whole)
                dest[: end - offset] = whole[offset - lo : end - lo]
        except DamagedClusterError as exc:
            if self._on_damage is not None:
                self._on_damage(exc)
            raise
        return end - offset

    def _read_checked(self, lo: int, buffer: memoryview) -> None:
        """Read whole clusters at `lo` into `buffer` and check each stored one's digest.

        The digests of a large read are computed in two halves at once, one on a helper
        thread (BLAKE3 releases the GIL while it hashes): a mount streams one request at a
        time, so this is what puts the second core to work.
        """
        self._view.readinto(lo, buffer)
        size = self.cluster_size
        pending: list[_Pending] = []
        for run in self._view.runs(lo, len(buffer)):
            if run.kind is ViewKind.ZERO or run.point_id is None:
                continue
            # Whole clusters of this file only (and the disk's last, partial one); a cluster
            # shared with another file (a backing file shorter than its overlay) has no digest
            # of its own here.
            run_end = run.guest_offset + run.length
            first = -(-run.guest_offset // size)
            stop = -(-run_end // size) if run_end == self.virtual_size else run_end // size
            for cluster in range(first, stop):
                if self._verified[cluster >> 3] & (1 << (cluster & 7)):
                    continue
                expected = self._lookup.digest(run.point_id, cluster)
                at = cluster * size - lo
                pending.append((run.point_id, run.path, cluster, buffer[at : at + size], expected))
        half = len(pending) // 2 if len(pending) >= PARALLEL_CLUSTERS else 0
        helper = _hash_pool().submit(_first_bad, pending[:half], size) if half else None
        bad = _first_bad(pending[half:], size)
        if helper is not None:
            earlier = helper.result()
            bad = earlier if earlier is not None else bad
        if bad is not None:
            point_id, path, cluster, _, expected = bad
            problem = (
                "is mapped by the file but the index lists no checksum for it"
                if expected is None
                else "does not match its checksum"
            )
            raise DamagedClusterError(self._check.where(point_id), cluster, path, problem)
        for _, _, cluster, _, _ in pending:
            self._verified[cluster >> 3] |= 1 << (cluster & 7)


_Pending = tuple[int, "Path | None", int, memoryview, "bytes | None"]
"""(point id, file, guest cluster, its bytes, recorded digest or None) of a cluster to check."""
PARALLEL_CLUSTERS = 4
"""Reads of at least this many clusters to check are hashed in two halves at once."""
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _hash_pool() -> ThreadPoolExecutor:
    """The helper threads that hash half of a large read (two: a mount has two views a disk)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(2, thread_name_prefix="lbstore-verify")
        return _pool


def _first_bad(pending: list[_Pending], size: int) -> _Pending | None:
    """The first cluster without a digest or whose digest differs, or None."""
    for entry in pending:
        expected = entry[4]
        if expected is None or cluster_digest(entry[3], size) != expected:
            return entry
    return None


def damage_reporter(store: Store, vm: str) -> OnDamage:
    """Log each damage found (once per cluster) and record it in the store's event log when
    the store can take events (a read-only store only logs)."""
    seen: set[tuple[str, int]] = set()
    lock = threading.Lock()

    def report(exc: DamagedClusterError) -> None:
        with lock:
            if (exc.where, exc.cluster) in seen:
                return
            seen.add((exc.where, exc.cluster))
        log.error("damaged cluster: %s", exc)
        with contextlib.suppress(ReadOnlyStoreError, sqlite3.Error):
            store.record_event(vm, "damage", str(exc), cluster=exc.cluster, where=exc.where)

    return report


def verified_views(
    store: Store, point: RestorePoint, disk: str, count: int, on_damage: OnDamage | None
) -> Sequence[VerifiedView]:
    """`count` verified views of one disk (a mount serves parallel reads with several)."""
    views: list[VerifiedView] = []
    try:
        for _ in range(count):
            view = store.view(point, disk)
            views.append(
                VerifiedView(
                    view,
                    StoredSetCheck(store, point, disk, view),
                    store.digest_lookup(disk),
                    on_damage,
                )
            )
    except BaseException:
        for opened in views:
            opened.close()
        raise
    return views
