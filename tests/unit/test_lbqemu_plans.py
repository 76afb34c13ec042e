"""The pure decisions of lbqemu: addresses, disk choice, bitmap trust, which runs to read."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbqemu.bitmaps import bitmap_name, plan_disk, rollback_actions, transaction_actions
from lbqemu.discovery import BitmapInfo, DiskInfo, choose_disks, device_id_of
from lbqemu.errors import DiskSelectionError, EndpointAddressError, InsecureTransportError
from lbqemu.fleece import nbd_endpoint
from lbqemu.nbd import STATE_DIRTY, STATE_HOLE, STATE_ZERO, Run, plan_runs
from lbqemu.qmp import parse_address

K = 1024
C = 64 * K


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/run/qmp.sock", "/run/qmp.sock"),
        ("tcp:127.0.0.1:4444", ("127.0.0.1", 4444)),
        ("tcp:[::1]:4444", ("::1", 4444)),
        ("tcp:localhost:1", ("localhost", 1)),
    ],
)
def test_parse_address(text: str, expected: object) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text", ["", "unix:", "/run/qmp.sock", "tcp:host", "tcp:host:0", "tcp:host:x", "udp:a:1"]
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(EndpointAddressError) as info:
        parse_address(text)
    assert info.value.exit_code == 2


def test_choose_disks_leaves_the_firmware_flash_out_unless_named() -> None:
    """-drive if=pflash: OVMF's variables are writable but not a disk of the VM."""
    flash = DiskInfo("pflash1", "#block123", 540672, "raw", C, None, "/machine/system.flash1",
                     "pflash1")  # fmt: skip
    assert flash.is_firmware_flash and not disk("vda").is_firmware_flash
    assert [d.name for d in choose_disks([disk("vda"), flash], [])] == ["vda"]
    assert [d.name for d in choose_disks([disk("vda"), flash], ["pflash1"])] == ["pflash1"]


def test_nbd_endpoint_refuses_plain_tcp_unless_asked(tmp_path: Path) -> None:
    assert nbd_endpoint(None, tmp_path).path == str(tmp_path / "nbd.sock")
    with pytest.raises(InsecureTransportError):
        nbd_endpoint("tcp:127.0.0.1:10809", tmp_path)
    plain = nbd_endpoint("tcp:127.0.0.1:10809", tmp_path, insecure_tcp=True)
    assert plain.qmp_addr() == {"type": "inet", "data": {"host": "127.0.0.1", "port": "10809"}}
    tls = nbd_endpoint("tcp:127.0.0.1:10809", tmp_path, tls_creds_dir="/creds")
    assert tls.tls_creds_dir == "/creds"
    with pytest.raises(EndpointAddressError):
        nbd_endpoint("unix:/x.sock", tmp_path, tls_creds_dir="/creds")


def disk(name: str = "vda", size: int = 16 * C, bitmaps: tuple[BitmapInfo, ...] = ()) -> DiskInfo:
    return DiskInfo(name, f"fmt-{name}", size, "qcow2", C, None, None, name, bitmaps)


def bm(name: str, recording: bool = True, inconsistent: bool = False) -> BitmapInfo:
    return BitmapInfo(name, recording, True, False, inconsistent, C, 0)


def test_device_ids() -> None:
    assert device_id_of("/machine/peripheral/vda/virtio-backend") == "vda"
    assert device_id_of("/machine/peripheral-anon/device[0]/virtio-backend") is None
    assert device_id_of(None) is None


def test_choose_disks_names_what_exists() -> None:
    disks = [disk("vda"), disk("vdb")]
    assert [d.name for d in choose_disks(disks, [])] == ["vda", "vdb"]
    assert [d.name for d in choose_disks(disks, ["vdb", "vdb"])] == ["vdb"]
    with pytest.raises(DiskSelectionError) as info:
        choose_disks(disks, ["vdz"])
    assert "vdz" in str(info.value) and "vda, vdb" in str(info.value)
    assert info.value.exit_code == 2


