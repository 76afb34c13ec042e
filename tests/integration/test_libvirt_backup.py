"""Backups of libvirt domains through libvirt's own API (a real libvirtd, guest-less domains).

Every restore point is compared with `qemu-img compare` against raw copies of the source
images taken while the domain is paused, at the instant the point stands for.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import MiB, assert_point_equals
from libvirt_env import URI, GuestlessDomain

from lbqemu.errors import DomainBusyError
from lbrestore.backup import BackupHooks, BackupSummary
from lbrestore.cli import main
from lbrestore.errors import UsageError
from lbrestore.libvirt_backup import LibvirtBackupOptions, run_libvirt_backup
from lbstore.store import Store


def lv_backup(
    store_path: Path, dom: GuestlessDomain, hooks: Any = None, **options: Any
) -> BackupSummary:
    """One `backup VM --libvirt URI`, in this process."""
    opts = LibvirtBackupOptions(vm=dom.name, uri=URI, **options)
    with Store.open(store_path, write=True, vm=dom.name) as store:
        return asyncio.run(run_libvirt_backup(store, opts, hooks))


def ours(dom: GuestlessDomain, target: str = "vda") -> list[dict[str, Any]]:
    return [b for b in dom.bitmaps(target) if b["name"].startswith("lbr-")]


def checkpoints(dom: GuestlessDomain) -> list[str]:
    return sorted(c.getName() for c in dom.handle.listAllCheckpoints())


def test_full_then_incrementals_two_disks_exact(make_domain, store_path, tmp_path) -> None:
    dom = make_domain({"vda": 16 * MiB, "vdb": 8 * MiB})
    dom.qemu_io("vda", "write -P 0x11 0 1M")
    dom.qemu_io("vdb", "write -P 0x22 4M 128k")
    snaps = dom.snapshot_all(tmp_path, "s1")
    first = lv_backup(store_path, dom)
    assert first.kind == "full" and [d.name for d in first.disks] == ["vda", "vdb"]
    assert_point_equals(store_path, first.point_id, snaps)
    # Nothing of this store is visible in libvirt between backups; one bitmap records.
    assert checkpoints(dom) == []
    assert [b["recording"] for b in ours(dom)] == [True]

    dom.qemu_io("vda", "write -P 0x33 512k 64k")
    dom.qemu_io("vdb", "write -P 0x44 7M 4k")
    snaps2 = dom.snapshot_all(tmp_path, "s2")
    second = lv_backup(store_path, dom)
    assert second.kind == "incremental"
    assert {d.name: (d.mode, d.bytes_read) for d in second.disks} == {
        "vda": ("incremental", 64 * 1024),
        "vdb": ("incremental", 64 * 1024),
    }
    assert_point_equals(store_path, second.point_id, snaps2)

    dom.qemu_io("vda", "write -P 0x55 15M 1M")
    snaps3 = dom.snapshot_all(tmp_path, "s3")
    third = lv_backup(store_path, dom)
    assert third.kind == "incremental" and third.disks[1].bytes_read == 0
    assert_point_equals(store_path, third.point_id, snaps3)
    assert_point_equals(store_path, first.point_id, snaps)
    for target in ("vda", "vdb"):
        (bitmap,) = ours(dom, target)
        assert bitmap["recording"] and bitmap["name"].endswith(f"-{third.point_id}")
    assert checkpoints(dom) == []
    # The domain's definition is kept with the point (restore writes a domain XML from it).
    with Store.open(store_path) as store:
        definition = store.restore_points(dom.name)[-1].definition
    assert definition is not None and f"<name>{dom.name}</name>" in definition["libvirt_xml"]
    assert [d["name"] for d in definition["disks"]] == ["vda", "vdb"]


def test_bitmap_deleted_by_hand_resyncs(make_domain, store_path, tmp_path) -> None:
    dom = make_domain()
    dom.qemu_io("vda", "write -P 0x11 0 2M")
    lv_backup(store_path, dom)
    (bitmap,) = ours(dom)
    dom.qmp("block-dirty-bitmap-remove", node=dom.node("vda"), name=bitmap["name"])
    dom.qemu_io("vda", "write -P 0x66 1M 64k")
    snaps = dom.snapshot_all(tmp_path, "r")
    resync = lv_backup(store_path, dom)
    assert resync.kind == "resync"
    (disk,) = resync.disks
    assert disk.mode == "resync" and "unusable" in (disk.reason or "")
    assert disk.bytes_stored <= 128 * 1024  # whole disk read, only the change stored
    assert_point_equals(store_path, resync.point_id, snaps)
    # ... and the chain goes on incrementally from the resync.
    dom.qemu_io("vda", "write -P 0x77 3M 64k")
    snaps = dom.snapshot_all(tmp_path, "r2")
    after = lv_backup(store_path, dom)
    assert after.kind == "incremental" and after.bytes_read == 64 * 1024
    assert_point_equals(store_path, after.point_id, snaps)


def test_failed_backup_forgets_no_write(make_domain, store_path, tmp_path) -> None:
    dom = make_domain()
    lv_backup(store_path, dom)
    dom.qemu_io("vda", "write -P 0x12 2M 64k")

    def fail(disk: str, offset: int, length: int) -> None:
        dom.qemu_io("vda", "write -P 0x13 5M 64k")  # a write while the job runs
        raise RuntimeError("receiver fails mid-pull")

    with pytest.raises(RuntimeError, match="mid-pull"):
        lv_backup(store_path, dom, BackupHooks(progress=fail))
    assert checkpoints(dom) == []
    assert len(ours(dom)) == 1
    dom.qemu_io("vda", "write -P 0x14 9M 64k")
    snaps = dom.snapshot_all(tmp_path, "f")
    after = lv_backup(store_path, dom)
    assert after.kind == "incremental" and after.bytes_read == 3 * 64 * 1024
    assert_point_equals(store_path, after.point_id, snaps)


def test_two_stores_keep_their_own_chains(make_domain, tmp_path) -> None:
    dom = make_domain()
    stores = [tmp_path / "a", tmp_path / "b"]
    for path in stores:
        Store.init(path)
    dom.qemu_io("vda", "write -P 0x21 0 1M")
    for path in stores:
        assert lv_backup(path, dom).kind == "full"
    for round_ in range(2):
        dom.qemu_io("vda", f"write -P 0x3{round_} {round_ * 4}M 64k")
        snaps = dom.snapshot_all(tmp_path, f"t{round_}")
        for path in stores:
            point = lv_backup(path, dom)
            assert point.kind == "incremental" and point.bytes_read == 64 * 1024
            assert_point_equals(path, point.point_id, snaps)
    assert len(ours(dom)) == 2  # one per store


def test_virtnbdbackup_on_the_same_domain(make_domain, store_path, tmp_path) -> None:
    if subprocess.run(["which", "virtnbdbackup"], capture_output=True).returncode != 0:
        pytest.skip("virtnbdbackup is not installed")
    dom = make_domain()
    dom.qemu_io("vda", "write -P 0x41 0 1M")
    theirs = tmp_path / "virtnbdbackup"

    def virtnbdbackup(level: str) -> None:
        done = subprocess.run(
            ["virtnbdbackup", "-U", URI, "-d", dom.name, "-l", level, "-o", str(theirs)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]

    virtnbdbackup("full")
    before = checkpoints(dom)
    assert before and all("virtnbdbackup" in name for name in before)
    lv_backup(store_path, dom)
    assert checkpoints(dom) == before  # theirs untouched, ours invisible
    dom.qemu_io("vda", "write -P 0x42 2M 64k")
    virtnbdbackup("inc")  # it still runs its incremental beside our bitmap
    assert len(checkpoints(dom)) == len(before) + 1
    dom.qemu_io("vda", "write -P 0x43 6M 64k")
    snaps = dom.snapshot_all(tmp_path, "v")
    mine = lv_backup(store_path, dom)
    assert mine.kind == "incremental" and mine.bytes_read == 2 * 64 * 1024
    assert_point_equals(store_path, mine.point_id, snaps)
    assert len(checkpoints(dom)) == len(before) + 1


def test_cli_backup_and_usage_errors(make_domain, store_path, capsys) -> None:
    dom = make_domain()
    dom.qemu_io("vda", "write -P 0x51 0 64k")
    with pytest.raises(SystemExit) as exit_:
        main(["--store", str(store_path), "backup", dom.name, "--libvirt", URI])
    out, err = capsys.readouterr()
    assert exit_.value.code == 0, err
    assert f"restore point #1 of {dom.name}: full" in out
    bad = [
        (["backup", dom.name], "either --qmp"),
        (["backup", dom.name, "--libvirt", URI, "--qmp", "unix:/x"], "either --qmp"),
        (["backup", "--all", "--qmp", "unix:/x"], "--all needs --libvirt"),
        (["backup", "--libvirt", URI], "missing the VM name"),
        (["backup", dom.name, "--libvirt", URI, "--disk", "vdz"], "no such disk: vdz"),
    ]
    for args, message in bad:
        with pytest.raises(SystemExit) as exit_:
            main(["--store", str(store_path), *args])
        err = capsys.readouterr().err
        assert exit_.value.code == 2, (args, err)
        assert message in err and "Traceback" not in err and err.count("\n") == 1, (args, err)
    with pytest.raises(SystemExit) as exit_:
        main(["--store", str(store_path), "backup", "lbrt-no-such-domain", "--libvirt", URI])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "find domain lbrt-no-such-domain" in err, err


def test_nbd_over_tcp_and_one_disk_of_two(make_domain, store_path, tmp_path) -> None:
    dom = make_domain({"vda": 8 * MiB, "vdb": 8 * MiB})
    dom.qemu_io("vdb", "write -P 0x91 1M 128k")
    port = free_tcp_port()
    snaps = dom.snapshot_all(tmp_path, "tcp")
    point = lv_backup(
        store_path, dom, disks=("vdb",), nbd=f"tcp:127.0.0.1:{port}", insecure_tcp=True
    )
    assert [d.name for d in point.disks] == ["vdb"]
    assert_point_equals(store_path, point.point_id, {"vdb": snaps["vdb"]})
    with pytest.raises(UsageError, match="unencrypted"):
        lv_backup(store_path, dom, nbd=f"tcp:127.0.0.1:{port}")
    assert checkpoints(dom) == []


KILLED_RECEIVER = """
import asyncio, os, sys
from pathlib import Path
from lbrestore.backup import BackupHooks
from lbrestore.libvirt_backup import LibvirtBackupOptions, run_libvirt_backup
from lbstore.store import Store

