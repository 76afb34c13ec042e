"""Checksum verification of committed files (read-only): which restore points are damaged?

Every committed file is checked on its own, not through its chain, so that damage is pinned to
the file that holds it: the header and L1/L2 tables must open and map cleanly, the clusters the
file stores must be exactly those the index has checksums for, and each stored cluster, re-read
from the file, must have the BLAKE3 digest recorded at ingest. A truncated file, an unreadable
L2 table or a changed byte are all damage of that file.

A damaged file damages every restore point whose chain includes it (for that disk), so the
report maps each damaged file to all of them, not only to the point that wrote it.

Stored clusters are re-read and checked by lbstore.readpipe (the one read-and-verify pipeline:
large sequential reads in host order, hashed in place), and a large file is split into guest
ranges checked by several processes, so verification runs at close to the speed of reading the
files once hashing is not the limit. `sample_percent` checks a random share of
the clusters for routine runs; the structural checks always cover the whole file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lbstore.chain import disk_chain
from lbstore.checksums import CHUNK_CLUSTERS, cluster_digest
from lbstore.errors import Qcow2Error, StoreError
from lbstore.integrity import clip_runs, file_zero_runs, mapped_clusters, zero_run_problems
from lbstore.model import DiskRecord, RestorePoint, utc_iso
from lbstore.qcow2.reader import Qcow2Image
from lbstore.readpipe import StoredCluster, check_clusters
from lbstore.store import Store

MAX_WORKERS = 4
"""Processes that check files in parallel, at most (never more than the CPUs)."""
PIECE_BYTES = 64 << 20
"""A file storing more than this is checked in pieces (guest ranges) that several processes
share: otherwise one big base file would keep a single core hashing while the others idle."""
MAX_PROBLEMS_PER_FILE = 20
"""Problems listed per damaged file; the count of damaged clusters is always exact."""

Progress = Callable[[int], None]


@dataclass(slots=True)
class FileDamage:
    """A committed file that failed verification, and what was wrong with it."""

    point_id: int
    vm: str
    disk: str
    path: Path
    problems: list[str] = field(default_factory=list)
    damaged_clusters: int = 0

    def add(self, problem: str, clusters: int = 0) -> None:
        """Record a problem (the first few are kept verbatim) and the clusters it spoils."""
        self.damaged_clusters += clusters
        if len(self.problems) < MAX_PROBLEMS_PER_FILE:
            self.problems.append(problem)
        elif len(self.problems) == MAX_PROBLEMS_PER_FILE:
            self.problems.append("... (more problems not listed)")

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready form."""
        return {
            "point_id": self.point_id,
            "vm": self.vm,
            "disk": self.disk,
            "path": str(self.path),
            "damaged_clusters": self.damaged_clusters,
            "problems": self.problems,
        }


