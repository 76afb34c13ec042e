"""Smoke tests of the restore and verify benchmarks: they run small and print their ratios
(their speed is not checked: benchmarks never fail on time)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize("script", ["bench_restore.py", "bench_verify.py"])
def test_bench_runs_small_and_prints_a_ratio(script: str, tmp_path: Path) -> None:
    env = dict(
        os.environ,
        LBR_BENCH_MIB="8",
        LBR_BENCH_DEPTH="3",
        LBR_BENCH_ROUNDS="1",
        LBR_BENCH_DIR=str(tmp_path),
    )
    result = subprocess.run(
        [sys.executable, str(BENCH / script)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ratio (ours/theirs)" in result.stdout
    assert "peak RSS (ours)" in result.stdout
    assert not list(tmp_path.iterdir())  # the work folder was cleaned up
