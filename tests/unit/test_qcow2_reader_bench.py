"""Smoke test: the qcow2 read benchmark runs on a tiny image and prints a ratio (not a timing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench" / "bench_qcow2_read.py"


def test_bench_qcow2_read_prints_a_ratio(tmp_path: Path) -> None:
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
    assert "4 MiB" in proc.stdout
