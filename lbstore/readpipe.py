"""Reading stored clusters back and checking them against their digests: the one pipeline.

Every command that reads stored data and must trust it goes through this module: restore
(flattening a chain), verify (re-reading every file), merge (copying clusters between files of
a chain). It holds the one set of tuning constants and the two ways of reading that measured
fastest (bench/bench_restore.py, bench/bench_verify.py):

- in place (`check_clusters`): the clusters of one file, sorted by where they lie in the file,
  are grouped into spans of at most BATCH_BYTES (neighbours closer than MAX_GAP are read
  together), each span is mapped (mmap) and hashed where it lies, with the next spans announced
  to the kernel. No copy out of the page cache: twice as fast as preadv into a buffer when the
  file is cached, no slower cold. For verify, which only needs the verdict, in its own
  processes (one per core).
- into shared buffers (`Slots` + `ReadHashWorker`): a forked child reads with preadv into a
  ring of RING_BUFFERS buffers of BATCH_BYTES in shared memory and checks the digests, while
  the parent decides what to read next and consumes what is checked. BLAKE3 holds Python's GIL,
  so the hashing must leave the process that writes. The consumer gets exactly the bytes that
  were checked, without a copy. `read_verified` wraps it for "read these stored clusters of
  this file, verified" (merge); restore drives the worker itself (its batches mix files of a
  chain, zeros and compressed clusters).

Digests are made by lbstore.checksums only (one rule); ingest (import and backup) shares that
hashing side and does not read stored data back.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import NamedTuple

from lbstore.checksums import cluster_digest
from lbstore.errors import DamagedClusterError, Qcow2Error, ReadWorkerError

BATCH_BYTES = 8 << 20
"""Bytes read (and checked) per step: large sequential reads, bounded memory."""
RING_BUFFERS = 6
"""Shared buffers of the forked reader: read ahead, being hashed, being consumed."""
READ_AHEAD_SPANS = 2
"""Spans announced to the kernel (POSIX_FADV_WILLNEED) ahead of the one being hashed."""
MAX_GAP = 256 << 10
"""Clusters closer than this in the file are read together (the gap is read and ignored)."""


class StoredCluster(NamedTuple):
    """One cluster a file stores: guest cluster index, file offset, recorded digest."""

    cluster: int
    host: int
    expected: bytes


Problem = tuple[str | int, ...]
"""What went wrong with a buffer: ("mismatch", check index), ("short", path, file offset) for
a read past the end of a file, or ("error", path, message) for a failed read."""


@dataclass(frozen=True, slots=True)
class HashCheck:
    """One cluster to check: where it lies in its buffer, and what its digest must be."""

    at: int
    length: int
    expected: bytes
    point_id: int
    cluster: int


@dataclass(frozen=True, slots=True)
class FileRead:
    """Bytes [host, host + length) of `path`, to be read to offset `at` of a buffer."""

    at: int
    path: str
    host: int
    length: int


@dataclass(frozen=True, slots=True)
class Answer:
    """The child's answer for one buffer: `problem` is None when every read and check passed."""

    slot: int
    problem: Problem | None


class Slots:
    """A fixed ring of equal buffers in shared memory (a forked child sees the same pages)."""

    def __init__(self, count: int, size: int) -> None:
        self.count = count
        self.size = size
        self.memory = mmap.mmap(-1, count * size)  # MAP_SHARED | MAP_ANONYMOUS

    def view(self, slot: int) -> memoryview:
        """The whole buffer of `slot` (release it before `close`)."""
        return memoryview(self.memory)[slot * self.size : (slot + 1) * self.size]

    def close(self) -> None:
        """Unmap the buffers."""
        with contextlib.suppress(BufferError):
            self.memory.close()


