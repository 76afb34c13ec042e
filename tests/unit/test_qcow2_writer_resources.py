"""The qcow2 writer's resources: memory bounded by metadata, disk full, the benchmark runs."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.tmpfs import mounted_tmpfs
from qcow2_writer_oracles import qemu_img_check

from lbstore.errors import Qcow2Error, Qcow2WriteError
from lbstore.qcow2.writer import Qcow2Writer

MIB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]


def traced_peak_while_writing(path: Path, total: int, chunk: bytes, **options: object) -> int:
    """Peak Python heap growth while writing ``total`` bytes in chunks through the writer."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        baseline = tracemalloc.get_traced_memory()[0]
        with Qcow2Writer(path, total, **options) as writer:  # type: ignore[arg-type]
            for offset in range(0, total, len(chunk)):
                writer.write(offset, chunk)
        return tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()


def test_memory_stays_bounded_by_metadata_not_data(tmp_path: Path) -> None:
    chunk = os.urandom(4 * MIB)
    image = tmp_path / "big.qcow2"
    peak = traced_peak_while_writing(image, 256 * MIB, chunk)
    assert peak < 8 * MIB, f"peak {peak} bytes while writing 256 MiB"
    assert image.stat().st_size > 256 * MIB
    qemu_img_check(image)


def test_memory_stays_bounded_with_compression(tmp_path: Path) -> None:
    # Clusters that compress to about half: one 32 MiB write would leave 16 MiB of
    # compressed output in memory if it were not compressed and written out in batches.
    chunk = (os.urandom(32 * 1024) + bytes(32 * 1024)) * (32 * MIB // 65536)
    image = tmp_path / "big-zstd.qcow2"
    peak = traced_peak_while_writing(image, 64 * MIB, chunk, compression="zstd")
    assert peak < 12 * MIB, f"peak {peak} bytes while writing 64 MiB"
    qemu_img_check(image)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (needs root and mount rights; skipped where that is not possible)."""
    with mounted_tmpfs(tmp_path / "small", "2m") as mountpoint:
        yield mountpoint


def test_disk_full_while_writing_data(small_tmpfs: Path) -> None:
    path = small_tmpfs / "full.qcow2"
    writer = Qcow2Writer(path, 8 * MIB)
    with pytest.raises(Qcow2WriteError) as caught:
        writer.write(0, bytes(4 * MIB))
    assert caught.value.errno == errno.ENOSPC
    assert isinstance(caught.value.__cause__, OSError)
    with pytest.raises(Qcow2Error, match="failed earlier"):
        writer.write(4 * MIB, bytes(65536))
    with pytest.raises(Qcow2Error, match="failed earlier"):
        writer.close()
    writer.abort()
    assert not path.exists()


def test_disk_full_while_writing_metadata_aborts_in_context_manager(small_tmpfs: Path) -> None:
    path = small_tmpfs / "meta.qcow2"
    data = bytes(31 * 65536)  # fits; the L2, L1 and refcount clusters do not
    with pytest.raises(Qcow2WriteError) as caught, Qcow2Writer(path, 8 * MIB) as writer:
        writer.write(0, data)
    assert caught.value.errno == errno.ENOSPC
    assert not path.exists()


def test_benchmark_runs_small_and_prints_a_ratio(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_qcow2_write.py")],
        capture_output=True,
        text=True,
        check=False,
        env={
            **os.environ,
            "LBR_BENCH_MIB": "8",
            "LBR_BENCH_ROUNDS": "1",
            "LBR_BENCH_DIR": str(tmp_path),
        },
    )
    assert result.returncode == 0, result.stderr
    assert "ratio (ours/theirs)" in result.stdout
    assert "peak RSS" in result.stdout
