"""Read qcow2 images (and raw backing files) through their whole backing chain.

`Qcow2Image.open` validates a file (see `header.py`) and opens its backing chain; `runs()` gives
this file's own mapping as coalesced runs; `read()` returns guest bytes through the chain.
Every problem raises `Qcow2Error(path, problem)`; unsupported features raise
`UnsupportedFeatureError` naming the feature.

`open_image(path, format=None)` probes the magic: a qcow2 file opens as `Qcow2Image`; a file
with the magic of another known image format (VMDK, VDI, VHD, VHDX, QED, LUKS, qcow v1) is
refused by name; anything else is a raw image (raw has no magic, so every other file is a
valid raw disk). Pass `format="raw"` or `format="qcow2"` to skip probing.

Reads follow file semantics at the end of the top image: a read that runs past the virtual
size returns fewer bytes. Inside the chain, a backing file shorter than its overlay reads as
zeros past its end, as QEMU does.

Version 2 images have no zero flag in the spec, but QEMU honours bit 0 of an L2 entry in any
version; so does this reader, to agree with `qemu-img convert` byte for byte.
"""

from __future__ import annotations

import enum
import os
import stat
import sys
import threading
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lbstore.closing import Closing
from lbstore.errors import Qcow2Error, UnsupportedFeatureError
from lbstore.qcow2 import format as fmt
from lbstore.qcow2.compression import DecompressionError, decompress_cluster
from lbstore.qcow2.header import COMPRESSION_NAMES, Qcow2Header, l1_entries_needed, parse_header
from lbstore.qcow2.l2cache import DEFAULT_L2_CACHE_BYTES, L2Cache

DEFAULT_MAX_CHAIN_DEPTH = 1000
_BIG_ENDIAN_HOST = sys.byteorder == "big"
_ZEROS = bytes(1 << 20)
_ALL_SUBCLUSTERS = (1 << fmt.SUBCLUSTERS_PER_CLUSTER) - 1
_ZERO_NOT_COMPRESSED = fmt.QCOW_OFLAG_ZERO | fmt.QCOW_OFLAG_COMPRESSED
# An entry is unallocated (read from the backing file) when none of these bits is set.
_UNALLOCATED_TEST = fmt.QCOW_OFLAG_COMPRESSED | fmt.QCOW_OFLAG_ZERO | fmt.L2E_OFFSET_MASK
_MAX_PREAD = 1 << 30  # Linux caps one read at ~2 GiB; stay well below it
_PROBE = 8  # first stretch of L2 entries compared at C speed


class RunKind(enum.Enum):
    """How a range of guest bytes is stored in one image file."""

    DATA = "data"  # stored uncompressed here; host_offset is the file offset
    COMPRESSED = "compressed"  # stored compressed here (host_offset None)
    ZERO = "zero"  # reads as zeros (zero flag, allocated or not)
    BACKING = "backing"  # not allocated here: read from the backing file (zeros if none)


@dataclass(frozen=True, slots=True)
class Run:
    """A maximal range of guest bytes that one image file stores the same way."""

    kind: RunKind
    guest_offset: int
    length: int
    host_offset: int | None


# --- small address helpers -------------------------------------------------------------------


def _entries_from_bytes(data: bytes) -> array:
    """Big-endian 64-bit table entries as an array of host integers."""
    table = array("Q", data)
    if not _BIG_ENDIAN_HOST:
        table.byteswap()
    return table


