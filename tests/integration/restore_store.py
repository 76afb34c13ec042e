"""Stores with known contents for the restore and verify tests.

Restore points are written through the Store API (the ingest that backups use), and for every
point the expected guest bytes are kept as a raw file, the oracle that `qemu-img compare` checks
restored disks against.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lbstore.qcow2.reader import Qcow2Image
from lbstore.store import Store

CLUSTER = 65536

LIBVIRT_XML = """<domain type='kvm' id='3'>
  <name>vm1</name>
  <uuid>0d6b8c4e-6c0e-4b54-9d43-3f1b2a9c7e11</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/vm1-root.qcow2' index='1'/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/vm1-data.qcow2' index='2'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:11:22:33'/>
      <source network='default'/>
      <target dev='vnet0'/>
      <model type='virtio'/>
    </interface>
  </devices>
  <seclabel type='dynamic' model='apparmor' relabel='yes'><label>libvirt-x</label></seclabel>
</domain>
"""


def definition(libvirt_xml: str | None = LIBVIRT_XML) -> dict[str, Any]:
    """A captured VM definition as docs/internals.md describes it."""
    return {
        "name": "vm1",
        "uuid": "0d6b8c4e-6c0e-4b54-9d43-3f1b2a9c7e11",
        "machine": "pc-q35-7.2",
        "memory_mib": 256,
        "cpus": 1,
        "disks": [
            {
                "name": "vda",
                "node_name": "drive0",
                "virtual_size": 16 << 20,
                "format": "qcow2",
                "device": "virtio-blk-pci",
            },
            {
                "name": "vdb",
                "node_name": "drive1",
                "virtual_size": (4 << 20) + 4096,
                "format": "qcow2",
                "device": "virtio-blk-pci",
            },
        ],
        "nics": [{"id": "net0", "model": "virtio-net-pci", "mac": "52:54:00:11:22:33"}],
        "libvirt_xml": libvirt_xml,
    }


@dataclass
class Disk:
    """A disk's current guest bytes (kept in memory; the tests' disks are small)."""

    name: str
    size: int
    content: bytearray = field(init=False)

    def __post_init__(self) -> None:
        self.content = bytearray(self.size)


@dataclass
class KnownStore:
    """A store and, per restore point and disk, a raw file with the expected guest bytes."""

    path: Path
    expected: dict[tuple[int, str], Path]
    nonzero_clusters: dict[tuple[int, str], int]
    point_ids: list[int]


def build_store(
    root: Path,
    *,
    vm: str = "vm1",
    points: int = 4,
    full_at: tuple[int, ...] = (),
    seed: int = 1,
    with_definition: bool = True,
    store: Path | None = None,
) -> KnownStore:
    """A store with `points` restore points of two disks (vda 16 MiB, vdb 4 MiB + 4 KiB).

    Each point writes random data clusters, overwrites some clusters with zeros (zero clusters
    in an overlay) and leaves most of the disk unallocated. Points whose index is in `full_at`
    store vda as a full file (a new chain).
    """
    rng = random.Random(seed)
    store_path = store or root / "store"
    if not (store_path / "index.sqlite").exists():
        Store.init(store_path)
    disks = [Disk("vda", 16 << 20), Disk("vdb", (4 << 20) + 4096)]
    expected: dict[tuple[int, str], Path] = {}
    nonzero: dict[tuple[int, str], int] = {}
    ids: list[int] = []
    with Store.open(store_path, write=True) as opened:
        for index in range(points):
            defn = definition() if with_definition else None
            with opened.begin(vm, definition=defn) as ingest:
                for disk in disks:
                    full = disk.name == "vda" and index in full_at
                    mode = "full" if full or index == 0 else "incremental"
                    writer = ingest.add_disk(disk.name, disk.size, cluster_size=CLUSTER, mode=mode)
                    _change(rng, disk, writer, full=full or index == 0)
                point = ingest.commit()
            ids.append(point.id)
            for disk in disks:
                out = root / f"expected-{vm}-{point.id}-{disk.name}.raw"
                out.write_bytes(disk.content)
                expected[(point.id, disk.name)] = out
                nonzero[(point.id, disk.name)] = _count_nonzero(disk.content)
    return KnownStore(store_path, expected, nonzero, ids)


def _change(rng: random.Random, disk: Disk, writer: Any, *, full: bool) -> None:
    """Write some random clusters (and, in overlays, zero some); a full gets every cluster."""
    clusters = -(-disk.size // CLUSTER)
    picked = sorted(rng.sample(range(clusters), max(2, clusters // 8)))
    for cluster in picked:
        start = cluster * CLUSTER
        length = min(CLUSTER, disk.size - start)
        data = rng.randbytes(length)
        disk.content[start : start + length] = data
    if not full:
        for cluster in rng.sample(range(clusters), 2):
            if cluster in picked:
                continue
            start = cluster * CLUSTER
            length = min(CLUSTER, disk.size - start)
            disk.content[start : start + length] = bytes(length)
            writer.zero(start, length)
        for cluster in picked:
            start = cluster * CLUSTER
            writer.write(start, memoryview(disk.content)[start : min(start + CLUSTER, disk.size)])
        return
    for start in range(0, disk.size, 4 << 20):
        end = min(start + (4 << 20), disk.size)
        writer.write(start, memoryview(disk.content)[start:end])


def _count_nonzero(content: bytearray) -> int:
    zero = bytes(CLUSTER)
    count = 0
    for start in range(0, len(content), CLUSTER):
        piece = bytes(content[start : start + CLUSTER])
        if piece != zero[: len(piece)]:
            count += 1
    return count


def lbrestore(
    store: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "lbrestore", "--store", str(store), *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )


def qemu_img_json(*args: str | os.PathLike[str]) -> Any:
    """`qemu-img ... --output=json` parsed."""
    result = subprocess.run(
        ["qemu-img", *map(str, args), "--output=json"], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)


def compare(a: Path, b: Path, fmt_a: str = "qcow2") -> subprocess.CompletedProcess[str]:
    """`qemu-img compare` of an image against an expected raw (the caller checks the sizes)."""
    return subprocess.run(
        ["qemu-img", "compare", "-f", fmt_a, "-F", "raw", str(a), str(b)],
        capture_output=True,
        text=True,
        check=False,
    )


def l2_entry_offset(path: Path, guest_offset: int) -> int:
    """File offset of the L2 entry mapping `guest_offset` (qcow2.txt: L1 -> L2 -> cluster)."""
    with Qcow2Image.open(path, backing=False) as image:
        cluster_bits, l1_offset = image.cluster_bits, image.header.l1_table_offset
    l2_bits = cluster_bits - 3
    l1_index, l2_index = (
        guest_offset >> (cluster_bits + l2_bits),
        (guest_offset >> cluster_bits) & ((1 << l2_bits) - 1),
    )
    with path.open("rb") as f:
        f.seek(l1_offset + 8 * l1_index)
        (l1_entry,) = struct.unpack(">Q", f.read(8))
    return (l1_entry & 0x00FF_FFFF_FFFF_FE00) + 8 * l2_index
