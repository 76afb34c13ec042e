"""The bitmap invariant on failure paths: Ctrl-C, an NBD error, a QMP error.

After each failure: nothing committed, QEMU left with exactly one recording bitmap of the store
per disk (the new one merged back into it), no export, job or scratch node left, and the next
backup is an exact incremental.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MiB, assert_point_equals, backup, our_bitmaps, points

from lbqemu.errors import NbdError, QemuError, QmpCommandError
from lbrestore.backup import BackupHooks
from lbrestore.errors import AppError
from lbstore.store import Store

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def assert_clean_and_covered(vm, store_path, tmp_path, committed: list[tuple[int, str]]) -> None:
    assert points(store_path) == committed
    assert vm.cmd("query-block-exports") == [] and vm.cmd("query-jobs") == []
    nodes = [n["node-name"] for n in vm.cmd("query-named-block-nodes", flat=True)]
    assert not [n for n in nodes if n.startswith("lbr-")], nodes
    for disk in vm.disks:
        mine = our_bitmaps(vm, disk)
        assert len(mine) == 1 and mine[0]["recording"], mine
    vm.qemu_io("vda", "write -P 0xd4 14M 64k")
    snaps = vm.snapshot_all(tmp_path, f"after{len(committed)}")
    result = backup(store_path, vm)
    assert result.kind == "incremental"
    assert_point_equals(store_path, result.point_id, snaps)


def test_ctrl_c_mid_pull_tears_down_and_merges_back(make_vm, store_path, tmp_path) -> None:
    vm = make_vm({"vda": 16 * MiB, "vdb": 16 * MiB})
    vm.qemu_io("vda", "write -P 0xd1 0 16M")
    first = backup(store_path, vm)
    vm.qemu_io("vda", "write -P 0xd2 0 8M")
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "slow_backup.py"), str(store_path), vm.qmp_address, vm.name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.stdout is not None and proc.stderr is not None
    for line in proc.stdout:
        if line.startswith("READ") and int(line.split()[2]) >= 2 * MiB:
            vm.qemu_io("vdb", "write -P 0xd3 3M 64k")  # during the interrupted backup
            proc.send_signal(signal.SIGINT)
            break
    proc.wait()
    err = proc.stderr.read()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err, err
    assert_clean_and_covered(vm, store_path, tmp_path, [(first.point_id, "full")])


def test_nbd_error_mid_pull(make_vm, store_path, tmp_path) -> None:
    vm = make_vm({"vda": 16 * MiB})
    vm.qemu_io("vda", "write -P 0xe1 0 8M")
    first = backup(store_path, vm)
    vm.qemu_io("vda", "write -P 0xe2 0 4M")

    cut: list[str] = []

    def cut_the_export(disk: str, offset: int, length: int) -> None:
        if not cut:  # runs already read are still delivered after the cut: cut once
            for export in vm.cmd("query-block-exports"):
                vm.cmd("block-export-del", id=export["id"], mode="hard")
                cut.append(export["id"])

    with pytest.raises(NbdError):
        backup(store_path, vm, BackupHooks(progress=cut_the_export), chunk=64 * 1024)
    with Store.open(store_path) as store:
        failures = store.events("vm1", "backup-failed")
    assert len(failures) == 1 and "NbdError" in failures[0]["message"]
    assert_clean_and_covered(vm, store_path, tmp_path, [(first.point_id, "full")])


def test_qmp_error_after_the_transaction(make_vm, store_path, tmp_path) -> None:
    vm = make_vm({"vda": 16 * MiB})
    vm.qemu_io("vda", "write -P 0xf1 0 1M")
    first = backup(store_path, vm)
    vm.qemu_io("vda", "write -P 0xf2 0 64k")
    # Someone else's NBD server is running: nbd-server-start fails after the transaction.
    other = tmp_path / "other.sock"
    vm.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(other)}})
    with pytest.raises(QmpCommandError) as info:
        backup(store_path, vm)
    assert info.value.command == "nbd-server-start"
    vm.cmd("nbd-server-stop")
    assert_clean_and_covered(vm, store_path, tmp_path, [(first.point_id, "full")])


def test_qemu_dying_mid_pull_is_one_clear_error(make_vm, store_path, tmp_path) -> None:
    vm = make_vm({"vda": 16 * MiB})
    vm.qemu_io("vda", "write -P 0xc1 0 8M")
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    def crash(disk: str, offset: int, length: int) -> None:
        if vm.proc is not None:
            vm.kill9()

    with pytest.raises(QemuError):
        backup(store_path, vm, BackupHooks(progress=crash), chunk=64 * 1024, scratch_dir=scratch)
    assert points(store_path) == []
    assert list(scratch.iterdir()) == []
    vm.start()  # and the next backup works
    snaps = vm.snapshot_all(tmp_path, "back")
    result = backup(store_path, vm)
    assert result.kind == "full"
    assert_point_equals(store_path, result.point_id, snaps)


def test_a_vm_without_disks_is_a_clear_error(make_vm, store_path) -> None:
    vm = make_vm({"vda": 16 * MiB})
    vm.quit()
    vm.disks.clear()
    vm.start()
    with pytest.raises(AppError, match="no writable disk"):
        backup(store_path, vm)
    assert points(store_path) == []
