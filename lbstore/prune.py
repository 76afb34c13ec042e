"""Prune: apply a retention plan to a VM of an opened store, as a series of merges.

The plan comes from lbstore.retention (pure). Removing is done one point at a time by
lbstore.merge, each merge committing on its own, so an interruption leaves a consistent store
with some of the planned points removed; running the same prune again finishes the work.

Order: newest first. Every removed point then has a successor that the plan keeps, so the
clusters of a run of removed points travel at most once, into (or, when merge finds that
cheaper, together with) the kept point above the run; oldest first would copy the same clusters
again at every step and would make every point above a removed full a new full in turn.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo

from lbstore.merge import merge_point
from lbstore.model import RestorePoint
from lbstore.retention import Decision, PointTime, Policy, plan
from lbstore.store import Store


@dataclass
class PruneResult:
    """What a prune of one VM decided and did so far."""

    vm: str
    decisions: list[Decision]
    removed: list[int] = field(default_factory=list)
    freed_bytes: int = 0
    copied_bytes: int = 0
    """Bytes the merges copied between files (data clusters)."""

    @property
    def kept(self) -> int:
        """Points the plan keeps."""
        return sum(1 for d in self.decisions if d.keep)

    @property
    def planned(self) -> list[int]:
        """Ids of the points the plan removes, in removal order (newest first)."""
        return removal_order(self.decisions)


def plan_vm(store: Store, vm: str, policy: Policy, now: datetime, tz: tzinfo | None) -> PruneResult:
    """The plan for every committed point of `vm` (newest first), nothing removed yet."""
    points = [PointTime(p.id, p.created) for p in store.restore_points(vm)]
    return PruneResult(vm, plan(points, policy, now, tz))


def removal_order(decisions: Sequence[Decision]) -> list[int]:
    """Ids of the points to remove, newest first (the cheapest order for a chain, see above)."""
    doomed = [d for d in decisions if not d.keep]
    doomed.sort(key=lambda d: (d.created, d.point_id), reverse=True)
    return [d.point_id for d in doomed]


def allocated_bytes(store: Store, vm: str) -> int:
    """Bytes the VM's files occupy on disk (allocated blocks, as `du` counts them)."""
    total = 0
    for path in (store.data_dir / vm).glob("*/*.qcow2"):
        try:
            total += os.stat(path).st_blocks * 512
        except FileNotFoundError:
            continue
    return total


Progress = Callable[[int, int, RestorePoint], None]


def execute(store: Store, result: PruneResult, progress: Progress | None = None) -> PruneResult:
    """Remove the planned points one merge at a time; `result` records each removal as it ends.

    `progress(done, total, point)` is called before each merge. An error stops the prune and
    propagates; the points merged before it stay removed (each merge committed on its own).
    """
    order = result.planned
    for done, point_id in enumerate(order):
        point = store.point(point_id)
        if progress is not None:
            progress(done, len(order), point)
        before = allocated_bytes(store, result.vm)
        merged = merge_point(store, point)
        result.removed.append(point_id)
        result.copied_bytes += merged.bytes_copied
        result.freed_bytes += before - allocated_bytes(store, result.vm)
    return result
