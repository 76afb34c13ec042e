"""File-like adapters: the dissect parsers read through these, never through copies of disks.

`SourceStream` turns a ByteSource into the seek/read object the parsers want, optionally with an
overlay of replayed journal blocks on top, and charges every byte read to a `ReadBudget`: damaged
metadata (a loop of tree pointers, a chain of clusters that comes back to itself) then ends in a
ReadBudgetError instead of a hang. `SubSource` is a byte range of a source (a partition),
`StreamSource` a ByteSource over a parser's stream (an LVM logical volume).
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator, Mapping
from typing import BinaryIO

from lbguest.errors import ReadBudgetError, SourceUnreadableError
from lbguest.model import ByteSource
from lbstore.errors import StoreError

UNLIMITED = 1 << 62


class ReadBudget:
    """How many bytes the current request may still read (per thread; unlimited outside one)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._local = threading.local()

    @contextlib.contextmanager
    def limit(self, budget: int) -> Iterator[None]:
        """Allow `budget` bytes of reads inside the block (nested limits keep the outer one)."""
        if getattr(self._local, "remaining", None) is not None:
            yield
            return
        self._local.remaining = budget
        self._local.budget = budget
        try:
            yield
        finally:
            self._local.remaining = None

    def charge(self, length: int) -> None:
        """Count `length` bytes read; raise ReadBudgetError past the limit."""
        remaining = getattr(self._local, "remaining", None)
        if remaining is None:
            return
        remaining -= max(length, 512)  # many tiny reads are work too
        self._local.remaining = remaining
        if remaining < 0:
            raise ReadBudgetError(self.name, self._local.budget)


def read_source(source: ByteSource, offset: int, length: int, name: str) -> bytes:
    """`length` bytes of `source` at `offset`, clipped to its end; read failures become
    SourceUnreadableError (a damaged stored cluster, an I/O error)."""
    if offset < 0:
        raise SourceUnreadableError(name, ValueError(f"negative offset {offset}"))
    length = max(0, min(length, source.size - offset))
    if length == 0:
        return b""
    try:
        data = source.read(offset, length)
    except (StoreError, OSError, EOFError) as exc:
        raise SourceUnreadableError(name, exc) from exc
    return data if type(data) is bytes else bytes(data)


def readinto_source(source: ByteSource, offset: int, dest: memoryview, name: str) -> int:
    """Fill `dest` from `source` at `offset` (clipped to its end; straight into the buffer when
    the source can); bytes filled. Read failures become SourceUnreadableError.

    A source with an `alignment` (a chain view: its cluster size) reads whole aligned clusters
    straight into the buffer but bounces partial ones through a scratch buffer, so a long read
    that starts or ends mid-cluster (a guest file's blocks rarely sit on cluster boundaries) is
    split: the partial head and tail alone, the aligned middle in one zero-copy read."""
    length = max(0, min(len(dest), source.size - offset))
    if length == 0:
        return 0
    align = getattr(source, "alignment", 0)
    if align and length > 2 * align and (offset % align or length % align):
        head = -offset % align
        middle = (length - head) // align * align
        filled = 0
        for lo, hi in ((0, head), (head, head + middle), (head + middle, length)):
            if hi > lo:
                filled += _readinto_once(source, offset + lo, dest[lo:hi], name)
        return filled
    return _readinto_once(source, offset, dest[:length], name)


def _readinto_once(source: ByteSource, offset: int, dest: memoryview, name: str) -> int:
    length = len(dest)
    readinto = getattr(source, "readinto", None)
    if readinto is None:
        data = read_source(source, offset, length, name)
        dest[: len(data)] = data
        return len(data)
    try:
        return int(readinto(offset, dest[:length]))
    except (StoreError, OSError, EOFError) as exc:
        raise SourceUnreadableError(name, exc) from exc


class SubSource:
    """`length` bytes of another source starting at `start` (a partition of a disk)."""

    def __init__(self, source: ByteSource, start: int, length: int) -> None:
        self._source = source
        self._start = start
        self.size = max(0, min(length, source.size - start))
        align = getattr(source, "alignment", 0)
        self.alignment = align if align and start % align == 0 else 0

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the range (clipped to it)."""
        length = max(0, min(length, self.size - offset))
        return self._source.read(self._start + offset, length) if length else b""

    def readinto(self, offset: int, dest: memoryview) -> int:
        """Fill `dest` from the range at `offset` (clipped to it); bytes filled."""
        length = max(0, min(len(dest), self.size - offset))
        if length == 0:
            return 0
        return _readinto_once(self._source, self._start + offset, dest[:length], "range")


class StreamSource:
    """A ByteSource over a parser's seekable stream of known size (reads serialised)."""

    def __init__(self, stream: BinaryIO, size: int) -> None:
        self._stream = stream
        self.size = size
        self._lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the stream at `offset`."""
        with self._lock:
            self._stream.seek(offset)
            return self._stream.read(length)


class SourceStream(io.RawIOBase):
    """A read-only, seekable file over a ByteSource (+ overlay of whole blocks), budgeted."""

    def __init__(
        self,
        source: ByteSource,
        budget: ReadBudget,
        *,
        overlay: Mapping[int, bytes] | None = None,
        block_size: int = 4096,
    ) -> None:
        super().__init__()
        self._source = source
        self._budget = budget
        self._overlay = overlay or {}
        self._block_size = block_size
        self._position = 0
        self.size = source.size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self.size - self._position
        data = self.pread(self._position, size)
        self._position += len(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)

    def preadinto(self, offset: int, dest: memoryview) -> int:
        """Fill `dest` with the bytes at `offset` (short at the end), overlay included."""
        if self._overlay:
            data = self.pread(offset, len(dest))
            dest[: len(data)] = data
            return len(data)
        self._budget.charge(len(dest))
        return readinto_source(self._source, offset, dest, self._budget.name)

    def pread(self, offset: int, length: int) -> bytes:
        """Bytes at `offset` (short at the end), with overlay blocks in place."""
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        self._budget.charge(length)
        data = read_source(self._source, offset, length, self._budget.name)
        if not self._overlay:
            return data
        return patch_blocks(data, offset, self._overlay, self._block_size)


def patch_blocks(data: bytes, offset: int, overlay: Mapping[int, bytes], block_size: int) -> bytes:
    """`data` (read at `offset`) with every overlapping block of `overlay` put in its place."""
    first, last = offset // block_size, (offset + len(data) - 1) // block_size
    if last - first + 1 > len(overlay):
        hits = sorted(block for block in overlay if first <= block <= last)
    else:
        hits = [block for block in range(first, last + 1) if block in overlay]
    if not hits:
        return data
    patched = bytearray(data)
    for block in hits:
        block_start = block * block_size
        lo, hi = max(block_start, offset), min(block_start + block_size, offset + len(data))
        patched[lo - offset : hi - offset] = overlay[block][lo - block_start : hi - block_start]
    return bytes(patched)