@dataclass(frozen=True, slots=True)
class DamagedPoint:
    """A restore point whose view reads at least one damaged file."""

    point: RestorePoint
    files: tuple[FileDamage, ...]

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready form."""
        return {
            "id": self.point.id,
            "vm": self.point.vm,
            "created": utc_iso(self.point.created),
            "address": f"{self.point.vm}@#{self.point.id}",
            "damaged_files": [str(f.path) for f in self.files],
        }


@dataclass(slots=True)
class VerifyReport:
    """What a verification run checked and found."""

    sample_percent: float | None = None
    files_checked: int = 0
    clusters_checked: int = 0
    bytes_checked: int = 0
    points_checked: list[int] = field(default_factory=list)
    damaged_files: list[FileDamage] = field(default_factory=list)
    damaged_points: list[DamagedPoint] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no damage was found."""
        return not self.damaged_files

    def add(self, outcome: _Outcome) -> None:
        """Count one checked file."""
        self.files_checked += 1
        self.clusters_checked += outcome.clusters_checked
        self.bytes_checked += outcome.bytes_checked
        if outcome.damage is not None:
            self.damaged_files.append(outcome.damage)

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready form for `verify --json`."""
        return {
            "ok": self.ok,
            "sample_percent": self.sample_percent,
            "files_checked": self.files_checked,
            "clusters_checked": self.clusters_checked,
            "bytes_checked": self.bytes_checked,
            "points_checked": self.points_checked,
            "damaged_files": [f.as_dict() for f in self.damaged_files],
            "damaged_points": [p.as_dict() for p in self.damaged_points],
        }


@dataclass(frozen=True, slots=True)
class _FileJob:
    """One committed file to verify: the point that wrote it, its disk record, its path and
    the path its backing file must be. Picklable: worker processes receive it."""

    point: RestorePoint
    record: DiskRecord
    path: Path
    expected_backing: Path | None
    piece: int = 0
    pieces: int = 1

    @property
    def key(self) -> tuple[int, str]:
        """The file this job (or piece of a file) checks."""
        return (self.point.id, self.record.name)

    def guest_range(self) -> tuple[int, int]:
        """[start, end) guest bytes of this piece: equal cluster-aligned shares of the disk."""
        size, virtual = self.record.cluster_size, self.record.virtual_size
        clusters = -(-virtual // size)
        step = -(-clusters // self.pieces) * size
        return min(virtual, self.piece * step), min(virtual, (self.piece + 1) * step)

    def split(self) -> list[_FileJob]:
        """This file as pieces of about PIECE_BYTES of stored data each."""
        count = max(1, -(-self.record.stored_bytes // PIECE_BYTES))
        count = min(count, max(1, -(-self.record.virtual_size // self.record.cluster_size)))
        return [dataclasses.replace(self, piece=i, pieces=count) for i in range(count)]


def verify_store(
    store: Store,
    *,
    vm: str | None = None,
    point: RestorePoint | None = None,
    sample_percent: float | None = None,
    seed: int | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
) -> VerifyReport:
    """Verify the files of one restore point's chains, of one VM, or of the whole store.

    Files are checked in `workers` processes (default: one per CPU, at most MAX_WORKERS):
    BLAKE3 holds Python's GIL, so processes, not threads, are what let hashing use every
    core and overlap one file's reads with another's hashing.

    Returns a report; damage is data, not an exception. Raises StoreError only for bad
    arguments (an unknown VM, a sample share out of range).
    """
    if sample_percent is not None and not 0 < sample_percent <= 100:
        raise StoreError(f"sample must be a percentage in (0, 100], not {sample_percent:g}")
    if point is not None:
        vm = point.vm
    points = store.restore_points(vm)
    if vm is not None and not points:
        raise StoreError(f"VM {vm!r} has no restore points in this store")
    report = VerifyReport(sample_percent=sample_percent)
    report.points_checked = [point.id] if point is not None else [p.id for p in points]
    files = list(_file_jobs(store, points, point))
    count = workers or min(os.cpu_count() or 1, MAX_WORKERS)
    if workers is None and sum(job.record.stored_bytes for job in files) <= PIECE_BYTES:
        count = 1  # starting processes would cost more than they save
    jobs = files if count <= 1 else [piece for job in files for piece in job.split()]
    # Largest pieces first, so the last ones to finish are small and no process idles long.
    jobs.sort(key=lambda job: job.record.stored_bytes // job.pieces, reverse=True)
    settings = _Settings(sample_percent, seed)
    merged: dict[tuple[int, str], _Outcome] = {}
    for job, outcome in _run_jobs(store, jobs, settings, min(len(jobs), count)):
        merged.setdefault(job.key, _Outcome(None)).merge(outcome)
        if progress is not None:
            progress(outcome.bytes_checked)
    for job in files:  # the report lists files in the order the store holds them
        report.add(merged[job.key])
    report.damaged_points = damaged_points(store, report.damaged_files)
    return report


@dataclass(frozen=True, slots=True)
class _Settings:
    sample_percent: float | None
    seed: int | None

    def rng(self, job: _FileJob) -> random.Random:
        """A per-piece generator: a seeded run samples the same clusters in any process."""
        if self.seed is None:
            return random.Random()
        return random.Random(f"{self.seed}/{job.point.id}/{job.record.name}/{job.piece}")


@dataclass(slots=True)
class _Outcome:
    """What checking one file found (sent back from a worker process)."""

    damage: FileDamage | None
    clusters_checked: int = 0
    bytes_checked: int = 0

    def merge(self, other: _Outcome) -> None:
        """Add another piece of the same file."""
        self.clusters_checked += other.clusters_checked
        self.bytes_checked += other.bytes_checked
        if other.damage is None:
            return
        if self.damage is None:
            self.damage = other.damage
            return
        for problem in other.damage.problems:
            if not problem.startswith("..."):
                self.damage.add(problem)
        self.damage.damaged_clusters += other.damage.damaged_clusters


def _run_jobs(
    store: Store, jobs: list[_FileJob], settings: _Settings, workers: int
) -> Iterator[tuple[_FileJob, _Outcome]]:
    """Check every job, in this process or in `workers` forked ones; outcomes in job order."""
    if workers <= 1:
        for job in jobs:
            yield job, _Checker(store, settings).verify(job)
        return
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_worker_start, initargs=(store.path,)
    ) as pool:
        yield from zip(jobs, pool.map(_worker_verify, jobs, [settings] * len(jobs)), strict=True)


_worker_store: Store | None = None


def _worker_start(store_path: Path) -> None:
    """In a worker process: open the store for reading (never share the parent's connection)."""
    global _worker_store
    _worker_store = Store.open(store_path)


def _worker_verify(job: _FileJob, settings: _Settings) -> _Outcome:
    assert _worker_store is not None
    return _Checker(_worker_store, settings).verify(job)


def _file_jobs(
    store: Store, points: Sequence[RestorePoint], only: RestorePoint | None
) -> Iterator[_FileJob]:
    """The files to check: every file of every point, or the files of `only`'s chains."""
    by_id = {p.id: p for p in points}
    if only is None:
        wanted = [(p, d.name) for p in points for d in p.disks]
    else:
        wanted = [(p, d.name) for d in only.disks for p in store.chain(only, d.name)]
    seen: set[tuple[int, str]] = set()
    for writer, disk in wanted:
        if (writer.id, disk) in seen:
            continue
        seen.add((writer.id, disk))
        record = writer.disk(disk)
        assert record is not None
        backing = by_id.get(record.backing_point_id) if record.backing_point_id else None
        yield _FileJob(
            point=writer,
            record=record,
            path=store.file_path(writer, disk),
            expected_backing=store.file_path(backing, disk) if backing is not None else None,
        )


def damaged_points(store: Store, damaged: Sequence[FileDamage]) -> list[DamagedPoint]:
    """Every restore point whose chain, for some disk, includes a damaged file."""
    bad = {(d.point_id, d.disk): d for d in damaged}
    result = []
    for vm in sorted({d.vm for d in damaged}):
        points = store.restore_points(vm)
        by_id = {p.id: p for p in points}  # one query per VM, not one per point and disk
        for candidate in points:
            files = [
                bad[(link, disk.name)]
                for disk in candidate.disks
                for link in disk_chain(candidate, disk.name, by_id)
                if (link, disk.name) in bad
            ]
            if files:
                result.append(DamagedPoint(candidate, tuple(files)))
    return result


# --- one file ---------------------------------------------------------------------------------

# (guest cluster index, host offset or -1 for a compressed cluster, expected digest)
_Entry = tuple[int, int, bytes]


class _Checker:
    """Verifies one file with one read buffer, counting what it read."""

    def __init__(self, store: Store, settings: _Settings) -> None:
        self.store = store
        self.share = None if settings.sample_percent is None else settings.sample_percent / 100
        self.settings = settings
        self.rng = random.Random()
        self.size = 0
        self.outcome = _Outcome(None)

    def verify(self, job: _FileJob) -> _Outcome:
        """Check one committed file; the outcome carries its damage, or None when intact."""
        self.rng = self.settings.rng(job)
        damage = FileDamage(job.point.id, job.point.vm, job.record.name, job.path)
        self.outcome = _Outcome(None)
        try:
            image = Qcow2Image.open(job.path, backing=False)
            fd = os.open(job.path, os.O_RDONLY | os.O_CLOEXEC)
        except (Qcow2Error, OSError) as exc:
            if job.piece == 0:  # the other pieces of the file would only repeat it
                damage.add(f"cannot open: {_reason(exc)}", _expected_count(job))
                self.outcome.damage = damage
            return self.outcome
        with image, _closing_fd(fd):
            if job.piece == 0:
                _check_header(job, image, damage)
            try:
                digests = self._digests(job)
                stored = mapped_clusters(image, *job.guest_range())
                for batch in _batches(_joined(digests, stored, damage), CHUNK_CLUSTERS):
                    self._check_batch(image, fd, self._sampled(batch), damage)
                self._check_zeros(job, image, damage)
            except (Qcow2Error, OSError) as exc:
                damage.add(f"mapping unreadable: {_reason(exc)}", 1)
        self.outcome.damage = damage if damage.problems else None
        return self.outcome

    def _check_zeros(self, job: _FileJob, image: Qcow2Image, damage: FileDamage) -> None:
        """The file's own zero clusters in the job's range against those its point stored."""
        recorded = self.store.zero_runs(job.point.id, job.record.name)
        if recorded is None:
            return  # committed before zero clusters were recorded
        start, end = job.guest_range()
        size = image.cluster_size
        listed = clip_runs(recorded, start // size, -(-end // size))
        for cluster, problem in zero_run_problems(listed, file_zero_runs(image, start, end)):
            damage.add(f"cluster {cluster} {problem}", 1)

    def _digests(self, job: _FileJob) -> Iterator[tuple[int, bytes]]:
        """The index's (guest cluster, digest) pairs within the job's guest range."""
        if job.pieces == 1:
            return self.store.stored_clusters(job.point, job.record.name)
        start, end = job.guest_range()
        size = job.record.cluster_size
        return self.store.stored_clusters(
            job.point, job.record.name, start // size, -(-end // size)
        )

    def _sampled(self, batch: list[_Entry]) -> list[_Entry]:
        if self.share is None:
            return batch
        return [entry for entry in batch if self.rng.random() < self.share]

    def _check_batch(
        self, image: Qcow2Image, fd: int, batch: list[_Entry], damage: FileDamage
    ) -> None:
        """Re-read a batch of clusters (in host order, through lbstore.readpipe) and compare
        their digests; compressed clusters are decompressed and compared here."""
        size = self.size = image.cluster_size
        stored = [StoredCluster(*e) for e in batch if e[1] >= 0]
        for verdict in check_clusters(fd, stored, size):
            self.outcome.clusters_checked += verdict.checked
            self.outcome.bytes_checked += verdict.bytes_checked
            for cluster, problem in verdict.bad:
                damage.add(f"cluster {cluster} {problem}", 1)
        for cluster, _, digest in (e for e in batch if e[1] < 0):
            content = image.read(cluster * size, size)
            self._compare(cluster, content, digest, damage)

    def _compare(
        self, cluster: int, content: bytes | memoryview, expected: bytes, damage: FileDamage
    ) -> None:
        self.outcome.clusters_checked += 1
        self.outcome.bytes_checked += len(content)
        if cluster_digest(content, self.size) != expected:
            damage.add(f"cluster {cluster} checksum mismatch", 1)


@contextlib.contextmanager
def _closing_fd(fd: int) -> Iterator[None]:
    try:
        yield
    finally:
        os.close(fd)


def _batches(entries: Iterable[_Entry], count: int) -> Iterator[list[_Entry]]:
    """Consecutive batches of at most `count` entries (memory stays bounded per file)."""
    batch: list[_Entry] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) >= count:
            yield batch
            batch = []
    if batch:
        yield batch


def _joined(
    digests: Iterable[tuple[int, bytes]],
    stored: Iterable[tuple[int, int]],
    damage: FileDamage,
) -> Iterator[_Entry]:
    """The file's stored clusters merged with the index's digests, both in guest order.

    A cluster the file stores without a digest, or a digest for a cluster the file does not
    store, is damage (typically a changed L2 entry).
    """
    indexed = iter(digests)
    pending = next(indexed, None)
    for cluster, host in stored:
        while pending is not None and pending[0] < cluster:
            _missing(damage, pending[0])
            pending = next(indexed, None)
        if pending is not None and pending[0] == cluster:
            yield cluster, host, pending[1]
            pending = next(indexed, None)
        else:
            damage.add(f"cluster {cluster} is stored in the file but has no checksum", 1)
    while pending is not None:
        _missing(damage, pending[0])
        pending = next(indexed, None)


def _missing(damage: FileDamage, cluster: int) -> None:
    damage.add(f"cluster {cluster} has a checksum but the file does not store it", 1)


def _reason(exc: BaseException) -> str:
    """An error's problem without the file name (the report names the file already)."""
    if isinstance(exc, Qcow2Error):
        return exc.problem
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def _expected_count(job: _FileJob) -> int:
    """Clusters the file should store (what becomes unreadable when the file cannot open)."""
    return -(-job.record.stored_bytes // job.record.cluster_size)


def _check_header(job: _FileJob, image: Qcow2Image, damage: FileDamage) -> None:
    """Geometry and backing file as the index recorded them."""
    record = job.record
    if image.virtual_size != record.virtual_size:
        damage.add(f"virtual size {image.virtual_size}, index says {record.virtual_size}")
    if image.cluster_size != record.cluster_size:
        damage.add(f"cluster size {image.cluster_size}, index says {record.cluster_size}")
    actual = image.backing_file
    if job.expected_backing is None:
        if actual is not None:
            damage.add(f"has backing file {actual!r}, index says none")
        return
    resolved = (job.path.parent / actual).resolve() if actual else None
    if resolved != job.expected_backing.resolve():
        damage.add(f"backing file {actual!r} is not {job.expected_backing.name} of the index")
