"""Streaming qcow2 v3 writer: data and zero runs in any order, metadata written on close.

Data clusters are appended to the file as they arrive, so memory is bounded by the metadata
(the L2 tables of the ranges that were touched), never by the data. On close the writer
appends the L2 tables, the L1 table and the refcount structures, then writes the header in
cluster 0 and fsyncs. Until then cluster 0 stays empty, so an interrupted file is never taken
for a valid image. Layout and names follow QEMU's docs/interop/qcow2.txt.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys
import threading
import zlib
from array import array
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import zstandard

from lbstore.errors import Qcow2Error, Qcow2WriteError
from lbstore.qcow2.allocation import (
    MAX_REFCOUNT,
    QCOW_MAX_L1_SIZE,
    QCOW_MAX_REFTABLE_SIZE,
    CompressedRefcounts,
    Geometry,
    L2Tables,
    cluster_bits_of,
    compressed_descriptor,
    l1_table_bytes,
    refcount_layout,
)
from lbstore.qcow2.format import (
    AUTOCLEAR_BITMAPS,
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_ZLIB,
    COMPRESSION_ZSTD,
    CRYPT_NONE,
    DEFAULT_REFCOUNT_ORDER,
    FEATURE_TYPE_AUTOCLEAR,
    FEATURE_TYPE_COMPATIBLE,
    FEATURE_TYPE_INCOMPATIBLE,
    HEADER_EXTENSION_BACKING_FORMAT,
    HEADER_EXTENSION_END,
    HEADER_EXTENSION_FEATURE_NAME_TABLE,
    HEADER_V3_LENGTH_WITH_COMPRESSION,
    INCOMPAT_COMPRESSION_TYPE,
    INCOMPAT_NAMES,
    QCOW_OFLAG_COPIED,
    FeatureNameEntry,
    HeaderExtensionHeader,
    HeaderV2,
    HeaderV3Additional,
    HeaderV3CompressionType,
)

Compression = Literal["zlib", "zstd"]

MAX_BACKING_FILE_NAME = 1023  # qcow2.txt: backing_file_size "must not be larger than 1023"
SECTOR_SIZE = 512  # QEMU sizes block devices in 512-byte sectors
IOV_MAX = 1024
METADATA_BATCH = 4 * 1024 * 1024  # bytes of L2/refcount tables gathered per pwritev
# Worker threads compress clusters in parallel (zlib and zstd release the GIL).
COMPRESS_THREADS = min(4, os.cpu_count() or 1)
COMPRESS_BATCH = 8 * 1024 * 1024  # guest bytes compressed and written out together
WRITEBACK_WINDOW = 8 * 1024 * 1024  # plain data gathered before its writeback is started
PAGE_SIZE = mmap.PAGESIZE
# Plain data runs at least this long, page-aligned in the file and in memory, bypass the page
# cache (O_DIRECT): no copy into the cache and no reclaim of cache pages to make room, which on
# a busy host costs more CPU than the whole checksum. Shorter or unaligned runs stay buffered.
DIRECT_MIN = 256 * 1024
# O_DIRECT writes wait for the device; a long run is cut into this many page-aligned pieces
# written at once (one on the caller's thread), so the device has several requests to work on.
DIRECT_STREAMS = 4

# Names QEMU writes into the feature name table, so `qemu-img info` can name every bit.
_FEATURE_NAMES = [
    *((FEATURE_TYPE_INCOMPATIBLE, bit, name) for bit, name in INCOMPAT_NAMES.items()),
    (FEATURE_TYPE_COMPATIBLE, COMPAT_LAZY_REFCOUNTS, "lazy refcounts"),
    (FEATURE_TYPE_AUTOCLEAR, AUTOCLEAR_BITMAPS, "bitmaps"),
    (FEATURE_TYPE_AUTOCLEAR, AUTOCLEAR_DATA_FILE_RAW, "raw external data"),
]

_zstd_local = threading.local()


def _compress_zlib(cluster: bytes | memoryview) -> bytes:
    """Raw deflate with a 4 KiB window (wbits -12), the way QEMU compresses qcow2 clusters."""
    return zlib.compress(cluster, zlib.Z_DEFAULT_COMPRESSION, -12)


def _compress_zstd(cluster: bytes | memoryview) -> bytes:
    """One zstd frame per cluster; one compressor per thread (they are not thread-safe)."""
    compressor = getattr(_zstd_local, "compressor", None)
    if compressor is None:
        compressor = _zstd_local.compressor = zstandard.ZstdCompressor()
    return compressor.compress(cluster)


_COMPRESSORS: dict[str, Callable[[bytes | memoryview], bytes]] = {
    "zlib": _compress_zlib,
    "zstd": _compress_zstd,
}


def _pad8(data: bytes) -> bytes:
    return data + bytes(-len(data) % 8)


def _extension(kind: int, data: bytes) -> bytes:
    """One header extension: type, length of the data, data padded to 8 bytes."""
    return HeaderExtensionHeader.build({"type": kind, "length": len(data)}) + _pad8(data)


def _feature_name_table() -> bytes:
    return b"".join(
        FeatureNameEntry.build({"type": kind, "bit": mask.bit_length() - 1, "name": name})
        for kind, mask, name in _FEATURE_NAMES
    )


def _to_big_endian(table: array[int]) -> bytes:
    """The bytes of a table of entries, big-endian as qcow2 stores every integer."""
    if sys.byteorder == "little":
        table = array(table.typecode, table)
        table.byteswap()
    return table.tobytes()


def _pwrite_all(fd: int, chunks: Sequence[bytes | memoryview], offset: int) -> None:
    """Write ``chunks`` back to back at ``offset``: few syscalls, short writes resumed."""
    for start in range(0, len(chunks), IOV_MAX):
        group = chunks[start : start + IOV_MAX]
        total = sum(len(chunk) for chunk in group)
        done = os.pwritev(fd, group, offset)
        if done < total:
            _finish_short_write(fd, group, offset, done)
        offset += total


def _finish_short_write(
    fd: int, chunks: Sequence[bytes | memoryview], offset: int, done: int
) -> None:
    position = offset
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        skip = min(len(view), max(0, offset + done - position))
        position += skip
        view = view[skip:]
        while view:
            written = os.pwrite(fd, view, position)
            if written <= 0:
                raise OSError(errno.EIO, "write made no progress")
            view = view[written:]
            position += written


def _open_direct(path: Path) -> int | None:
    """A second descriptor of the new file for O_DIRECT writes; None where the file system
    has no O_DIRECT (tmpfs on older kernels, some FUSE file systems)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC | flag)
    except OSError:
        return None


