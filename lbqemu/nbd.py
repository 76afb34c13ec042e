"""Pull a point-in-time view over NBD with libnbd: which extents to read, and reading them fast.

`plan_runs` (pure) turns the `base:allocation` extents and, for an incremental, the
`qemu:dirty-bitmap:<name>` extents into cluster-aligned runs: data to read, or zeros to record
without reading (a trimmed or zero-written cluster must read as zeros after restore).
`pull` reads the data runs with several requests in flight (libnbd's aio_pread, a bounded
queue) and hands every run, in offset order, to a sink: `sink(offset, length, data | ZERO)`,
the data lent without a copy (`Borrowed`).

libnbd's API is synchronous here; the backup job runs `pull` in a worker thread.
"""

from __future__ import annotations

import bisect
import collections
import mmap
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import nbd

from lbqemu.errors import NbdError, PullCancelledError

STATE_HOLE: Final = 1  # base:allocation NBD_STATE_HOLE
STATE_ZERO: Final = 2  # base:allocation NBD_STATE_ZERO
STATE_DIRTY: Final = 1  # qemu:dirty-bitmap NBD_STATE_DIRTY
BASE_ALLOCATION: Final = "base:allocation"
DEFAULT_CHUNK: Final = 4 << 20
DEFAULT_DEPTH: Final = 8
STATUS_WINDOW: Final = 1 << 30
MAX_REQUESTS: Final = 64
ALIGNED_BUFFER: Final = 256 << 10  # read buffers from this size on are page-aligned


class _Zero:
    """The sentinel type of ZERO."""

    _instance: _Zero | None = None

    def __new__(cls) -> _Zero:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ZERO"


ZERO: Final = _Zero()
"""Stands for the data of a run that reads as zeros."""

Sink = Callable[[int, int, Any], None]
"""`sink(offset, length, data)`: data is `Borrowed` or `ZERO`."""
Extent = tuple[int, int, int]  # (offset, length, flags)


@dataclass(frozen=True, slots=True)
class Run:
    """A cluster-aligned piece of the disk to store: data to read, or zeros."""

    offset: int
    length: int
    zero: bool


@dataclass(frozen=True)
class NbdSource:
    """How to reach one export: a unix socket, or TCP (with TLS when `tls_creds_dir` is set)."""

    export: str
    socket_path: str | None = None
    host: str | None = None
    port: int | None = None
    tls_creds_dir: str | None = None

    @classmethod
    def unix(cls, socket_path: str, export: str) -> NbdSource:
        return cls(export, socket_path=socket_path)

    @classmethod
    def tcp(cls, host: str, port: int, export: str, tls_creds_dir: str | None) -> NbdSource:
        return cls(export, host=host, port=port, tls_creds_dir=tls_creds_dir)


# --- planning -----------------------------------------------------------------------------------


