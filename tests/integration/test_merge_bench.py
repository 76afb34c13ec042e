"""Smoke test of the merge benchmark: it runs small, its merge and qemu-img commit agree, and it
prints its ratios (its speed is not checked: benchmarks never fail on time)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_merge.py"


def test_bench_merge_runs_small_and_prints_its_ratios(tmp_path: Path) -> None:
    env = dict(os.environ, LBR_BENCH_MIB="64", LBR_BENCH_ROUNDS="1", LBR_BENCH_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, str(BENCH)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ratio (ours/theirs)" in result.stdout
    assert "merge time as share of copying the full" in result.stdout
    assert not list(tmp_path.iterdir())  # the work folder was cleaned up
