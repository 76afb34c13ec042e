"""Retention planner: every rule, their combinations, keep_within, DST edges, with fixed clocks."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from lbstore.retention import (
    COUNT_RULES,
    Duration,
    PointTime,
    Policy,
    RetentionPolicyError,
    parse_duration,
    plan,
)

BERLIN = ZoneInfo("Europe/Berlin")


def utc(text: str) -> datetime:
    """An aware UTC instant from `2026-11-27 10:00`."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def points_at(*times: str) -> list[PointTime]:
    """Points #1, #2, ... created at the given UTC times (in the given order)."""
    return [PointTime(i, utc(t)) for i, t in enumerate(times, start=1)]


def labels(
    points: list[PointTime], policy: Policy, now: str = "2030-01-01 00:00", tz: object = UTC
) -> dict[int, str]:
    """{point id: decision label} of the plan."""
    decisions = plan(points, policy, utc(now), tz)  # type: ignore[arg-type]
    assert len(decisions) == len(points)
    return {d.point_id: d.label for d in decisions}


def within(text: str) -> Duration:
    return parse_duration(text)


# --- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "span"),
    [
        ("1H", timedelta(hours=1)),
        ("36H", timedelta(hours=36)),
        ("2d", timedelta(days=2)),
        ("3w", timedelta(weeks=3)),
        ("1m", timedelta(days=31)),
        ("2y", timedelta(days=730)),
    ],
)
def test_durations_as_borg_counts_them(text: str, span: timedelta) -> None:
    assert parse_duration(text) == Duration(text, span)


@pytest.mark.parametrize(
    "text", ["", "2", "d", "0d", "-1d", "1.5d", "2D", "2h", "2dd", "1 d", "2s"]
)
def test_bad_durations_are_refused_naming_the_setting(text: str) -> None:
    with pytest.raises(RetentionPolicyError) as caught:
        parse_duration(text, "vm.vm1.keep_within")
    assert str(caught.value).startswith("vm.vm1.keep_within: ")
    assert caught.value.exit_code == 2


# --- policies ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, -7])
def test_counts_below_one_are_refused(value: int) -> None:
    with pytest.raises(RetentionPolicyError, match=f"keep_daily: {value} must be at least 1"):
        Policy(keep_daily=value).checked()


@pytest.mark.parametrize("value", [True, "3", 2.5])
def test_counts_must_be_whole_numbers(value: object) -> None:
    with pytest.raises(RetentionPolicyError, match=r"keep_hourly: .* is not a whole number"):
        Policy(keep_hourly=value).checked()  # type: ignore[arg-type]


def test_plan_refuses_an_invalid_policy() -> None:
    with pytest.raises(RetentionPolicyError):
        plan(points_at("2026-01-01 00:00"), Policy(keep_last=0), utc("2026-01-02 00:00"))


def test_empty_policy_and_description() -> None:
    assert Policy().is_empty
    assert not Policy(keep_yearly=1).is_empty
    assert not Policy(keep_within=within("1d")).is_empty
    policy = Policy(keep_within=within("2d"), keep_daily=7, keep_monthly=12)
    assert policy.describe() == "--keep-within 2d --keep-daily 7 --keep-monthly 12"


def test_no_points_no_decisions() -> None:
    assert plan([], Policy(keep_last=3), utc("2026-01-01 00:00")) == []


# --- each rule alone ---------------------------------------------------------------------------


def test_keep_last_keeps_the_newest_points_in_any_input_order() -> None:
    points = points_at("2026-01-03", "2026-01-01", "2026-01-05", "2026-01-02", "2026-01-04")
    assert labels(points, Policy(keep_last=3)) == {
        3: "last #1",
        5: "last #2",
        1: "last #3",
        4: "remove",
        2: "remove",
    }


def test_keep_last_counts_points_of_the_same_instant_by_id() -> None:
    points = points_at("2026-01-01 10:00", "2026-01-01 10:00", "2026-01-01 10:00")
    assert labels(points, Policy(keep_last=2)) == {3: "last #1", 2: "last #2", 1: "remove"}


def test_keep_hourly_keeps_the_newest_point_of_each_hour() -> None:
    points = points_at(
        "2026-01-01 10:05", "2026-01-01 10:40", "2026-01-01 11:10", "2026-01-01 12:00"
    )
    assert labels(points, Policy(keep_hourly=2)) == {
        4: "hourly #1",
        3: "hourly #2",
        2: "remove",
        1: "remove",
    }


def test_a_rule_short_of_periods_also_keeps_the_oldest_point() -> None:
    points = points_at("2026-01-01 10:05", "2026-01-01 10:40", "2026-01-01 11:10")
    assert labels(points, Policy(keep_hourly=10)) == {
        3: "hourly #1",
        2: "hourly #2",
        1: "hourly (oldest)",
    }


