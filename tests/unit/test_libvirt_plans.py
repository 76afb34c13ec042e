"""libvirt XML plumbing (lbqemu.libvirt) and the libvirt job's disk plans, without a libvirtd."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from lbqemu import libvirt as lv
from lbrestore.libvirt_backup import Checkpoints, choose_disks, plan_disks

DOMAIN = """<domain type='kvm' id='3'>
  <name>web1</name><uuid>0b0e7a1c-94a5-4b7e-a2b4-0d4b5c0f7d11</uuid>
  <memory unit='KiB'>1048576</memory><vcpu placement='static'>2</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/img/web1.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='block' device='disk'><driver name='qemu' type='raw'/>
      <source dev='/dev/vg/data'/><target dev='sda' bus='scsi'/></disk>
    <disk type='file' device='cdrom'><target dev='sdb' bus='sata'/><readonly/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
      <source file='/img/ro.qcow2'/><target dev='vdc' bus='virtio'/><readonly/></disk>
    <interface type='network'><mac address='52:54:00:aa:bb:cc'/><model type='virtio'/></interface>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+107</label></seclabel>
</domain>"""


def test_parse_disks_and_owner() -> None:
    disks = lv.parse_disks(DOMAIN)
    assert [(d.target, d.source, d.format, d.kind, d.read_only) for d in disks] == [
        ("vda", "/img/web1.qcow2", "qcow2", "file", False),
        ("sda", "/dev/vg/data", "raw", "block", False),
        ("vdc", "/img/ro.qcow2", "qcow2", "file", True),
    ]
    assert [d.can_checkpoint for d in disks] == [True, False, False]
    assert lv.dac_owner(DOMAIN) == (64055, 107)
    assert [d.target for d in choose_disks(disks, ())] == ["vda", "sda"]
    with pytest.raises(Exception, match="no such disk: vdc"):
        choose_disks(disks, ("vdc",))


def test_domain_facts() -> None:
    facts = lv.domain_facts(DOMAIN)
    assert facts["name"] == "web1" and facts["machine"] == "pc-q35-7.2"
    assert facts["memory_mib"] == 1024 and facts["cpus"] == 2 and facts["arch"] == "x86_64"
    assert facts["disk_devices"]["vda"] == "virtio-blk-pci"
    assert facts["nics"] == [{"id": "net0", "model": "virtio-net-pci", "mac": "52:54:00:aa:bb:cc"}]


def test_backup_and_checkpoint_xml() -> None:
    backup = lv.pull_backup_xml(
        [lv.BackupDisk("vda", "/s/vda.scratch", "lbr-S-4"), lv.BackupDisk("sda", "/s/sda")],
        ["vdc"],
        socket="/s/nbd.sock",
    )
    root = ET.fromstring(backup)
    assert root.get("mode") == "pull" and root.find("server").get("socket") == "/s/nbd.sock"
    vda, sda, vdc = root.iterfind("disks/disk")
    assert (vda.get("backupmode"), vda.get("incremental")) == ("incremental", "lbr-S-4")
    assert sda.get("backupmode") == "full" and vdc.get("backup") == "no"
    tcp = ET.fromstring(lv.pull_backup_xml([], [], tcp=("host", 10809), tls=True)).find("server")
    assert tcp.attrib == {"transport": "tcp", "name": "host", "port": "10809", "tls": "yes"}
    checkpoint = lv.checkpoint_xml("lbr-S-5", ["vda"], ["sda"])
    assert lv.checkpoint_name(checkpoint) == "lbr-S-5"
    assert lv.checkpoint_disks(checkpoint) == ["vda"]
    running = (
        "<domainbackup mode='pull'><server transport='unix' socket='/s/nbd.sock'/><disks>"
        "<disk name='vda' backup='yes' exportname='vda' exportbitmap='backup-vda'/>"
        "<disk name='vdc' backup='no'/></disks></domainbackup>"
    )
    assert lv.exports(running) == {"vda": ("vda", "backup-vda")}
    assert lv.backup_socket(running) == "/s/nbd.sock"


@pytest.mark.parametrize(
    ("uri", "remote"),
    [
        ("qemu:///system", False),
        ("qemu+ssh://root@kvm2/system", True),
        ("qemu+tls://kvm2.example:16514/system", True),
        ("qemu+ssh://localhost/system", False),
    ],
)
def test_is_remote(uri: str, remote: bool) -> None:
    assert lv.is_remote(uri) is remote


def test_plans() -> None:
    vda, sda = lv.parse_disks(DOMAIN)[:2]
    sizes = {"vda": 10 << 30, "sda": 5 << 30}
    trusted = Checkpoints("lbr-S-", old="lbr-S-4", old_disks=("vda",))
    newest = {"vda": (4, 10 << 30), "sda": (4, 5 << 30)}
    plans = plan_disks([vda, sda], sizes, newest, trusted, force_full=False)
    assert [(p.mode, p.since) for p in plans] == [("incremental", "lbr-S-4"), ("resync", None)]
    assert "raw" in (plans[1].reason or "")
    lost = Checkpoints("lbr-S-", distrust="checkpoint lbr-S-4 unusable: missing bitmap")
    (plan,) = plan_disks([vda], sizes, newest, lost, force_full=False)
    assert plan.mode == "resync" and "unusable" in (plan.reason or "")
    (plan,) = plan_disks([vda], sizes, {}, trusted, force_full=False)
    assert plan.mode == "full" and plan.reason == "disk new to the store"
    (plan,) = plan_disks([vda], {"vda": 11 << 30}, newest, trusted, force_full=False)
    assert plan.mode == "resync" and "resized" in (plan.reason or "")
    (plan,) = plan_disks([vda], sizes, newest, trusted, force_full=True)
    assert plan.mode == "full"
