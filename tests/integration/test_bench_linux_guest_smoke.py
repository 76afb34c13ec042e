"""The Linux guest benchmark runs end to end (one short incremental) and prints its ratios."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fixtures.linux_guest import LinuxGuestImage

ROOT = Path(__file__).resolve().parent.parent.parent


def test_bench_linux_guest_runs_small(linux_guest: LinuxGuestImage) -> None:
    env = dict(os.environ, LBR_BENCH_INCREMENTALS="1", LBR_BENCH_GAP="2")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_linux_guest.py")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for line in (
        "ratio (ours/theirs) full backup throughput:",
        "ratio (stored/written) incremental 1:",
        "ratio (ours/theirs) restore throughput:",
        "ratio (restored/original) boot-to-marker time:",
    ):
        assert line in done.stdout, done.stdout
