"""`lbrestore backup` as a user runs it: output, --json, --disk, refusals, one-line errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from conftest import MiB, assert_point_equals, points


def lbrestore(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbrestore", "--store", str(store), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_backup_command_json_and_summary(make_vm, store_path, tmp_path) -> None:
    vm = make_vm({"vda": 16 * MiB, "vdb": 16 * MiB})
    vm.qemu_io("vda", "write -P 0xa1 0 1M")
    snaps = vm.snapshot_all(tmp_path, "c")
    done = lbrestore(store_path, "backup", "vm1", "--qmp", vm.qmp_address, "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["kind"] == "full" and summary["vm"] == "vm1"
    assert {"bytes_read", "bytes_stored", "duration", "throughput"} <= set(summary)
    assert [d["name"] for d in summary["disks"]] == ["vda", "vdb"]
    assert_point_equals(store_path, summary["point_id"], snaps)

    vm.qemu_io("vdb", "write -P 0xa2 0 64k")
    done = lbrestore(store_path, "backup", "vm1", "--qmp", vm.qmp_address, "--disk", "vdb")
    assert done.returncode == 0, done.stderr
    assert "incremental" in done.stdout and "vdb" in done.stdout and "vda" not in done.stdout
    assert "Traceback" not in done.stderr


def test_backup_command_refusals(make_vm, store_path, tmp_path) -> None:
    vm = make_vm({"vda": 16 * MiB})
    unknown = lbrestore(store_path, "backup", "vm1", "--qmp", vm.qmp_address, "--disk", "vdz")
    assert unknown.returncode == 2
    assert "vdz" in unknown.stderr and "vda" in unknown.stderr
    plain = lbrestore(
        store_path, "backup", "vm1", "--qmp", vm.qmp_address, "--nbd", "tcp:127.0.0.1:1"
    )
    assert plain.returncode == 2 and "--insecure-tcp" in plain.stderr
    bad = lbrestore(store_path, "backup", "vm1", "--qmp", "nonsense")
    assert bad.returncode == 2
    gone = lbrestore(
        store_path, "backup", "vm1", "--qmp", f"unix:{tmp_path}/none.sock",
        "--connect-timeout", "0.2",
    )  # fmt: skip
    assert gone.returncode == 1 and "cannot connect" in gone.stderr
    busy = lbrestore(
        store_path, "backup", "vm1", "--qmp", f"unix:{vm.ctl_socket}", "--connect-timeout", "1"
    )  # the harness holds that monitor
    assert busy.returncode == 1 and "did not greet" in busy.stderr
    badname = lbrestore(store_path, "backup", "../x", "--qmp", vm.qmp_address)
    assert badname.returncode != 0
    for result in (unknown, plain, bad, gone, busy, badname):
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert points(store_path) == []
    assert vm.cmd("query-block-exports") == [] and vm.cmd("query-jobs") == []
    assert vm.bitmaps("vda") == []

    # Asked for explicitly, plain TCP works.
    vm.qemu_io("vda", "write -P 0xa3 0 64k")
    snaps = vm.snapshot_all(tmp_path, "tcp")
    tcp = lbrestore(
        store_path, "backup", "vm1", "--qmp", vm.qmp_address, "--json",
        "--nbd", f"tcp:127.0.0.1:{free_port()}", "--insecure-tcp",
    )  # fmt: skip
    assert tcp.returncode == 0, tcp.stderr
    assert_point_equals(store_path, json.loads(tcp.stdout)["point_id"], snaps)


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_disk_without_device_id_is_named_by_its_node(make_vm, store_path, tmp_path) -> None:
    vm = make_vm({"vda": 16 * MiB})
    vm.quit()
    anon = vm.create_disk("anon", 16 * MiB)
    anon.anonymous = True
    vm.start()
    vm.qemu_io("vda", "write -P 0xb1 0 64k")
    done = lbrestore(store_path, "backup", "vm1", "--qmp", vm.qmp_address, "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert [d["name"] for d in summary["disks"]] == ["vda", anon.node]
    listed = json.loads(lbrestore(store_path, "list", "--json").stdout)
    assert sorted(d["name"] for d in listed[0]["disks"]) == [anon.node, "vda"]
    unknown = lbrestore(store_path, "backup", "vm1", "--qmp", vm.qmp_address, "--disk", "anon")
    assert unknown.returncode == 2 and anon.node in unknown.stderr