class ReadHashWorker:
    """A forked process that fills buffers of `slots` from files and checks their clusters.

    Requests are answered in the order they were submitted. Fork it before starting threads.
    """

    def __init__(self, slots: Slots, cluster_size: int) -> None:
        context = multiprocessing.get_context("fork")
        child_requests, self._requests = context.Pipe(duplex=False)  # (receive, send) ends
        self._answers, child_answers = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_serve,
            args=(
                child_requests,
                child_answers,
                (self._requests, self._answers),
                slots.memory,
                slots.size,
                cluster_size,
            ),
            name="lbstore-read-hash",
            daemon=True,
        )
        # SIGINT stays blocked across the fork: a Ctrl-C arriving before the child ignores it
        # would print a KeyboardInterrupt traceback from the child's start-up. The parent
        # takes a pending one as soon as it unblocks.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self._process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child_requests.close()
        child_answers.close()  # the child's end: EOF here once the child is gone

    def submit(self, slot: int, reads: Sequence[FileRead], checks: Sequence[HashCheck]) -> None:
        """Fill `slot` with `reads`, then check `checks` (offsets within the slot)."""
        message = (
            slot,
            [(r.at, r.path, r.host, r.length) for r in reads],
            [(c.at, c.length, c.expected) for c in checks],
        )
        try:
            self._requests.send(message)
        except OSError:  # the child is gone (its end of the pipe closed)
            self._process.join(1.0)
            raise ReadWorkerError(self._process.exitcode) from None

    def answer(self) -> Answer:
        """The answer to the oldest request not yet answered (waits for it)."""
        try:
            slot, problem = self._answers.recv()
        except (EOFError, OSError):
            self._process.join(1.0)
            raise ReadWorkerError(self._process.exitcode) from None
        return Answer(slot, problem)

    def close(self) -> None:
        """Let the child finish (every request must have been answered) and reap it."""
        with contextlib.suppress(OSError):
            self._requests.send(None)
        self._process.join()
        self._requests.close()
        self._answers.close()

    def kill(self) -> None:
        """End the child at once (on failure elsewhere) and reap it."""
        if self._process.is_alive():
            self._process.kill()
        self._process.join()
        self._requests.close()
        self._answers.close()


