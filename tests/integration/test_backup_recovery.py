"""Backups across QEMU restarts and crashes, receiver crashes, changed disks and two stores."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MiB, assert_point_equals, backup, our_bitmaps, points
from qemu_vm import TestVM

from lbqemu.errors import BackupInProgressError
from lbqemu.tls import tls_creds_object
from lbstore.store import Store

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def test_clean_restart_keeps_the_persistent_bitmap(make_vm, store_path, tmp_path) -> None:
    vm: TestVM = make_vm({"vda": 16 * MiB, "vdb": 16 * MiB})
    vm.qemu_io("vda", "write -P 0x31 0 2M")
    backup(store_path, vm)
    vm.qemu_io("vda", "write -P 0x32 4M 64k")
    vm.restart()  # `quit`: QEMU stores the persistent bitmaps in the qcow2 files
    vm.qemu_io("vdb", "write -P 0x33 6M 64k")
    snaps = vm.snapshot_all(tmp_path, "r")
    result = backup(store_path, vm)
    assert result.kind == "incremental"
    assert [d.mode for d in result.disks] == ["incremental", "incremental"]
    assert {d.name: d.bytes_read for d in result.disks} == {"vda": 64 * 1024, "vdb": 64 * 1024}
    assert_point_equals(store_path, result.point_id, snaps)


def test_qemu_sigkill_between_backups_resyncs_exactly(make_vm, store_path, tmp_path) -> None:
    vm = make_vm({"vda": 16 * MiB})
    vm.qemu_io("vda", "write -P 0x41 0 4M")
    backup(store_path, vm)
    vm.restart()  # the bitmap is now in the file, loaded (and marked in use) by QEMU
    vm.qemu_io("vda", "write -P 0x42 1M 64k")
    vm.kill9()
    vm.start()
    assert our_bitmaps(vm, "vda")[0]["inconsistent"] is True
    vm.qemu_io("vda", "write -P 0x43 2M 64k")
    snaps = vm.snapshot_all(tmp_path, "k")
    result = backup(store_path, vm)
    assert result.kind == "resync"
    assert "inconsistent" in (result.disks[0].reason or "")
    assert result.disks[0].bytes_read >= 4 * MiB  # read whole...
    assert result.disks[0].bytes_stored == 128 * 1024  # ...stored only what changed
    assert_point_equals(store_path, result.point_id, snaps)
    with Store.open(store_path) as store:
        assert [e["kind"] for e in store.events("vm1", "resync")] == ["resync"]

    # A bitmap created after QEMU started is lost by a crash: missing -> resync too.
    vm.kill9()
    vm.start()
    assert our_bitmaps(vm, "vda") == []
    vm.qemu_io("vda", "write -P 0x44 3M 64k")
    snaps = vm.snapshot_all(tmp_path, "m")
    again = backup(store_path, vm)
    assert again.kind == "resync" and again.disks[0].reason == "bitmap missing"
    assert_point_equals(store_path, again.point_id, snaps)
    vm.qemu_io("vda", "write -P 0x45 5M 64k")
    snaps = vm.snapshot_all(tmp_path, "n")
    last = backup(store_path, vm)
    assert last.kind == "incremental" and last.disks[0].bytes_read == 64 * 1024
    assert_point_equals(store_path, last.point_id, snaps)


def _kill_slow_backup(store_path: Path, vm: TestVM, marker: str, count: int) -> str:
    """Run slow_backup.py and SIGKILL it after `count` output lines starting with `marker`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "slow_backup.py"), str(store_path), vm.qmp_address, vm.name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    seen = 0
    last = ""
    assert proc.stdout is not None
    for line in proc.stdout:
        last = line.strip()
        if line.startswith(marker):
            seen += 1
            if seen >= count:
                proc.send_signal(signal.SIGKILL)
                break
        assert not line.startswith("DONE"), "the backup finished before it was killed"
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    return last


