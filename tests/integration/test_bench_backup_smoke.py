"""The backup benchmark runs end to end on a tiny disk and prints its ratios (not its speed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_bench_backup_runs_small() -> None:
    env = dict(
        os.environ,
        LBR_BENCH_MIB="16",
        LBR_BENCH_ROUNDS="1",
        LBR_BENCH_LIST_POINTS="3",
        LBR_BENCH_LIST_RUNS="1",
    )
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_backup.py")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "ratio (ours/theirs) full backup throughput:" in done.stdout
    assert "ratio (incremental/full) time:" in done.stdout
    assert "peak RSS: lbrestore backup" in done.stdout
    assert "kind=incremental" in done.stdout
    assert "lbrestore list (3 points, warm cache" in done.stdout
    assert "ratio (list/python start-up) time:" in done.stdout
