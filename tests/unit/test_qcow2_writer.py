"""The qcow2 writer: header fields, flags, packing, libqcow as a second oracle, misuse."""

from __future__ import annotations

import errno
import mmap
import os
import random
import struct
import subprocess
from pathlib import Path

import pyqcow
import pytest
from qcow2_writer_oracles import (
    make_qcow2_backing,
    qemu_img_check,
    qemu_img_compare,
    qemu_img_info,
)

from lbstore.errors import Qcow2Error, Qcow2WriteError
from lbstore.qcow2.format import (
    HEADER_EXTENSION_FEATURE_NAME_TABLE,
    INCOMPAT_COMPRESSION_TYPE,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    HeaderV2,
    HeaderV3Additional,
    HeaderV3CompressionType,
)
from lbstore.qcow2.writer import DIRECT_STREAMS, Qcow2Writer

KIB = 1024
MIB = 1024 * KIB


def l2_entries(image: Path) -> list[int]:
    """Every L2 entry of the image, in guest order (0 where no L2 table exists)."""
    data = image.read_bytes()
    header = HeaderV2.parse(data)
    cluster_size = 1 << header.cluster_bits
    entries: list[int] = []
    for index in range(header.l1_size):
        (l1_entry,) = struct.unpack_from(">Q", data, header.l1_table_offset + 8 * index)
        table = l1_entry & 0x00FFFFFFFFFFFE00
        count = cluster_size // 8
        if table == 0:
            entries += [0] * count
        else:
            assert l1_entry & QCOW_OFLAG_COPIED, "an L2 table with refcount 1 needs COPIED"
            entries += struct.unpack_from(f">{count}Q", data, table)
    return entries


def read_with_libqcow(image: Path, parent: Path | None = None) -> bytes:
    handle = pyqcow.file()
    handle.open(str(image))
    parent_handle = None
    if parent is not None:
        parent_handle = pyqcow.file()
        parent_handle.open(str(parent))
        handle.set_parent(parent_handle)
    try:
        return bytes(handle.read_buffer_at_offset(handle.media_size, 0))
    finally:
        handle.close()
        if parent_handle is not None:
            parent_handle.close()


# --- header -----------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", [None, "zlib", "zstd"])
def test_header_is_v3_with_compression_type_and_backing_extension(
    tmp_path: Path, compression: str | None
) -> None:
    image = tmp_path / "a.qcow2"
    with Qcow2Writer(
        image,
        MIB,
        backing_file="base.qcow2",
        backing_format="qcow2",
        compression=compression,  # type: ignore[arg-type]
    ):
        pass
    data = image.read_bytes()
    v2 = HeaderV2.parse(data)
    v3 = HeaderV3Additional.parse(data[72:])
    assert (v2.version, v3.refcount_order, v3.header_length) == (3, 4, 112)
    assert v3.incompatible_features == (INCOMPAT_COMPRESSION_TYPE if compression == "zstd" else 0)
    assert HeaderV3CompressionType.parse(data[104:]).compression_type == (
        1 if compression == "zstd" else 0
    )
    name = data[v2.backing_file_offset : v2.backing_file_offset + v2.backing_file_size]
    assert name == b"base.qcow2"
    info = qemu_img_info(image)
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert info["format-specific"]["data"]["compression-type"] == (compression or "zlib")
    assert struct.pack(">I", HEADER_EXTENSION_FEATURE_NAME_TABLE) in data[:65536]


def test_feature_name_table_is_left_out_when_it_does_not_fit(tmp_path: Path) -> None:
    image = tmp_path / "small.qcow2"
    (tmp_path / "b").write_bytes(bytes(64 * KIB))
    with Qcow2Writer(image, 64 * KIB, cluster_size=512, backing_file="b", backing_format="raw"):
        pass
    assert struct.pack(">I", HEADER_EXTENSION_FEATURE_NAME_TABLE) not in image.read_bytes()[:512]
    assert qemu_img_info(image)["backing-filename"] == "b"
    qemu_img_check(image)