def test_days_without_points_do_not_count() -> None:
    points = points_at(
        "2026-03-01 08:00", "2026-03-01 20:00", "2026-03-04 09:00", "2026-03-09 01:00"
    )
    assert labels(points, Policy(keep_daily=2)) == {
        4: "daily #1",
        3: "daily #2",
        2: "remove",
        1: "remove",
    }


def test_keep_weekly_uses_iso_weeks_across_the_year_end() -> None:
    # 2026-12-28 is the Monday of ISO week 2026-W53; 2027-01-03 its Sunday; 2027-01-04 is W01.
    points = points_at("2026-12-28 12:00", "2027-01-03 12:00", "2027-01-04 12:00")
    assert labels(points, Policy(keep_weekly=2)) == {3: "weekly #1", 2: "weekly #2", 1: "remove"}


def test_keep_monthly_and_keep_yearly() -> None:
    points = points_at(
        "2024-06-01", "2024-12-31 23:00", "2025-01-15", "2025-01-31", "2025-02-01", "2025-02-02"
    )
    assert labels(points, Policy(keep_monthly=2)) == {
        6: "monthly #1",
        4: "monthly #2",
        5: "remove",
        3: "remove",
        2: "remove",
        1: "remove",
    }
    assert labels(points, Policy(keep_yearly=2)) == {
        6: "yearly #1",
        2: "yearly #2",
        5: "remove",
        4: "remove",
        3: "remove",
        1: "remove",
    }


def test_keep_within_keeps_points_strictly_newer_than_now_minus_the_span() -> None:
    points = points_at("2026-05-01 00:00", "2026-05-01 00:00:01", "2026-05-02 12:00")
    assert labels(points, Policy(keep_within=within("2d")), now="2026-05-03 00:00") == {
        3: "within",
        2: "within",
        1: "remove",
    }


def test_keep_within_one_month_is_31_days() -> None:
    points = points_at("2026-01-31 00:00", "2026-01-31 00:01", "2026-03-01 00:00")
    assert labels(points, Policy(keep_within=within("1m")), now="2026-03-03 00:00") == {
        3: "within",
        2: "within",
        1: "remove",
    }


def test_the_newest_point_is_never_removed() -> None:
    points = points_at("2026-01-01", "2026-01-02", "2026-01-03")
    assert labels(points, Policy(keep_within=within("1H")), now="2026-06-01 00:00") == {
        3: "newest",
        2: "remove",
        1: "remove",
    }


# --- combinations: a point kept by one rule is not counted by the next --------------------------


def test_last_then_daily_the_used_day_is_not_counted() -> None:
    points = points_at(
        "2026-04-01 12:00",
        "2026-04-02 12:00",
        "2026-04-03 12:00",
        "2026-04-04 12:00",
        "2026-04-05 08:00",
        "2026-04-05 12:00",
    )
    assert labels(points, Policy(keep_last=2, keep_daily=3)) == {
        6: "last #1",
        5: "last #2",
        4: "daily #1",
        3: "daily #2",
        2: "daily #3",
        1: "remove",
    }


def test_within_then_monthly_then_yearly() -> None:
    points = points_at(
        "2024-03-10",
        "2025-07-01",
        "2025-09-15",
        "2025-10-20",
        "2025-11-28",
        "2025-11-29",
        "2025-11-30 12:00",
    )
    policy = Policy(keep_within=within("3d"), keep_monthly=2, keep_yearly=5)
    assert labels(points, policy, now="2025-12-01 00:00") == {
        7: "within",
        6: "within",
        5: "remove",  # November's newest point is kept by within: November is used up
        4: "monthly #1",
        3: "monthly #2",
        2: "remove",  # 2025's newest point is kept already: the year is used up
        1: "yearly #1",
    }


def test_every_rule_together() -> None:
    start = utc("2025-01-01 00:00")
    points = [PointTime(i + 1, start + timedelta(hours=7 * i)) for i in range(1500)]
    policy = Policy(
        keep_within=within("1d"),
        keep_last=2,
        keep_hourly=3,
        keep_daily=4,
        keep_weekly=3,
        keep_monthly=5,
        keep_yearly=2,
    )
    now = points[-1].created + timedelta(hours=1)
    decisions = plan(points, policy, now, UTC)
    by_rule: dict[str, list[int]] = {}
    for decision in decisions:
        by_rule.setdefault(decision.rule, []).append(decision.point_id)
    assert by_rule["within"] == [1500, 1499, 1498, 1497]  # 0..21 hours old
    assert by_rule["last"] == [1496, 1495]
    assert by_rule["hourly"] == [1494, 1493, 1492]
    # Each 7-hour step lands on a new day every 3 or 4 points; days already used are skipped.
    assert len(by_rule["daily"]) == 4
    assert len(by_rule["weekly"]) == 3
    assert len(by_rule["monthly"]) == 5
    # 2026 and 2025 are both used up by earlier rules; the rule falls back to the oldest point.
    assert by_rule["yearly"] == [1]
    assert len(by_rule["remove"]) == 1500 - sum(len(v) for k, v in by_rule.items() if k != "remove")


