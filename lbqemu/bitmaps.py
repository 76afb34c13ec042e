"""The checkpoint bitmap lifecycle, which keeps ARCHITECTURE.md's bitmap invariant.

For each backed-up disk QEMU holds a persistent dirty bitmap named `lbr-<store id>-<token>`; the
store id keeps two stores' bitmaps apart (a store only ever touches bitmaps with its own prefix).
A backup:

1. plans each disk (`plan_disk`): trust the store's bitmap, or fall back to a resync / full;
2. `prepare`: removes this store's untrusted bitmaps and folds leftovers of an interrupted
   backup (an old disabled bitmap plus a newer one) into one, so it covers every write;
3. in the one QMP transaction that also starts the point-in-time views, adds the new bitmap
   (persistent, enabled) and disables the old one (`transaction_actions`): an enabled bitmap
   cannot be exported read-only, and a frozen one describes exactly the changes up to the view;
4. after the store committed: `finalize` deletes the old bitmap; on any failure before the
   commit: `rollback` merges the new bitmap into the old, re-enables it and deletes the new one.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from lbqemu.discovery import BitmapInfo, DiskInfo
from lbqemu.errors import QemuError, QmpCommandError
from lbqemu.qmp import QmpSession

Mode = Literal["full", "incremental", "resync"]
BITMAP_PREFIX = "lbr-"


def store_prefix(store_id: str) -> str:
    """The name prefix of every bitmap that belongs to the store `store_id`."""
    return f"{BITMAP_PREFIX}{store_id}-"


def bitmap_name(store_id: str, token: str) -> str:
    """The name of a checkpoint bitmap: `lbr-<store id>-<token>`."""
    return f"{store_prefix(store_id)}{token}"


@dataclass(frozen=True)
class DiskPlan:
    """What a backup does with one disk and its bitmaps.

    `mode` is what the store is asked for; `reason` says why it is not an incremental.
    `old_bitmap` is this store's trusted bitmap (frozen in the transaction, exported for an
    incremental, merged back on failure, deleted after commit); `fold` are further bitmaps of
    this store merged into it first; `drop` are this store's untrusted bitmaps, deleted first.
    """

    disk: DiskInfo
    mode: Mode
    new_bitmap: str
    old_bitmap: str | None = None
    reason: str | None = None
    fold: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()

    @property
    def export_bitmap(self) -> str | None:
        """The bitmap whose `qemu:dirty-bitmap:` context the pull reads (incrementals only)."""
        return self.old_bitmap if self.mode == "incremental" else None


def _token(bitmap: BitmapInfo) -> int | None:
    tail = bitmap.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _distrust(
    disk: DiskInfo, ours: list[BitmapInfo], last_size: int | None, last_point: int | None
) -> str | None:
    """Why this store's bitmaps cannot be trusted for `disk`, or None when they can.

    Bitmaps are named after the restore point whose backup created them, and each new one is
    created in the instant the previous one is frozen: together they cover every write since
    the oldest of them. That is enough when the oldest is not newer than the newest point."""
    if any(b.inconsistent for b in ours):
        return "bitmap inconsistent (QEMU did not shut down cleanly)"
    if not ours:
        others = [b.name for b in disk.bitmaps if b.name.startswith(BITMAP_PREFIX)]
        if others:
            return "no bitmap of this store (only another store's)"
        return "bitmap missing"
    if last_size is not None and last_size != disk.virtual_size:
        return f"disk resized ({last_size} -> {disk.virtual_size} bytes)"
    if not any(b.recording for b in ours):
        return "bitmap disabled (changes may have been missed)"
    tokens = [_token(b) for b in ours]
    if None in tokens:
        return "bitmap name not made by lbrestore"
    if last_point is not None and min(t for t in tokens if t is not None) > last_point:
        return "bitmap newer than the newest restore point"
    return None


def plan_disk(
    disk: DiskInfo,
    *,
    store_id: str,
    token: str,
    last_size: int | None,
    last_point: int | None = None,
    force_full: bool = False,
) -> DiskPlan:
    """Decide the mode for one disk. `last_size` and `last_point` are its size in, and the id
    of, the newest restore point that holds it (None when none does: a new disk gets a full).
    `token` is the id of the restore point being made: it names the new bitmap."""
    prefix = store_prefix(store_id)
    new = bitmap_name(store_id, token)
    ours = sorted((b for b in disk.bitmaps if b.name.startswith(prefix)), key=lambda b: b.name)
    if last_size is None:
        names = tuple(b.name for b in ours)
        return DiskPlan(disk, "full", new, reason="disk new to the store", drop=names)
    distrust = _distrust(disk, ours, last_size, last_point)
    if distrust is not None:
        return DiskPlan(disk, "resync", new, reason=distrust, drop=tuple(b.name for b in ours))
    # Keep the oldest: its name says since which point the union of them all covers writes.
    keep = min(ours, key=lambda b: _token(b) or 0)
    fold = tuple(b.name for b in ours if b.name != keep.name)
    mode: Mode = "full" if force_full else "incremental"
    reason = "full backup requested" if force_full else None
    return DiskPlan(disk, mode, new, old_bitmap=keep.name, reason=reason, fold=fold)


def with_mode(plan: DiskPlan, mode: str, reason: str | None) -> DiskPlan:
    """`plan` with the mode the store chose instead (it could not build on its previous file).

    Only a step towards reading more is allowed: an incremental reads just the dirty
    clusters, so neither a full nor a resync can become one."""
    if mode not in ("full", "resync") or (mode == "resync" and plan.mode == "full"):
        raise ValueError(f"a {plan.mode} backup cannot become a {mode}")
    return dataclasses.replace(plan, mode=cast(Mode, mode), reason=reason)


def _node(plan: DiskPlan, **args: Any) -> dict[str, Any]:
    return {"node": plan.disk.node_name, **args}


async def prepare(session: QmpSession, plans: Iterable[DiskPlan]) -> None:
    """Delete untrusted bitmaps and fold leftovers into the kept one, before the transaction."""
    actions: list[dict[str, Any]] = []
    for plan in plans:
        for name in plan.drop:
            actions.append({"type": "block-dirty-bitmap-remove", "data": _node(plan, name=name)})
        if plan.old_bitmap and plan.fold:
            target = plan.old_bitmap
            actions.append(
                {
                    "type": "block-dirty-bitmap-merge",
                    "data": _node(plan, target=target, bitmaps=list(plan.fold)),
                }
            )
            actions.append({"type": "block-dirty-bitmap-enable", "data": _node(plan, name=target)})
            for name in plan.fold:
                actions.append(
                    {"type": "block-dirty-bitmap-remove", "data": _node(plan, name=name)}
                )
    await session.transaction(actions)


def transaction_actions(plans: Iterable[DiskPlan]) -> list[dict[str, Any]]:
    """The bitmap part of the backup's transaction: add each new bitmap, freeze each old one.

    Bitmaps are persistent where the format can store them (qcow2); on other disks they live
    as long as the QEMU process, and a restart means a resync."""
    actions: list[dict[str, Any]] = []
    for plan in plans:
        actions.append(
            {
                "type": "block-dirty-bitmap-add",
                "data": _node(plan, name=plan.new_bitmap, persistent=plan.disk.can_persist_bitmaps),
            }
        )
        if plan.old_bitmap:
            actions.append(
                {"type": "block-dirty-bitmap-disable", "data": _node(plan, name=plan.old_bitmap)}
            )
    return actions


def rollback_actions(plan: DiskPlan) -> list[dict[str, Any]]:
    """Undo one disk's transaction part without losing a write: merge new into old, re-enable."""
    actions: list[dict[str, Any]] = []
    if plan.old_bitmap:
        actions.append(
            {
                "type": "block-dirty-bitmap-merge",
                "data": _node(plan, target=plan.old_bitmap, bitmaps=[plan.new_bitmap]),
            }
        )
        actions.append(
            {"type": "block-dirty-bitmap-enable", "data": _node(plan, name=plan.old_bitmap)}
        )
    actions.append({"type": "block-dirty-bitmap-remove", "data": _node(plan, name=plan.new_bitmap)})
    return actions


