"""Address resolution (`VM@SPEC`), table-driven: every spec form, ties, future, zones, garbage."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from lbstore.chain import parse_address, select_point
from lbstore.errors import AddressError
from lbstore.model import RestorePoint

NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)


def point(point_id: int, created: datetime, vm: str = "vm1") -> RestorePoint:
    return RestorePoint(id=point_id, vm=vm, created=created, kind="full", disks=())


# Points of vm1, oldest first. #3 and #4 share an instant (a tie): the higher id is newer.
POINTS = [
    point(1, NOW - timedelta(days=3)),
    point(2, NOW - timedelta(hours=5)),
    point(3, NOW - timedelta(hours=2)),
    point(4, NOW - timedelta(hours=2)),
    point(7, NOW - timedelta(minutes=10)),
]


def resolve(address: str) -> int:
    return select_point(parse_address(address, NOW), POINTS).id


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("vm1", 7),
        ("vm1@latest", 7),
        ("vm1@#1", 1),
        ("vm1@#4", 4),
        ("vm1@#7", 7),
        ("vm1@0s-ago", 7),
        ("vm1@10m-ago", 7),  # exactly at #7's instant: "at or before" includes it
        ("vm1@11m-ago", 4),  # tie at 2h ago: the higher id wins
        ("vm1@2h-ago", 4),
        ("vm1@121m-ago", 2),
        ("vm1@7200s-ago", 4),
        ("vm1@3h-ago", 2),
        ("vm1@1d-ago", 1),
        ("vm1@4h-ago", 2),
        ("vm1@2d-ago", 1),
        ("vm1@3d-ago", 1),
        ("vm1@72h-ago", 1),
        ("vm1@2026-11-27T10:00", 4),  # no zone means UTC
        ("vm1@2026-11-27T10:00:00Z", 4),
        ("vm1@2026-11-27T09:59:59Z", 2),
        ("vm1@2026-11-27T12:00+02:00", 4),  # 10:00 UTC
        ("vm1@2026-11-27T11:00-01:00", 7),  # 12:00 UTC
        ("vm1@2026-11-27T06:59:59.999+00:00", 1),
        ("vm1@2026-11-27 07:00:00", 2),
        ("vm1@2026-11-24T12:00", 1),
        ("vm1@2026-11-25", 1),  # a date alone is its midnight, UTC
        ("vm1@2099-01-01", 7),  # the future: the newest point at or before it
        ("vm1@2099-01-01T00:00+14:00", 7),
    ],
)
def test_spec_forms_resolve(address: str, expected: int) -> None:
    assert resolve(address) == expected


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("vm1@", "unknown restore point spec"),
        ("vm1@yesterday", "unknown restore point spec"),
        ("vm1@LATEST", "unknown restore point spec"),
        ("vm1@#", "unknown restore point spec"),
        ("vm1@#x", "unknown restore point spec"),
        ("vm1@#-1", "unknown restore point spec"),
        ("vm1@2h", "unknown restore point spec"),
        ("vm1@2y-ago", "unknown restore point spec"),
        ("vm1@-2h-ago", "unknown restore point spec"),
        ("vm1@1.5h-ago", "unknown restore point spec"),
        ("vm1@2026-13-01", "unknown restore point spec"),
        ("vm1@2026-11-27T25:00", "unknown restore point spec"),
        ("vm1@@latest", "unknown restore point spec"),
        ("vm1@999999999w-ago", "before the year 1"),
        ("@latest", "invalid VM name"),
        ("../x@latest", "invalid VM name"),
        ("a/b@latest", "invalid VM name"),
        ("x" * 200 + "@latest", "invalid VM name"),
        ("", "invalid VM name"),
        ("vm1@#5", "has no restore point #5"),
        ("vm1@#99999", "has no restore point #99999"),
        ("vm1@4d-ago", "no restore point of vm1 at or before 2026-11-23T12:00:00Z"),
        ("vm1@2020-01-01", "no restore point of vm1 at or before 2020-01-01T00:00:00Z"),
    ],
)
def test_bad_addresses_are_one_clear_line(address: str, message: str) -> None:
    with pytest.raises(AddressError) as info:
        resolve(address)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_no_match_says_what_exists() -> None:
    with pytest.raises(AddressError) as info:
        resolve("vm1@2020-01-01")
    text = str(info.value)
    assert "5 restore points" in text and "#1" in text and "#7" in text


def test_a_vm_without_points_is_an_error() -> None:
    with pytest.raises(AddressError, match="no restore points"):
        select_point(parse_address("vm9@latest", NOW), [])


def test_relative_specs_use_the_given_now() -> None:
    later = NOW + timedelta(hours=3)
    assert select_point(parse_address("vm1@3h-ago", later), POINTS).id == 7
    assert select_point(parse_address("vm1@4h-ago", later), POINTS).id == 4
