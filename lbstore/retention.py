"""Retention planning: which restore points of a VM a policy keeps, and by which rule.

Pure logic, no I/O: given a VM's points (id, creation instant), a `Policy`, the current instant and
a time zone, `plan` decides for every point the rule that keeps it, or that it is removed. The
semantics are borg's `prune` (described in its documentation, implemented here from that text):

- `keep_within DURATION` keeps every point created after now - DURATION (H hours, d days,
  w weeks, m = 31 days, y = 365 days). It is applied first; what it keeps counts for no other rule.
- Then the counting rules in this order: last, hourly, daily, weekly (ISO weeks, Monday to
  Sunday), monthly, yearly. Each rule walks the points from newest to oldest and looks at the
  newest point of each period (the periods of `last` are the points themselves). When that point
  is not kept yet, the rule keeps it and counts it; when an earlier rule already keeps it, the
  period is used up without counting. A rule stops when it has counted N points.
- A counting rule that found fewer than N periods also keeps the oldest point (borg 1.2 and
  later), so that the first point goes on aging until newer points replace it.
- Periods are calendar periods in local time (the given zone): wall-clock labels, so the hour
  repeated when clocks fall back is one hourly period, and a day of 23 or 25 hours is one day.
- The newest point is never removed: when no rule keeps it, it is kept as "newest".

Departure from borg: `keep_last` counts points, not seconds (borg's keep-last is keep-secondly),
so two points created in the same second are both counted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, tzinfo

from lbstore.errors import StoreError

COUNT_RULES: tuple[str, ...] = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
"""The counting rules, in the order they are applied."""

RULES: tuple[str, ...] = ("within", *COUNT_RULES)
"""Every rule of a policy, in the order they are applied."""

REMOVE = "remove"
NEWEST = "newest"

_DURATION = re.compile(r"([1-9][0-9]{0,8})([Hdwmy])")
_DURATION_UNITS: dict[str, timedelta] = {
    "H": timedelta(hours=1),
    "d": timedelta(days=1),
    "w": timedelta(weeks=1),
    "m": timedelta(days=31),
    "y": timedelta(days=365),
}
DURATION_HELP = "a positive whole number followed by H, d, w, m or y (e.g. 36H, 2d, 3w, 1m, 1y)"


class RetentionPolicyError(StoreError):
    """A retention policy value is out of range or malformed (names the setting; exit code 2)."""

    exit_code = 2

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


@dataclass(frozen=True)
class Duration:
    """A `keep_within` duration as written (`2d`) and as a span of time."""

    text: str
    span: timedelta


def parse_duration(text: str, setting: str = "keep_within") -> Duration:
    """The duration written as borg writes it: 36H, 2d, 3w, 1m (31 days), 1y (365 days)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise RetentionPolicyError(setting, f"{text!r} is not a duration: use {DURATION_HELP}")
    amount, unit = int(match.group(1)), match.group(2)
    return Duration(f"{amount}{unit}", amount * _DURATION_UNITS[unit])


@dataclass(frozen=True)
class Policy:
    """A retention policy: how many points each counting rule keeps, and the keep_within span.

    None means the rule is not used. Counts are at least 1 (checked by `checked`).
    """

    keep_within: Duration | None = None
    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None

    def count(self, rule: str) -> int | None:
        """How many points the counting rule `rule` keeps (None when unused)."""
        value: int | None = getattr(self, f"keep_{rule}")
        return value

    @property
    def is_empty(self) -> bool:
        """True when the policy has no rule at all (it would keep only the newest point)."""
        return all(getattr(self, f.name) is None for f in fields(self))

    def checked(self) -> Policy:
        """This policy, after checking every count is a whole number of at least 1."""
        for rule in COUNT_RULES:
            value = self.count(rule)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise RetentionPolicyError(f"keep_{rule}", f"{value!r} is not a whole number")
            if value < 1:
                raise RetentionPolicyError(f"keep_{rule}", f"{value} must be at least 1")
        return self

    def describe(self) -> str:
        """The policy as command-line options: `--keep-daily 7 --keep-within 2d`."""
        parts = []
        if self.keep_within is not None:
            parts.append(f"--keep-within {self.keep_within.text}")
        for rule in COUNT_RULES:
            value = self.count(rule)
            if value is not None:
                parts.append(f"--keep-{rule} {value}")
        return " ".join(parts) or "(no rule)"


