"""Live backups of a real QEMU: full then incrementals, writes during the pull, zeros, failures.

Every restore point is compared with `qemu-img compare` against raw snapshots that the test
takes with `qemu-img convert` while the VM is stopped (`stop` / `cont`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import MiB, assert_point_equals, backup, our_bitmaps, points
from qemu_vm import TestVM

from lbrestore.backup import BackupHooks
from lbstore.store import Store


def test_full_then_incrementals_two_disks(make_vm, store_path: Path, tmp_path: Path) -> None:
    vm: TestVM = make_vm({"vda": 32 * MiB, "vdb": 16 * MiB})
    vm.qemu_io("vda", "write -P 0x11 0 1M")
    vm.qemu_io("vda", "write -P 0x22 20M 192k")
    vm.qemu_io("vdb", "write -P 0x33 64k 64k")
    snaps = vm.snapshot_all(tmp_path, "s1")
    first = backup(store_path, vm)
    assert first.kind == "full"
    assert_point_equals(store_path, first.point_id, snaps)

    vm.qemu_io("vda", "write -P 0x44 512k 64k")  # inside data already backed up
    vm.qemu_io("vdb", "write -P 0x55 15M 4k")  # a partial cluster
    snaps = vm.snapshot_all(tmp_path, "s2")
    second = backup(store_path, vm)
    assert second.kind == "incremental"
    assert [d.mode for d in second.disks] == ["incremental", "incremental"]
    # Only the dirty clusters were read: 64 KiB on vda, one 64 KiB cluster on vdb.
    assert {d.name: d.bytes_read for d in second.disks} == {"vda": 64 * 1024, "vdb": 64 * 1024}
    assert_point_equals(store_path, second.point_id, snaps)

    vm.qemu_io("vda", "write -P 0x66 31M 1M")
    snaps = vm.snapshot_all(tmp_path, "s3")
    third = backup(store_path, vm)
    assert third.kind == "incremental"
    assert third.disks[1].bytes_read == 0
    assert_point_equals(store_path, third.point_id, snaps)
    # Earlier points still read as they were.
    assert_point_equals(store_path, first.point_id, {"vda": tmp_path / "s1-vda.raw"})
    # Exactly one bitmap of this store per disk, recording.
    for disk in ("vda", "vdb"):
        mine = our_bitmaps(vm, disk)
        assert len(mine) == 1 and mine[0]["recording"] and mine[0]["persistent"]
        assert mine[0]["name"].endswith(f"-{third.point_id}")


def test_discard_and_write_zeroes_read_as_zeros(make_vm, store_path, tmp_path) -> None:
    vm = make_vm({"vda": 16 * MiB})
    vm.qemu_io("vda", "write -P 0x77 0 4M")
    backup(store_path, vm)
    vm.qemu_io("vda", "write -z 1M 1M")
    vm.qemu_io("vda", "discard 3M 512k")
    snaps = vm.snapshot_all(tmp_path, "z")
    assert snaps["vda"].read_bytes()[1 * MiB : 2 * MiB] == bytes(MiB)
    result = backup(store_path, vm)
    assert result.kind == "incremental"
    disk = result.disks[0]
    assert disk.bytes_zero >= MiB  # recorded as zeros, not read
    assert disk.bytes_read < MiB
    assert_point_equals(store_path, result.point_id, snaps)


def test_writes_during_the_pull_go_to_the_next_point(make_vm, store_path, tmp_path) -> None:
    vm = make_vm({"vda": 16 * MiB, "vdb": 16 * MiB})
    vm.qemu_io("vda", "write -P 0x10 0 16M")
    vm.qemu_io("vdb", "write -P 0x20 0 16M")
    before = vm.snapshot_all(tmp_path, "before")
    written: list[str] = []

    def write_while_pulling(disk: str, offset: int, length: int) -> None:
        if disk == "vda" and offset >= 4 * MiB and not written:
            # Already read (vda start), not yet read (vda end), and the other disk.
            vm.qemu_io("vda", "write -P 0xe1 0 128k")
            vm.qemu_io("vda", "write -P 0xe2 15M 128k")
            vm.qemu_io("vdb", "write -P 0xe3 8M 64k")
            vm.qemu_io("vdb", "write -z 9M 64k")
            written.append(disk)

    first = backup(store_path, vm, BackupHooks(progress=write_while_pulling), chunk=256 * 1024)
    assert written, "the hook never ran during the pull"
    after = vm.snapshot_all(tmp_path, "after")
    assert_point_equals(store_path, first.point_id, before)
    second = backup(store_path, vm)
    assert second.kind == "incremental"
    assert_point_equals(store_path, second.point_id, after)
    assert {d.name: d.bytes_read for d in second.disks} == {"vda": 256 * 1024, "vdb": 64 * 1024}


class Boom(RuntimeError):
    """Raised from a hook to fail the backup mid-pull."""


def test_failure_mid_pull_commits_nothing_and_keeps_every_write(
    make_vm, store_path, tmp_path
) -> None:
    vm = make_vm({"vda": 16 * MiB, "vdb": 16 * MiB})
    vm.qemu_io("vda", "write -P 0x01 0 8M")
    first = backup(store_path, vm)
    vm.qemu_io("vda", "write -P 0x02 1M 64k")  # before the failed backup

    def fail(disk: str, offset: int, length: int) -> None:
        vm.qemu_io("vdb", "write -P 0x03 5M 64k")  # during it
        raise Boom("the store refused")

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(Boom):
        backup(store_path, vm, BackupHooks(progress=fail), scratch_dir=scratch)
    assert points(store_path) == [(first.point_id, "full")]
    for disk in ("vda", "vdb"):
        mine = our_bitmaps(vm, disk)
        assert len(mine) == 1 and mine[0]["recording"], mine
    assert vm.cmd("query-block-exports") == [] and vm.cmd("query-jobs") == []
    assert list(scratch.iterdir()) == []
    vm.qemu_io("vda", "write -P 0x04 12M 64k")  # after it
    snaps = vm.snapshot_all(tmp_path, "s")
    result = backup(store_path, vm)
    assert result.kind == "incremental"
    assert_point_equals(store_path, result.point_id, snaps)


def test_full_flag_reads_everything_and_keeps_the_chain(make_vm, store_path, tmp_path) -> None:
    vm = make_vm({"vda": 16 * MiB})
    vm.qemu_io("vda", "write -P 0x0f 0 2M")
    backup(store_path, vm)
    vm.qemu_io("vda", "write -P 0x1f 3M 64k")
    snaps = vm.snapshot_all(tmp_path, "f")
    result = backup(store_path, vm, full=True)
    assert result.kind == "full"
    assert result.disks[0].bytes_read >= 2 * MiB
    assert_point_equals(store_path, result.point_id, snaps)
    vm.qemu_io("vda", "write -P 0x2f 5M 64k")
    snaps = vm.snapshot_all(tmp_path, "g")
    again = backup(store_path, vm)
    assert again.kind == "incremental" and again.disks[0].bytes_read == 64 * 1024
    assert_point_equals(store_path, again.point_id, snaps)


def test_vm_definition_is_captured(make_vm, store_path) -> None:
    vm = make_vm({"vda": 16 * MiB})
    result = backup(store_path, vm)
    with Store.open(store_path) as store:
        definition = store.point(result.point_id).definition
    assert definition is not None
    assert definition["name"] == "vm1"
    assert definition["machine"].startswith("pc-q35")
    assert definition["memory_mib"] == 64 and definition["cpus"] == 1
    assert definition["disks"][0] == {
        "name": "vda",
        "node_name": "fmt-vda",
        "virtual_size": 16 * MiB,
        "format": "qcow2",
        "device": "virtio-blk-pci",
    }
    assert definition["nics"] == [
        {"id": "net0", "model": "virtio-net-pci", "mac": "52:54:00:12:34:56"}
    ]
    # The scratch files skip flushes; the guest's own disk must keep them.
    nodes = {n["node-name"]: n for n in vm.cmd("query-named-block-nodes", flat=True)}
    assert nodes["fmt-vda"]["cache"]["no-flush"] is False
    assert nodes["file-vda"]["cache"]["no-flush"] is False
