"""Smoke test: the guest-files read benchmark runs on a tiny file and prints a ratio."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench" / "bench_guest_files.py"


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_bench_guest_files_prints_a_ratio(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "LBR_BENCH_MIB": "4",
        "LBR_BENCH_REPEAT": "1",
        "LBR_BENCH_DIR": str(tmp_path),
    }
    proc = subprocess.run(
        [sys.executable, BENCH], capture_output=True, text=True, env=env, check=True
    )
    assert "guest file of 4 MiB on ext4 (journal clean)" in proc.stdout
    assert "ratio (ours/theirs):" in proc.stdout
    if os.geteuid() == 0:
        assert "n/a" not in proc.stdout
    assert not any(tmp_path.iterdir())  # store, mounts and loop device gone
