"""Cluster checksums: the one digest rule, the one row codec, and lookups by cluster.

The digest of a stored cluster is BLAKE3 of the whole cluster; the last cluster of a disk whose
size is not a multiple of the cluster size is hashed as if zero-padded to a whole cluster. Ingest
(backup and import), verify, restore, mount and merge all compute digests with `cluster_digest`
/ `cluster_digests` below, and nowhere else.

The index keeps digests compactly (ARCHITECTURE: never one row per cluster): one row per
(point, disk, chunk of CHUNK_CLUSTERS guest clusters) holding the algorithm's name, a blob of
run-encoded cluster indexes relative to the chunk (little-endian uint32 pairs `first, count`)
and a blob of the concatenated digests in the same order. `ChecksumChunk.encode` and
`decode_row` are the only code that knows this layout; `lbstore.index` only moves the blobs.
Decoding checks the recorded algorithm and that the blobs agree, so a row written by another
algorithm, or a damaged row, is a clear `ChecksumRowError`, never silently read as BLAKE3.

Zero clusters a file stores (QCOW_OFLAG_ZERO entries: "reads as zeros, whatever the backing
file says") have no digest to check, but losing one makes the cluster read its backing file's
bytes. So each file's own zero clusters are recorded too, as one blob of absolute
(first, count) runs (little-endian uint64 pairs): `encode_zero_runs` / `decode_zero_runs`.
"""

from __future__ import annotations

import bisect
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import blake3

from lbstore.errors import ChecksumRowError

ALGORITHM = "blake3"
"""The name recorded in every checksum row this code writes (and the only one it reads)."""
DIGEST_SIZE = 32
"""Bytes per digest (BLAKE3's default output)."""
CHUNK_CLUSTERS = 1 << 16
"""Guest clusters per checksum row: 4 GiB of guest space at 64 KiB clusters, <= 2 MiB of digests."""

Buffer = bytes | bytearray | memoryview


# --- the digest rule ------------------------------------------------------------------------------


def cluster_digest(piece: Buffer, cluster_size: int) -> bytes:
    """The digest of one cluster; a short (last) cluster is hashed as if zero-padded."""
    hasher = blake3.blake3(piece)
    missing = cluster_size - len(piece)
    if missing > 0:
        hasher.update(bytes(missing))
    return hasher.digest()


def cluster_digests(data: Buffer, cluster_size: int) -> list[bytes]:
    """The digest of each cluster of `data` (cluster-aligned; the last one may be short)."""
    view = memoryview(data).cast("B")
    return [
        cluster_digest(view[start : start + cluster_size], cluster_size)
        for start in range(0, len(view), cluster_size)
    ]


@lru_cache(maxsize=16)
def zero_digest(cluster_size: int) -> bytes:
    """The digest of a cluster of zeros: every zero or unallocated cluster has it."""
    return cluster_digest(bytes(cluster_size), cluster_size)


# --- the row codec --------------------------------------------------------------------------------


class ChecksumRow(NamedTuple):
    """One checksum row as the index stores it (opaque blobs; see the module docstring)."""

    chunk: int
    algorithm: str
    cluster_runs: bytes
    digests: bytes


@dataclass(frozen=True)
class ChecksumChunk:
    """The digests of the stored clusters of one file within one chunk of guest clusters.

    `runs` holds (first, count) pairs of cluster indexes relative to the chunk's first cluster,
    sorted and disjoint; `digests` holds DIGEST_SIZE bytes per cluster in the same order.
    """

    chunk: int
    runs: tuple[tuple[int, int], ...]
    digests: bytes

    @property
    def count(self) -> int:
        """How many clusters the chunk lists."""
        return sum(count for _, count in self.runs)

    def clusters(self) -> Iterator[tuple[int, bytes]]:
        """(absolute guest cluster index, digest) for every cluster of this chunk, in order."""
        base = self.chunk * CHUNK_CLUSTERS
        position = 0
        digests = self.digests
        for first, count in self.runs:
            for index in range(base + first, base + first + count):
                yield index, digests[position : position + DIGEST_SIZE]
                position += DIGEST_SIZE

    def encode(self) -> ChecksumRow:
        """The row the index stores for this chunk."""
        return ChecksumRow(self.chunk, ALGORITHM, encode_runs(self.runs), bytes(self.digests))


def encode_runs(runs: Sequence[tuple[int, int]]) -> bytes:
    """(first, count) pairs as little-endian uint32s."""
    flat = array("I", [value for run in runs for value in run])
    if flat.itemsize != 4:  # pragma: no cover - every platform we run on has 32-bit "I"
        raise RuntimeError("array('I') is not 32 bits wide")
    return flat.tobytes()


def decode_runs(blob: bytes) -> tuple[tuple[int, int], ...]:
    """The inverse of encode_runs (the blob's length must be a multiple of 8)."""
    flat = array("I")
    flat.frombytes(blob)
    return tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))


ZERO_RUNS_CHUNK = -1
"""The chunk number errors give for a point's zero runs (they are one blob, not chunked)."""


def encode_zero_runs(runs: Sequence[tuple[int, int]]) -> bytes:
    """A file's own zero clusters, (first, count) pairs of absolute cluster indexes, as the
    index and the sidecars keep them."""
    flat = array("Q", [value for run in runs for value in run])
    if flat.itemsize != 8:  # pragma: no cover - every platform we run on has 64-bit "Q"
        raise RuntimeError("array('Q') is not 64 bits wide")
    return flat.tobytes()