def _merge(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping (start, end) intervals; adjacent ones joined."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _outward(start: int, end: int, align: int, size: int) -> tuple[int, int]:
    return (start // align * align, min(-(-end // align) * align, size))


def _inward(start: int, end: int, align: int, size: int) -> tuple[int, int]:
    up = -(-start // align) * align
    down = end if end == size else end // align * align
    return (up, down)


def plan_runs(
    size: int, allocation: list[Extent], dirty: list[Extent] | None, align: int
) -> list[Run]:
    """The runs to store: every cluster (of `align` bytes) that is dirty (all of them when
    `dirty` is None), as zeros when `allocation` says the whole cluster reads as zeros."""
    if dirty is None:
        wanted = [(0, size)] if size else []
    else:
        dirty_spans = [(o, o + n) for o, n, f in dirty if f & STATE_DIRTY]
        wanted = _merge([_outward(s, e, align, size) for s, e in dirty_spans])
    zero_spans = _merge([(o, o + n) for o, n, f in allocation if f & STATE_ZERO])
    zeros = _merge([_inward(s, e, align, size) for s, e in zero_spans])
    starts = [z[0] for z in zeros]
    runs: list[Run] = []
    for start, end in wanted:
        pos = start
        # Zero spans are sorted and disjoint: start at the last one beginning before `start`.
        k = max(bisect.bisect_right(starts, start) - 1, 0)
        while k < len(zeros) and zeros[k][0] < end:
            zs, ze = max(zeros[k][0], start), min(zeros[k][1], end)
            k += 1
            if zs >= ze:
                continue
            if zs > pos:
                runs.append(Run(pos, zs - pos, zero=False))
            runs.append(Run(zs, ze - zs, zero=True))
            pos = ze
        if pos < end:
            runs.append(Run(pos, end - pos, zero=False))
    return runs


# --- libnbd -------------------------------------------------------------------------------------


def connect(source: NbdSource, contexts: list[str]) -> nbd.NBD:
    """An NBD handle connected to the export with the requested meta contexts."""
    handle = nbd.NBD()
    try:
        handle.set_export_name(source.export)
        for context in contexts:
            handle.add_meta_context(context)
        if source.socket_path is not None:
            handle.connect_unix(source.socket_path)
        elif source.tls_creds_dir:
            from lbqemu import tls

            assert source.host is not None and source.port is not None
            tls.connect_tcp(handle, source.host, source.port, source.tls_creds_dir)
        else:
            handle.connect_tcp(source.host, str(source.port))
    except nbd.Error as exc:
        _close(handle)
        raise NbdError(source.export, str(exc.string or exc)) from exc
    except BaseException:
        _close(handle)
        raise
    for context in contexts:
        if not handle.can_meta_context(context):
            _close(handle)
            raise NbdError(source.export, f"server does not offer meta context {context}")
    return handle


def _close(handle: nbd.NBD) -> None:
    """Disconnect politely when connected; libnbd frees the handle when it is collected."""
    try:
        if handle.aio_is_ready() or handle.aio_is_processing():
            handle.shutdown()
    except nbd.Error:
        pass


def _status_window(
    handle: nbd.NBD, offset: int, length: int, contexts: list[str]
) -> dict[str, list[Extent]]:
    """One NBD_CMD_BLOCK_STATUS: the extents each context reports from `offset` on."""
    got: dict[str, list[Extent]] = {c: [] for c in contexts}

    def collect(context: str, start: int, entries: list[int], err: Any) -> int:
        if context in got:
            pos = start
            for k in range(0, len(entries) - 1, 2):
                got[context].append((pos, entries[k], entries[k + 1]))
                pos += entries[k]
        return 0

    handle.block_status(length, offset, collect)
    return got


def read_extents(handle: nbd.NBD, size: int, contexts: list[str]) -> dict[str, list[Extent]]:
    """All extents of every context over the whole export, window by window (a server may
    answer for less than asked, and differently per context: advance by the shortest)."""
    result: dict[str, list[Extent]] = {c: [] for c in contexts}
    offset = 0
    while offset < size:
        got = _status_window(handle, offset, min(size - offset, STATUS_WINDOW), contexts)
        ends = [ext[-1][0] + ext[-1][1] if ext else offset for ext in got.values()]
        end = min(min(ends), size)
        if end <= offset:
            raise NbdError("?", f"server returned no block status at offset {offset}")
        for context, extents in got.items():
            for o, n, f in extents:
                if o < end:
                    result[context].append((o, min(o + n, end) - o, f))
        offset = end
    return result


class BufferPool:
    """Reusable libnbd buffers by size class.

    libnbd 1.14's Python `aio_pread` keeps a reference to every buffer it reads into, so a
    fresh buffer per request is never freed (RSS grows with the bytes read). Buffers are
    therefore reused, in few sizes: `align * 2**k` up to the chunk size, plus exact lengths
    at the disk's end. A short run is read with the next size up (reading a little more than
    needed is cheaper than an unbounded number of sizes)."""

    def __init__(self, align: int, chunk: int, size: int) -> None:
        self.align = align
        self.chunk = chunk
        self.size = size
        self._free: dict[int, list[nbd.Buffer]] = {}
        self._lock = threading.Lock()

    def read_length(self, offset: int, length: int) -> int:
        """How many bytes to read for a run piece of `length` at `offset`."""
        wanted = self.align
        while wanted < length:
            wanted *= 2
        wanted = min(wanted, self.chunk)
        return length if offset + wanted > self.size or wanted < length else wanted

    def take(self, length: int) -> nbd.Buffer:
        with self._lock:
            free = self._free.get(length)
            if free:
                return free.pop()
        # A Buffer over our own memory: it can be lent to the sink without a copy. Long ones
        # are page-aligned (mmap), so the store can write them with O_DIRECT; short ones are
        # written through the page cache anyway and come cheaper from the heap.
        memory = mmap.mmap(-1, length) if length >= ALIGNED_BUFFER else bytearray(length)
        return nbd.Buffer.from_buffer(memory)

    def give(self, buf: nbd.Buffer, length: int) -> None:
        with self._lock:
            self._free.setdefault(length, []).append(buf)


@dataclass(frozen=True, slots=True)
class Borrowed:
    """Data lent to the sink without a copy: `view` stays valid until `release()` is called,
    after which its buffer is reused for another read."""

    view: memoryview
    release: Callable[[], None]


class Puller:
    """Reads runs from one handle with up to `depth` x `chunk` bytes (and at most MAX_REQUESTS
    requests) in flight, delivering them in offset order."""

    def __init__(
        self,
        handle: nbd.NBD,
        export: str,
        sink: Sink,
        *,
        chunk: int = DEFAULT_CHUNK,
        depth: int = DEFAULT_DEPTH,
        stop: threading.Event | None = None,
    ) -> None:
        self.handle = handle
        self.export = export
        self.sink = sink
        self.chunk = chunk
        self.depth = depth
        self.stop = stop or threading.Event()
        self._pending: collections.deque[tuple[int, nbd.Buffer, int, int, int]] = (
            collections.deque()
        )
        self._pool: BufferPool | None = None
        self._inflight = 0

    def run(self, runs: list[Run], align: int, size: int) -> None:
        """Read and deliver every run in offset order."""
        chunk = max(self.chunk // align, 1) * align
        self._pool = BufferPool(align, chunk, size)
        try:
            for run in runs:
                if run.zero:
                    self._drain()
                    self._check_stop()
                    self.sink(run.offset, run.length, ZERO)
                    continue
                for pos in range(run.offset, run.offset + run.length, chunk):
                    length = min(chunk, run.offset + run.length - pos)
                    # Bound the bytes in flight (depth x chunk), not the requests: many small
                    # reads (an incremental) need more requests in flight to hide latency.
                    while self._pending and (
                        len(self._pending) >= MAX_REQUESTS
                        or self._inflight + length > self.depth * chunk
                    ):
                        self._complete_oldest()
                    self._submit(pos, length)
            self._drain()
        except nbd.Error as exc:
            raise NbdError(self.export, str(exc.string or exc)) from exc

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise PullCancelledError(self.export)

    def _submit(self, offset: int, length: int) -> None:
        self._check_stop()
        assert self._pool is not None
        read = self._pool.read_length(offset, length)
        buf = self._pool.take(read)
        cookie = self.handle.aio_pread(buf, offset)
        self._pending.append((cookie, buf, offset, length, read))
        self._inflight += read

    def _complete_oldest(self) -> None:
        cookie, buf, offset, length, read = self._pending[0]
        while not self.handle.aio_command_completed(cookie):
            self.handle.poll(-1)
        self._pending.popleft()
        self._inflight -= read
        pool = self._pool
        assert pool is not None
        self._check_stop()
        view = memoryview(buf.to_buffer())[:length]
        self.sink(offset, length, Borrowed(view, lambda: pool.give(buf, read)))

    def _drain(self) -> None:
        while self._pending:
            self._complete_oldest()


def pull(
    source: NbdSource,
    sink: Sink,
    *,
    align: int,
    dirty_bitmap: str | None = None,
    chunk: int = DEFAULT_CHUNK,
    depth: int = DEFAULT_DEPTH,
    stop: threading.Event | None = None,
    on_plan: Callable[[list[Run]], None] | None = None,
) -> None:
    """Pull one export into `sink`: the dirty clusters of `dirty_bitmap`, or the whole disk.

    Data reaches the sink as a `Borrowed` view of a read buffer, which the sink must release
    (no copy per byte); zeros as `ZERO`. `stop` cancels (PullCancelledError)."""
    contexts = [BASE_ALLOCATION]
    if dirty_bitmap:
        contexts.append(f"qemu:dirty-bitmap:{dirty_bitmap}")
    handle = connect(source, contexts)
    try:
        size = handle.get_size()
        try:
            extents = read_extents(handle, size, contexts)
        except nbd.Error as exc:
            raise NbdError(source.export, str(exc)) from exc
        dirty = extents[contexts[1]] if dirty_bitmap else None
        runs = plan_runs(size, extents[BASE_ALLOCATION], dirty, align)
        if on_plan is not None:
            on_plan(runs)
        puller = Puller(handle, source.export, sink, chunk=chunk, depth=depth, stop=stop)
        puller.run(runs, align, size)
    finally:
        _close(handle)