def test_empty_and_zero_size_images_are_valid(tmp_path: Path) -> None:
    for size in (0, 512, 3 * MIB + 512):
        image = tmp_path / f"empty-{size}.qcow2"
        with Qcow2Writer(image, size):
            pass
        qemu_img_check(image)
        assert qemu_img_info(image)["virtual-size"] == size


# --- L2 entries: COPIED, zero, compressed ------------------------------------------------------


def test_copied_flag_on_data_but_not_on_compressed_or_zero(tmp_path: Path) -> None:
    image = tmp_path / "flags.qcow2"
    cluster = 64 * KIB
    with Qcow2Writer(image, 8 * cluster, compression="zlib") as writer:
        writer.write(0, os.urandom(cluster))  # incompressible: stored as a data cluster
        writer.write(cluster, b"x" * cluster)  # compressible
        writer.write_zeroes(2 * cluster, cluster)
    entries = l2_entries(image)
    assert entries[0] & QCOW_OFLAG_COPIED and not entries[0] & QCOW_OFLAG_COMPRESSED
    assert entries[1] & QCOW_OFLAG_COMPRESSED and not entries[1] & QCOW_OFLAG_COPIED
    assert entries[2] == QCOW_OFLAG_ZERO
    assert entries[3:8] == [0] * 5
    qemu_img_check(image)


