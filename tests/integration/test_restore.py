"""`lbrestore restore`: standalone thin disks equal to the restore point, VM definition, NBD."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from qemu.qmp import ConnectError
from qemu.qmp.legacy import QEMUMonitorProtocol
from restore_store import (
    CLUSTER,
    KnownStore,
    build_store,
    compare,
    l2_entry_offset,
    lbrestore,
    qemu_img_json,
)


@pytest.fixture(scope="module")
def known(tmp_path_factory: pytest.TempPathFactory) -> KnownStore:
    """vm1: four points of vda (16 MiB) and vdb (4 MiB + 4 KiB), the third a new full of vda."""
    return build_store(tmp_path_factory.mktemp("restore"), points=4, full_at=(2,))


def allocated_clusters(image: Path) -> int:
    """Clusters that hold data in the image itself (qemu-img map, the image's own layer)."""
    ranges = qemu_img_json("map", image)
    return sum(-(-r["length"] // CLUSTER) for r in ranges if r["data"] and r["depth"] == 0)


@pytest.mark.parametrize("position", [0, 1, 3])
def test_restored_qcow2_equals_the_point_and_is_standalone_and_thin(
    known: KnownStore, tmp_path: Path, position: int
) -> None:
    point = known.point_ids[position]
    out = tmp_path / "out"
    result = lbrestore(known.path, "restore", f"vm1@#{point}", "--to", str(out), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for disk in ("vda", "vdb"):
        image = out / f"{disk}.qcow2"
        assert compare(image, known.expected[(point, disk)]).returncode == 0
        check = subprocess.run(["qemu-img", "check", image], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        info = qemu_img_json("info", image)
        assert "backing-filename" not in info and "full-backing-filename" not in info
        assert info["virtual-size"] == known.expected[(point, disk)].stat().st_size
        # thin: exactly the non-zero clusters are allocated; file size follows the data
        assert allocated_clusters(image) == known.nonzero_clusters[(point, disk)]
        assert info["actual-size"] < (known.nonzero_clusters[(point, disk)] + 16) * CLUSTER
        assert info["actual-size"] < info["virtual-size"] // 2
    verified = {d["name"]: d["verified_clusters"] for d in report["disks"]}
    assert verified["vda"] > 0 and verified["vdb"] > 0
    assert not [p for p in out.iterdir() if "partial" in p.name]


def test_restored_raw_is_sparse_and_equal(known: KnownStore, tmp_path: Path) -> None:
    point = known.point_ids[-1]
    out = tmp_path / "out"
    result = lbrestore(known.path, "restore", "vm1@latest", "--to", str(out), "--format", "raw")
    assert result.returncode == 0, result.stderr
    for disk in ("vda", "vdb"):
        image = out / f"{disk}.raw"
        assert compare(image, known.expected[(point, disk)], "raw").returncode == 0
        allocated = image.stat().st_blocks * 512
        assert allocated <= (known.nonzero_clusters[(point, disk)] + 1) * CLUSTER
    assert (out / "start-vm1.sh").exists()


def test_definition_for_the_new_host(known: KnownStore, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = lbrestore(known.path, "restore", "vm1@latest", "--to", str(out), "--name", "vm1-dr")
    assert result.returncode == 0, result.stderr
    xml = out / "vm1-dr.xml"
    valid = subprocess.run(["virt-xml-validate", xml, "domain"], capture_output=True, text=True)
    assert valid.returncode == 0, valid.stdout + valid.stderr
    root = ET.parse(xml).getroot()
    assert root.findtext("name") == "vm1-dr"
    assert root.findtext("uuid") != "0d6b8c4e-6c0e-4b54-9d43-3f1b2a9c7e11"
    sources = [s.get("file") for s in root.findall("devices/disk/source")]
    assert sources == [str(out / "vda.qcow2"), str(out / "vdb.qcow2")]
    mac = root.find("devices/interface/mac")
    assert mac is not None and mac.get("address", "").startswith("52:54:00:")
    assert mac.get("address") != "52:54:00:11:22:33"
    assert "vnet0" not in xml.read_text() and "seclabel" not in xml.read_text()
    script = (out / "start-vm1-dr.sh").read_text()
    assert mac.get("address", "-") in script and root.findtext("uuid", "-") in script


def test_generated_script_starts_a_vm_from_the_restored_disks(
    known: KnownStore, tmp_path: Path
) -> None:
    qmp_socket = tmp_path / "qmp.sock"
    out = tmp_path / "out"
    assert lbrestore(known.path, "restore", "vm1@latest", "--to", str(out)).returncode == 0
    process = subprocess.Popen(
        [
            out / "start-vm1.sh",
            "-S",
            "-display",
            "none",
            "-qmp",
            f"unix:{qmp_socket},server=on,wait=off",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        qmp = QEMUMonitorProtocol(str(qmp_socket))
        while True:  # the socket appears before QEMU accepts; QEMU may also fail to start
            assert process.poll() is None, process.communicate()[1]
            try:
                qmp.connect()
                break
            except (OSError, ConnectError):
                time.sleep(0.05)
        status = qmp.cmd("query-status")
        assert status["status"] == "prelaunch"
        blocks = qmp.cmd("query-block")
        files = sorted(b["inserted"]["file"] for b in blocks if "inserted" in b)
        assert files == [str(out / "vda.qcow2"), str(out / "vdb.qcow2")]
        script = (out / "start-vm1.sh").read_text()
        nics = qmp.cmd("query-rx-filter")
        assert len(nics) == 1 and nics[0]["main-mac"] in script
        assert nics[0]["main-mac"] != "52:54:00:11:22:33"
        qmp.close()
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def _serve_nbd(tmp_path: Path, image: Path) -> tuple[subprocess.Popen[bytes], Path]:
    socket = tmp_path / "nbd.sock"
    server = subprocess.Popen(
        [
            "qemu-nbd",
            "-f",
            "qcow2",
            "-k",
            str(socket),
            "-x",
            "target",
            "--persistent",
            "--cache=none",
            str(image),
        ],
        stderr=subprocess.PIPE,
    )
    while not socket.exists():
        assert server.poll() is None, server.communicate()[1]
        time.sleep(0.02)
    return server, socket


def test_nbd_restore_into_a_qemu_nbd_target(known: KnownStore, tmp_path: Path) -> None:
    point = known.point_ids[-1]
    size = known.expected[(point, "vda")].stat().st_size
    target = tmp_path / "target.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", target, str(size)], check=True)
    # old data everywhere: the restore must zero what reads as zeros
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P 0xee 0 {size}", target],
        check=True,
        capture_output=True,
    )
    server, socket = _serve_nbd(tmp_path, target)
    try:
        uri = f"nbd+unix:///target?socket={socket}"
        result = lbrestore(known.path, "restore", "vm1@latest", "--disk", "vda", "--to", uri)
        assert result.returncode == 0, result.stderr
        assert "vda" in result.stdout
    finally:
        server.terminate()
        server.wait()
    assert compare(target, known.expected[(point, "vda")]).returncode == 0


def test_nbd_target_too_small_or_ambiguous_is_refused(known: KnownStore, tmp_path: Path) -> None:
    target = tmp_path / "small.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", target, "1M"], check=True)
    server, socket = _serve_nbd(tmp_path, target)
    try:
        uri = f"nbd+unix:///target?socket={socket}"
        small = lbrestore(known.path, "restore", "vm1@latest", "--disk", "vda", "--to", uri)
        both = lbrestore(known.path, "restore", "vm1@latest", "--to", uri)
    finally:
        server.terminate()
        server.wait()
    assert small.returncode == 1 and "needs" in small.stderr
    assert both.returncode == 1 and "--disk" in both.stderr
    for result in (small, both):
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_bad_input_gives_one_line_and_leaves_nothing(known: KnownStore, tmp_path: Path) -> None:
    missing = tmp_path / "never"
    nothing = lbrestore(known.path, "restore", "vm1@#999", "--to", str(missing))
    assert nothing.returncode == 1 and "#999" in nothing.stderr
    assert not missing.exists()

    unknown_vm = lbrestore(known.path, "restore", "nobody@latest", "--to", str(missing))
    assert unknown_vm.returncode == 1 and "vm1" in unknown_vm.stderr  # says what exists

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    refused = lbrestore(known.path, "restore", "vm1@latest", "--to", str(busy))
    assert refused.returncode != 0 and "--force" in refused.stderr
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    forced = lbrestore(known.path, "restore", "vm1@latest", "--to", str(busy), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (busy / "keep.txt").read_text() == "mine" and (busy / "vda.qcow2").exists()

    unreachable = lbrestore(
        known.path,
        "restore",
        "vm1@latest",
        "--disk",
        "vda",
        "--to",
        f"nbd+unix:///x?socket={tmp_path / 'no.sock'}",
    )
    assert unreachable.returncode == 1 and "cannot connect" in unreachable.stderr

    for result in (nothing, unknown_vm, refused, unreachable):
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr


def test_damaged_store_fails_the_restore_and_leaves_nothing(
    known: KnownStore, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    shutil.copytree(known.path, store)
    point = known.point_ids[-1]
    top = store / "data" / "vm1" / "vdb" / f"{point}.qcow2"
    ranges = [r for r in qemu_img_json("map", top) if r["data"] and r["depth"] == 0]
    os.chmod(top, 0o644)
    with top.open("r+b") as f:
        f.seek(ranges[0]["offset"] + 100)
        byte = f.read(1)
        f.seek(ranges[0]["offset"] + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    out = tmp_path / "out"
    result = lbrestore(store, "restore", "vm1@latest", "--to", str(out))
    assert result.returncode == 1
    assert "checksum" in result.stderr and "Traceback" not in result.stderr
    assert f"vm1@#{point} disk vdb" in result.stderr and str(top.name) in result.stderr
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep").write_text("x")
    again = lbrestore(store, "restore", "vm1@latest", "--to", str(existing), "--force")
    assert again.returncode == 1
    assert sorted(p.name for p in existing.iterdir()) == ["keep"]


def test_no_verify_skips_checksums_and_a_read_error_fails_cleanly(
    known: KnownStore, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    shutil.copytree(known.path, store)
    point = known.point_ids[-1]
    top = store / "data" / "vm1" / "vdb" / f"{point}.qcow2"
    first = next(r for r in qemu_img_json("map", top) if r["data"] and r["depth"] == 0)
    os.chmod(top, 0o644)
    with top.open("r+b") as f:
        f.seek(first["offset"])
        f.write(b"\x00damaged\x00")
    unchecked = lbrestore(
        store, "restore", "vm1@latest", "--to", str(tmp_path / "a"), "--no-verify", "--disk", "vdb"
    )
    assert unchecked.returncode == 0, unchecked.stderr  # the damage goes unnoticed...
    assert compare(tmp_path / "a" / "vdb.qcow2", known.expected[(point, "vdb")]).returncode == 1

    vda_top = store / "data" / "vm1" / "vda" / f"{point}.qcow2"
    last = [r for r in qemu_img_json("map", vda_top) if r["data"] and r["depth"] == 0][-1]
    os.chmod(vda_top, 0o644)
    with vda_top.open("r+b") as f:  # its last data cluster now lies far past the end of file
        f.seek(l2_entry_offset(vda_top, last["start"]))
        f.write(struct.pack(">Q", (1 << 63) | (1 << 40)))
    out = tmp_path / "b"
    result = lbrestore(store, "restore", "vm1@latest", "--to", str(out), "--no-verify")
    assert result.returncode == 1, result.stderr
    assert "past end of file" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_nbd_restore_over_tcp_on_loopback(known: KnownStore, tmp_path: Path) -> None:
    """nbd://127.0.0.1:PORT/EXPORT; the port comes from binding port 0, handed to qemu-nbd by
    socket activation (LISTEN_FDS), so no other process can take it in between."""
    point = known.point_ids[1]
    size = known.expected[(point, "vdb")].stat().st_size
    target = tmp_path / "target.raw"
    target.write_bytes(b"\xee" * size)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    os.set_inheritable(listener.fileno(), True)
    server = subprocess.Popen(
        [
            "bash",  # dash cannot name fds above 9
            "-c",
            f"exec 3<&{listener.fileno()}; LISTEN_PID=$$ LISTEN_FDS=1 exec qemu-nbd "
            f'-f raw -x disk --persistent "{target}"',
        ],
        pass_fds=[listener.fileno()],
    )
    listener.close()
    try:
        result = lbrestore(
            known.path,
            "restore",
            f"vm1@#{point}",
            "--disk",
            "vdb",
            "--to",
            f"nbd://127.0.0.1:{port}/disk",
        )
        assert result.returncode == 0, result.stderr
    finally:
        server.terminate()
        server.wait()
    assert compare(target, known.expected[(point, "vdb")], "raw").returncode == 0
