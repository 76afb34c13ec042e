"""The writer's host-cluster arithmetic: refcount layout, compressed descriptors, packing."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from lbstore.qcow2.allocation import (
    MAX_REFCOUNT,
    CompressedRefcounts,
    Geometry,
    L2Tables,
    compressed_descriptor,
    refcount_layout,
)
from lbstore.qcow2.format import (
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    compressed_offset_bits,
)
from lbstore.qcow2.writer import Qcow2Writer


@settings(max_examples=200, deadline=None)
@given(
    cluster_bits=st.integers(min_value=9, max_value=21),
    existing=st.integers(min_value=1, max_value=10**8),
)
def test_refcount_layout_covers_itself_exactly(cluster_bits: int, existing: int) -> None:
    geometry = Geometry(cluster_bits, 0)
    table_clusters, blocks = refcount_layout(existing, geometry)
    total = existing + table_clusters + blocks
    per_block = geometry.refcounts_per_block
    # Enough blocks for every cluster including the refcount structures, and not one more.
    assert blocks == -(-total // per_block)
    assert table_clusters == -(-blocks * 8 // geometry.cluster_size)


@settings(max_examples=200, deadline=None)
@given(
    cluster_bits=st.integers(min_value=9, max_value=21),
    data=st.data(),
)
def test_compressed_descriptor_decodes_as_qemu_reads_it(
    cluster_bits: int, data: st.DataObject
) -> None:
    cluster_size = 1 << cluster_bits
    host = data.draw(st.integers(min_value=cluster_size, max_value=1 << 40))
    length = data.draw(st.integers(min_value=1, max_value=cluster_size - 1))
    entry = compressed_descriptor(host, length, cluster_bits)
    x = compressed_offset_bits(cluster_bits)
    # block/qcow2-cluster.c qcow2_parse_compressed_l2_entry():
    coffset = entry & ((1 << x) - 1)
    nb_csectors = ((entry >> x) & ((1 << (62 - x)) - 1)) + 1
    csize = nb_csectors * 512 - (coffset & 511)
    assert entry & QCOW_OFLAG_COMPRESSED and not entry & QCOW_OFLAG_COPIED
    assert coffset == host
    assert length <= csize < length + 512
    assert (coffset + csize) % 512 == 0


def test_l2_tables_are_created_only_for_touched_ranges() -> None:
    geometry = Geometry(9, 1 << 30)  # 512-byte clusters: 64 entries per L2 table
    tables = L2Tables(geometry)
    tables.set_data(60, 10, 4096)  # spans tables 0 and 1
    tables.set_zero(64 * 100, 3)
    assert [index for index, _ in tables.items()] == [0, 1, 100]
    table0, table1 = tables.items()[0][1], tables.items()[1][1]
    assert table0[60] == 4096 | QCOW_OFLAG_COPIED
    assert table1[5] == (4096 + 9 * 512) | QCOW_OFLAG_COPIED
    assert tables.items()[2][1][2] == QCOW_OFLAG_ZERO
    assert tables.any_written(69, 1) and not tables.any_written(70, 64 * 100 - 70)
    assert tables.first_written(0, 100) == 60


def test_refcount_blocks_count_shared_compressed_clusters() -> None:
    geometry = Geometry(9, 0)  # 256 refcounts per block
    refs = CompressedRefcounts(geometry)
    refs.add(3, 3)
    refs.add(3, 4)
    refs.add(300, 300)
    block0 = refs.block(0, total_clusters=260)
    assert (block0[0], block0[3], block0[4], block0[255]) == (1, 2, 1, 1)
    block1 = refs.block(1, total_clusters=260)
    assert list(block1[:4]) == [1, 1, 1, 1] and block1[4] == 0
    assert refs.block(1, total_clusters=400)[300 - 256] == 1


def test_compressed_packing_never_overflows_a_16_bit_refcount(tmp_path: Path) -> None:
    cluster = 2 * 1024 * 1024  # room for a million 1-byte pieces at even offsets
    writer = Qcow2Writer(tmp_path / "pack.qcow2", cluster, cluster_size=cluster)
    try:
        offsets = [writer._place_compressed(1) for _ in range(MAX_REFCOUNT + 10)]
        first_cluster = offsets[0] // cluster
        assert writer._compressed_refs.get(first_cluster) == MAX_REFCOUNT
        assert offsets[MAX_REFCOUNT] // cluster == first_cluster + 1
        assert all(offset % 2 == 0 for offset in offsets)
    finally:
        writer.abort()
