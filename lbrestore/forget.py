"""`lbrestore forget`: remove this store's dirty bitmaps (and libvirt checkpoints) from a VM.

A store that is retired would otherwise leave its bitmap in every disk image for good, recording
every write. Only names with this store's prefix (`lbr-<store id>-`) are touched; other stores'
and other tools' bitmaps stay. The store keeps its restore points; the VM's next backup into it
is a resync.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lbqemu import bitmaps
from lbqemu import libvirt as lv
from lbqemu.discovery import list_disks
from lbqemu.errors import LibvirtError
from lbqemu.qmp import QmpSession
from lbrestore.libvirt_backup import CHECKPOINT_KEY
from lbstore.store import Store


@dataclass
class ForgetReport:
    """What was removed (`disk: name`), and what could not be."""

    vm: str
    removed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _prefix(store: Store) -> str:
    return bitmaps.store_prefix(store.identity()["id"])


def _record(store: Store, report: ForgetReport) -> ForgetReport:
    store.record_event(
        report.vm, "forgotten", "this store's bitmaps removed from the VM", removed=report.removed
    )
    return report


async def forget_qmp(store: Store, vm: str, qmp: str, connect_timeout: float) -> ForgetReport:
    """Remove this store's bitmaps from every disk of the QEMU behind `qmp`."""
    prefix, report = _prefix(store), ForgetReport(vm)
    async with QmpSession(qmp, connect_timeout=connect_timeout) as session:
        for disk in await list_disks(session):
            names = [b.name for b in disk.bitmaps if b.name.startswith(prefix)]
            await bitmaps.remove_bitmaps(session, disk.node_name, names)
            report.removed += [f"{disk.name}: {name}" for name in names]
    return _record(store, report)


def forget_libvirt(store: Store, vm: str, uri: str) -> ForgetReport:
    """Remove this store's checkpoints and bitmaps from the libvirt domain `vm`.

    A running domain's bitmaps are deleted through libvirt (the names this store's points
    recorded); an inactive domain's images are edited directly (`qemu-img bitmap --remove`),
    which finds every bitmap of the store."""
    prefix, report = _prefix(store), ForgetReport(vm)
    known = {
        lv.checkpoint_name(str(p.definition[CHECKPOINT_KEY]))
        for p in store.restore_points(vm)
        if p.definition and p.definition.get(CHECKPOINT_KEY)
    }
    with lv.connection(uri) as conn:
        domain = lv.Domain.lookup(conn, vm)
        active = domain.is_active()
        defined = [n for n in domain.checkpoint_names() if n.startswith(prefix)]
        for name in defined:
            domain.delete_checkpoint(name, metadata_only=not active)
            report.removed.append(f"checkpoint {name}")
        disks = [d for d in lv.parse_disks(domain.xml(inactive=not active)) if d.can_checkpoint]
        if active:
            for name in sorted(known - set(defined)):
                for disk in disks:
                    if domain.delete_bitmap(name, disk.target):
                        report.removed.append(f"{disk.target}: {name}")
        else:
            for disk in disks:
                _forget_image(disk, prefix, report)
    return _record(store, report)


def _forget_image(disk: lv.DomainDisk, prefix: str, report: ForgetReport) -> None:
    if disk.source is None or disk.kind not in ("file", "block"):
        report.problems.append(f"{disk.target}: not a local image, its bitmaps were left")
        return
    try:
        for name in lv.image_bitmaps(disk.source):
            if name.startswith(prefix):
                lv.remove_image_bitmap(disk.source, name)
                report.removed.append(f"{disk.target}: {name}")
    except LibvirtError as exc:
        report.problems.append(f"{disk.target}: {exc}")
