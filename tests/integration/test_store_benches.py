"""Smoke runs of the store benchmarks at tiny sizes: they run and print their ratios (no timing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize(
    ("script", "env", "expected"),
    [
        ("bench_store_import.py", {"LBR_BENCH_ROUNDS": "1"}, ["ratio (ours/theirs)", "peak RSS"]),
        (
            "bench_store_view.py",
            {"LBR_BENCH_DEPTH": "5", "LBR_BENCH_READS": "200", "LBR_BENCH_ROUNDS": "1"},
            ["ratio (depth 5/depth 1, ours, per read)", "ratio (ours/theirs"],
        ),
        (
            "bench_store_index.py",
            {"LBR_BENCH_POINTS": "3"},
            ["bytes per stored cluster", "rows per restore point", "ratio (ours/theirs"],
        ),
    ],
)
def test_bench_runs_small(
    tmp_path: Path, script: str, env: dict[str, str], expected: list[str]
) -> None:
    full_env = {**os.environ, "LBR_BENCH_MIB": "8", "LBR_BENCH_DIR": str(tmp_path), **env}
    result = subprocess.run(
        [sys.executable, str(BENCH / script)],
        env=full_env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for text in expected:
        assert text in result.stdout, result.stdout
    assert list(tmp_path.iterdir()) == []  # the bench cleans up after itself
