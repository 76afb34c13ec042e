"""Human formatting used by the store commands: ages, sizes, tables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from lbrestore.commands._common import format_age, format_size, format_table

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("delta", "text"),
    [
        (timedelta(seconds=3), "just now"),
        (timedelta(seconds=42), "42s ago"),
        (timedelta(minutes=5, seconds=59), "5m ago"),
        (timedelta(hours=2, minutes=30), "2h ago"),
        (timedelta(days=3, hours=23), "3d ago"),
        (timedelta(days=15), "2w ago"),
        (timedelta(hours=-3), "in 3h"),
    ],
)
def test_format_age(delta: timedelta, text: str) -> None:
    assert format_age(NOW - delta, NOW) == text


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (512, "512 B"), (65536, "64.0 KiB"), (3 << 29, "1.5 GiB"), (5 << 40, "5.0 TiB")],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


def test_format_table_aligns_columns() -> None:
    table = format_table(["ID", "VM"], [["#1", "a-long-name"], ["#22", "b"]])
    assert table.splitlines() == ["ID   VM", "#1   a-long-name", "#22  b"]
