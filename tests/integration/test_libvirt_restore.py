"""`lbrestore backup --all --libvirt` and `restore --define [--start]` against a real libvirtd."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import MiB, assert_point_equals, points
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