def _kill_cli_once_exported(store_path: Path, vm: TestVM) -> None:
    """Run `lbrestore backup` and SIGKILL it as soon as QEMU exports the views."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lbrestore", "--store", str(store_path), "backup", vm.name,
         "--qmp", vm.qmp_address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    while proc.poll() is None and not vm.cmd("query-block-exports"):
        pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_receiver_sigkill_mid_pull_loses_nothing(make_vm, store_path, tmp_path) -> None:
    vm = make_vm({"vda": 16 * MiB, "vdb": 16 * MiB})
    vm.qemu_io("vda", "write -P 0x51 0 16M")
    vm.qemu_io("vdb", "write -P 0x52 0 16M")
    first = backup(store_path, vm)
    vm.qemu_io("vda", "write -P 0x53 0 8M")  # a long incremental to interrupt
    vm.qemu_io("vdb", "write -P 0x54 0 8M")
    instants = [("PLAN", 1), ("READ", 1), ("READ", 40), ("READ", 150)]
    for n, (marker, count) in enumerate(instants):
        _kill_slow_backup(store_path, vm, marker, count)
        assert points(store_path) == [(first.point_id, "full")], f"instant {n}"
        vm.qemu_io("vda", f"write -P {0x60 + n} {(9 + n) * MiB} 64k")  # between attempts
    _kill_cli_once_exported(store_path, vm)
    vm.qemu_io("vdb", "write -P 0x70 15M 64k")
    for disk in ("vda", "vdb"):
        assert our_bitmaps(vm, disk), f"{disk}: no bitmap left to cover the writes"
    snaps = vm.snapshot_all(tmp_path, "after")
    result = backup(store_path, vm)
    assert result.kind == "incremental", result.disks
    assert result.leftovers_removed, "the killed receiver's exports and jobs were not found"
    assert_point_equals(store_path, result.point_id, snaps)
    assert vm.cmd("query-block-exports") == [] and vm.cmd("query-jobs") == []
    for disk in ("vda", "vdb"):
        assert len(our_bitmaps(vm, disk)) == 1
    with Store.open(store_path) as store:
        assert [p.id for p in store.restore_points("vm1")] == [first.point_id, result.point_id]


def test_disk_grown_and_disk_added(make_vm, store_path, tmp_path) -> None:
    vm = make_vm({"vda": 16 * MiB, "vdb": 16 * MiB})
    vm.qemu_io("vda", "write -P 0x81 0 1M")
    vm.qemu_io("vdb", "write -P 0x82 0 1M")
    backup(store_path, vm)
    vm.resize("vda", 24 * MiB)
    vm.qemu_io("vda", "write -P 0x83 20M 64k")
    vm.qemu_io("vdb", "write -P 0x84 2M 64k")
    vm.add_disk("vdc", 8 * MiB)
    vm.qemu_io("vdc", "write -P 0x85 1M 64k")
    snaps = vm.snapshot_all(tmp_path, "g")
    result = backup(store_path, vm)
    modes = {d.name: (d.mode, d.reason) for d in result.disks}
    assert modes["vda"][0] == "resync" and "resized" in (modes["vda"][1] or "")
    assert modes["vdb"] == ("incremental", None)
    assert modes["vdc"][0] == "full"
    assert_point_equals(store_path, result.point_id, snaps)
    with Store.open(store_path) as store:
        point = store.point(result.point_id)
        assert {d.name: d.virtual_size for d in point.disks}["vda"] == 24 * MiB
    vm.qemu_io("vdc", "write -P 0x86 2M 64k")
    snaps = vm.snapshot_all(tmp_path, "h")
    again = backup(store_path, vm)
    assert again.kind == "incremental"
    assert_point_equals(store_path, again.point_id, snaps)


def test_second_store_does_not_disturb_the_first(make_vm, tmp_path) -> None:
    store_a, store_b = tmp_path / "a", tmp_path / "b"
    Store.init(store_a)
    Store.init(store_b)
    vm = make_vm({"vda": 16 * MiB})
    vm.qemu_io("vda", "write -P 0x91 0 1M")
    backup(store_a, vm)
    vm.qemu_io("vda", "write -P 0x92 2M 64k")
    b1 = backup(store_b, vm)
    assert b1.kind == "full"
    vm.qemu_io("vda", "write -P 0x93 3M 64k")
    snaps = vm.snapshot_all(tmp_path, "ab")
    a2 = backup(store_a, vm)
    assert a2.kind == "incremental"
    assert a2.disks[0].bytes_read == 128 * 1024  # both writes since A's last point
    assert_point_equals(store_a, a2.point_id, snaps)
    b2 = backup(store_b, vm)
    assert b2.kind == "incremental" and b2.disks[0].bytes_read == 64 * 1024
    assert_point_equals(store_b, b2.point_id, snaps)
    assert len(our_bitmaps(vm, "vda")) == 2


def test_raw_disk_bitmap_lives_as_long_as_qemu(make_vm, store_path, tmp_path) -> None:
    vm = make_vm({"vda": 16 * MiB})
    vm.quit()
    vm.create_disk("vdb", 16 * MiB, fmt="raw")
    vm.start()
    vm.qemu_io("vdb", "write -P 0x61 0 1M")
    backup(store_path, vm)
    assert [b["persistent"] for b in our_bitmaps(vm, "vdb")] == [False]
    vm.qemu_io("vdb", "write -P 0x62 2M 64k")
    snaps = vm.snapshot_all(tmp_path, "raw1")
    inc = backup(store_path, vm)
    assert [(d.name, d.mode, d.bytes_read) for d in inc.disks] == [
        ("vda", "incremental", 0),
        ("vdb", "incremental", 64 * 1024),
    ]
    assert_point_equals(store_path, inc.point_id, snaps)
    vm.restart()  # the raw disk's bitmap is gone, the qcow2 one persisted
    vm.qemu_io("vdb", "write -P 0x63 3M 64k")
    snaps = vm.snapshot_all(tmp_path, "raw2")
    after = backup(store_path, vm)
    modes = {d.name: (d.mode, d.reason) for d in after.disks}
    assert modes == {"vda": ("incremental", None), "vdb": ("resync", "bitmap missing")}
    assert_point_equals(store_path, after.point_id, snaps)


def test_a_second_backup_while_one_runs_is_refused(make_vm, tmp_path) -> None:
    store_a, store_b = tmp_path / "a", tmp_path / "b"
    Store.init(store_a)
    Store.init(store_b)
    vm = make_vm({"vda": 16 * MiB})
    vm.qemu_io("vda", "write -P 0x71 0 8M")
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "slow_backup.py"), str(store_a), vm.qmp_address, vm.name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("READ"):
            break
    # Through another QMP monitor (on one monitor, the second receiver would just wait).
    with pytest.raises(BackupInProgressError) as info:
        backup(store_b, vm, qmp=vm.second_qmp_address)
    assert info.value.pid == proc.pid
    rest = proc.stdout.read()
    assert proc.wait() == 0 and "DONE" in rest  # the running backup was not disturbed
    assert points(store_a) == [(1, "full")] and points(store_b) == []


def test_leftover_tls_server_of_a_killed_receiver_is_removed(make_vm, store_path, tmp_path):
    from fixtures.tls import make_tls_dirs

    creds = make_tls_dirs(tmp_path / "tls").good
    vm = make_vm({"vda": 16 * MiB})
    vm.qemu_io("vda", "write -P 0x75 0 1M")
    first = backup(store_path, vm)
    # What a receiver killed during a TLS backup leaves: its credentials object, its server.
    vm.cmd("object-add", **tls_creds_object(creds, endpoint="server", id="lbr-tls-2"))
    vm.cmd(
        "nbd-server-start",
        addr={"type": "inet", "data": {"host": "127.0.0.1", "port": str(free_port())}},
        **{"tls-creds": "lbr-tls-2"},
    )
    vm.qemu_io("vda", "write -P 0x76 0 64k")
    snaps = vm.snapshot_all(tmp_path, "tls")
    result = backup(store_path, vm, nbd=f"tcp:127.0.0.1:{free_port()}", tls_creds=str(creds))
    assert "object lbr-tls-2" in result.leftovers_removed
    assert result.kind == "incremental" and result.point_id == first.point_id + 1
    assert_point_equals(store_path, result.point_id, snaps)
    objects = [o["name"] for o in vm.cmd("qom-list", path="/objects")]
    assert not [o for o in objects if o.startswith("lbr-")]


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
