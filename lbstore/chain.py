"""Restore-point addresses (`VM@SPEC`) and chain helpers. Pure logic: no I/O, no SQL.

SPEC forms:
  latest              the newest committed point of the VM
  #ID                 the point with that id (it must belong to the VM)
  N{s,m,h,d,w}-ago    the newest point at or before now - N units
  ISO-8601 time       the newest point at or before that instant; no zone means UTC
A bare `VM` means `VM@latest`. Points created at the same instant are ordered by id, so "newest"
is always one well-defined point.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from lbstore.errors import AddressError, AddressSpecError, InvalidNameError
from lbstore.model import RestorePoint, as_utc
from lbstore.names import check_vm_name

# ASCII only: a str pattern's \d also matches other scripts' digits (fullwidth, Arabic-Indic),
# which int() would take.
_ID_SPEC = re.compile(r"#(\d{1,18})", re.ASCII)
_AGO_SPEC = re.compile(r"(\d{1,9})([smhdw])-ago", re.ASCII)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
SPEC_HELP = "use latest, #ID, N{s,m,h,d,w}-ago (e.g. 2h-ago) or an ISO-8601 time"


@dataclass(frozen=True)
class Latest:
    """The newest point."""


@dataclass(frozen=True)
class ById:
    """The point with this id."""

    id: int


@dataclass(frozen=True)
class AtOrBefore:
    """The newest point created at or before this instant (aware UTC)."""

    instant: datetime


Selector = Latest | ById | AtOrBefore


@dataclass(frozen=True)
class Address:
    """A parsed `VM@SPEC`."""

    text: str
    vm: str
    selector: Selector


def parse_address(address: str, now: datetime) -> Address:
    """Split and check `VM@SPEC`; relative specs are turned into instants against `now`."""
    vm, sep, spec = address.partition("@")
    try:
        check_vm_name(vm)
    except InvalidNameError as exc:
        raise AddressSpecError(address, str(exc)) from None
    if not sep:
        return Address(address, vm, Latest())
    return Address(address, vm, parse_spec(address, spec, now))


def parse_spec(address: str, spec: str, now: datetime) -> Selector:
    """The selector named by `spec` (the part after '@'); AddressError when it is none."""
    if spec == "latest":
        return Latest()
    if match := _ID_SPEC.fullmatch(spec):
        return ById(int(match.group(1)))
    if match := _AGO_SPEC.fullmatch(spec):
        amount, unit = int(match.group(1)), match.group(2)
        try:
            return AtOrBefore(as_utc(now) - timedelta(**{_UNITS[unit]: amount}))
        except OverflowError:
            raise AddressSpecError(address, f"{spec!r} reaches before the year 1") from None
    return AtOrBefore(_parse_instant(address, spec))


def _parse_instant(address: str, spec: str) -> datetime:
    """An ISO-8601 time; one without a zone is UTC. Anything else is garbage."""
    if not spec or not spec.isascii() or not spec[0].isdigit():
        raise AddressSpecError(address, f"unknown restore point spec {spec!r}: {SPEC_HELP}")
    try:
        moment = datetime.fromisoformat(spec)
    except ValueError:
        raise AddressSpecError(
            address, f"unknown restore point spec {spec!r}: {SPEC_HELP}"
        ) from None
    try:
        return as_utc(moment)
    except OverflowError:  # 9999-12-31T23:59:59-12:00 is past the year 9999 in UTC
        raise AddressSpecError(address, f"{spec!r} is outside the years 1 to 9999 in UTC") from None


def select_point(address: Address, points: Sequence[RestorePoint]) -> RestorePoint:
    """The point of `points` (the VM's committed points, oldest first) that `address` names."""
    if not points:
        raise AddressError(address.text, f"VM {address.vm!r} has no restore points")
    selector = address.selector
    if isinstance(selector, Latest):
        return points[-1]
    if isinstance(selector, ById):
        for point in points:
            if point.id == selector.id:
                return point
        raise AddressError(
            address.text, f"{address.vm} has no restore point #{selector.id}; {describe(points)}"
        )
    chosen = None
    for point in points:
        if point.created <= selector.instant:
            chosen = point
    if chosen is None:
        raise AddressError(
            address.text,
            f"no restore point of {address.vm} at or before {format_instant(selector.instant)}; "
            f"{describe(points)}",
        )
    return chosen


def describe(points: Sequence[RestorePoint]) -> str:
    """One phrase saying what exists: count, oldest and newest (with ids)."""
    first, last = points[0], points[-1]
    if len(points) == 1:
        return f"it has 1 restore point: #{first.id} at {format_instant(first.created)}"
    return (
        f"it has {len(points)} restore points, from #{first.id} at "
        f"{format_instant(first.created)} to #{last.id} at {format_instant(last.created)}"
    )


def format_instant(moment: datetime) -> str:
    """A short UTC time for messages: 2026-11-27T10:00:00Z."""
    return as_utc(moment).strftime("%Y-%m-%dT%H:%M:%SZ")


def disk_chain(point: RestorePoint, disk: str, by_id: dict[int, RestorePoint]) -> list[int]:
    """Point ids whose files form the chain of `disk` at `point`, top first (base last)."""
    chain: list[int] = []
    current: RestorePoint | None = point
    while current is not None:
        record = current.disk(disk)
        if record is None:
            raise KeyError(f"restore point #{current.id} holds no disk {disk!r}")
        chain.append(current.id)
        backing = record.backing_point_id
        current = by_id.get(backing) if backing is not None else None
        if backing is not None and current is None:
            raise KeyError(f"restore point #{backing} (backing of #{chain[-1]}) is not committed")
    return chain