def _serve(
    requests: Connection,
    answers: Connection,
    parent_ends: tuple[Connection, Connection],
    memory: mmap.mmap,
    slot_size: int,
    cluster: int,
) -> None:
    """In the child: answer each (slot, reads, checks) with (slot, problem or None).

    Ctrl-C reaches the whole process group: the parent handles it (and ends this child), so
    the child ignores SIGINT instead of printing a traceback of its own.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # discards one pending since the fork
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    for end in parent_ends:  # inherited copies: without them, a dead parent means EOF here
        end.close()
    view = memoryview(memory)
    files: dict[str, int] = {}
    while True:
        try:
            message = requests.recv()
        except EOFError:
            return
        if message is None:
            return
        slot, reads, checks = message
        base = slot * slot_size
        problem = _read_all(view, base, reads, files)
        if problem is None:
            problem = _check_all(view, base, checks, cluster)
        answers.send((slot, problem))


def _read_all(
    view: memoryview, base: int, reads: list[tuple[int, str, int, int]], files: dict[str, int]
) -> Problem | None:
    for at, path, host, length in reads:
        try:
            fd = files.get(path)
            if fd is None:
                fd = files[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            dest = view[base + at : base + at + length]
            done = 0
            while done < length:
                got = os.preadv(fd, [dest[done:]], host + done)
                if got == 0:
                    return ("short", path, host + done)
                done += got
        except OSError as exc:
            return ("error", path, exc.strerror or str(exc))
    return None


def _check_all(
    view: memoryview, base: int, checks: list[tuple[int, int, bytes]], cluster: int
) -> Problem | None:
    for index, (at, length, expected) in enumerate(checks):
        if cluster_digest(view[base + at : base + at + length], cluster) != expected:
            return ("mismatch", index)
    return None


# --- in place: verify's reads ---------------------------------------------------------------


@dataclass(slots=True)
class SpanVerdict:
    """What checking the clusters of one span found."""

    checked: int = 0
    bytes_checked: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)
    """(guest cluster, problem) of each cluster that failed, in host order."""


def spans(clusters: Iterable[StoredCluster], cluster_size: int) -> Iterator[list[StoredCluster]]:
    """Clusters (sorted by host offset) grouped into reads of at most BATCH_BYTES whose
    clusters lie less than MAX_GAP apart."""
    span: list[StoredCluster] = []
    for entry in clusters:
        if span:
            start, end = span[0].host, span[-1].host + cluster_size
            if entry.host - end > MAX_GAP or entry.host + cluster_size - start > BATCH_BYTES:
                yield span
                span = []
        span.append(entry)
    if span:
        yield span


def check_clusters(
    fd: int, clusters: Sequence[StoredCluster], cluster_size: int
) -> Iterator[SpanVerdict]:
    """Check stored clusters of the open file `fd` in place, one span at a time (host order).

    A cluster past the end of the file is reported as truncated; nothing raises for damage.
    """
    file_size = os.fstat(fd).st_size
    ordered = sorted(clusters, key=lambda entry: entry.host)
    groups = list(spans(ordered, cluster_size))
    for index, span in enumerate(groups):
        for ahead in groups[index + 1 : index + 1 + READ_AHEAD_SPANS]:
            _will_need(fd, ahead[0].host, ahead[-1].host + cluster_size - ahead[0].host)
        yield _check_span(fd, span, cluster_size, file_size)


def _check_span(fd: int, span: list[StoredCluster], size: int, file_size: int) -> SpanVerdict:
    """Map the span (or read it into a buffer if it cannot be mapped) and check each cluster."""
    start = span[0].host
    end = min(span[-1].host + size, file_size)
    if end <= start:
        return _check_in(span, memoryview(b""), start, size, file_size)
    base = start - start % mmap.ALLOCATIONGRANULARITY
    try:
        mapped = mmap.mmap(fd, end - base, offset=base, prot=mmap.PROT_READ)
    except (OSError, ValueError):
        view = memoryview(_read_buffer())[: end - start]
        got = _pread_full(fd, view, start)
        return _check_in(span, view[:got], start, size, file_size)
    with mapped:
        view = memoryview(mapped)
        try:
            return _check_in(span, view[start - base :], start, size, file_size)
        finally:
            view.release()


def _check_in(
    span: list[StoredCluster], view: memoryview, start: int, size: int, file_size: int
) -> SpanVerdict:
    """Compare each cluster of `span` held in `view` (file bytes from `start` on)."""
    verdict = SpanVerdict()
    for cluster, host, expected in span:
        at = host - start
        if at + size > len(view):
            verdict.bad.append(
                (
                    cluster,
                    f"at host offset {host:#x} is past the end of the file ({file_size} bytes): "
                    "truncated",
                )
            )
            continue
        part = view[at : at + size]
        verdict.checked += 1
        verdict.bytes_checked += size
        if cluster_digest(part, size) != expected:
            verdict.bad.append((cluster, "checksum mismatch"))
        part.release()
    return verdict


_buffer: bytearray | None = None


def _read_buffer() -> bytearray:
    """This process's fallback read buffer, allocated once (not once per file)."""
    global _buffer
    if _buffer is None:
        _buffer = bytearray(BATCH_BYTES)
    return _buffer


def _will_need(fd: int, offset: int, length: int) -> None:
    """Start asynchronous readahead of a range (a hint: errors do not matter)."""
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)