def test_compressed_clusters_share_host_clusters(tmp_path: Path) -> None:
    image = tmp_path / "packed.qcow2"
    cluster = 64 * KIB
    rng = random.Random(5)
    # Each cluster compresses to a few KiB, so many share one host cluster and some span two.
    data = b"".join(rng.randbytes(3000) + bytes(cluster - 3000) for _ in range(64))
    with Qcow2Writer(image, len(data), compression="zstd") as writer:
        writer.write(0, data)
    host_clusters = {(entry & ((1 << 54) - 1)) // cluster for entry in l2_entries(image)[:64]}
    assert len(host_clusters) < 8
    report = qemu_img_check(image)
    assert report["compressed-clusters"] == 64
    raw = tmp_path / "expected.raw"
    raw.write_bytes(data)
    qemu_img_compare(raw, image)


def test_refcount_table_spanning_several_clusters(tmp_path: Path) -> None:
    # 512-byte clusters: one refcount block covers 256 clusters, one table cluster 64 blocks,
    # so 10 MiB of data needs a refcount table of two clusters and many blocks.
    image = tmp_path / "many.qcow2"
    data = random.Random(7).randbytes(10 * MIB)
    with Qcow2Writer(image, len(data), cluster_size=512) as writer:
        for offset in range(0, len(data), MIB):
            writer.write(offset, data[offset : offset + MIB])
    header = HeaderV2.parse(image.read_bytes()[:104])
    assert header.refcount_table_clusters >= 2
    qemu_img_check(image)
    raw = tmp_path / "expected.raw"
    raw.write_bytes(data)
    qemu_img_compare(raw, image)


def test_large_uncompressed_writes_use_few_syscalls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_pwritev = os.pwritev

    def counting_pwritev(fd: int, buffers: list[bytes], offset: int) -> int:
        calls.append(offset)
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", counting_pwritev)
    with Qcow2Writer(tmp_path / "big.qcow2", 16 * MIB, cluster_size=4096) as writer:
        writer.write(0, bytes(8 * MIB))  # 2048 clusters in one call
        # bytes are not page-aligned: an O_DIRECT attempt per piece, then one buffered write
        assert len(calls) <= DIRECT_STREAMS + 1


def _record_write_fds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    fds: list[int] = []
    real_pwritev = os.pwritev

    def recording_pwritev(fd: int, buffers: list[bytes], offset: int) -> int:
        fds.append(fd)
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", recording_pwritev)
    return fds


def test_page_aligned_data_bypasses_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = random.Random(3).randbytes(8 * MIB + 4096)
    buffer = mmap.mmap(-1, len(data))  # page-aligned memory, as the importer reads into
    buffer[:] = data
    fds = _record_write_fds(monkeypatch)
    image = tmp_path / "direct.qcow2"
    with Qcow2Writer(image, len(data), cluster_size=4096, direct=True) as writer:
        direct_fd = writer._direct_fd
        assert direct_fd is not None
        writer.write(0, memoryview(buffer))
    buffer.close()
    assert fds.count(direct_fd) == DIRECT_STREAMS
    qemu_img_check(image)
    raw = tmp_path / "expected.raw"
    raw.write_bytes(data)
    qemu_img_compare(raw, image)


def test_unaligned_memory_and_direct_off_still_write_exact_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = random.Random(4).randbytes(4 * MIB)
    unaligned = memoryview(bytearray(b"x" + data))[1:]
    raw = tmp_path / "expected.raw"
    raw.write_bytes(data)
    for direct in (True, False):
        image = tmp_path / f"direct-{direct}.qcow2"
        with Qcow2Writer(image, len(data), cluster_size=65536, direct=direct) as writer:
            assert (writer._direct_fd is not None) == direct
            writer.write(0, unaligned)
        qemu_img_check(image)
        qemu_img_compare(raw, image)


# --- libqcow as a second reader ---------------------------------------------------------------


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_libqcow_reads_what_was_written(tmp_path: Path, compression: str | None) -> None:
    # libqcow 20240308 does not support zstd (incompatible bit 3); zlib and plain it does.
    cluster = 4096
    size = 40 * cluster + 1536
    rng = random.Random(11)
    expected = bytearray(size)
    image = tmp_path / "lib.qcow2"
    with Qcow2Writer(image, size, cluster_size=cluster, compression=compression) as writer:  # type: ignore[arg-type]
        for first, count in ((30, 11), (2, 3), (10, 8), (6, 1)):
            offset = first * cluster
            length = min(count * cluster, size - offset)
            data = rng.randbytes(length // 2) + bytes([first]) * (length - length // 2)
            writer.write(offset, data)
            expected[offset : offset + length] = data
        writer.write_zeroes(20 * cluster, 4 * cluster)
    assert read_with_libqcow(image) == expected


def test_libqcow_reads_through_a_backing_file(tmp_path: Path) -> None:
    # libqcow reads a zero cluster from the parent, so this case has data runs only.
    cluster = 65536
    size = 12 * cluster
    base = random.Random(3).randbytes(size)
    (tmp_path / "base.raw").write_bytes(base)
    make_qcow2_backing(tmp_path / "base.raw", tmp_path / "base.qcow2")
    expected = bytearray(base)
    image = tmp_path / "top.qcow2"
    with Qcow2Writer(
        image, size, backing_file="base.qcow2", backing_format="qcow2", compression="zlib"
    ) as writer:
        for first, fill in ((4, b"a"), (9, b"b")):
            data = fill * (2 * cluster)
            writer.write(first * cluster, data)
            expected[first * cluster : (first + 2) * cluster] = data
    assert read_with_libqcow(image, tmp_path / "base.qcow2") == expected


# --- misuse and lifecycle ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (512, 65536),  # offset not cluster-aligned
        (0, 1000),  # not whole clusters, does not end at the end of the disk
        (65536, 4 * 65536),  # runs past the end
        (-65536, 65536),  # negative offset
    ],
)
def test_misaligned_or_out_of_range_runs_are_refused(
    tmp_path: Path, offset: int, length: int
) -> None:
    with Qcow2Writer(tmp_path / "m.qcow2", 3 * 65536) as writer:
        with pytest.raises(Qcow2Error):
            writer.write(offset, bytes(length))
        with pytest.raises(Qcow2Error):
            writer.write_zeroes(offset, length)
        writer.write(0, bytes(65536))  # the writer stays usable after a refused run
    qemu_img_check(tmp_path / "m.qcow2")


def test_a_partial_last_cluster_only_at_the_end_of_the_disk(tmp_path: Path) -> None:
    image = tmp_path / "tail.qcow2"
    size = 2 * 65536 + 4096
    with Qcow2Writer(image, size) as writer:
        writer.write(65536, b"t" * (65536 + 4096))
    expected = tmp_path / "expected.raw"
    expected.write_bytes(bytes(65536) + b"t" * (65536 + 4096))
    qemu_img_compare(expected, image)
    assert image.stat().st_size % 65536 == 0