@dataclass(frozen=True)
class PointTime:
    """What the planner needs of a restore point: its id and creation instant (aware)."""

    id: int
    created: datetime


@dataclass(frozen=True)
class Decision:
    """The fate of one point: the rule keeping it (`within`, `last`, ..., `newest`) or `remove`.

    `number` is the point's count within a counting rule (1 = that rule's newest period);
    `oldest` marks the oldest point kept because its rule found fewer periods than asked for.
    """

    point_id: int
    created: datetime
    rule: str
    number: int | None = None
    oldest: bool = False

    @property
    def keep(self) -> bool:
        """True unless the point is removed."""
        return self.rule != REMOVE

    @property
    def label(self) -> str:
        """A short text for people: `daily #3`, `monthly (oldest)`, `within`, `remove`."""
        if self.oldest:
            return f"{self.rule} (oldest)"
        if self.number is not None:
            return f"{self.rule} #{self.number}"
        return self.rule


def _period_key(rule: str, tz: tzinfo | None) -> Callable[[PointTime], Hashable]:
    """The function naming the period of `rule` a point falls in, in local wall-clock time."""

    def local(point: PointTime) -> datetime:
        return point.created.astimezone(tz)

    keys: dict[str, Callable[[PointTime], Hashable]] = {
        "last": lambda p: p.id,
        "hourly": lambda p: local(p).strftime("%Y-%m-%d %H"),
        "daily": lambda p: local(p).date(),
        "weekly": lambda p: local(p).isocalendar()[:2],
        "monthly": lambda p: (local(p).year, local(p).month),
        "yearly": lambda p: local(p).year,
    }
    return keys[rule]


def _apply_count_rule(
    rule: str,
    wanted: int,
    newest_first: Sequence[PointTime],
    kept: dict[int, Decision],
    tz: tzinfo | None,
) -> None:
    """Keep the newest point of each of the `wanted` newest periods not already kept (in place)."""
    key = _period_key(rule, tz)
    counted = 0
    previous: Hashable = object()
    for point in newest_first:
        period = key(point)
        if period == previous:
            continue
        previous = period
        if point.id in kept:
            continue
        counted += 1
        kept[point.id] = Decision(point.id, point.created, rule, number=counted)
        if counted == wanted:
            return
    oldest = newest_first[-1] if newest_first else None
    if oldest is not None and oldest.id not in kept:
        kept[oldest.id] = Decision(oldest.id, oldest.created, rule, oldest=True)


def plan(
    points: Sequence[PointTime], policy: Policy, now: datetime, tz: tzinfo | None = None
) -> list[Decision]:
    """For every point (any order), the rule keeping it or `remove`; newest first.

    `tz` is the zone whose calendar defines hours, days, weeks, months and years (None: the
    system's local time). Points created at the same instant are ordered by id, as addresses do.
    """
    policy.checked()
    newest_first = sorted(points, key=lambda p: (p.created, p.id), reverse=True)
    kept: dict[int, Decision] = {}
    if policy.keep_within is not None:
        cutoff = now - policy.keep_within.span
        for point in newest_first:
            if point.created > cutoff:
                kept[point.id] = Decision(point.id, point.created, "within")
    for rule in COUNT_RULES:
        wanted = policy.count(rule)
        if wanted is not None:
            _apply_count_rule(rule, wanted, newest_first, kept, tz)
    if newest_first and newest_first[0].id not in kept:
        newest = newest_first[0]
        kept[newest.id] = Decision(newest.id, newest.created, NEWEST)
    return [kept.get(p.id) or Decision(p.id, p.created, REMOVE) for p in newest_first]
