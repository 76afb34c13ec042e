"""The retention configuration file: the documented format, and one line naming every mistake."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from lbrestore.retention_config import ConfigError, load_config
from lbstore.retention import Policy, parse_duration

EXAMPLE = """\
timezone = "Europe/Berlin"

[default]
keep_within = "2d"
keep_hourly = 24
keep_daily = 7
keep_monthly = 12

[vm.vm1]
keep_daily = 30

[vm."web.example"]
keep_last = 5
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lbrestore.toml"
    path.write_text(text)
    return path


def test_the_documented_example(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, EXAMPLE), required=True)
    assert config.timezone == ZoneInfo("Europe/Berlin")
    assert config.default == Policy(
        keep_within=parse_duration("2d"), keep_hourly=24, keep_daily=7, keep_monthly=12
    )
    assert config.default is not None and config.default.keep_within is not None
    assert config.default.keep_within.span == timedelta(days=2)
    assert config.policy_for("vm1") == Policy(keep_daily=30)  # replaces [default], no inheriting
    assert config.policy_for("web.example") == Policy(keep_last=5)
    assert config.policy_for("other") == config.default


def test_missing_files(tmp_path: Path) -> None:
    missing = tmp_path / "none.toml"
    empty = load_config(missing, required=False)
    assert empty.default is None and empty.vms == {} and empty.timezone is None
    assert empty.policy_for("vm1") is None
    with pytest.raises(ConfigError, match=r"none\.toml: no such file"):
        load_config(missing, required=True)


def test_only_vm_sections_give_no_default(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[vm.vm2]\nkeep_yearly = 3\n"), required=True)
    assert config.policy_for("vm2") == Policy(keep_yearly=3)
    assert config.policy_for("vm1") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("keep_daily = 7\n", "unknown key 'keep_daily'"),
        ("[default]\nkeep_dayly = 7\n", "unknown key 'default.keep_dayly'"),
        ("[vm.vm1]\nkeep_daily = 7\nfoo = 1\n", "unknown key 'vm.vm1.foo'"),
        ("[default]\nkeep_daily = '7'\n", "default.keep_daily: expected a whole number, got '7'"),
        ("[default]\nkeep_daily = 1.5\n", "default.keep_daily: expected a whole number"),
        ("[default]\nkeep_daily = true\n", "default.keep_daily: expected a whole number"),
        ("[vm.vm1]\nkeep_hourly = -3\n", "vm.vm1.keep_hourly: -3 must be at least 1"),
        ("[default]\nkeep_weekly = 0\n", "default.keep_weekly: 0 must be at least 1"),
        ("[default]\nkeep_within = '2 days'\n", "default.keep_within: '2 days' is not a duration"),
        ("[default]\nkeep_within = 2\n", "default.keep_within: expected a duration text"),
        ("[default]\nkeep_within = '0d'\n", "default.keep_within: '0d' is not a duration"),
        ("default = 3\n", "default: expected a table of keep_* keys"),
        ("vm = 3\n", "vm: expected tables like [vm.NAME]"),
        ("[vm]\nvm1 = 3\n", "vm.vm1: expected a table of keep_* keys"),
        ('[vm."../x"]\nkeep_last = 1\n', "vm.../x: invalid VM name"),
        ("timezone = 'Mars/Olympus'\n", "timezone: unknown time zone 'Mars/Olympus'"),
        ("timezone = 1\n", "timezone: expected a zone name"),
        ("[default]\nkeep_daily = 7\nkeep_daily = 8\n", "TOML syntax error"),
        ("[default]\nkeep_daily 7\n", "(at line 2, column"),
    ],
)
def test_each_mistake_is_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, required=False)
    line = str(caught.value)
    assert "\n" not in line
    assert line.startswith(f"{path}: ")
    assert message in line
    assert caught.value.exit_code == 2


def test_unreadable_and_undecodable_files(tmp_path: Path) -> None:
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(folder, required=True)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[default]\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(binary, required=True)
