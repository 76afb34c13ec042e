"""Live backups of a real QEMU go on correctly after merges, also after the newest point was
merged away (its bitmap then names a removed point: the next backup resyncs, exactly)."""

from __future__ import annotations

from pathlib import Path

from conftest import MiB, assert_point_equals, backup
from qemu_vm import TestVM

from lbstore.merge import merge_point
from lbstore.store import Store


def merge(store_path: Path, point_id: int) -> str:
    with Store.open(store_path, write=True, vm="vm1") as store:
        result = merge_point(store, store.point(point_id))
    return result.disks[0].direction


def test_backups_after_merging_a_middle_and_the_newest_point(
    make_vm, store_path: Path, tmp_path: Path
) -> None:
    vm: TestVM = make_vm({"vda": 8 * MiB})
    vm.qemu_io("vda", "write -P 0x11 0 2M")
    first = backup(store_path, vm)
    s1 = vm.snapshot_all(tmp_path, "s1")
    vm.qemu_io("vda", "write -P 0x22 1M 128k")
    second = backup(store_path, vm)
    vm.qemu_io("vda", "write -P 0x33 4M 64k")
    vm.qemu_io("vda", "write -z 0 64k")
    third = backup(store_path, vm)
    s3 = vm.snapshot_all(tmp_path, "s3")

    merge(store_path, second.point_id)  # a middle point
    assert_point_equals(store_path, first.point_id, s1)
    assert_point_equals(store_path, third.point_id, s3)
    vm.qemu_io("vda", "write -P 0x44 6M 64k")
    fourth = backup(store_path, vm)
    assert [d.mode for d in fourth.disks] == ["incremental"]
    s4 = vm.snapshot_all(tmp_path, "s4")
    assert_point_equals(store_path, fourth.point_id, s4)

    assert merge(store_path, fourth.point_id) == "drop"  # the newest point
    vm.qemu_io("vda", "write -P 0x55 7M 64k")
    fifth = backup(store_path, vm)
    assert [d.mode for d in fifth.disks] == ["resync"]  # the bitmap counts from #fourth
    s5 = vm.snapshot_all(tmp_path, "s5")
    assert_point_equals(store_path, fifth.point_id, s5)
    vm.qemu_io("vda", "write -P 0x66 2M 64k")
    sixth = backup(store_path, vm)
    assert [d.mode for d in sixth.disks] == ["incremental"]
    assert_point_equals(store_path, sixth.point_id, vm.snapshot_all(tmp_path, "s6"))
    assert_point_equals(store_path, fifth.point_id, s5)
    assert_point_equals(store_path, third.point_id, s3)
    assert_point_equals(store_path, first.point_id, s1)
