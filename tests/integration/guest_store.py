"""The fixture guest disks (tests/fixtures/guest_disks.py) in a real store, for the guest-files
tests: each version imported with `lbrestore import` as one restore point of a VM."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fixtures.guest_disks import GuestDiskPoint


@dataclass
class ImportedPoints:
    store: Path
    points: list[tuple[int, GuestDiskPoint]]  # (restore point id, what it holds)


def lbrestore(store: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """One lbrestore command on `store`, in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "lbrestore", "--store", str(store), *map(str, args)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def import_point(store: Path, vm: str, disks: dict[str, Path], hour: int) -> int:
    """Import raw disk images as a point of `vm` dated 2026-01-01 at `hour`; its id."""
    args = [arg for name, path in disks.items() for arg in ("--disk", f"{name}={path}")]
    done = lbrestore(store, "import", vm, *args, "--at", f"2026-01-01T{hour:02}:00:00")
    assert done.returncode == 0, done.stderr
    listed = json.loads(lbrestore(store, "list", vm, "--json").stdout)
    return max(entry["id"] for entry in listed)


def import_fixture_points(
    store: Path, versions: tuple[GuestDiskPoint, GuestDiskPoint]
) -> ImportedPoints:
    """A new store holding both fixture versions as points of vm1."""
    assert lbrestore(store, "init").returncode == 0
    points = [
        (import_point(store, "vm1", version.disks, hour), version)
        for hour, version in enumerate(versions, start=1)
    ]
    return ImportedPoints(store, points)