def test_plan_trusts_this_stores_recording_bitmap() -> None:
    plan = plan_disk(
        disk(bitmaps=(bm(bitmap_name("S", "3")), bm("lbr-T-9"), bm("user"))),
        store_id="S",
        token="4",
        last_size=16 * C,
        last_point=3,
    )
    assert (plan.mode, plan.old_bitmap, plan.new_bitmap) == ("incremental", "lbr-S-3", "lbr-S-4")
    assert plan.export_bitmap == "lbr-S-3" and plan.drop == () and plan.fold == ()
    actions = transaction_actions([plan])
    assert [a["type"] for a in actions] == ["block-dirty-bitmap-add", "block-dirty-bitmap-disable"]
    assert actions[0]["data"]["persistent"] is True
    undo = rollback_actions(plan)
    assert [a["type"] for a in undo] == [
        "block-dirty-bitmap-merge",
        "block-dirty-bitmap-enable",
        "block-dirty-bitmap-remove",
    ]
    assert undo[0]["data"] == {"node": "fmt-vda", "target": "lbr-S-3", "bitmaps": ["lbr-S-4"]}


@pytest.mark.parametrize(
    ("bitmaps", "last_size", "reason"),
    [
        ((), 16 * C, "bitmap missing"),
        ((bm("lbr-T-1"),), 16 * C, "only another store"),
        ((bm("lbr-S-1", inconsistent=True),), 16 * C, "inconsistent"),
        ((bm("lbr-S-1"),), 8 * C, "resized"),
        ((bm("lbr-S-1", recording=False),), 16 * C, "disabled"),
        ((bm("lbr-S-5"),), 16 * C, "newer than the newest"),
    ],
)
def test_plan_resyncs_an_untrusted_bitmap(bitmaps: tuple, last_size: int, reason: str) -> None:
    plan = plan_disk(disk(bitmaps=bitmaps), store_id="S", token="4", last_size=last_size,
                     last_point=3)  # fmt: skip
    assert plan.mode == "resync"
    assert reason in (plan.reason or "")
    assert plan.old_bitmap is None and plan.export_bitmap is None
    assert set(plan.drop) == {b.name for b in bitmaps if b.name.startswith("lbr-S-")}
    assert [a["type"] for a in rollback_actions(plan)] == ["block-dirty-bitmap-remove"]


def test_plan_folds_leftovers_of_an_interrupted_backup_into_the_oldest() -> None:
    leftovers = (bm("lbr-S-3", recording=False), bm("lbr-S-4"), bm("lbr-S-5"))
    plan = plan_disk(disk(bitmaps=leftovers), store_id="S", token="6", last_size=16 * C,
                     last_point=3)  # fmt: skip
    assert plan.mode == "incremental" and plan.old_bitmap == "lbr-S-3"
    assert plan.fold == ("lbr-S-4", "lbr-S-5")


def test_bitmaps_persist_only_on_writable_qcow2() -> None:
    raw = DiskInfo("vdb", "fmt-vdb", 16 * C, "raw", C, None, None, "vdb")
    ro = DiskInfo("cd0", "fmt-cd0", 16 * C, "qcow2", C, None, None, "cd0", read_only=True)
    plans = [plan_disk(d, store_id="S", token="1", last_size=None) for d in (disk(), raw, ro)]
    added = [a["data"]["persistent"] for a in transaction_actions(plans)]
    assert added == [True, False, False]
    assert [d.name for d in choose_disks([disk(), raw, ro], [])] == ["vda", "vdb"]
    assert [d.name for d in choose_disks([disk(), raw, ro], ["cd0"])] == ["cd0"]


def test_plan_new_disk_and_forced_full() -> None:
    new = plan_disk(disk(bitmaps=(bm("lbr-S-1"),)), store_id="S", token="2", last_size=None)
    assert new.mode == "full" and new.drop == ("lbr-S-1",) and new.old_bitmap is None
    forced = plan_disk(disk(bitmaps=(bm("lbr-S-1"),)), store_id="S", token="2",
                       last_size=16 * C, last_point=1, force_full=True)  # fmt: skip
    assert forced.mode == "full" and forced.old_bitmap == "lbr-S-1"
    assert forced.export_bitmap is None