@pytest.mark.parametrize("first", ["data", "zero"])
@pytest.mark.parametrize("second", ["data", "zero"])
def test_writing_a_cluster_twice_is_refused(tmp_path: Path, first: str, second: str) -> None:
    cluster = 65536
    with Qcow2Writer(tmp_path / "twice.qcow2", 8 * cluster, compression="zstd") as writer:
        run = writer.write_zeroes if first == "zero" else lambda o, n: writer.write(o, bytes(n))
        run(2 * cluster, 2 * cluster)
        with pytest.raises(Qcow2Error, match="twice"):
            if second == "zero":
                writer.write_zeroes(0, 4 * cluster)
            else:
                writer.write(3 * cluster, bytes(cluster))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"virtual_size": MIB, "cluster_size": 1000},
        {"virtual_size": MIB, "cluster_size": 256},
        {"virtual_size": MIB, "cluster_size": 4 * MIB},
        {"virtual_size": 1000},
        {"virtual_size": -512},
        {"virtual_size": 1 << 50, "cluster_size": 512},  # L1 table beyond QEMU's limit
        {"virtual_size": MIB, "compression": "lzo"},
        {"virtual_size": MIB, "backing_format": "raw"},
        {"virtual_size": MIB, "backing_file": "x" * 1024},
        {"virtual_size": MIB, "backing_file": "a\0b"},
        {"virtual_size": MIB, "cluster_size": 512, "backing_file": "y" * 400},
    ],
)
def test_bad_options_are_refused_before_creating_the_file(
    tmp_path: Path, kwargs: dict[str, object]
) -> None:
    path = tmp_path / "bad.qcow2"
    with pytest.raises(Qcow2Error):
        Qcow2Writer(path, **kwargs)  # type: ignore[arg-type]
    assert not path.exists()


def test_an_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "exists.qcow2"
    path.write_bytes(b"precious")
    with pytest.raises(Qcow2WriteError) as caught:
        Qcow2Writer(path, MIB)
    assert caught.value.errno == errno.EEXIST
    assert isinstance(caught.value.__cause__, FileExistsError)
    assert path.read_bytes() == b"precious"


def test_use_after_close_is_refused(tmp_path: Path) -> None:
    writer = Qcow2Writer(tmp_path / "c.qcow2", MIB)
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(Qcow2Error, match="closed"):
        writer.write(0, bytes(65536))
    with pytest.raises(Qcow2Error, match="closed"):
        writer.write_zeroes(0, 65536)


def test_context_manager_aborts_on_exception(tmp_path: Path) -> None:
    path = tmp_path / "aborted.qcow2"
    with pytest.raises(RuntimeError), Qcow2Writer(path, MIB) as writer:
        writer.write(0, bytes(65536))
        raise RuntimeError("the source failed")
    assert not path.exists()


def test_abort_removes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gone.qcow2"
    writer = Qcow2Writer(path, MIB)
    writer.write(0, bytes(65536))
    writer.abort()
    assert not path.exists()
    writer.abort()  # idempotent


def test_stored_bytes_counts_data_not_metadata(tmp_path: Path) -> None:
    cluster = 65536
    with Qcow2Writer(tmp_path / "s.qcow2", 4 * cluster + 512) as writer:
        writer.write(0, bytes(2 * cluster))
        writer.write_zeroes(2 * cluster, cluster)
        writer.write(4 * cluster, bytes(512))
        assert writer.stored_bytes == 3 * cluster
    with Qcow2Writer(tmp_path / "z.qcow2", 4 * cluster, compression="zlib") as writer:
        writer.write(0, bytes(4 * cluster))
        assert 0 < writer.stored_bytes < 4096


