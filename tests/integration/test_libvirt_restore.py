"""`backup --all --libvirt`, inactive domains, `restore --define [--start]` and `forget`."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import MiB, assert_point_equals, backup, our_bitmaps, points
from libvirt_env import URI, remove_domain
from test_libvirt_backup import lv_backup

from lbrestore.cli import main


def test_restore_define_and_start(make_domain, store_path, libvirt_conn, capsys) -> None:
    dom = make_domain()
    dom.qemu_io("vda", "write -P 0x61 0 1M")
    lv_backup(store_path, dom)
    source = ET.fromstring(dom.handle.XMLDesc(0))
    # QEMU runs as libvirt's own user here (no test label): the folder must let it in.
    parent = Path(tempfile.mkdtemp(prefix="lbrt-", dir="/var/lib/libvirt/images"))
    parent.chmod(0o711)
    new_name = f"{dom.name}-r"
    try:
        with pytest.raises(SystemExit) as exit_:
            main(
                ["--store", str(store_path), "restore", f"{dom.name}@latest",
                 "--to", str(parent / "r"), "--name", new_name, "--define", URI, "--start"]
            )  # fmt: skip
        assert exit_.value.code == 0, capsys.readouterr().err
        assert f"domain {new_name} defined and started on {URI}" in capsys.readouterr().out
        restored = libvirt_conn.lookupByName(new_name)
        assert restored.isActive()
        xml = ET.fromstring(restored.XMLDesc(0))
        assert xml.findtext("uuid") != source.findtext("uuid")
        new_mac = xml.find("devices/interface/mac").get("address")
        assert new_mac != source.find("devices/interface/mac").get("address")
        assert xml.find("devices/disk/source").get("file") == str(parent / "r" / "vda.qcow2")
    finally:
        with contextlib.suppress(Exception):
            remove_domain(libvirt_conn.lookupByName(new_name))
        shutil.rmtree(parent, ignore_errors=True)


def test_all_domains_one_fails(make_domain, store_path, tmp_path, capsys) -> None:
    doms = [make_domain({"vda": 8 * MiB}) for _ in range(3)]
    for index, dom in enumerate(doms):
        dom.qemu_io("vda", f"write -P 0x7{index} 0 256k")
    busy = doms[1]  # another tool's backup job holds this one
    socket = tmp_path / "other.sock"
    busy.handle.backupBegin(
        f"<domainbackup mode='pull'><server transport='unix' socket='{socket}'/></domainbackup>",
        None,
    )
    snaps = {dom.name: dom.snapshot_all(tmp_path, "a") for dom in (doms[0], doms[2])}
    pattern = doms[0].name.rsplit("-", 1)[0] + "-*"
    with pytest.raises(SystemExit) as exit_:
        main(
            ["--store", str(store_path), "backup", "--all", "--libvirt", URI,
             "--match", pattern, "--jobs", "2"]
        )  # fmt: skip
    assert exit_.value.code == 1
    out, err = capsys.readouterr()
    assert f"{busy.name}: FAILED: " in err and "another job" in err
    for dom in (doms[0], doms[2]):
        assert f"{dom.name}: ok: restore point #" in out
        ((point_id, kind),) = points(store_path, dom.name)
        assert kind == "full"
        assert_point_equals(store_path, point_id, snaps[dom.name])
    assert points(store_path, busy.name) == []
    busy.handle.abortJob()


def image_bitmaps(path: Path) -> list[str]:
    done = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    specific = json.loads(done.stdout)["format-specific"]["data"]
    return [b["name"] for b in specific.get("bitmaps", []) if b["name"].startswith("lbr-")]


def raw_copy(image: Path, dest: Path) -> dict[str, Path]:
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(dest)], check=True)
    return {"vda": dest}


def test_inactive_domain_read_directly_then_forget(make_domain, store_path, tmp_path, capsys):
    dom = make_domain()
    image = dom.disks["vda"]
    dom.qemu_io("vda", "write -P 0x81 0 1M")
    lv_backup(store_path, dom)
    dom.handle.destroy()
    # A write while the domain is down (the image's bitmap records it) ...
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x82 2M 64k", str(image)], check=True)
    with pytest.raises(SystemExit) as exit_:
        main(
            ["--store", str(store_path), "backup", "--all", "--libvirt", URI,
             "--match", dom.name, "--include-inactive", "--json"]
        )  # fmt: skip
    assert exit_.value.code == 0
    (result,) = json.loads(capsys.readouterr().out)
    offline = result["backup"]
    assert offline["kind"] == "incremental" and offline["bytes_read"] == 64 * 1024
    assert_point_equals(store_path, offline["point_id"], raw_copy(image, tmp_path / "off.raw"))
    # ... and once it runs again, its next backup still sees that write plus the new one.
    dom.handle.create()
    dom.qemu_io("vda", "write -P 0x83 5M 64k")
    snaps = dom.snapshot_all(tmp_path, "on")
    online = lv_backup(store_path, dom)
    assert online.kind == "incremental" and online.bytes_read == 2 * 64 * 1024
    assert_point_equals(store_path, online.point_id, snaps)

    # forget: the running domain's bitmap goes through libvirt, the next backup resyncs.
    assert len([b for b in dom.bitmaps("vda") if b["name"].startswith("lbr-")]) == 1
    with pytest.raises(SystemExit) as exit_:
        main(["--store", str(store_path), "forget", dom.name, "--libvirt", URI])
    assert exit_.value.code == 0
    assert f"{dom.name}: 1 removed" in capsys.readouterr().out
    assert [b for b in dom.bitmaps("vda") if b["name"].startswith("lbr-")] == []
    assert dom.handle.listAllCheckpoints() == []
    assert lv_backup(store_path, dom).kind == "resync"
    # An inactive domain's images are edited directly.
    dom.handle.destroy()
    assert len(image_bitmaps(image)) == 1
    with pytest.raises(SystemExit) as exit_:
        main(["--store", str(store_path), "forget", dom.name, "--libvirt", URI])
    assert exit_.value.code == 0
    assert image_bitmaps(image) == []


def test_forget_through_qmp(make_vm, store_path) -> None:
    vm = make_vm({"vda": 8 * MiB})
    backup(store_path, vm)
    assert our_bitmaps(vm, "vda")
    with pytest.raises(SystemExit) as exit_:
        main(["--store", str(store_path), "forget", "vm1", "--qmp", vm.qmp_address])
    assert exit_.value.code == 0
    assert our_bitmaps(vm, "vda") == []
    assert backup(store_path, vm).kind == "resync"
