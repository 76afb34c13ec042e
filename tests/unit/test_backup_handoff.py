"""The backup's reader-to-store handoff: small runs travel in batches, long reads are
page-aligned (so the store can write them with O_DIRECT)."""

from __future__ import annotations

import ctypes
import mmap
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from lbqemu.nbd import ZERO, Borrowed, BufferPool
from lbrestore.backup import BATCH_RUNS, _Batch, _Batcher
from lbstore.checksums import cluster_digests

CLUSTER = 65536


class _Collect:
    def __init__(self) -> None:
        self.items: list[Any] = []

    def put(self, item: Any) -> None:
        self.items.append(item)


def _data(length: int) -> Borrowed:
    return Borrowed(memoryview(bytes(length)), lambda: None)


def _batcher(limit: int) -> tuple[_Batcher, _Collect]:
    sink = _Collect()
    return _Batcher(sink, limit, CLUSTER, ThreadPoolExecutor(1)), sink  # type: ignore[arg-type]


def test_small_runs_are_handed_over_together_in_order() -> None:
    batcher, sink = _batcher(4 << 20)
    for k in range(300):
        batcher.add(k * 2 * CLUSTER, CLUSTER, _data(CLUSTER) if k % 3 else ZERO)
    batcher.flush()
    assert all(isinstance(item, _Batch) for item in sink.items)
    assert 2 <= len(sink.items) <= 300 // 10
    runs = [run for item in sink.items for run in item.runs]
    assert [run[0] for run in runs] == [k * 2 * CLUSTER for k in range(300)]
    assert all(len(item.runs) <= BATCH_RUNS for item in sink.items)
    # every data run comes with its cluster digests (computed on the hasher thread)
    assert all((run[3] is None) == (run[2] is ZERO) for run in runs)
    digests = [run[3] for run in runs if run[3] is not None]
    assert digests == [cluster_digests(bytes(CLUSTER), CLUSTER)] * len(digests)


def test_long_runs_are_hashed_on_the_hasher_thread() -> None:
    batcher, sink = _batcher(4 << 20)
    batcher.add(0, 4 << 20, _data(4 << 20))
    digests = sink.items[0].runs[0][3]
    assert isinstance(digests, Future)
    assert digests.result() == cluster_digests(bytes(4 << 20), CLUSTER)


def test_a_chunk_sized_run_is_handed_over_at_once() -> None:
    batcher, sink = _batcher(4 << 20)
    batcher.add(0, 4 << 20, _data(4 << 20))
    assert len(sink.items) == 1 and len(sink.items[0].runs) == 1


def test_long_read_buffers_are_page_aligned() -> None:
    pool = BufferPool(CLUSTER, 4 << 20, 1 << 30)
    for length in (4 << 20, 1 << 20):
        memory = pool.take(length).to_buffer()
        address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
        assert address % mmap.PAGESIZE == 0
