"""The store's value objects: restore points and the disks they hold. Immutable, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

PointKind = Literal["full", "incremental", "resync", "merged"]
DiskMode = Literal["full", "incremental", "compare", "resync"]
POINT_KINDS: tuple[str, ...] = ("full", "incremental", "resync", "merged")
DISK_MODES: tuple[str, ...] = ("full", "incremental", "compare", "resync")
COMPARING_MODES: tuple[str, ...] = ("compare", "resync")
"""Modes whose caller sends every cluster; only clusters whose digest changed are stored.
compare is an ordinary incremental made by comparison (import); resync is the same work done
because a dirty bitmap could not be trusted, and the point says so."""


@dataclass(frozen=True)
class DiskRecord:
    """One disk of a restore point: its size, cluster size, data bytes stored in its own file,
    and that file's path relative to STORE/data (`<vm>/<disk>/<point id>.qcow2`)."""

    name: str
    virtual_size: int
    cluster_size: int
    stored_bytes: int
    file: str
    backing_point_id: int | None = None
    mode: str = "full"


@dataclass(frozen=True)
class RestorePoint:
    """A committed restore point of one VM: all its disks from one instant."""

    id: int
    vm: str
    created: datetime
    kind: str
    disks: tuple[DiskRecord, ...]
    definition: dict[str, Any] | None = None

    def disk(self, name: str) -> DiskRecord | None:
        """The record of disk `name`, or None when this point does not hold it."""
        return next((d for d in self.disks if d.name == name), None)

    @property
    def stored_bytes(self) -> int:
        """Data bytes stored in this point's own files (all disks)."""
        return sum(d.stored_bytes for d in self.disks)


def utc_iso(moment: datetime) -> str:
    """A fixed-width ISO-8601 UTC text (microseconds, +00:00): sorts like the instants it names."""
    return as_utc(moment).isoformat(timespec="microseconds")


def as_utc(moment: datetime) -> datetime:
    """`moment` as an aware UTC datetime; a naive one is taken to be UTC already."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def parse_utc(text: str) -> datetime:
    """The aware UTC datetime of a text written by utc_iso."""
    return as_utc(datetime.fromisoformat(text))