def test_qemu_can_write_to_the_image_afterwards(tmp_path: Path) -> None:
    # QEMU trusts our refcounts and COPIED flags when it allocates and rewrites in place.
    image = tmp_path / "rw.qcow2"
    cluster = 65536
    tail = os.urandom(2 * cluster)
    with Qcow2Writer(image, 16 * cluster, compression="zlib") as writer:
        writer.write(0, b"q" * (4 * cluster))
        writer.write(6 * cluster, os.urandom(2 * cluster))
        writer.write(12 * cluster, tail)
    subprocess.run(
        ["qemu-io", "-c", f"write -P 0x77 {cluster // 2} {9 * cluster}", str(image)],
        check=True,
        capture_output=True,
    )
    qemu_img_check(image)
    expected = bytearray(16 * cluster)
    expected[: cluster // 2] = b"q" * (cluster // 2)
    expected[cluster // 2 : cluster // 2 + 9 * cluster] = b"\x77" * (9 * cluster)
    expected[12 * cluster : 14 * cluster] = tail
    (tmp_path / "expected.raw").write_bytes(expected)
    qemu_img_compare(tmp_path / "expected.raw", image)


def test_sparse_multi_terabyte_image_with_runs_far_beyond_4_gib(tmp_path: Path) -> None:
    cluster = 65536
    size = 3 * 1024**4 + 512  # 3 TiB and one sector: the last cluster is partial
    runs = {
        5 * 1024**3: b"a" * cluster,
        2 * 1024**4: os.urandom(3 * cluster),
        size - 512: b"z" * 512,
    }
    expected = tmp_path / "expected.raw"
    with expected.open("wb") as raw:
        raw.truncate(size)
        for offset, data in runs.items():
            raw.seek(offset)
            raw.write(data)
    image = tmp_path / "huge.qcow2"
    with Qcow2Writer(image, size) as writer:
        for offset, data in reversed(runs.items()):
            writer.write(offset, data)
        writer.write_zeroes(1024**4, 4 * cluster)
    assert image.stat().st_size < 4 * MIB
    qemu_img_check(image)
    qemu_img_compare(expected, image)


@pytest.mark.parametrize("compression", [None, "zlib", "zstd"])
def test_round_trip_through_lbstore_reader(tmp_path: Path, compression: str | None) -> None:
    from lbstore.qcow2.reader import Qcow2Image, RunKind

    cluster = 4096
    size = 20 * cluster + 512
    rng = random.Random(21)
    expected = bytearray(size)
    image = tmp_path / "rt.qcow2"
    with Qcow2Writer(image, size, cluster_size=cluster, compression=compression) as writer:  # type: ignore[arg-type]
        data = rng.randbytes(2 * cluster) + b"c" * (2 * cluster)
        writer.write(8 * cluster, data)
        expected[8 * cluster : 12 * cluster] = data
        writer.write(20 * cluster, b"e" * 512)
        expected[20 * cluster :] = b"e" * 512
        writer.write_zeroes(0, 2 * cluster)
    with Qcow2Image.open(image) as opened:
        assert opened.read(0, size) == expected
        kinds = {run.kind for run in opened.runs()}
    assert RunKind.ZERO in kinds and RunKind.BACKING in kinds
    assert (RunKind.COMPRESSED in kinds) == (compression is not None)


@pytest.mark.parametrize("barrier", [True, False])
def test_header_barrier_orders_the_flushes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, barrier: bool
) -> None:
    events: list[str] = []
    real_fsync, real_pwritev = os.fsync, os.pwritev

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    def pwritev(fd: int, buffers: list[bytes], offset: int) -> int:
        if offset == 0:
            events.append("header")
        return real_pwritev(fd, buffers, offset)

    data = random.Random(5).randbytes(MIB)
    image = tmp_path / "barrier.qcow2"
    with Qcow2Writer(image, len(data), header_barrier=barrier) as writer:
        writer.write(0, data)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.undo()
    # With the barrier the data is durable before the header is written; without it (a file
    # renamed into place only after close) one flush covers everything.
    assert events == (["fsync", "header", "fsync"] if barrier else ["header", "fsync"])
    raw = tmp_path / "expected.raw"
    raw.write_bytes(data)
    qemu_img_compare(raw, image)