def _compressed_extent(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, byte length) of the compressed data that a descriptor points to."""
    x = fmt.compressed_offset_bits(cluster_bits)
    host = entry & ((1 << x) - 1)
    sectors = ((entry >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return host, sectors * fmt.COMPRESSED_SECTOR_SIZE - (host % fmt.COMPRESSED_SECTOR_SIZE)


def _zero_entries_end(table: array, j: int, stop: int) -> int:
    """Index of the first non-zero entry in `table[j:stop]` (or `stop`), probing stretches of
    doubling length at C speed: linear in the stretch found, whatever the pattern."""
    step = _PROBE
    while j < stop:
        n = min(step, stop - j)
        if table[j : j + n].count(0) == n:
            j, step = j + n, step * 2
            continue
        while j < stop and table[j] == 0:  # the stretch ends in this probe
            j += 1
        return j
    return j


def _validate_read_args(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise ValueError(f"negative offset or length: {offset}, {length}")


class _File:
    """An open file descriptor with bounded, EOF-aware positional reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; no effect on files.
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise Qcow2Error(path, f"cannot open: {exc.strerror or exc}") from exc
        try:
            self.size = self._size()
        except BaseException:
            os.close(self.fd)
            raise

    def _size(self) -> int:
        """The file's size; only regular files and block devices can hold a disk image."""
        try:
            st = os.fstat(self.fd)
            self.identity = (st.st_dev, st.st_ino)
            if stat.S_ISREG(st.st_mode):
                return st.st_size
            if stat.S_ISBLK(st.st_mode):
                return os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as exc:
            raise Qcow2Error(self.path, f"cannot stat: {exc.strerror or exc}") from exc
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise Qcow2Error(self.path, f"{kind}: cannot hold a disk image")

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset`; short only at end of file."""
        length = max(0, min(length, self.size - offset))
        buf = bytearray(length)
        got = self.readinto_at(memoryview(buf), offset)
        return bytes(buf[:got])

    def readinto_at(self, dest: memoryview, offset: int) -> int:
        """Fill `dest` from `offset`; return how many bytes were read (short only at EOF)."""
        done = 0
        total = len(dest)
        while done < total:
            chunk = dest[done : done + _MAX_PREAD]
            try:
                got = os.preadv(self.fd, [chunk], offset + done)
            except OSError as exc:
                raise Qcow2Error(self.path, f"read error at {offset + done}: {exc}") from exc
            if got == 0:
                break
            done += got
        return done

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _ImageBase(Closing):
    """What qcow2 and raw images share: the context manager and closing the whole chain."""

    path: Path
    virtual_size: int
    backing: Qcow2Image | RawImage | None
    _file: _File

    def close(self) -> None:
        """Close this file and every backing file below it."""
        image: _ImageBase | None = self
        while image is not None:
            image._file.close()
            image = image.backing

    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes `[offset, offset + length)` through the chain (short past the end)."""
        _validate_read_args(offset, length)
        length = max(0, min(length, self.virtual_size - offset))
        buf = bytearray(length)
        _fill(self, offset, memoryview(buf), zeroed=True)
        return bytes(buf)

    def readinto(self, offset: int, buf: bytearray | memoryview) -> int:
        """Fill `buf` with guest bytes from `offset`; return the count (short past the end)."""
        view = memoryview(buf).cast("B")
        _validate_read_args(offset, len(view))
        length = max(0, min(len(view), self.virtual_size - offset))
        _fill(self, offset, view[:length], zeroed=False)
        return length


class RawImage(_ImageBase):
    """A raw disk image: guest offset == file offset, every byte of the file is the disk."""

    format = "raw"
    backing_file = None
    backing_format = None
    cluster_size = 512
    cluster_bits = 9
    version = 0

    def __init__(self, file: _File) -> None:
        self._file = file
        self.path = file.path
        self.virtual_size = file.size
        self.backing = None

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> RawImage:
        """Open a raw image file."""
        return cls(_File(Path(path)))

    def runs(self, offset: int = 0, length: int | None = None) -> Iterator[Run]:
        """DATA runs where the file has data, ZERO runs over its holes (SEEK_DATA/SEEK_HOLE)."""
        end = self.virtual_size if length is None else min(self.virtual_size, offset + length)
        pos = offset
        while pos < end:
            data = self._seek(pos, os.SEEK_DATA)
            if data is None or data >= end:
                yield Run(RunKind.ZERO, pos, end - pos, None)
                return
            if data > pos:
                yield Run(RunKind.ZERO, pos, data - pos, None)
            hole = self._seek(data, os.SEEK_HOLE)
            stop = end if hole is None else min(hole, end)
            yield Run(RunKind.DATA, data, stop - data, data)
            pos = stop

    def _seek(self, pos: int, whence: int) -> int | None:
        try:
            return os.lseek(self._file.fd, pos, whence)
        except OSError:  # ENXIO: no more data past pos (or no hole support)
            return None

    def _fill_own(self, offset: int, dest: memoryview, zeroed: bool) -> None:
        got = self._file.readinto_at(dest, offset)
        if got < len(dest) and not zeroed:
            _zero(dest[got:])


class Qcow2Image(_ImageBase):
    """One qcow2 file, validated on open, with its backing chain open below it."""

    format = "qcow2"

    def __init__(self, file: _File, header: Qcow2Header, l2_cache_bytes: int) -> None:
        self._file = file
        self.header = header
        self.path = file.path
        self.virtual_size = header.virtual_size
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.version = header.version
        self.backing_file = header.backing_file
        self.backing_format = header.backing_format
        self.backing: Qcow2Image | RawImage | None = None
        self.compression = COMPRESSION_NAMES[header.compression_type]
        self._l2_bits = header.l2_bits
        self._l1 = self._load_l1()
        self._l2_cache = L2Cache(self._load_l2, l2_cache_bytes)
        self._last_cluster: tuple[int, bytes] | None = None
        self._cluster_lock = threading.Lock()

    # --- opening ---

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH,
        l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES,
        backing: bool = True,
    ) -> Qcow2Image:
        """Open and validate `path` and its whole backing chain (or, with `backing=False`, the
        file alone: its BACKING runs then read as zeros; verify checks one file at a time)."""
        image = cls._open_single(Path(path), l2_cache_bytes)
        if not backing:
            return image
        try:
            _open_backing_chain(image, max_chain_depth, l2_cache_bytes)
        except BaseException:
            image.close()
            raise
        return image

    @classmethod
    def _open_single(cls, path: Path, l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES) -> Qcow2Image:
        file = _File(path)
        try:
            header = parse_header(path, file.read_at, file.size)
            return cls(file, header, l2_cache_bytes)
        except BaseException:
            file.close()
            raise

    def _load_l1(self) -> array:
        """The L1 entries this virtual size needs; every L2 pointer checked against the file."""
        h = self.header
        count = l1_entries_needed(h.virtual_size, h.cluster_bits, self._l2_bits)
        table = _entries_from_bytes(self._file.read_at(h.l1_table_offset, count * 8))
        cmask = self.cluster_size - 1
        limit = self._file.size - self.cluster_size
        for index, entry in enumerate(table):
            l2 = entry & fmt.L1E_OFFSET_MASK
            if l2 and (l2 & cmask or l2 > limit):
                raise Qcow2Error(
                    self.path,
                    f"L1 entry {index} points to an L2 table at {l2:#x}, which is "
                    f"{'unaligned' if l2 & cmask else 'past end of file'}",
                )
            table[index] = l2
        return table

    def _load_l2(self, offset: int) -> array:
        return _entries_from_bytes(self._file.read_at(offset, self.cluster_size))

    # --- mapping ---

    def runs(self, offset: int = 0, length: int | None = None) -> Iterator[Run]:
        """This file's own mapping of `[offset, offset + length)`, as coalesced runs."""
        _validate_read_args(offset, 0 if length is None else length)
        end = self.virtual_size if length is None else min(self.virtual_size, offset + length)
        for kind, guest, size, host in self._extents(offset, end, merge_compressed=True):
            yield Run(kind, guest, size, host if kind is RunKind.DATA else None)

    def _extents(
        self, offset: int, end: int, *, merge_compressed: bool = False
    ) -> Iterator[tuple[RunKind, int, int, int]]:
        """Coalesced (kind, guest offset, length, host) pieces; host is the L2 entry for
        COMPRESSED pieces, which are merged only when `merge_compressed` is set."""
        pending: list = [None, 0, 0, 0]
        for piece in self._pieces(offset, end):
            kind, _guest, size, host = piece
            pkind = pending[0]
            if kind is pkind and (
                (kind is RunKind.DATA and host == pending[3] + pending[2])
                or (kind is RunKind.COMPRESSED and merge_compressed)
                or kind is RunKind.ZERO
                or kind is RunKind.BACKING
            ):
                pending[2] += size
                continue
            if pkind is not None:
                yield tuple(pending)
            pending = list(piece)
        if pending[0] is not None:
            yield tuple(pending)

    def _pieces(self, offset: int, end: int) -> Iterator[tuple[RunKind, int, int, int]]:
        """Uncoalesced pieces, one per cluster (or subcluster group), unallocated L2 ranges
        as one piece each."""
        range_bits = self.cluster_bits + self._l2_bits
        pos = offset
        while pos < end:
            l1_index = pos >> range_bits
            range_start = l1_index << range_bits
            range_end = min(end, range_start + (1 << range_bits))
            l2_offset = self._l1[l1_index]
            if l2_offset == 0:
                yield (RunKind.BACKING, pos, range_end - pos, 0)
            else:
                table = self._l2_cache.get(l2_offset)
                if self.header.extended_l2:
                    yield from self._extended_l2_pieces(table, range_start, pos, range_end)
                else:
                    yield from self._l2_pieces(table, range_start, pos, range_end)
            pos = range_end

    def _l2_pieces(
        self, table: array, range_start: int, pos: int, end: int
    ) -> Iterator[tuple[RunKind, int, int, int]]:
        """Pieces of one standard L2 table, each a stretch of entries of one kind (DATA only
        while host offsets are contiguous); long stretches are found at C speed."""
        cbits = self.cluster_bits
        i = (pos - range_start) >> cbits
        stop = ((end - 1 - range_start) >> cbits) + 1
        while i < stop:
            entry = table[i]
            kind, host, j = self._classify_stretch(table, i, stop, entry, range_start)
            start = max(pos, range_start + (i << cbits))
            finish = min(end, range_start + (j << cbits))
            if kind is RunKind.DATA:
                host += start - range_start - (i << cbits)
            yield (kind, start, finish - start, host)
            i = j

    def _classify_stretch(
        self, table: array, i: int, stop: int, entry: int, range_start: int
    ) -> tuple[RunKind, int, int]:
        """(kind, host or descriptor, end index) of the stretch of entries starting at `i`."""
        if entry & fmt.QCOW_OFLAG_COMPRESSED:
            return RunKind.COMPRESSED, entry, i + 1
        if entry & fmt.QCOW_OFLAG_ZERO:
            j = i + 1
            while j < stop and table[j] & _ZERO_NOT_COMPRESSED == fmt.QCOW_OFLAG_ZERO:
                j += 1
            return RunKind.ZERO, 0, j
        host = entry & fmt.L2E_OFFSET_MASK
        if host == 0:
            j = _zero_entries_end(table, i + 1, stop) if entry == 0 else i + 1
            while j < stop and table[j] & _UNALLOCATED_TEST == 0:
                j += 1
            return RunKind.BACKING, 0, j
        if host & (self.cluster_size - 1):
            guest = range_start + (i << self.cluster_bits)
            raise Qcow2Error(self.path, f"L2 entry for guest {guest:#x}: unaligned host {host:#x}")
        return RunKind.DATA, host, self._contiguous_end(table, i, stop, entry)

    def _contiguous_end(self, table: array, i: int, stop: int, entry: int) -> int:
        """End index of the entries from `i` that continue `entry` cluster by cluster.

        Probes stretches of doubling length at C speed, so the cost stays linear in the
        length found whatever the pattern: O(1) for an isolated cluster, O(n) for a table.
        """
        csize = self.cluster_size
        j = i + 1
        expect = entry + csize
        step = _PROBE
        while j < stop:
            n = min(step, stop - j)
            last = expect + n * csize
            if last < 1 << 64 and table[j : j + n] == array("Q", range(expect, last, csize)):
                j, expect, step = j + n, last, step * 2
                continue
            while j < stop and table[j] == expect:  # the stretch ends in this probe
                j += 1
                expect += csize
            return j
        return j

    def _extended_l2_pieces(
        self, table: array, range_start: int, pos: int, end: int
    ) -> Iterator[tuple[RunKind, int, int, int]]:
        """Pieces from 128-bit L2 entries: 32 subclusters per cluster, each allocated (data at
        host + index * subcluster size), zero, or unallocated (read from the backing file)."""
        cbits = self.cluster_bits
        csize = self.cluster_size
        first = (pos - range_start) >> cbits
        last = (end - 1 - range_start) >> cbits
        for index in range(first, last + 1):
            entry = table[2 * index]
            cluster = range_start + (index << cbits)
            start = pos if pos > cluster else cluster
            stop = min(cluster + csize, end)
            if entry & fmt.QCOW_OFLAG_COMPRESSED:
                yield (RunKind.COMPRESSED, start, stop - start, entry)
                continue
            bitmap = table[2 * index + 1]
            alloc, zero = bitmap & _ALL_SUBCLUSTERS, bitmap >> fmt.SUBCLUSTERS_PER_CLUSTER
            host = entry & fmt.L2E_OFFSET_MASK
            self._check_extended_entry(cluster, host, alloc, zero)
            if alloc == _ALL_SUBCLUSTERS:
                yield (RunKind.DATA, start, stop - start, host + (start - cluster))
            elif zero == _ALL_SUBCLUSTERS:
                yield (RunKind.ZERO, start, stop - start, 0)
            elif alloc == 0 and zero == 0:
                yield (RunKind.BACKING, start, stop - start, 0)
            else:
                yield from self._subcluster_pieces(cluster, start, stop, host, alloc, zero)

    def _check_extended_entry(self, cluster: int, host: int, alloc: int, zero: int) -> None:
        problem = None
        if alloc & zero:
            problem = "a subcluster is marked both allocated and zero"
        elif alloc and host == 0:
            problem = "allocated subclusters without a host cluster"
        elif alloc and host & (self.cluster_size - 1):
            problem = f"unaligned host {host:#x}"
        if problem:
            raise Qcow2Error(self.path, f"L2 entry for guest {cluster:#x}: {problem}")

    def _subcluster_pieces(
        self, cluster: int, start: int, stop: int, host: int, alloc: int, zero: int
    ) -> Iterator[tuple[RunKind, int, int, int]]:
        sc_bits = self.cluster_bits - 5
        for sc in range((start - cluster) >> sc_bits, ((stop - 1 - cluster) >> sc_bits) + 1):
            s0 = max(start, cluster + (sc << sc_bits))
            s1 = min(stop, cluster + ((sc + 1) << sc_bits))
            if (alloc >> sc) & 1:
                yield (RunKind.DATA, s0, s1 - s0, host + (s0 - cluster))
            elif (zero >> sc) & 1:
                yield (RunKind.ZERO, s0, s1 - s0, 0)
            else:
                yield (RunKind.BACKING, s0, s1 - s0, 0)

    # --- reading ---

    def _fill_own(self, offset: int, dest: memoryview, zeroed: bool) -> list:
        """Fill `dest` from this file; return the BACKING pieces as (guest, length, dest pos)."""
        deferred = []
        file_size = self._file.size
        for kind, guest, size, host in self._extents(offset, offset + len(dest)):
            at = guest - offset
            part = dest[at : at + size]
            if kind is RunKind.DATA:
                if host + size > file_size:
                    raise Qcow2Error(
                        self.path,
                        f"data for guest {guest:#x} at host {host:#x} past end of file "
                        f"({file_size} bytes)",
                    )
                if self._file.readinto_at(part, host) != size:
                    raise Qcow2Error(self.path, f"short read at host {host:#x}")
            elif kind is RunKind.COMPRESSED:
                cluster = self._decompressed(host)
                within = guest & (self.cluster_size - 1)
                part[:] = cluster[within : within + size]
            elif kind is RunKind.BACKING and self.backing is not None:
                deferred.append((guest, size, at))
            elif not zeroed:
                _zero(part)
        return deferred

    def _decompressed(self, entry: int) -> bytes:
        """The cluster that compressed descriptor `entry` holds (last one cached)."""
        with self._cluster_lock:
            last = self._last_cluster
        if last is not None and last[0] == entry:
            return last[1]
        host, length = _compressed_extent(entry, self.cluster_bits)
        if host >= self._file.size:
            raise Qcow2Error(self.path, f"compressed cluster at {host:#x} past end of file")
        # QEMU's descriptor may count sectors past the end of a file that ends mid-sector.
        data = self._file.read_at(host, length)
        try:
            cluster = decompress_cluster(self.header.compression_type, data, self.cluster_size)
        except DecompressionError as exc:
            raise Qcow2Error(self.path, f"compressed cluster at {host:#x}: {exc}") from exc
        with self._cluster_lock:
            self._last_cluster = (entry, cluster)
        return cluster


# --- chain -------------------------------------------------------------------------------------


def _fill(top: _ImageBase, offset: int, dest: memoryview, *, zeroed: bool) -> None:
    """Fill `dest` with guest bytes from `offset` through the chain, without recursion:
    backing pieces go on a work list, so a 1000-deep chain costs no Python stack."""
    work: list[tuple[_ImageBase, int, int, int]] = [(top, offset, len(dest), 0)]
    while work:
        image, off, length, at = work.pop()
        part = dest[at : at + length]
        inside = max(0, min(length, image.virtual_size - off))
        if inside < length and not zeroed:
            _zero(part[inside:])
        if inside == 0:
            continue
        deferred = image._fill_own(off, part[:inside], zeroed)  # type: ignore[attr-defined]
        if deferred:
            assert image.backing is not None
            for guest, size, rel in deferred:
                work.append((image.backing, guest, size, at + rel))


def _zero(dest: memoryview) -> None:
    pos = 0
    while pos < len(dest):
        n = min(len(_ZEROS), len(dest) - pos)
        dest[pos : pos + n] = _ZEROS[:n]
        pos += n


def _resolve_backing(image: Qcow2Image) -> Path:
    name = image.backing_file
    assert name is not None
    if name.startswith("json:") or "://" in name:
        raise UnsupportedFeatureError(image.path, f"backing file protocol in {name!r}")
    path = Path(name)
    if not path.is_absolute():
        path = image.path.parent / path
    return path


def _open_backing_chain(top: Qcow2Image, max_depth: int, l2_cache_bytes: int) -> None:
    """Open the backing files below `top`, refusing loops and chains deeper than `max_depth`."""
    seen = {top._file.identity}
    image: Qcow2Image = top
    depth = 0
    while image.backing_file is not None:
        depth += 1
        if depth > max_depth:
            raise Qcow2Error(top.path, f"backing chain deeper than the limit of {max_depth}")
        path = _resolve_backing(image)
        if not path.exists():
            raise Qcow2Error(image.path, f"backing file {image.backing_file!r} not found")
        backing = _open_backing(image, path, l2_cache_bytes)
        image.backing = backing
        if backing._file.identity in seen:
            raise Qcow2Error(image.path, f"backing chain loops: {path} is already in the chain")
        seen.add(backing._file.identity)
        if isinstance(backing, RawImage):
            return
        image = backing


def _open_backing(image: Qcow2Image, path: Path, l2_cache_bytes: int) -> Qcow2Image | RawImage:
    kind = image.backing_format
    if kind is None:
        kind = probe_format(path)
    if kind == "qcow2":
        return Qcow2Image._open_single(path, l2_cache_bytes)
    if kind == "raw":
        return RawImage.open(path)
    raise UnsupportedFeatureError(image.path, f"backing file format {kind!r}")


# --- probing -----------------------------------------------------------------------------------

_OTHER_MAGICS = (
    (b"QFI\xfb\x00\x00\x00\x01", "qcow (version 1)"),
    (b"KDMV", "VMDK"),
    (b"# Disk DescriptorFile", "VMDK"),
    (b"conectix", "VHD"),
    (b"vhdxfile", "VHDX"),
    (b"QED\x00", "QED"),
    (b"LUKS\xba\xbe", "LUKS"),
)


def probe_format(path: str | os.PathLike[str]) -> str:
    """'qcow2', 'raw', or the name of another image format that lbstore does not read."""
    file = _File(Path(path))
    try:
        head = file.read_at(0, 128)
    finally:
        file.close()
    for magic, name in _OTHER_MAGICS:
        if head.startswith(magic):
            return name
    if head[64:68] == b"\x7f\x10\xda\xbe":  # VDI signature after its text banner
        return "VDI"
    if head.startswith(fmt.QCOW_MAGIC):
        return "qcow2"
    return "raw"


def open_image(
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    max_chain_depth: int = DEFAULT_MAX_CHAIN_DEPTH,
) -> Qcow2Image | RawImage:
    """Open a qcow2 or raw image; `format=None` probes the magic (see the module docstring)."""
    kind = format or probe_format(path)
    if kind == "qcow2":
        return Qcow2Image.open(path, max_chain_depth=max_chain_depth)
    if kind == "raw":
        return RawImage.open(path)
    if format is None:
        raise UnsupportedFeatureError(Path(path), f"image format {kind} (only qcow2 and raw)")
    raise Qcow2Error(Path(path), f"unknown image format {format!r} (expected qcow2 or raw)")