def decode_zero_runs(blob: bytes, where: str) -> tuple[tuple[int, int], ...]:
    """The inverse of encode_zero_runs, after checking the shape: sorted, disjoint and
    non-empty runs (a damaged blob is a ChecksumRowError, never a wrong set)."""
    if len(blob) % 16:
        raise ChecksumRowError(where, ZERO_RUNS_CHUNK, f"zero runs of {len(blob)} bytes")
    flat = array("Q")
    flat.frombytes(blob)
    runs = tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))
    end = 0
    for first, count in runs:
        if first < end or count <= 0:
            raise ChecksumRowError(
                where, ZERO_RUNS_CHUNK, f"zero run ({first}, {count}) out of order"
            )
        end = first + count
    return runs


def decode_row(row: ChecksumRow, where: str) -> ChecksumChunk:
    """A stored row as a ChecksumChunk, after checking its algorithm and its shape.

    `where` names the row in errors (e.g. "vm1@#3 disk vda").
    """
    chunk, algorithm, runs_blob, digests = row
    if algorithm != ALGORITHM:
        raise ChecksumRowError(where, chunk, f"unknown checksum algorithm {algorithm!r}")
    if len(runs_blob) % 8:
        raise ChecksumRowError(where, chunk, f"cluster runs of {len(runs_blob)} bytes")
    runs = decode_runs(bytes(runs_blob))
    end = 0
    for first, count in runs:
        if first < end or count <= 0 or first + count > CHUNK_CLUSTERS:
            raise ChecksumRowError(where, chunk, f"cluster run ({first}, {count}) out of order")
        end = first + count
    listed = sum(count for _, count in runs)
    if len(digests) != listed * DIGEST_SIZE:
        raise ChecksumRowError(
            where, chunk, f"{len(digests)} bytes of digests for {listed} clusters"
        )
    return ChecksumChunk(chunk, runs, bytes(digests))


class DigestCollector:
    """The digests of one file's stored clusters, collected in any order, chunked on finish."""

    def __init__(self) -> None:
        self._chunks: dict[int, tuple[array[int], bytearray]] = {}

    def add(self, cluster: int, digest: bytes) -> None:
        """Record the digest of one stored guest cluster."""
        chunk, relative = divmod(cluster, CHUNK_CLUSTERS)
        entry = self._chunks.get(chunk)
        if entry is None:
            entry = self._chunks[chunk] = (array("I"), bytearray())
        entry[0].append(relative)
        entry[1].extend(digest)

    def finish(self) -> tuple[ChecksumChunk, ...]:
        """Chunks with sorted, run-encoded cluster indexes."""
        out = []
        for chunk in sorted(self._chunks):
            indexes, digests = self._chunks[chunk]
            order = sorted(range(len(indexes)), key=indexes.__getitem__)
            if order != list(range(len(indexes))):
                size = DIGEST_SIZE
                digests = bytearray(b"".join(digests[i * size : (i + 1) * size] for i in order))
                indexes = array("I", (indexes[i] for i in order))
            out.append(ChecksumChunk(chunk, _to_runs(indexes), bytes(digests)))
        return tuple(out)


def _to_runs(indexes: array[int]) -> tuple[tuple[int, int], ...]:
    runs: list[list[int]] = []
    for index in indexes:
        if runs and runs[-1][0] + runs[-1][1] == index:
            runs[-1][1] += 1
        else:
            runs.append([index, 1])
    return tuple((first, count) for first, count in runs)


# --- lookups --------------------------------------------------------------------------------------

ChunkLoader = Callable[[int, int], ChecksumChunk | None]
"""(point id, chunk) -> that chunk of the point's checksums for one disk, or None."""


class _Located:
    """One decoded chunk arranged for lookups: run starts and the digest position of each."""

    __slots__ = ("bases", "digests", "starts", "total")

    def __init__(self, chunk: ChecksumChunk) -> None:
        self.starts: list[int] = []
        self.bases: list[int] = []
        position = 0
        for first, count in chunk.runs:
            self.starts.append(first)
            self.bases.append(position)
            position += count
        self.total = position
        self.digests = chunk.digests

    def find(self, relative: int) -> bytes | None:
        i = bisect.bisect_right(self.starts, relative) - 1
        if i < 0:
            return None
        position = self.bases[i] + relative - self.starts[i]
        end = self.bases[i + 1] if i + 1 < len(self.bases) else self.total
        if position >= end:
            return None
        return self.digests[position * DIGEST_SIZE : (position + 1) * DIGEST_SIZE]


class DigestLookup:
    """Digests of one disk's stored clusters by (point, guest cluster), a chunk row at a time.

    Rows come from `load` (the Store's `checksum_chunk`), decoded and checked once, and are kept
    for the most recent `cached_chunks` (point, chunk) pairs: walks in guest order read each row
    once, and random reads (a mount) stay fast without holding a whole chain's digests.
    """

    def __init__(self, load: ChunkLoader, *, cached_chunks: int = 64) -> None:
        self._load = load
        self._limit = cached_chunks
        self._chunks: OrderedDict[tuple[int, int], _Located | None] = OrderedDict()

    def chunk(self, point_id: int, chunk: int) -> _Located | None:
        """The located chunk (cached), or None when the point stores nothing there."""
        key = (point_id, chunk)
        if key in self._chunks:
            self._chunks.move_to_end(key)
            return self._chunks[key]
        row = self._load(point_id, chunk)
        located = None if row is None else _Located(row)
        self._chunks[key] = located
        if len(self._chunks) > self._limit:
            self._chunks.popitem(last=False)
        return located

    def digest(self, point_id: int, cluster: int) -> bytes | None:
        """The recorded digest of `cluster` in `point_id`'s own file, or None when not stored."""
        chunk, relative = divmod(cluster, CHUNK_CLUSTERS)
        located = self.chunk(point_id, chunk)
        return None if located is None else located.find(relative)