# --- local time and DST (Europe/Berlin, 2026) ---------------------------------------------------


def test_fall_back_the_repeated_hour_is_one_hourly_period() -> None:
    # 2026-10-25: 03:00 CEST becomes 02:00 CET at 01:00 UTC; 02:30 local happens twice.
    points = points_at("2026-10-24 23:30", "2026-10-25 00:30", "2026-10-25 01:30")
    assert labels(points, Policy(keep_hourly=2), tz=BERLIN) == {
        3: "hourly #1",  # 02:30 CET
        2: "remove",  # 02:30 CEST, the same wall-clock hour
        1: "hourly #2",  # 01:30 CEST
    }
    assert labels(points, Policy(keep_hourly=2), tz=UTC) == {
        3: "hourly #1",
        2: "hourly #2",
        1: "remove",
    }


def test_fall_back_the_25_hour_day_is_one_day() -> None:
    # Local 2026-10-25 runs from 2026-10-24 22:00 UTC to 2026-10-25 23:00 UTC.
    points = points_at("2026-10-24 21:59", "2026-10-24 22:00", "2026-10-25 22:59")
    assert labels(points, Policy(keep_daily=2), tz=BERLIN) == {
        3: "daily #1",
        2: "remove",
        1: "daily #2",
    }
    assert labels(points, Policy(keep_daily=2), tz=UTC) == {
        3: "daily #1",
        2: "daily #2",
        1: "remove",
    }


def test_spring_forward_the_23_hour_day_and_the_missing_hour() -> None:
    # 2026-03-29: 02:00 CET becomes 03:00 CEST at 01:00 UTC; local day is 23:00 to 22:00 UTC.
    points = points_at(
        "2026-03-28 22:59", "2026-03-28 23:00", "2026-03-29 21:59", "2026-03-29 22:00"
    )
    assert labels(points, Policy(keep_daily=3), tz=BERLIN) == {
        4: "daily #1",  # 00:00 on 03-30
        3: "daily #2",  # 23:59 on 03-29
        2: "remove",  # 00:00 on 03-29, same 23-hour day
        1: "daily #3",  # 23:59 on 03-28
    }
    hours = points_at("2026-03-29 00:59", "2026-03-29 01:00")  # 01:59 CET, then 03:00 CEST
    assert labels(hours, Policy(keep_hourly=2), tz=BERLIN) == {2: "hourly #1", 1: "hourly #2"}


def test_weeks_begin_on_local_monday() -> None:
    # 2026-11-29 23:30 UTC is Monday 2026-11-30 00:30 in Berlin: a new ISO week there.
    points = points_at("2026-11-22 12:00", "2026-11-29 12:00", "2026-11-29 23:30")
    assert labels(points, Policy(keep_weekly=2), tz=BERLIN) == {
        3: "weekly #1",
        2: "weekly #2",
        1: "remove",
    }
    assert labels(points, Policy(keep_weekly=2), tz=UTC) == {
        3: "weekly #1",
        2: "remove",
        1: "weekly #2",
    }


def test_keep_within_counts_real_hours_across_a_dst_change() -> None:
    # Berlin's spring-forward night: 24 real hours before 2026-03-29 22:30 UTC.
    points = points_at("2026-03-28 22:30", "2026-03-28 22:31")
    assert labels(points, Policy(keep_within=within("24H")), now="2026-03-29 22:30", tz=BERLIN) == {
        2: "within",
        1: "remove",
    }


# --- invariants on random histories -------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_plan_invariants_on_random_histories(seed: int) -> None:
    rng = random.Random(seed)
    start = utc("2025-01-01 00:00")
    points = [
        PointTime(i + 1, start + timedelta(minutes=rng.randrange(0, 60 * 24 * 500)))
        for i in range(rng.randrange(1, 120))
    ]
    counts = {rule: rng.choice([None, 1, 2, 5]) for rule in COUNT_RULES}
    policy = Policy(**{f"keep_{r}": v for r, v in counts.items()})  # type: ignore[arg-type]
    decisions = plan(points, policy, start + timedelta(days=600), BERLIN)
    newest = max(points, key=lambda p: (p.created, p.id))
    assert decisions[0].point_id == newest.id and decisions[0].keep
    for rule, wanted in counts.items():
        chosen = [d for d in decisions if d.rule == rule and not d.oldest]
        assert len(chosen) <= (wanted or 0)
        assert [d.number for d in chosen] == list(range(1, len(chosen) + 1))
    if policy.is_empty:
        assert sum(d.keep for d in decisions) == 1