def test_plan_runs_full_reads_data_and_records_zeros() -> None:
    size = 8 * C
    allocation = [(0, 2 * C, 0), (2 * C, 4 * C, STATE_HOLE | STATE_ZERO), (6 * C, 2 * C, 0)]
    assert plan_runs(size, allocation, None, C) == [
        Run(0, 2 * C, zero=False),
        Run(2 * C, 4 * C, zero=True),
        Run(6 * C, 2 * C, zero=False),
    ]


def test_plan_runs_incremental_reads_only_dirty_clusters() -> None:
    size = 8 * C
    allocation = [(0, 3 * C, 0), (3 * C, 5 * C, STATE_ZERO)]
    dirty = [(0, C, 0), (C, 3 * C, STATE_DIRTY), (4 * C, 3 * C, 0), (7 * C, C, STATE_DIRTY)]
    assert plan_runs(size, allocation, dirty, C) == [
        Run(C, 2 * C, zero=False),
        Run(3 * C, C, zero=True),
        Run(7 * C, C, zero=True),
    ]


def test_plan_runs_aligns_to_clusters_and_the_disk_end() -> None:
    size = 3 * C + 512  # not a multiple of the cluster size
    allocation = [(0, 4 * K, 0), (4 * K, size - 4 * K, STATE_ZERO)]
    dirty = [(C + 4 * K, 4 * K, STATE_DIRTY), (3 * C, 512, STATE_DIRTY)]
    # A partly zero cluster is read; the tail zero run may end at the disk's end.
    assert plan_runs(size, allocation, dirty, C) == [
        Run(C, C, zero=True),
        Run(3 * C, 512, zero=True),
    ]
    assert plan_runs(size, allocation, None, C) == [
        Run(0, C, zero=False),
        Run(C, 2 * C + 512, zero=True),
    ]


def test_plan_runs_hole_without_zero_flag_is_read() -> None:
    assert plan_runs(2 * C, [(0, 2 * C, STATE_HOLE)], None, C) == [Run(0, 2 * C, zero=False)]


def _brute_force(size: int, allocation: list, dirty: list | None, align: int) -> list[Run]:
    """Cluster by cluster: wanted if any byte is dirty, zero if every byte reads as zeros."""
    zero_bytes = bytearray(size)
    for o, n, f in allocation:
        if f & STATE_ZERO:
            zero_bytes[o : o + n] = b"\1" * n
    dirty_bytes = bytearray(b"\1" * size) if dirty is None else bytearray(size)
    for o, n, f in dirty or []:
        if f & STATE_DIRTY:
            dirty_bytes[o : o + n] = b"\1" * n
    runs: list[Run] = []
    for start in range(0, size, align):
        end = min(start + align, size)
        if not any(dirty_bytes[start:end]):
            continue
        zero = all(zero_bytes[start:end])
        if runs and runs[-1].zero == zero and runs[-1].offset + runs[-1].length == start:
            runs[-1] = Run(runs[-1].offset, runs[-1].length + end - start, zero)
        else:
            runs.append(Run(start, end - start, zero))
    return runs


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_plan_runs_matches_a_cluster_by_cluster_model(data: st.DataObject) -> None:
    unit = 512
    align = data.draw(st.sampled_from([512, 1024, 4096]))
    size = data.draw(st.integers(1, 24)) * unit + data.draw(st.sampled_from([0, 0, 100]))

    def extents(flags: st.SearchStrategy[int]) -> list[tuple[int, int, int]]:
        out, pos = [], 0
        while pos < size:
            n = min(data.draw(st.integers(1, 6)) * unit, size - pos)
            out.append((pos, n, data.draw(flags)))
            pos += n
        return out

    allocation = extents(st.sampled_from([0, STATE_HOLE, STATE_ZERO, STATE_HOLE | STATE_ZERO]))
    dirty = None if data.draw(st.booleans()) else extents(st.sampled_from([0, STATE_DIRTY]))
    assert plan_runs(size, allocation, dirty, align) == _brute_force(size, allocation, dirty, align)
