"""`make demo` tells the whole story (shortened: backups every 4 s, the point of 8 s ago)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fixtures.linux_guest import LinuxGuestImage

ROOT = Path(__file__).resolve().parent.parent.parent


def test_demo_tells_the_story(linux_guest: LinuxGuestImage) -> None:
    env = dict(os.environ, LBR_DEMO_EVERY="4", LBR_DEMO_MOUNT_AGE="8")
    done = subprocess.run(
        [sys.executable, "-m", "lbrestore.demo"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "incremental" in out and "full" in out  # the backups, and `list`
    assert "mount lg@8s-ago" in out and "lbrestore guest file 00002" in out  # a file, mounted
    assert "boot: OK" in out  # verify --boot
    assert "LBR-LINUX-GUEST-UP" in out and "LBR-CHECK-DONE ok=" in out  # the restored VM
    assert "the VMs, the store and the restored copy were removed" in out