def die(disk, offset, length):
    os._exit(9)  # no cleanup at all, as under SIGKILL

store_path, vm, uri, nbd = sys.argv[1:]
tcp = dict(nbd=nbd, insecure_tcp=True) if nbd else {}
options = LibvirtBackupOptions(vm=vm, uri=uri, **tcp)
with Store.open(store_path, write=True, vm=vm) as store:
    asyncio.run(run_libvirt_backup(store, options, BackupHooks(progress=die)))
"""


def free_tcp_port() -> int:
    import socket

    with socket.socket() as probe:  # a free port for libvirt's NBD server
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_receiver_killed_mid_pull(make_domain, store_path, tmp_path, transport) -> None:
    dom = make_domain()
    dom.qemu_io("vda", "write -P 0xa1 0 1M")
    lv_backup(store_path, dom)
    dom.qemu_io("vda", "write -P 0xa2 2M 64k")
    nbd = f"tcp:127.0.0.1:{free_tcp_port()}" if transport == "tcp" else ""
    argv = [sys.executable, "-c", KILLED_RECEIVER, str(store_path), dom.name, URI, nbd]
    killed = subprocess.run(argv, check=False)
    assert killed.returncode == 9
    assert dom.handle.jobInfo()[0] != 0  # its pull job is still running in libvirt
    assert len(checkpoints(dom)) == 2  # the kept one, redefined, and the new one
    dom.qemu_io("vda", "write -P 0xa3 7M 64k")
    snaps = dom.snapshot_all(tmp_path, "k")
    after = lv_backup(store_path, dom)
    assert after.leftovers_removed and "receiver that is gone" in after.leftovers_removed[0]
    assert after.kind == "incremental" and after.bytes_read == 2 * 64 * 1024
    assert_point_equals(store_path, after.point_id, snaps)
    assert checkpoints(dom) == [] and len(ours(dom)) == 1


def test_another_tools_tcp_job_is_left_alone(make_domain, store_path) -> None:
    """A TCP job with no checkpoint of this store showing is not ours to end: busy, untouched."""
    dom = make_domain()
    dom.qemu_io("vda", "write -P 0xb1 0 256k")
    first = lv_backup(store_path, dom)
    server = f"<server transport='tcp' name='127.0.0.1' port='{free_tcp_port()}'/>"
    dom.handle.backupBegin(f"<domainbackup mode='pull'>{server}</domainbackup>", None)
    try:
        with pytest.raises(DomainBusyError, match="another job"):
            lv_backup(store_path, dom)
        assert dom.handle.jobInfo()[0] != 0  # still running
    finally:
        dom.handle.abortJob()
    dom.qemu_io("vda", "write -P 0xb2 1M 64k")
    after = lv_backup(store_path, dom)
    assert after.kind == "incremental" and after.point_id > first.point_id
