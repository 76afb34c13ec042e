"""The backup of a libvirt domain that is not running: its images read directly.

No QEMU runs, so nothing can be asked of libvirt's backup API; the images do not change while
qemu-nbd holds them (read-only, with QEMU's image lock), so each image is its own point in time.
The store's bitmap (`lbr-<store id>-<point id>`, kept in the image while the domain was down)
still says what changed since the checkpoint kept with the newest point: qemu-nbd exports it
and the pull reads only those clusters. No new bitmap is made: the kept one goes on recording
from an older point, which covers every change since this one (the next backup reads a
superset, never less), and the kept checkpoint XML passes on to this point.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from lbqemu import libvirt as lv
from lbqemu.bitmaps import store_prefix
from lbqemu.imageexport import exported_image
from lbqemu.nbd import NbdSource
from lbrestore.backup import BackupHooks, BackupSummary, DiskSummary, PullSpec, pull_disk
from lbrestore.errors import AppError
from lbrestore.libvirt_backup import (
    CHECKPOINT_KEY,
    DEFAULT_WORK_PARENT,
    Checkpoints,
    LibvirtBackupOptions,
    choose_disks,
    domain_definition,
    newest_by_disk,
    plan_disks,
    previous_checkpoint,
)
from lbstore.model import RestorePoint
from lbstore.store import Store


def _checkpoints(disks: list[lv.DomainDisk], prefix: str, kept: str | None) -> Checkpoints:
    """The kept checkpoint, trusted for the disks whose image holds its bitmap, consistent."""
    state = Checkpoints(prefix)
    if kept is None:
        state.distrust = "no checkpoint of this store on the domain"
        return state
    name = lv.checkpoint_name(kept)
    covered = set(lv.checkpoint_disks(kept))
    state.old = name
    state.old_disks = tuple(
        d.target
        for d in disks
        if d.target in covered
        and d.source is not None
        and d.can_checkpoint
        and lv.image_bitmaps(d.source).get(name, False)
    )
    return state


async def backup_inactive(
    store: Store,
    domain: lv.Domain,
    options: LibvirtBackupOptions,
    hooks: BackupHooks,
    summary: BackupSummary,
) -> RestorePoint:
    """Back up an inactive domain's local images into one restore point."""
    if lv.is_remote(options.uri):
        raise AppError(f"domain {options.vm} is not running: its images can be read here only")
    disks = choose_disks(lv.parse_disks(domain.xml(inactive=True)), options.disks)
    if not disks:
        raise AppError(f"domain {options.vm} has no writable disk to back up")
    for disk in disks:
        if disk.source is None or disk.kind not in ("file", "block"):
            raise AppError(f"domain {options.vm}: disk {disk.target} is not a local image")
    sizes = {d.target: domain.capacity(d.target) for d in disks}
    folder = Path(
        tempfile.mkdtemp(prefix="lbrestore-", dir=options.scratch_dir or DEFAULT_WORK_PARENT)
    )
    try:
        with store.begin(options.vm) as ingest:
            points = store.restore_points(options.vm)
            kept = previous_checkpoint(points)
            state = _checkpoints(disks, store_prefix(store.identity()["id"]), kept)
            plans = plan_disks(disks, sizes, newest_by_disk(points), state, options.full)
            definition = domain_definition(domain, plans)
            if kept is not None:
                definition[CHECKPOINT_KEY] = kept
            for plan in plans:
                dingest = ingest.add_disk(plan.disk.target, plan.size, mode=plan.mode)
                if dingest.mode != plan.mode:
                    plan.mode, plan.reason, plan.since = dingest.mode, dingest.reason, None
                result = DiskSummary(plan.disk.target, plan.mode, plan.reason, plan.size)
                summary.disks.append(result)
                socket = folder / f"{plan.disk.target}.sock"
                assert plan.disk.source is not None
                with exported_image(
                    plan.disk.source, plan.disk.format, socket, plan.disk.target, plan.since
                ):
                    spec = PullSpec(
                        NbdSource.unix(str(socket), plan.disk.target),
                        plan.since,
                        options.chunk,
                        options.depth,
                    )
                    await pull_disk(spec, dingest, result, hooks)
            ingest.definition = definition
            point: RestorePoint = ingest.commit()
            return point
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(folder)