def _pread_full(fd: int, dest: memoryview, offset: int) -> int:
    """Read into `dest` from `offset` until it is full or the file ends; returns bytes read."""
    done = 0
    while done < len(dest):
        got = os.preadv(fd, [dest[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done


# --- into shared buffers, verified: merge's reads -------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifiedSpan:
    """Checked clusters of one file, packed: cluster `clusters[i]` is `view[i*size:(i+1)*size]`
    (of the disk's last, partial cluster only the bytes before the disk's end are meaningful).
    `view` is valid only during the consumer call."""

    clusters: list[StoredCluster]
    view: memoryview


def read_verified(
    path: Path,
    clusters: Iterable[StoredCluster],
    *,
    cluster_size: int,
    virtual_size: int,
    consume: Callable[[VerifiedSpan], None],
    where: str = "",
) -> int:
    """Read the given stored clusters of one file, check each against its digest, and hand
    them to `consume` in host order, a span at a time; returns the clusters handed over.

    Reading and hashing run in a forked child on a ring of shared buffers, ahead of the
    consumer. A cluster that fails its digest raises DamagedClusterError naming it (`where`
    says which point and disk) before any of its span is consumed; a cluster past the end of
    the file is damage too.
    """
    per_slot = BATCH_BYTES // cluster_size
    if per_slot < 1:
        raise ValueError(f"cluster size {cluster_size} is larger than a batch")
    ordered = sorted(clusters, key=lambda entry: entry.host)
    batches = [ordered[i : i + per_slot] for i in range(0, len(ordered), per_slot)]
    if not batches:
        return 0
    slots = Slots(min(RING_BUFFERS, len(batches)), per_slot * cluster_size)
    worker = ReadHashWorker(slots, cluster_size)
    done = False
    try:
        handed = _run_batches(
            path, batches, slots, worker, cluster_size, virtual_size, consume, where
        )
        worker.close()
        done = True
        return handed
    finally:
        if not done:
            worker.kill()
        slots.close()


def _run_batches(
    path: Path,
    batches: list[list[StoredCluster]],
    slots: Slots,
    worker: ReadHashWorker,
    size: int,
    virtual_size: int,
    consume: Callable[[VerifiedSpan], None],
    where: str,
) -> int:
    """Keep up to `slots.count` batches in the worker; consume each as its answer comes."""
    handed = 0
    pending: list[int] = []
    for index in range(len(batches) + slots.count):
        if index < len(batches):
            slot = index % slots.count
            worker.submit(slot, *_requests(path, batches[index], size, virtual_size))
            pending.append(index)
        if pending and (len(pending) == slots.count or index >= len(batches)):
            first = pending.pop(0)
            handed += _take(
                path, batches[first], first % slots.count, slots, worker, size, consume, where
            )
    return handed


def _requests(
    path: Path, batch: list[StoredCluster], size: int, virtual_size: int
) -> tuple[list[FileRead], list[HashCheck]]:
    """Reads packing `batch` into a slot (one per run of neighbouring clusters) and checks."""
    reads: list[FileRead] = []
    checks: list[HashCheck] = []
    for i, entry in enumerate(batch):
        length = min(size, virtual_size - entry.cluster * size)
        at = i * size
        last = reads[-1] if reads else None
        if (
            last is not None
            and last.at + last.length == at
            and last.host + last.length == entry.host
            and last.length % size == 0
        ):
            reads[-1] = FileRead(last.at, last.path, last.host, last.length + length)
        else:
            reads.append(FileRead(at, str(path), entry.host, length))
        checks.append(HashCheck(at, length, entry.expected, 0, entry.cluster))
    return reads, checks


def _take(
    path: Path,
    batch: list[StoredCluster],
    slot: int,
    slots: Slots,
    worker: ReadHashWorker,
    size: int,
    consume: Callable[[VerifiedSpan], None],
    where: str,
) -> int:
    """Wait for one batch's answer; raise on damage, else hand it to `consume`."""
    answer = worker.answer()
    if answer.slot != slot:
        raise RuntimeError(f"read process answered slot {answer.slot}, not {slot}")
    problem = answer.problem
    if problem is not None:
        if problem[0] == "mismatch":
            cluster = batch[int(problem[1])].cluster
            raise DamagedClusterError(
                where or str(path), cluster, path, "does not match its checksum"
            )
        if problem[0] == "short":
            raise Qcow2Error(path, f"stored cluster at {problem[2]:#x} is past the end of the file")
        raise Qcow2Error(path, f"read error: {problem[2]}")
    buffer = slots.view(slot)
    try:
        view = buffer[: len(batch) * size]
        consume(VerifiedSpan(batch, view))
        view.release()
    finally:
        buffer.release()
    return len(batch)
