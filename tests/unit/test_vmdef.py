"""The VM definition for a new host: libvirt XML rewrite and generation, QEMU start script."""

from __future__ import annotations

import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from lbrestore.vmdef import (
    MAC_PREFIX,
    DefinitionError,
    RestoredDisk,
    new_mac,
    write_host_definition,
)

MAC_RE = re.compile(r"^52:54:00(:[0-9a-f]{2}){3}$")

# What `virsh dumpxml` gives for a running domain: ids, aliases, labels and paths of that host.
LIVE_XML = """<domain type='kvm' id='7'>
  <name>web1</name>
  <uuid>6a3e0e1c-0d4b-4b8e-9a55-6d1c8f0a1b2c</uuid>
  <memory unit='KiB'>1048576</memory>
  <vcpu placement='static'>2</vcpu>
  <resource><partition>/machine</partition></resource>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source dev='/dev/vg0/web1-root' index='2'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web1-data.qcow2' index='1'/>
      <backingStore type='file' index='3'>
        <format type='qcow2'/>
        <source file='/var/lib/libvirt/images/base.qcow2'/>
      </backingStore>
      <target dev='vdb' bus='virtio'/>
      <alias name='ua-data'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/srv/iso/debian.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source network='default' portid='0b5c1f3a-1111-2222-3333-444455556666' bridge='virbr0'/>
      <target dev='vnet3'/>
      <model type='virtio'/>
      <alias name='net0'/>
    </interface>
    <serial type='pty'>
      <source path='/dev/pts/4'/>
      <target type='isa-serial' port='0'><model name='isa-serial'/></target>
      <alias name='serial0'/>
    </serial>
    <console type='pty' tty='/dev/pts/4'>
      <source path='/dev/pts/4'/>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-7-web1/agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
    </channel>
    <graphics type='vnc' port='5900' autoport='yes' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
  </devices>
  <seclabel type='dynamic' model='apparmor' relabel='yes'>
    <label>libvirt-6a3e0e1c</label>
    <imagelabel>libvirt-6a3e0e1c</imagelabel>
  </seclabel>
</domain>
"""

DEFINITION: dict[str, Any] = {
    "name": "web1",
    "uuid": "6a3e0e1c-0d4b-4b8e-9a55-6d1c8f0a1b2c",
    "machine": "pc-q35-7.2",
    "memory_mib": 1024,
    "cpus": 2,
    "disks": [
        {
            "name": "vda",
            "node_name": "drive0",
            "virtual_size": 1 << 30,
            "format": "raw",
            "device": "virtio-blk-pci",
        },
        {
            "name": "vdb",
            "node_name": "drive1",
            "virtual_size": 1 << 30,
            "format": "qcow2",
            "device": "virtio-blk-pci",
        },
    ],
    "nics": [{"id": "net0", "model": "virtio-net-pci", "mac": "52:54:00:aa:bb:cc"}],
    "libvirt_xml": None,
}


def restored(tmp_path: Path, *names: str) -> list[RestoredDisk]:
    return [RestoredDisk(n, tmp_path / f"{n}.qcow2", "qcow2", 1 << 30) for n in names]


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virt-xml-validate", str(path), "domain"], capture_output=True, text=True, check=False
    )


def test_new_macs_use_the_qemu_prefix_and_differ() -> None:
    macs = {new_mac() for _ in range(50)}
    assert len(macs) == 50
    assert all(MAC_RE.match(m) and m.startswith(MAC_PREFIX) for m in macs)


def test_live_libvirt_xml_is_rewritten_for_a_new_host(tmp_path: Path) -> None:
    definition = dict(DEFINITION, libvirt_xml=LIVE_XML)
    host = write_host_definition(
        definition, restored(tmp_path, "vda", "vdb"), tmp_path, name="web1-dr"
    )
    assert host.libvirt_xml_path == tmp_path / "web1-dr.xml"
    root = ET.parse(host.libvirt_xml_path).getroot()
    assert root.get("id") is None
    assert root.findtext("name") == "web1-dr"
    assert root.findtext("uuid") == host.uuid != DEFINITION["uuid"]
    disks = root.findall("devices/disk[@device='disk']")
    assert [d.find("source").get("file") for d in disks] == [  # type: ignore[union-attr]
        str(tmp_path / "vda.qcow2"),
        str(tmp_path / "vdb.qcow2"),
    ]
    assert all(d.get("type") == "file" for d in disks)
    assert all(d.find("driver").get("type") == "qcow2" for d in disks)  # type: ignore[union-attr]
    assert root.find(".//backingStore") is None
    cdrom = root.find("devices/disk[@device='cdrom']")
    assert cdrom is not None and cdrom.find("source") is None
    mac = root.find("devices/interface/mac")
    assert mac is not None and MAC_RE.match(mac.get("address", ""))
    assert mac.get("address") != "52:54:00:aa:bb:cc"
    assert host.macs == {"net0": mac.get("address")}
    text = host.libvirt_xml_path.read_text()
    for stale in (
        "vnet3",
        "/dev/pts/4",
        "domain-7-web1",
        "seclabel",
        "virtio-disk0",
        "web1_VARS.fd",
        "port='5900'",
        'port="5900"',
    ):
        assert stale not in text, stale
    assert "ua-data" in text  # a user alias is the user's, not the old host's
    assert validate(host.libvirt_xml_path).returncode == 0, validate(host.libvirt_xml_path).stderr


