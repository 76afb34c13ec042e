"""A chain of restore points of one small disk, built the way `import --at` builds it, with the
image of every point kept beside it (`N.raw` for point #N), and the checks prune tests make."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from lbstore.importer import import_images
from lbstore.store import Store

MIB = 1 << 20
DISK = 4 * MIB


def lbrestore(store: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbrestore", "--store", str(store), *args],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "TZ": "UTC", "HOME": str(store.parent), **env},
    )


def change(image: Path, rng: random.Random) -> None:
    """A few random writes, a zeroed range and sometimes a punched hole (a discard)."""
    with image.open("r+b") as raw:
        for _ in range(rng.randrange(1, 4)):
            length = rng.choice((64 << 10, 192 << 10))
            raw.seek(rng.randrange(0, DISK - length) & ~0xFFFF)
            raw.write(rng.randbytes(length))
        raw.seek(rng.randrange(0, DISK - (128 << 10)) & ~0xFFFF)
        raw.write(bytes(128 << 10))
    if rng.random() < 0.4:
        offset = rng.randrange(0, DISK - MIB) & ~0xFFFF
        subprocess.run(
            ["fallocate", "-p", "-o", str(offset), "-l", str(256 << 10), str(image)], check=True
        )


def build(tmp_path: Path, vm: str, count: int, seed: int, store: Path | None = None) -> Path:
    """`count` points of `vm`, one every 13 hours ending a day ago; images kept as N.raw."""
    store = store or tmp_path / "store"
    if not store.exists():
        Store.init(store)
    rng = random.Random(seed)
    image = tmp_path / f"{vm}.raw"
    image.write_bytes(rng.randbytes(DISK))
    start = datetime.now(UTC) - timedelta(days=1, hours=13 * count)
    with Store.open(store, write=True) as opened:
        for n in range(count):
            if n:
                change(image, rng)
            point = import_images(
                opened, vm, {"vda": image}, created=start + timedelta(hours=13 * n)
            )
            (tmp_path / f"{point.id}.raw").write_bytes(image.read_bytes())
    return store


def files(store: Path, vm: str = "vm1") -> dict[int, Path]:
    return {int(p.stem): p for p in (store / "data" / vm / "vda").glob("*.qcow2")}


def assert_exact(store: Path, tmp_path: Path, vm: str = "vm1") -> None:
    """Every point left reads as its image; every file passes qemu-img check; index agrees."""
    with Store.open(store) as opened:
        ids = [p.id for p in opened.restore_points(vm)]
    assert sorted(files(store, vm)) == ids
    for point_id, path in files(store, vm).items():
        compare = subprocess.run(
            [
                "qemu-img",
                "compare",
                "-f",
                "qcow2",
                "-F",
                "raw",
                str(path),
                str(tmp_path / f"{point_id}.raw"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert compare.returncode == 0, f"#{point_id}: {compare.stdout}{compare.stderr}"
        check = subprocess.run(
            ["qemu-img", "check", "-f", "qcow2", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert check.returncode == 0, f"#{point_id}: {check.stdout}{check.stderr}"


def allocated(store: Path, vm: str = "vm1") -> int:
    return sum(os.stat(p).st_blocks * 512 for p in files(store, vm).values())
