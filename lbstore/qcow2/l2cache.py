"""A small LRU cache of L2 tables, bounded in bytes, safe to share between threads."""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable

DEFAULT_L2_CACHE_BYTES = 8 << 20  # per image: 64 GiB of guest with 64 KiB clusters


class L2Cache:
    """Maps an L2 table's host offset to its entries (host byte order); least recently used out.

    The bound counts table bytes, so the number of cached tables adapts to the cluster size
    (one 2 MiB table or many 512-byte ones); at least one table is always kept.
    """

    def __init__(self, load: Callable[[int], array], max_bytes: int = DEFAULT_L2_CACHE_BYTES):
        self._load = load
        self._max_bytes = max_bytes
        self._tables: OrderedDict[int, array] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, offset: int) -> array:
        """The L2 table at host `offset`, loading it on a miss."""
        with self._lock:
            table = self._tables.get(offset)
            if table is not None:
                self._tables.move_to_end(offset)
                return table
        table = self._load(offset)
        size = len(table) * table.itemsize
        with self._lock:
            if offset not in self._tables:
                self._tables[offset] = table
                self._bytes += size
            while self._bytes > self._max_bytes and len(self._tables) > 1:
                _, old = self._tables.popitem(last=False)
                self._bytes -= len(old) * old.itemsize
        return table

    def clear(self) -> None:
        """Drop every cached table."""
        with self._lock:
            self._tables.clear()
            self._bytes = 0
