"""A store that runs out of space mid-backup: one clear line, nothing committed, nothing forgotten.

The store lives on a small tmpfs. A backup that does not fit fails with exit 1 and one line,
leaves the committed points as they were, no scratch files, exports or jobs in QEMU, and the
store's bitmap still recording every write since the last committed point: once there is room
again, the next backup is an incremental that reads back exactly.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MiB, assert_point_equals, backup, our_bitmaps, points
from fixtures.tmpfs import mounted_tmpfs, resize_tmpfs

from lbstore.store import Store


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB filesystem for the store."""
    with mounted_tmpfs(tmp_path / "small", "12m") as mountpoint:
        yield mountpoint


def test_store_full_mid_backup_loses_nothing(make_vm, small_filesystem, tmp_path) -> None:
    store_path = small_filesystem / "store"
    Store.init(store_path)
    vm = make_vm({"vda": 64 * MiB})
    vm.qemu_io("vda", "write -P 0x11 0 4M")
    first = backup(store_path, vm)
    assert first.kind == "full"

    vm.qemu_io("vda", "write -P 0x22 8M 24M")  # 24 MiB of changes: more than the room left
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    failed = subprocess.run(
        [
            sys.executable,
            "-m",
            "lbrestore",
            "--store",
            str(store_path),
            "backup",
            vm.name,
            "--qmp",
            vm.qmp_address,
            "--scratch-dir",
            str(scratch),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert failed.returncode == 1, failed.stderr
    assert "Traceback" not in failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "space" in lines[0].lower(), failed.stderr

    assert points(store_path) == [(first.point_id, "full")]
    assert list((store_path / "tmp").iterdir()) == []
    assert list(scratch.iterdir()) == []
    assert vm.cmd("query-block-exports") == [] and vm.cmd("query-jobs") == []
    mine = our_bitmaps(vm, "vda")
    assert len(mine) == 1 and mine[0]["recording"], mine
    assert mine[0]["name"].endswith(f"-{first.point_id}")
    assert_point_equals(store_path, first.point_id, {"vda": first_snapshot(vm, tmp_path)})

    vm.qemu_io("vda", "write -P 0x33 40M 64k")  # after the failure
    resize_tmpfs(small_filesystem, "128m")
    snaps = vm.snapshot_all(tmp_path, "after")
    second = backup(store_path, vm)
    assert second.kind == "incremental"
    assert second.disks[0].bytes_read == 24 * MiB + 64 * 1024
    assert_point_equals(store_path, second.point_id, snaps)


def first_snapshot(vm, tmp_path: Path) -> Path:
    """The disk as the first point saw it: 4 MiB of 0x11, nothing else (rebuilt with qemu-io)."""
    raw = tmp_path / "first.raw"
    subprocess.run(
        ["qemu-img", "create", "-f", "raw", str(raw), str(64 * MiB)],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4M", str(raw)],
        check=True,
        capture_output=True,
    )
    return raw
