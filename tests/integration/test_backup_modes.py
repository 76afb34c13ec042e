"""Each disk's mode is decided once: what the summary and the event log say is what was stored."""

from __future__ import annotations

from pathlib import Path

from conftest import MiB, assert_point_equals, backup, our_bitmaps, stored_file
from qemu_vm import TestVM

from lbrestore.backup import BackupHooks
from lbstore.store import Store


def test_a_resync_the_store_turns_into_a_full_is_reported_as_a_full(
    make_vm, store_path: Path, tmp_path: Path
) -> None:
    vm: TestVM = make_vm({"vda": 8 * MiB, "vdb": 8 * MiB})
    vm.qemu_io("vda", "write -P 0x61 0 2M")
    vm.qemu_io("vdb", "write -P 0x62 0 2M")
    first = backup(store_path, vm)
    stored_file(store_path, first.point_id, "vda").unlink()  # vda's chain is now unreadable
    for bitmap in our_bitmaps(vm, "vda"):  # and its bitmap untrusted: the plan says resync
        vm.cmd("block-dirty-bitmap-remove", node=vm.disks["vda"].node, name=bitmap["name"])
    vm.qemu_io("vdb", "write -P 0x63 1M 64k")
    snaps = vm.snapshot_all(tmp_path, "s")

    result = backup(store_path, vm)

    modes = {d.name: (d.mode, d.reason) for d in result.disks}
    assert modes == {
        "vda": ("full", "the previous chain cannot be read"),
        "vdb": ("incremental", None),
    }
    assert result.kind == "incremental"  # one disk full, none resynced
    assert {d.name: d.bytes_read for d in result.disks} == {"vda": 2 * MiB, "vdb": 64 * 1024}
    assert_point_equals(store_path, result.point_id, snaps)
    with Store.open(store_path) as store:
        point = store.point(result.point_id)
        assert {d.name: (d.mode, d.backing_point_id) for d in point.disks} == {
            "vda": ("full", None),
            "vdb": ("incremental", first.point_id),
        }
        logged = [(e["kind"], e["details"].get("disk")) for e in store.events("vm1")]
    assert ("full", "vda") in logged and ("resync", "vda") not in logged
    assert ("chain-broken", "vda") in logged


def test_old_bitmaps_are_deleted_together_and_one_gone_spares_the_others(
    make_vm, store_path: Path
) -> None:
    vm: TestVM = make_vm({"vda": 4 * MiB, "vdb": 4 * MiB})
    vm.qemu_io("vda", "write -P 0x71 0 1M")
    vm.qemu_io("vdb", "write -P 0x72 0 1M")
    first = backup(store_path, vm)
    old = {disk: [b["name"] for b in our_bitmaps(vm, disk)] for disk in ("vda", "vdb")}
    assert all(len(names) == 1 for names in old.values())
    gone = []

    def lose_vdb_bitmap(disk: str, offset: int, length: int) -> None:
        if not gone:  # after the transaction froze it, before the commit
            vm.cmd("block-dirty-bitmap-remove", node=vm.disks["vdb"].node, name=old["vdb"][0])
            gone.append(disk)

    # --full: the old bitmaps are frozen but not exported, so one can be removed meanwhile.
    second = backup(store_path, vm, BackupHooks(progress=lose_vdb_bitmap), full=True)

    assert gone and second.kind == "full" and second.point_id == first.point_id + 1
    (problem,) = second.problems
    assert problem.startswith("vdb: old bitmap not deleted: ") and old["vdb"][0] in problem
    new_name = old["vda"][0].rsplit("-", 1)[0] + f"-{second.point_id}"
    for disk in ("vda", "vdb"):  # the other old bitmap is deleted all the same
        assert [b["name"] for b in our_bitmaps(vm, disk)] == [new_name]
    vm.qemu_io("vdb", "write -P 0x73 2M 64k")
    third = backup(store_path, vm)
    assert [(d.name, d.mode, d.bytes_read) for d in third.disks] == [
        ("vda", "incremental", 0),
        ("vdb", "incremental", 64 * 1024),
    ]
