"""The retention configuration: `STORE/lbrestore.toml` (or `--config FILE`), read with tomllib.

    timezone = "Europe/Berlin"      # optional: whose calendar makes hours, days, weeks, ...
                                    # (default: the system's local time)
    [default]                       # the policy of every VM without a section of its own
    keep_within = "2d"
    keep_hourly = 24
    keep_daily = 7
    keep_monthly = 12

    [vm.vm1]                        # vm1's whole policy (it replaces [default], key by key
    keep_daily = 30                 # nothing is inherited)
    [vm."web.example"]              # names with dots are quoted, as TOML wants
    keep_last = 5

Keys of a policy: keep_within (a duration text: 36H, 2d, 3w, 1m, 1y) and keep_last, keep_hourly,
keep_daily, keep_weekly, keep_monthly, keep_yearly (whole numbers of at least 1). Every mistake
is one line naming the file and the key (ConfigError, exit code 2).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from datetime import tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from lbrestore.errors import AppError
from lbstore.errors import InvalidNameError
from lbstore.names import check_vm_name
from lbstore.retention import (
    COUNT_RULES,
    Policy,
    RetentionPolicyError,
    parse_duration,
)

CONFIG_NAME = "lbrestore.toml"
POLICY_KEYS: tuple[str, ...] = ("keep_within", *(f"keep_{rule}" for rule in COUNT_RULES))
TOP_KEYS: tuple[str, ...] = ("timezone", "default", "vm")


class ConfigError(AppError):
    """The retention configuration file is missing, unreadable or malformed (exit code 2).

    The message names the file and the key (or TOML's line and column), so one line is enough
    to fix it.
    """

    exit_code = 2

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


@dataclass(frozen=True)
class RetentionConfig:
    """What a configuration file says: a default policy, per-VM policies and the time zone."""

    path: Path | None = None
    default: Policy | None = None
    vms: dict[str, Policy] = field(default_factory=dict)
    timezone: tzinfo | None = None
    timezone_name: str | None = None

    def policy_for(self, vm: str) -> Policy | None:
        """The policy of `vm`: its own section, else [default], else None (no policy)."""
        return self.vms.get(vm, self.default)


def load_config(path: Path, *, required: bool) -> RetentionConfig:
    """Read and check the configuration at `path`; a missing optional file is an empty config."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise ConfigError(path, "no such file") from None
        return RetentionConfig()
    except (OSError, UnicodeDecodeError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(path, f"cannot read: {problem}") from exc
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, f"TOML syntax error: {exc}") from None
    return parse_config(path, document)


def parse_config(path: Path, document: dict[str, Any]) -> RetentionConfig:
    """The checked configuration of a parsed TOML document."""
    for key in document:
        if key not in TOP_KEYS:
            raise ConfigError(path, f"unknown key {key!r} (known: {', '.join(TOP_KEYS)})")
    zone, zone_name = _parse_timezone(path, document.get("timezone"))
    default = None
    if "default" in document:
        default = _parse_policy(path, "default", document["default"])
    vms: dict[str, Policy] = {}
    sections = document.get("vm", {})
    if not isinstance(sections, dict):
        raise ConfigError(path, "vm: expected tables like [vm.NAME]")
    for name, section in sections.items():
        try:
            check_vm_name(name)
        except InvalidNameError as exc:
            raise ConfigError(path, f"vm.{name}: {exc}") from None
        vms[name] = _parse_policy(path, f"vm.{name}", section)
    return RetentionConfig(path, default, vms, zone, zone_name)


def _parse_timezone(path: Path, value: object) -> tuple[tzinfo | None, str | None]:
    if value is None:
        return None, None
    if not isinstance(value, str):
        raise ConfigError(
            path, f"timezone: expected a zone name like 'Europe/Berlin', got {value!r}"
        )
    try:
        return ZoneInfo(value), value
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(path, f"timezone: unknown time zone {value!r}") from None


def _parse_policy(path: Path, section: str, table: object) -> Policy:
    """The policy of one section ([default] or [vm.NAME]); each key checked and named."""
    if not isinstance(table, dict):
        raise ConfigError(path, f"{section}: expected a table of keep_* keys, got {table!r}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        where = f"{section}.{key}"
        if key not in POLICY_KEYS:
            raise ConfigError(path, f"unknown key {where!r} (known: {', '.join(POLICY_KEYS)})")
        values[key] = _parse_value(path, where, key, value)
    return Policy(**values)


def _parse_value(path: Path, where: str, key: str, value: object) -> Any:
    """One policy value: a duration text for keep_within, else a whole number of at least 1."""
    if key == "keep_within":
        if not isinstance(value, str):
            raise ConfigError(path, f"{where}: expected a duration text like '2d', got {value!r}")
        try:
            return parse_duration(value, where)
        except RetentionPolicyError as exc:
            raise ConfigError(path, str(exc)) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(path, f"{where}: expected a whole number, got {value!r}")
    if value < 1:
        raise ConfigError(path, f"{where}: {value} must be at least 1")
    return value
