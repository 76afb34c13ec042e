"""What QEMU runs: its disks (names, nodes, sizes, formats, dirty bitmaps) and its VM definition.

A disk's NAME is the id of the device it is attached to (`vda`) when that device has an id, else
the block node name. The VM definition is captured best effort: whatever QEMU cannot tell is
null, never guessed (docs/internals.md).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from lbqemu.errors import DiskSelectionError, QmpCommandError
from lbqemu.qmp import QmpSession

PERIPHERAL = "/machine/peripheral/"
SYSTEM_FLASH = "/machine/system.flash"


@dataclass(frozen=True)
class BitmapInfo:
    """One dirty bitmap on a block node, as QEMU reports it."""

    name: str
    recording: bool
    persistent: bool
    busy: bool
    inconsistent: bool
    granularity: int
    count: int

    @classmethod
    def from_qmp(cls, data: dict[str, Any]) -> BitmapInfo:
        return cls(
            name=str(data.get("name", "")),
            recording=bool(data.get("recording", False)),
            persistent=bool(data.get("persistent", False)),
            busy=bool(data.get("busy", False)),
            inconsistent=bool(data.get("inconsistent", False)),
            granularity=int(data.get("granularity", 0)),
            count=int(data.get("count", 0)),
        )


@dataclass(frozen=True)
class DiskInfo:
    """A disk of the VM: its name, the node that holds its bitmaps, size and format."""

    name: str
    node_name: str
    virtual_size: int
    format: str
    cluster_size: int
    filename: str | None
    qdev: str | None
    device_id: str | None
    bitmaps: tuple[BitmapInfo, ...] = ()
    read_only: bool = False

    @property
    def can_persist_bitmaps(self) -> bool:
        """Only a writable qcow2 node stores dirty bitmaps across QEMU restarts."""
        return self.format == "qcow2" and not self.read_only

    @property
    def is_firmware_flash(self) -> bool:
        """A pflash drive of the machine (OVMF's code or its UEFI variables), not a disk."""
        return (self.qdev or "").startswith(SYSTEM_FLASH)

    def bitmap(self, name: str) -> BitmapInfo | None:
        return next((b for b in self.bitmaps if b.name == name), None)


def device_id_of(qdev: str | None) -> str | None:
    """`/machine/peripheral/vda/virtio-backend` -> `vda`; anonymous devices have no id."""
    if not qdev:
        return None
    if qdev.startswith(PERIPHERAL):
        return qdev[len(PERIPHERAL) :].split("/", 1)[0] or None
    if "/" not in qdev:
        return qdev
    return None


def _bitmaps_by_node(nodes: list[dict[str, Any]]) -> dict[str, tuple[BitmapInfo, ...]]:
    result: dict[str, tuple[BitmapInfo, ...]] = {}
    for node in nodes:
        named = [BitmapInfo.from_qmp(b) for b in node.get("dirty-bitmaps", []) if b.get("name")]
        result[str(node.get("node-name"))] = tuple(named)
    return result


async def list_disks(session: QmpSession) -> list[DiskInfo]:
    """Every disk with a medium inserted, in QEMU's order."""
    blocks = await session.execute("query-block")
    nodes = await session.execute("query-named-block-nodes", {"flat": True})
    bitmaps = _bitmaps_by_node(nodes)
    disks = []
    for block in blocks:
        inserted = block.get("inserted")
        if not inserted:
            continue
        image = inserted.get("image", {})
        node = str(inserted.get("node-name"))
        qdev = block.get("qdev")
        dev_id = device_id_of(qdev) or (block.get("device") or None)
        disks.append(
            DiskInfo(
                name=dev_id or node,
                node_name=node,
                virtual_size=int(image.get("virtual-size", 0)),
                format=str(inserted.get("drv", image.get("format", "raw"))),
                cluster_size=int(image.get("cluster-size") or 65536),
                filename=inserted.get("file"),
                qdev=qdev,
                device_id=dev_id,
                bitmaps=bitmaps.get(node, ()),
                read_only=bool(inserted.get("ro", False)),
            )
        )
    return disks


def choose_disks(disks: list[DiskInfo], names: list[str] | tuple[str, ...]) -> list[DiskInfo]:
    """The disks named by `--disk`; an unknown name is DiskSelectionError. Without names: every
    writable disk (a read-only medium such as a CD-ROM never changes; name it to include it),
    but not the firmware's flash (UEFI variables: the restored VM starts from OVMF's template)."""
    if not names:
        return [d for d in disks if not d.read_only and not d.is_firmware_flash]
    by_name = {d.name: d for d in disks}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise DiskSelectionError(unknown, sorted(by_name))
    seen: dict[str, DiskInfo] = {}
    for name in names:
        seen.setdefault(name, by_name[name])
    return list(seen.values())


async def _try(session: QmpSession, command: str, args: dict[str, Any] | None = None) -> Any:
    """A query whose failure only means 'unknown'."""
    try:
        return await session.execute(command, args)
    except QmpCommandError:
        return None


async def _device_type(session: QmpSession, device_id: str | None) -> str | None:
    if not device_id:
        return None
    value = await _try(session, "qom-get", {"path": PERIPHERAL + device_id, "property": "type"})
    return str(value) if value else None


async def _nics(session: QmpSession) -> list[dict[str, Any]]:
    """Peripheral devices with a MAC address property (network cards)."""
    entries = await _try(session, "qom-list", {"path": PERIPHERAL.rstrip("/")}) or []
    children = [e for e in entries if str(e.get("type", "")).startswith("child<")]
    macs = await asyncio.gather(
        *(
            _try(session, "qom-get", {"path": PERIPHERAL + e["name"], "property": "mac"})
            for e in children
        )
    )
    nics = [
        {"id": e["name"], "model": str(e["type"])[len("child<") : -1], "mac": str(mac)}
        for e, mac in zip(children, macs, strict=True)
        if mac is not None
    ]
    return sorted(nics, key=lambda n: n["id"])


async def _machine(session: QmpSession) -> str | None:
    value = await _try(session, "qom-get", {"path": "/machine", "property": "type"})
    if not value:
        return None
    text = str(value)
    return text[: -len("-machine")] if text.endswith("-machine") else text


async def _firmware(session: QmpSession) -> str | None:
    """ "uefi" when the machine has a pflash firmware drive (OVMF); None when it has none."""
    value = await _try(session, "qom-get", {"path": "/machine", "property": "pflash0"})
    return "uefi" if value else None


async def vm_definition(session: QmpSession, disks: list[DiskInfo]) -> dict[str, Any]:
    """The VM definition JSON of docs/internals.md, best effort (nulls where QEMU cannot say).

    The queries are independent: they are sent together (QMP matches replies by id)."""
    (
        name,
        uuid_reply,
        memory,
        cpus,
        machine,
        nics,
        target,
        firmware,
        *devices,
    ) = await asyncio.gather(
        _try(session, "query-name"),
        _try(session, "query-uuid"),
        _try(session, "query-memory-size-summary"),
        _try(session, "query-cpus-fast"),
        _machine(session),
        _nics(session),
        _try(session, "query-target"),
        _firmware(session),
        *(_device_type(session, disk.device_id) for disk in disks),
    )
    uuid = (uuid_reply or {}).get("UUID")
    if uuid and set(uuid.replace("-", "")) == {"0"}:
        uuid = None
    base = (memory or {}).get("base-memory")
    return {
        "name": (name or {}).get("name"),
        "uuid": uuid,
        "machine": machine,
        "memory_mib": base // (1 << 20) if isinstance(base, int) else None,
        "cpus": len(cpus) if isinstance(cpus, list) and cpus else None,
        "disks": [
            {
                "name": disk.name,
                "node_name": disk.node_name,
                "virtual_size": disk.virtual_size,
                "format": disk.format,
                "device": device,
            }
            for disk, device in zip(disks, devices, strict=True)
        ],
        "nics": nics,
        "libvirt_xml": None,
        "arch": (target or {}).get("arch"),
        "firmware": firmware,
    }
