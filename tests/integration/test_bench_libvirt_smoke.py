"""The libvirt benchmark runs end to end on a tiny disk and prints its ratios (not its speed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import libvirt_env
import pytest

ROOT = Path(__file__).resolve().parent.parent.parent


def test_bench_libvirt_runs_small() -> None:
    why = libvirt_env.missing() or (
        None if shutil.which("virtnbdbackup") else "virtnbdbackup is not installed"
    )
    if why is not None:
        pytest.skip(why)
    env = dict(os.environ, LBR_BENCH_MIB="16", LBR_BENCH_ROUNDS="1")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_libvirt.py")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "ratio (ours/theirs) full backup throughput:" in done.stdout
    assert "ratio (ours/theirs) incremental time:" in done.stdout
    assert done.stderr == ""
