"""Backups of two VMs into one store at the same time (issue 9: writers of different VMs).

One backup is held mid-pull (slow_backup.py, paused after its first run) while the other VM's
whole `lbrestore backup` runs and commits; then the first one finishes. Both points are exact,
and each VM's next backup is an incremental: neither backup disturbed the other's chain or
bitmap.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from conftest import MiB, assert_point_equals, backup, points

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


@contextlib.contextmanager
def held_backup(store_path: Path, vm, resume: Path) -> Iterator[subprocess.Popen[str]]:
    """slow_backup.py of `vm`, returned once it is mid-pull (PAUSED until `resume` exists);
    killed on the way out if still running."""
    held = subprocess.Popen(
        [sys.executable, str(HERE / "slow_backup.py"), str(store_path), vm.qmp_address,
         vm.name, str(resume)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    try:
        assert held.stdout is not None
        for line in held.stdout:
            if line.startswith("PAUSED"):
                break
        else:
            raise AssertionError(f"{vm.name}'s backup never reached its pull: {held.stderr.read()}")
        yield held
    finally:
        if held.poll() is None:
            held.kill()
            held.wait()


def test_two_vms_back_up_at_the_same_time(make_vm, store_path: Path, tmp_path: Path) -> None:
    vm1 = make_vm({"vda": 16 * MiB}, name="vm1")
    vm2 = make_vm({"vda": 16 * MiB}, name="vm2")
    vm1.qemu_io("vda", "write -P 0x31 0 4M")
    vm2.qemu_io("vda", "write -P 0x32 1M 4M")
    snaps1 = vm1.snapshot_all(tmp_path, "one")
    snaps2 = vm2.snapshot_all(tmp_path, "two")
    resume = tmp_path / "resume"
    with held_backup(store_path, vm1, resume) as held:
        other = subprocess.run(
            [sys.executable, "-m", "lbrestore", "--store", str(store_path), "backup", "vm2",
             "--qmp", vm2.qmp_address],
            capture_output=True, text=True, check=False,
            env=dict(os.environ, LBRESTORE_LOCK_TIMEOUT="0"),  # must not wait for vm1's writer
        )  # fmt: skip
        assert other.returncode == 0, other.stderr
        assert held.poll() is None, "vm1's backup was not running while vm2's ran"
        assert points(store_path, "vm1") == []  # vm1's point is not committed yet
        resume.touch()
        out, err = held.communicate(timeout=300)
        assert held.returncode == 0, err
        assert "DONE" in out
    (p1,) = points(store_path, "vm1")
    (p2,) = points(store_path, "vm2")
    assert p1[1] == "full" and p2[1] == "full" and p1[0] < p2[0]  # vm1 began first
    assert_point_equals(store_path, p1[0], snaps1)
    assert_point_equals(store_path, p2[0], snaps2)
    for vm in (vm1, vm2):
        vm.qemu_io("vda", "write -P 0x40 8M 64k")
        again = backup(store_path, vm)
        assert again.kind == "incremental" and again.disks[0].bytes_read == 64 * 1024
        assert_point_equals(store_path, again.point_id, vm.snapshot_all(tmp_path, vm.name))


def test_check_during_a_backup_names_its_point_in_progress_not_as_damage(
    make_vm, store_path: Path, tmp_path: Path
) -> None:
    vm1 = make_vm({"vda": 16 * MiB}, name="vm1")
    vm1.qemu_io("vda", "write -P 0x31 0 4M")
    with held_backup(store_path, vm1, tmp_path / "never"):
        during = _check(store_path)
        assert during.returncode == 0, during.stdout + during.stderr
        report = json.loads(during.stdout)
        assert report["problems"] == []
        assert len(report["in_progress"]) == 1 and report["in_progress"][0].startswith("vm1@#")
    after = _check(store_path)  # the writer is dead now: its pending point is a leftover
    assert after.returncode == 3, after.stdout + after.stderr
    report = json.loads(after.stdout)
    assert report["in_progress"] == []
    assert "interrupted-write" in {p["kind"] for p in report["problems"]}


def _check(store_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbrestore", "--store", str(store_path), "check", "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