def test_disks_not_in_the_restore_point_are_dropped_with_a_note(tmp_path: Path) -> None:
    definition = dict(DEFINITION, libvirt_xml=LIVE_XML)
    host = write_host_definition(definition, restored(tmp_path, "vdb"), tmp_path, name="web1")
    assert host.libvirt_xml_path is not None
    root = ET.parse(host.libvirt_xml_path).getroot()
    targets = [d.find("target").get("dev") for d in root.findall("devices/disk[@device='disk']")]  # type: ignore[union-attr]
    assert targets == ["vdb"]
    assert any("vda" in note for note in host.notes)
    assert validate(host.libvirt_xml_path).returncode == 0


def test_libvirt_xml_is_generated_from_the_definition_when_none_was_captured(
    tmp_path: Path,
) -> None:
    host = write_host_definition(
        DEFINITION, restored(tmp_path, "vda", "vdb"), tmp_path, name="web1"
    )
    assert host.libvirt_xml_path is not None
    result = validate(host.libvirt_xml_path)
    assert result.returncode == 0, result.stderr
    root = ET.parse(host.libvirt_xml_path).getroot()
    assert root.findtext("memory") == "1024"
    assert root.findtext("vcpu") == "2"
    assert root.find("os/type").get("machine") == "pc-q35-7.2"  # type: ignore[union-attr]
    sources = [s.get("file") for s in root.findall("devices/disk/source")]
    assert sources == [str(tmp_path / "vda.qcow2"), str(tmp_path / "vdb.qcow2")]
    assert root.find("devices/interface/mac").get("address") == host.macs["net0"]  # type: ignore[union-attr]


def test_unknown_memory_gives_a_script_but_no_guessed_xml(tmp_path: Path) -> None:
    host = write_host_definition(None, restored(tmp_path, "vda"), tmp_path, name="vm1")
    assert host.libvirt_xml_path is None
    assert not list(tmp_path.glob("*.xml"))
    script = host.script_path.read_text()
    assert " -m " not in script and "-smp" not in script
    assert "memory unknown" in script
    assert "-nic none" in script


def test_script_is_valid_shell_with_new_identity(tmp_path: Path) -> None:
    host = write_host_definition(
        DEFINITION, restored(tmp_path, "vda", "vdb"), tmp_path, name="web1"
    )
    script = host.script_path.read_text()
    assert host.script_path == tmp_path / "start-web1.sh"
    assert host.script_path.stat().st_mode & 0o111
    assert subprocess.run(["sh", "-n", str(host.script_path)], check=False).returncode == 0
    assert host.uuid in script and host.macs["net0"] in script
    assert "52:54:00:aa:bb:cc" not in script
    assert "-m 1024" in script and "-smp 2" in script
    assert '"driver=file,filename=$D/"vda.qcow2' in script
    assert "driver=qcow2,file=disk1-file" in script


def test_script_arguments_expand_as_qemu_expects(tmp_path: Path) -> None:
    """Run the script with a fake QEMU that prints its arguments, from a folder with a comma."""
    folder = tmp_path / "new,host"
    folder.mkdir()
    host = write_host_definition(DEFINITION, restored(folder, "vda"), folder, name="web1")
    fake = tmp_path / "fake-qemu"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake.chmod(0o755)
    run = subprocess.run(
        [str(host.script_path), "-S"],
        capture_output=True,
        text=True,
        env={"QEMU": str(fake), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    args = run.stdout.splitlines()
    assert f"driver=file,filename={tmp_path}/new,,host/vda.qcow2,node-name=disk0-file" in args
    assert args[-1] == "-S"
    assert f"user,model=virtio-net-pci,mac={host.macs['net0']}" in args
    run = subprocess.run(
        [str(host.script_path)],
        capture_output=True,
        text=True,
        env={"QEMU": str(fake), "PATH": "/usr/bin:/bin", "NET": "none"},
        check=True,
    )
    assert "none" in run.stdout.splitlines() and "user" not in run.stdout
    assert "-cpu" not in run.stdout.splitlines()
    run = subprocess.run(
        [str(host.script_path)],
        capture_output=True,
        text=True,
        env={"QEMU": str(fake), "PATH": "/usr/bin:/bin", "CPU": "host"},
        check=True,
    )
    args = run.stdout.splitlines()
    assert args[args.index("-cpu") + 1] == "host"
    assert args[args.index("-machine") + 1].endswith(",accel=kvm:tcg")


def test_script_accelerator_is_a_setting(tmp_path: Path) -> None:
    """ACCEL=tcg starts the restored VM under TCG (hosts whose KVM cannot run the guest)."""
    host = write_host_definition(DEFINITION, restored(tmp_path, "vda"), tmp_path, name="web1")
    fake = tmp_path / "fake-qemu"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake.chmod(0o755)
    run = subprocess.run(
        [str(host.script_path)],
        capture_output=True,
        text=True,
        env={"QEMU": str(fake), "PATH": "/usr/bin:/bin", "ACCEL": "tcg"},
        check=True,
    )
    args = run.stdout.splitlines()
    assert args[args.index("-machine") + 1] == f"{DEFINITION['machine']},accel=tcg"
    assert "ACCEL=" in host.script_path.read_text()


def test_source_xml_that_is_not_a_domain_is_refused(tmp_path: Path) -> None:
    for bad in ("<network><name>x</name></network>", "<domain><name>"):
        with pytest.raises(DefinitionError):
            write_host_definition(
                dict(DEFINITION, libvirt_xml=bad), restored(tmp_path, "vda"), tmp_path, name="x"
            )
