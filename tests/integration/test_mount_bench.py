"""Smoke test: the mount read benchmark runs on a tiny chain and prints a ratio (not a timing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench" / "bench_mount_read.py"


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_bench_mount_read_prints_a_ratio(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "LBR_BENCH_MIB": "4",
        "LBR_BENCH_REPEAT": "1",
        "LBR_BENCH_DIR": str(tmp_path),
    }
    proc = subprocess.run(
        [sys.executable, BENCH], capture_output=True, text=True, env=env, check=True
    )
    assert "ratio (ours/theirs):" in proc.stdout
    assert "chain depth 25, 4 MiB" in proc.stdout
    assert not any(entry.is_dir() for entry in tmp_path.iterdir())  # store and mount removed
