"""Smoke run of the guest-files benchmarks at a tiny size: they run and print their ratios."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_bench_guest_diff_runs_small(tmp_path: Path) -> None:
    env = {**os.environ, "LBR_BENCH_FILES": "300", "LBR_BENCH_ROUNDS": "1"}
    env["LBR_BENCH_DIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, str(BENCH / "bench_guest_diff.py")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "ratio (diff/full walk)" in done.stdout
    assert "3 rewritten (1%)" in done.stdout