@dataclass
class BitmapOutcome:
    """Problems met while finalizing or rolling back (the job reports them, never hides them)."""

    problems: list[str] = field(default_factory=list)


async def rollback(session: QmpSession, plans: list[DiskPlan]) -> BitmapOutcome:
    """After a failure before commit: every disk's new bitmap folded back into its old one.

    All disks in one transaction; if that fails (e.g. QEMU lost one bitmap), disk by disk."""
    outcome = BitmapOutcome()
    try:
        await session.transaction([a for p in plans for a in rollback_actions(p)])
        return outcome
    except QemuError:
        pass
    for plan in plans:
        try:
            await session.transaction(rollback_actions(plan))
        except QemuError as exc:
            outcome.problems.append(f"{plan.disk.name}: bitmap rollback failed: {exc}")
    return outcome


async def finalize(session: QmpSession, plans: list[DiskPlan]) -> BitmapOutcome:
    """After the store committed: delete each old bitmap (the new one now stands for the point).

    All disks in one transaction (one round trip); if that fails (e.g. one bitmap is gone
    already), disk by disk, so every other old bitmap is still deleted."""
    outcome = BitmapOutcome()
    actions = {
        plan.disk.name: {
            "type": "block-dirty-bitmap-remove",
            "data": _node(plan, name=plan.old_bitmap),
        }
        for plan in plans
        if plan.old_bitmap
    }
    if not actions:
        return outcome
    try:
        await session.transaction(list(actions.values()))
        return outcome
    except QmpCommandError:
        pass
    for disk, action in actions.items():
        try:
            await session.transaction([action])
        except QmpCommandError as exc:
            outcome.problems.append(f"{disk}: old bitmap not deleted: {exc}")
    return outcome


async def remove_bitmaps(session: QmpSession, node: str, names: Iterable[str]) -> None:
    """Delete bitmaps by name, ignoring ones already gone."""
    for name in names:
        with contextlib.suppress(QmpCommandError):
            await session.execute("block-dirty-bitmap-remove", {"node": node, "name": name})