class _PendingWrites:
    """Pieces bound for the file, coalesced into contiguous segments for few pwritev calls."""

    def __init__(self) -> None:
        self._segments: list[tuple[int, list[bytes | memoryview]]] = []
        self._end = -1

    def add(self, offset: int, chunk: bytes | memoryview) -> None:
        if offset != self._end:
            self._segments.append((offset, []))
        self._segments[-1][1].append(chunk)
        self._end = offset + len(chunk)

    def flush(self, fd: int) -> None:
        for offset, chunks in self._segments:
            _pwrite_all(fd, chunks, offset)
        self._segments.clear()
        self._end = -1


class _Writeback:
    """Starts writeback of finished data early, so that close() does not wait for it all.

    Whole pages of plain data runs are never written again, so once a contiguous stretch
    of them reaches WRITEBACK_WINDOW bytes, POSIX_FADV_DONTNEED starts their writeback and
    lets the kernel drop them from the page cache when clean: the disk works while data
    still arrives, and a backup does not push the host's useful cache out. Advisory only:
    a write error still surfaces in the final fsync.
    """

    def __init__(self) -> None:
        self._start = self._end = 0

    def written(self, fd: int, offset: int, length: int) -> None:
        start = -(-offset // PAGE_SIZE) * PAGE_SIZE
        end = (offset + length) // PAGE_SIZE * PAGE_SIZE
        if end <= start:
            return
        if start != self._end:
            self.flush(fd)
            self._start = start
        self._end = end
        if self._end - self._start >= WRITEBACK_WINDOW:
            self.flush(fd)

    def flush(self, fd: int) -> None:
        if self._end > self._start:
            with suppress(OSError):
                os.posix_fadvise(fd, self._start, self._end - self._start, os.POSIX_FADV_DONTNEED)
        self._start = self._end


class Qcow2Writer:
    """Write a new qcow2 v3 image from cluster-aligned data and zero runs, in any order.

    ``stored_bytes`` counts the data bytes written to the file so far: whole clusters for
    uncompressed data (including the zero padding of a partial last cluster), the
    compressed size for compressed clusters. Metadata is not counted.

    The file is created exclusively (an existing file is never overwritten), so ``abort()``
    only ever deletes what this writer created.

    ``direct`` (default off; the store's ingest turns it on): long plain data runs in
    page-aligned memory are written with O_DIRECT, in DIRECT_STREAMS pieces at once;
    everything else goes through the page cache. The final fsync covers both, so durability
    and the close() ordering are unchanged.

    ``header_barrier`` (default on): close() fsyncs everything before it writes the header,
    so a crash never leaves a file that looks valid with its data missing. A caller that
    writes into a scratch name and renames the file only after close() (the store's ingest)
    does not need that and saves a flush.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        virtual_size: int,
        *,
        cluster_size: int = 65536,
        backing_file: str | None = None,
        backing_format: str | None = None,
        compression: Compression | None = None,
        direct: bool = False,
        header_barrier: bool = True,
    ) -> None:
        self.path = Path(path)
        self._header_barrier = header_barrier
        cluster_bits = self._check_options(virtual_size, cluster_size, compression)
        self._geometry = Geometry(cluster_bits, virtual_size)
        self._compression = compression
        self._compress = _COMPRESSORS[compression] if compression else None
        self._header_tail, self._backing_offset, self._backing_size = self._header_extensions(
            backing_file, backing_format
        )
        self._l2 = L2Tables(self._geometry)
        self._compressed_refs = CompressedRefcounts(self._geometry)
        self._end = cluster_size  # next free host offset; cluster 0 holds the header
        self._compressed_next = 0  # next free byte for compressed data (0: none yet)
        self._compressed_end = 0  # end of the host clusters given to compressed data
        self._pool: ThreadPoolExecutor | None = None
        self._writeback = _Writeback()
        self._failed: str | None = None
        self._closed = False
        self.stored_bytes = 0
        with self._os_errors("cannot create the file"):
            self._fd: int | None = os.open(
                self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
        self._direct_fd = _open_direct(self.path) if direct else None
        self._direct_writers: ThreadPoolExecutor | None = None

    # --- validation -------------------------------------------------------------------------

    def _check_options(self, virtual_size: int, cluster_size: int, compression: str | None) -> int:
        cluster_bits = cluster_bits_of(cluster_size)
        if cluster_bits is None:
            raise Qcow2Error(
                self.path, f"cluster size {cluster_size} is not a power of two from 512 B to 2 MiB"
            )
        if virtual_size < 0 or virtual_size % SECTOR_SIZE:
            raise Qcow2Error(
                self.path, f"virtual size {virtual_size} is not a non-negative multiple of 512"
            )
        if l1_table_bytes(Geometry(cluster_bits, virtual_size)) > QCOW_MAX_L1_SIZE:
            raise Qcow2Error(
                self.path,
                f"virtual size {virtual_size} is too large for {cluster_size}-byte clusters",
            )
        if compression is not None and compression not in _COMPRESSORS:
            raise Qcow2Error(self.path, f"unknown compression {compression!r}")
        return cluster_bits

    def _header_extensions(
        self, backing_file: str | None, backing_format: str | None
    ) -> tuple[bytes, int, int]:
        """Header extensions and backing file name, which must all fit in cluster 0.

        Returns the bytes that follow the fixed header, the backing file name's offset and
        its size (0, 0 without a backing file). The optional feature name table is left out
        when it would not fit, as QEMU does for small clusters.
        """
        if backing_format is not None and backing_file is None:
            raise Qcow2Error(self.path, "a backing format needs a backing file")
        name = b"" if backing_file is None else backing_file.encode()
        if backing_file is not None and not 0 < len(name) <= MAX_BACKING_FILE_NAME:
            raise Qcow2Error(self.path, "backing file name must be 1 to 1023 bytes")
        if b"\0" in name:
            raise Qcow2Error(self.path, "backing file name contains a NUL byte")
        extensions = b""
        if backing_format is not None:
            extensions += _extension(HEADER_EXTENSION_BACKING_FORMAT, backing_format.encode())
        end = _extension(HEADER_EXTENSION_END, b"")
        features = _extension(HEADER_EXTENSION_FEATURE_NAME_TABLE, _feature_name_table())
        for tail in (extensions + features + end, extensions + end):
            backing_offset = HEADER_V3_LENGTH_WITH_COMPRESSION + len(tail)
            if backing_offset + len(name) <= self._geometry.cluster_size:
                return tail + name, (backing_offset if name else 0), len(name)
        raise Qcow2Error(self.path, "backing file name and format do not fit in the header cluster")

    def _check_usable(self) -> None:
        if self._closed:
            raise Qcow2Error(self.path, "the writer is closed")
        if self._failed is not None:
            raise Qcow2Error(self.path, f"the writer failed earlier: {self._failed}")

    def _check_range(self, offset: int, length: int, what: str) -> tuple[int, int]:
        """Validate a run; returns (first guest cluster, number of clusters)."""
        self._check_usable()
        size = self._geometry.virtual_size
        cluster_size = self._geometry.cluster_size
        end = offset + length
        if offset < 0 or length < 0 or end > size:
            raise Qcow2Error(
                self.path, f"{what} of {length} bytes at {offset} is outside the disk ({size})"
            )
        if offset % cluster_size:
            raise Qcow2Error(
                self.path, f"{what} at {offset} is not aligned to the cluster size {cluster_size}"
            )
        if length % cluster_size and end != size:
            raise Qcow2Error(
                self.path,
                f"{what} of {length} bytes at {offset} is not a whole number of clusters"
                " and does not end at the end of the disk",
            )
        first = offset // cluster_size
        count = self._geometry.clusters_for(length)
        if self._l2.any_written(first, count):
            again = self._l2.first_written(first, count)
            raise Qcow2Error(
                self.path, f"{what}: the cluster at {(again or 0) * cluster_size} is written twice"
            )
        return first, count

    @contextmanager
    def _os_errors(self, action: str) -> Iterator[None]:
        """Turn an OSError into a Qcow2WriteError and mark the writer failed."""
        try:
            yield
        except OSError as exc:
            self._failed = f"{action}: {exc.strerror or exc}"
            raise Qcow2WriteError(self.path, self._failed, exc.errno) from exc

    # --- data -------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store guest data at ``offset``: whole clusters, or up to the end of the disk."""
        view = memoryview(data).cast("B")
        first, count = self._check_range(offset, len(view), "write")
        if count == 0:
            return
        with self._os_errors("writing data"):
            if self._compress is None:
                self._write_plain(first, count, view)
            else:
                self._write_compressed(first, count, view)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Mark guest clusters as zero clusters: they read as zeros whatever the backing file."""
        first, count = self._check_range(offset, length, "write_zeroes")
        self._l2.set_zero(first, count)

    def _write_plain(self, first: int, count: int, view: memoryview) -> None:
        host = self._end
        nbytes = count * self._geometry.cluster_size
        chunks: list[bytes | memoryview] = [view]
        if len(view) < nbytes:
            chunks.append(bytes(nbytes - len(view)))
        # Buffered: one pwritev for the whole run (buffered writes to one file are serialized
        # by the kernel's inode lock, so threads would not help). O_DIRECT writes wait for the
        # device instead, so _write_direct keeps several of them in flight.
        fd = self._require_fd()
        if len(chunks) > 1 or not self._write_direct(view, host):
            _pwrite_all(fd, chunks, host)
            self._writeback.written(fd, host, nbytes)
        self._end += nbytes
        self._l2.set_data(first, count, host)
        self.stored_bytes += nbytes

    def _write_direct(self, view: memoryview, host: int) -> bool:
        """Write `view` at `host` bypassing the page cache; False when it cannot (unaligned
        memory, offset or length, or a file system without O_DIRECT): write it buffered."""
        fd = self._direct_fd
        if fd is None or len(view) < DIRECT_MIN or (host | len(view)) % PAGE_SIZE:
            return False
        step = -(-len(view) // DIRECT_STREAMS // PAGE_SIZE) * PAGE_SIZE
        pieces = [(host + at, view[at : at + step]) for at in range(0, len(view), step)]
        pool = self._direct_pool() if len(pieces) > 1 else None
        others = (
            [pool.submit(self._pwrite_direct, fd, *piece) for piece in pieces[1:]] if pool else []
        )
        errors = []
        try:
            self._pwrite_direct(fd, *pieces[0])
        except OSError as exc:
            errors.append(exc)
        for future in others:
            try:
                future.result()
            except OSError as exc:
                errors.append(exc)
        for error in errors:
            if error.errno != errno.EINVAL:
                raise error
        # EINVAL: the memory is not aligned (nothing was written) or a piece was refused;
        # writing the run buffered over whatever went through is harmless.
        return not errors

    def _pwrite_direct(self, fd: int, host: int, piece: memoryview) -> None:
        done = os.pwritev(fd, [piece], host)
        if done < len(piece):
            _finish_short_write(self._require_fd(), [piece], host, done)

    def _direct_pool(self) -> ThreadPoolExecutor:
        if self._direct_writers is None:
            self._direct_writers = ThreadPoolExecutor(
                DIRECT_STREAMS - 1, thread_name_prefix="qcow2-direct"
            )
        return self._direct_writers

    def _write_compressed(self, first: int, count: int, view: memoryview) -> None:
        """Compress cluster by cluster, in batches so that memory stays bounded by a batch."""
        cluster_size = self._geometry.cluster_size
        per_batch = max(1, COMPRESS_BATCH // cluster_size)
        for start in range(0, count, per_batch):
            stop = min(count, start + per_batch)
            clusters: list[bytes | memoryview] = [
                view[i * cluster_size : (i + 1) * cluster_size] for i in range(start, stop)
            ]
            if len(clusters[-1]) < cluster_size:
                clusters[-1] = bytes(clusters[-1]) + bytes(cluster_size - len(clusters[-1]))
            self._store_clusters(first + start, clusters)

    def _store_clusters(self, first: int, clusters: list[bytes | memoryview]) -> None:
        """Store each cluster compressed if that is smaller, else as it is."""
        cluster_size = self._geometry.cluster_size
        pending = _PendingWrites()
        packed_clusters = self._compress_all(clusters)
        for index, (raw, packed) in enumerate(zip(clusters, packed_clusters, strict=True)):
            if len(packed) < cluster_size:
                host = self._place_compressed(len(packed))
                entry = compressed_descriptor(host, len(packed), self._geometry.cluster_bits)
                self._l2.set_entry(first + index, entry)
                pending.add(host, packed)
                self.stored_bytes += len(packed)
            else:
                host = self._end
                self._end += cluster_size
                self._l2.set_data(first + index, 1, host)
                pending.add(host, raw)
                self.stored_bytes += cluster_size
        pending.flush(self._require_fd())

    def _compress_all(self, clusters: list[bytes | memoryview]) -> Iterator[bytes]:
        """Compress clusters in order; zlib and zstd release the GIL, so threads help."""
        assert self._compress is not None
        if len(clusters) < 2 * COMPRESS_THREADS or COMPRESS_THREADS == 1:
            return map(self._compress, clusters)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(COMPRESS_THREADS, thread_name_prefix="qcow2-compress")
        return self._pool.map(self._compress, clusters)

    def _place_compressed(self, length: int) -> int:
        """Host offset for ``length`` bytes of compressed data, packed as QEMU packs them.

        Compressed clusters follow each other byte by byte, sharing host clusters. When the
        current host cluster is full, the data spills into the next one if that one is the
        end of the file; otherwise a fresh host cluster is started. A host cluster never
        gets more references than a 16-bit refcount can count.

        Each compressed cluster starts at an even offset: libqcow (20240308) takes bit 0 of a
        compressed cluster descriptor for the zero flag and misreads odd offsets, even in
        images written by QEMU. One byte of padding at most keeps our images readable there.
        """
        cluster_size = self._geometry.cluster_size
        start = self._compressed_next + (self._compressed_next & 1)
        tail_shareable = (
            start % cluster_size == 0
            or self._compressed_refs.get(start // cluster_size) < MAX_REFCOUNT
        )
        if start and start + length <= self._compressed_end and tail_shareable:
            pass
        elif start and self._compressed_end == self._end and tail_shareable:
            self._end = self._compressed_end = self._round_up(start + length)
        else:
            start = self._end
            self._end = self._compressed_end = self._round_up(start + length)
        self._compressed_next = start + length
        self._compressed_refs.add(start // cluster_size, (start + length - 1) // cluster_size)
        return start

    def _round_up(self, offset: int) -> int:
        return -(-offset // self._geometry.cluster_size) * self._geometry.cluster_size

    def _require_fd(self) -> int:
        if self._fd is None:
            raise Qcow2Error(self.path, "the writer is closed")
        return self._fd

    # --- close ------------------------------------------------------------------------------

    def close(self) -> None:
        """Write the L2 tables, L1 table, refcounts and header; fsync; close the file."""
        if self._closed:
            return
        self._check_usable()
        fd = self._require_fd()
        with self._os_errors("writing metadata"):
            self._writeback.flush(fd)
            l1_offset = self._write_l2_and_l1(fd)
            reftable_offset, reftable_clusters = self._write_refcounts(fd)
            if self._header_barrier:
                os.fsync(fd)
            header = self._header(l1_offset, reftable_offset, reftable_clusters)
            _pwrite_all(fd, [header], 0)
            os.fsync(fd)
            self._fd = None
            os.close(fd)
            self._close_direct()
        self._closed = True
        self._shutdown_pool()

    def _write_l2_and_l1(self, fd: int) -> int:
        """Append every touched L2 table, then the L1 table; returns the L1 table's offset."""
        cluster_size = self._geometry.cluster_size
        l1 = array("Q", bytes(l1_table_bytes(self._geometry)))
        batch: list[bytes] = []
        batch_offset = self._end
        for l1_index, table in self._l2.items():
            l1[l1_index] = self._end | QCOW_OFLAG_COPIED
            batch.append(_to_big_endian(table))
            self._end += cluster_size
            if len(batch) * cluster_size >= METADATA_BATCH:
                _pwrite_all(fd, batch, batch_offset)
                batch, batch_offset = [], self._end
        _pwrite_all(fd, batch, batch_offset)
        if not len(l1):
            return 0
        l1_offset = self._end
        l1_bytes = _to_big_endian(l1)
        l1_bytes += bytes(-len(l1_bytes) % cluster_size)
        _pwrite_all(fd, [l1_bytes], l1_offset)
        self._end += len(l1_bytes)
        return l1_offset

    def _write_refcounts(self, fd: int) -> tuple[int, int]:
        """Append the refcount table and blocks, covering every cluster including their own."""
        cluster_size = self._geometry.cluster_size
        existing = self._end // cluster_size
        table_clusters, blocks = refcount_layout(existing, self._geometry)
        if table_clusters * cluster_size > QCOW_MAX_REFTABLE_SIZE:
            raise Qcow2Error(self.path, "the image is too large for its refcount table")
        table_offset = self._end
        first_block = table_offset + table_clusters * cluster_size
        total = existing + table_clusters + blocks
        table = array("Q", bytes(table_clusters * cluster_size))
        for index in range(blocks):
            table[index] = first_block + index * cluster_size
        _pwrite_all(fd, [_to_big_endian(table)], table_offset)
        batch: list[bytes] = []
        batch_offset = first_block
        for index in range(blocks):
            batch.append(_to_big_endian(self._compressed_refs.block(index, total)))
            if len(batch) * cluster_size >= METADATA_BATCH:
                _pwrite_all(fd, batch, batch_offset)
                batch_offset += len(batch) * cluster_size
                batch = []
        _pwrite_all(fd, batch, batch_offset)
        self._end = total * cluster_size
        return table_offset, table_clusters

    def _header(self, l1_offset: int, reftable_offset: int, reftable_clusters: int) -> bytes:
        zstd = self._compression == "zstd"
        fixed = HeaderV2.build(
            {
                "version": 3,
                "backing_file_offset": self._backing_offset,
                "backing_file_size": self._backing_size,
                "cluster_bits": self._geometry.cluster_bits,
                "size": self._geometry.virtual_size,
                "crypt_method": CRYPT_NONE,
                "l1_size": self._geometry.l1_size,
                "l1_table_offset": l1_offset,
                "refcount_table_offset": reftable_offset,
                "refcount_table_clusters": reftable_clusters,
                "nb_snapshots": 0,
                "snapshots_offset": 0,
            }
        )
        v3 = HeaderV3Additional.build(
            {
                "incompatible_features": INCOMPAT_COMPRESSION_TYPE if zstd else 0,
                "compatible_features": 0,
                "autoclear_features": 0,
                "refcount_order": DEFAULT_REFCOUNT_ORDER,
                "header_length": HEADER_V3_LENGTH_WITH_COMPRESSION,
            }
        )
        compression = HeaderV3CompressionType.build(
            {
                "compression_type": COMPRESSION_ZSTD if zstd else COMPRESSION_ZLIB,
                "padding": bytes(7),
            }
        )
        return fixed + v3 + compression + self._header_tail

    # --- abort and context manager ----------------------------------------------------------

    def abort(self) -> None:
        """Close the file and delete it. Safe to call at any time; after a successful
        close() it deletes the finished file too (a caller that rejects the result)."""
        fd, self._fd = self._fd, None
        self._closed = True
        self._shutdown_pool()
        self._close_direct()
        if fd is not None:
            with suppress(OSError):
                os.close(fd)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise Qcow2WriteError(self.path, f"cannot remove: {exc.strerror}", exc.errno) from exc

    def _close_direct(self) -> None:
        if self._direct_writers is not None:
            self._direct_writers.shutdown(wait=True)
            self._direct_writers = None
        fd, self._direct_fd = self._direct_fd, None
        if fd is not None:
            with suppress(OSError):
                os.close(fd)

    def _shutdown_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()
            raise
