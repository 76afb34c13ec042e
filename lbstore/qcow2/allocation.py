"""Host-cluster bookkeeping for the qcow2 writer: geometry, L2 tables, refcounts, layout.

Pure arithmetic and in-memory tables, no I/O, so that each rule can be tested on its own.
Terms follow QEMU's docs/interop/qcow2.txt ("Host cluster management", "Cluster mapping",
"Compressed Clusters Descriptor").

Memory is bounded by the metadata: an L2 table is an ``array('Q')`` of one cluster's worth of
entries, created only for the L2 ranges that are touched; refcounts are not stored at all for
the ordinary case (every host cluster the writer allocates is referenced exactly once), only
for host clusters that hold compressed data, which several guest clusters may share.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from dataclasses import dataclass

from lbstore.qcow2.format import (
    COMPRESSED_SECTOR_SIZE,
    DEFAULT_REFCOUNT_ORDER,
    L1_ENTRY_SIZE,
    L2_ENTRY_SIZE,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    compressed_offset_bits,
)

# QEMU refuses to open images whose L1 table or refcount table is larger than these
# (block/qcow2.h: QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE); the writer stays inside them.
QCOW_MAX_L1_SIZE = 32 * 1024 * 1024
QCOW_MAX_REFTABLE_SIZE = 8 * 1024 * 1024

REFCOUNT_ENTRY_BITS = 1 << DEFAULT_REFCOUNT_ORDER  # 16-bit refcounts
MAX_REFCOUNT = (1 << REFCOUNT_ENTRY_BITS) - 1
REFCOUNT_TABLE_ENTRY_SIZE = 8


def cluster_bits_of(cluster_size: int) -> int | None:
    """log2 of cluster_size if it is a power of two that qcow2 allows, else None."""
    if cluster_size <= 0 or cluster_size & (cluster_size - 1):
        return None
    bits = cluster_size.bit_length() - 1
    return bits if MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS else None


def div_round_up(value: int, unit: int) -> int:
    """Number of units of size ``unit`` needed to hold ``value``."""
    return -(-value // unit)


@dataclass(frozen=True, slots=True)
class Geometry:
    """Sizes that follow from cluster_bits and the virtual size."""

    cluster_bits: int
    virtual_size: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        """Entries of one L2 table: one cluster of 8-byte entries."""
        return self.cluster_size // L2_ENTRY_SIZE

    @property
    def guest_clusters(self) -> int:
        return div_round_up(self.virtual_size, self.cluster_size)

    @property
    def l1_size(self) -> int:
        """Entries of the L1 table: one per L2 table needed to map the whole disk."""
        return div_round_up(self.guest_clusters, self.l2_entries)

    @property
    def refcounts_per_block(self) -> int:
        return self.cluster_size * 8 // REFCOUNT_ENTRY_BITS

    def clusters_for(self, nbytes: int) -> int:
        """Host clusters needed to hold ``nbytes`` bytes."""
        return div_round_up(nbytes, self.cluster_size)


def refcount_layout(existing_clusters: int, geometry: Geometry) -> tuple[int, int]:
    """Refcount table clusters and refcount blocks to cover a file and themselves.

    The file holds ``existing_clusters`` host clusters; the refcount table and blocks are
    appended after them, and must also count their own clusters. Each round adds the
    structures needed for the previous round's total; the sizes only grow and are bounded,
    so this reaches a fixed point in a few rounds.
    """
    per_block = geometry.refcounts_per_block
    table_entries_per_cluster = geometry.cluster_size // REFCOUNT_TABLE_ENTRY_SIZE
    table_clusters, blocks = 0, 0
    while True:
        total = existing_clusters + table_clusters + blocks
        need_blocks = div_round_up(total, per_block)
        need_table = div_round_up(need_blocks, table_entries_per_cluster)
        if (need_blocks, need_table) == (blocks, table_clusters):
            return table_clusters, blocks
        blocks, table_clusters = need_blocks, need_table


def compressed_descriptor(host_offset: int, length: int, cluster_bits: int) -> int:
    """L2 entry of a compressed cluster stored at ``host_offset`` with ``length`` bytes.

    Bits 0..x-1 hold the host offset, bits x..61 the number of 512-byte sectors the data
    occupies beyond the sector that holds its first byte (x = 62 - (cluster_bits - 8)).
    """
    x = compressed_offset_bits(cluster_bits)
    first_sector = host_offset // COMPRESSED_SECTOR_SIZE
    last_sector = (host_offset + length - 1) // COMPRESSED_SECTOR_SIZE
    additional = last_sector - first_sector
    if host_offset >= 1 << x or additional >= 1 << (62 - x):
        raise ValueError(f"compressed cluster at {host_offset} ({length} bytes) does not fit")
    return QCOW_OFLAG_COMPRESSED | (additional << x) | host_offset


class L2Tables:
    """The guest-to-host mapping, one lazily created ``array('Q')`` per touched L2 range.

    Entries are held in native byte order and converted to big-endian when written out.
    An entry of 0 means "never written" (the guest cluster reads from the backing file).
    """

    def __init__(self, geometry: Geometry) -> None:
        self._geometry = geometry
        self._tables: dict[int, array[int]] = {}

    def _spans(self, first: int, count: int) -> Iterator[tuple[int, int, int]]:
        """Split guest clusters [first, first+count) into (l1_index, start, stop) per table."""
        per_table = self._geometry.l2_entries
        cluster, end = first, first + count
        while cluster < end:
            l1_index, start = divmod(cluster, per_table)
            stop = min(per_table, start + end - cluster)
            yield l1_index, start, stop
            cluster += stop - start

    def _table(self, l1_index: int) -> array[int]:
        table = self._tables.get(l1_index)
        if table is None:
            table = array("Q", bytes(self._geometry.cluster_size))
            self._tables[l1_index] = table
        return table

    def first_written(self, first: int, count: int) -> int | None:
        """The first guest cluster in [first, first+count) that already has an entry."""
        per_table = self._geometry.l2_entries
        for l1_index, start, stop in self._spans(first, count):
            table = self._tables.get(l1_index)
            if table is None:
                continue
            for index in range(start, stop):
                if table[index]:
                    return l1_index * per_table + index
        return None

    def any_written(self, first: int, count: int) -> bool:
        """Whether any guest cluster in [first, first+count) already has an entry."""
        for l1_index, start, stop in self._spans(first, count):
            table = self._tables.get(l1_index)
            if table is not None and table[start:stop].count(0) != stop - start:
                return True
        return False

    def set_data(self, first: int, count: int, host_offset: int) -> None:
        """Map ``count`` guest clusters to consecutive host clusters (refcount 1: COPIED)."""
        cluster_size = self._geometry.cluster_size
        entry = host_offset | QCOW_OFLAG_COPIED
        for l1_index, start, stop in self._spans(first, count):
            n = stop - start
            self._table(l1_index)[start:stop] = array(
                "Q", range(entry, entry + n * cluster_size, cluster_size)
            )
            entry += n * cluster_size

    def set_zero(self, first: int, count: int) -> None:
        """Mark guest clusters as zero clusters with no host cluster (QCOW_OFLAG_ZERO)."""
        for l1_index, start, stop in self._spans(first, count):
            self._table(l1_index)[start:stop] = array("Q", [QCOW_OFLAG_ZERO]) * (stop - start)

    def set_entry(self, cluster: int, entry: int) -> None:
        """Store one raw L2 entry (used for compressed cluster descriptors)."""
        l1_index, index = divmod(cluster, self._geometry.l2_entries)
        self._table(l1_index)[index] = entry

    def __len__(self) -> int:
        return len(self._tables)

    def items(self) -> list[tuple[int, array[int]]]:
        """(l1_index, table) of every touched L2 range, in guest order."""
        return sorted(self._tables.items())


class CompressedRefcounts:
    """How many compressed clusters reference each shared host cluster.

    Every other host cluster the writer allocates has refcount 1, so only the clusters that
    hold compressed data are counted, in one lazily created ``array('H')`` per refcount
    block range.
    """

    def __init__(self, geometry: Geometry) -> None:
        self._per_block = geometry.refcounts_per_block
        self._blocks: dict[int, array[int]] = {}

    def get(self, host_cluster: int) -> int:
        block = self._blocks.get(host_cluster // self._per_block)
        return 0 if block is None else block[host_cluster % self._per_block]

    def add(self, first_cluster: int, last_cluster: int) -> None:
        """One more compressed cluster lies in host clusters first..last (inclusive)."""
        for cluster in range(first_cluster, last_cluster + 1):
            block_index, index = divmod(cluster, self._per_block)
            block = self._blocks.get(block_index)
            if block is None:
                block = array("H", bytes(2 * self._per_block))
                self._blocks[block_index] = block
            block[index] += 1

    def block(self, block_index: int, total_clusters: int) -> array[int]:
        """The refcounts of one refcount block, for a file of ``total_clusters`` clusters.

        Host clusters below ``total_clusters`` count 1 unless compressed data shares them;
        clusters past the end of the file count 0.
        """
        first = block_index * self._per_block
        used = max(0, min(self._per_block, total_clusters - first))
        counts = array("H", [1]) * used + array("H", bytes(2 * (self._per_block - used)))
        shared = self._blocks.get(block_index)
        if shared is not None:
            for index in range(used):
                if shared[index]:
                    counts[index] = shared[index]
        return counts


def l1_table_bytes(geometry: Geometry) -> int:
    """Size in bytes of the L1 table."""
    return geometry.l1_size * L1_ENTRY_SIZE
