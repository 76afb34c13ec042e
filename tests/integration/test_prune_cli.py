"""`lbrestore prune`: dry runs, --json, the configuration file, --all, and bad input.

The stores are built in this process with the importer (the same code as `import --at`). The
command runs as a real `python -m lbrestore` process where time zones matter; the many bad-input
cases call the same console entry point in this process (its error handler and exit codes).
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lbrestore.cli import main
from lbstore.importer import import_images
from lbstore.store import Store

MIB = 1 << 20


def lbrestore(store: Path, *args: str, tz: str = "UTC") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbrestore", "--store", str(store), *args],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "TZ": tz, "HOME": str(store.parent)},
    )


def in_process(
    capsys: pytest.CaptureFixture[str], store: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """The console entry point run in this process (same handler and exit codes, no start-up)."""
    with pytest.raises(SystemExit) as exited:
        main(["--store", str(store), *args])
    captured = capsys.readouterr()
    code = exited.value.code if isinstance(exited.value.code, int) else 1
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert text in lines[0], lines[0]


def build_store(tmp_path: Path, history: dict[str, list[str]]) -> Path:
    """A store whose VMs have points at the given UTC times (a 1 MiB disk, changing each time)."""
    path = tmp_path / "store"
    Store.init(path)
    image = tmp_path / "disk.raw"
    with Store.open(path, write=True) as store:
        for vm, times in history.items():
            for n, text in enumerate(times):
                image.write_bytes(bytes([n % 251 + 1]) * 65536 + bytes(MIB - 65536))
                created = datetime.fromisoformat(text).replace(tzinfo=UTC)
                import_images(store, vm, {"vda": image}, created=created)
    return path


def point_ids(store_path: Path, vm: str) -> list[int]:
    with Store.open(store_path) as store:
        return [p.id for p in store.restore_points(vm)]


HOURLY = [f"2026-10-24 {h:02d}:30" for h in range(20, 24)] + [
    f"2026-10-25 {h:02d}:30" for h in range(0, 4)
]
"""Eight hourly points across Berlin's fall-back night (00:30 and 01:30 UTC are both 02:30)."""


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return build_store(
        tmp_path,
        {
            "vm1": HOURLY,
            "vm2": ["2026-01-05 10:00", "2026-02-05 10:00", "2026-03-05 10:00"],
        },
    )


def test_dry_run_lists_every_point_with_its_rule_and_changes_nothing(store_path: Path) -> None:
    before = sorted(p.name for p in (store_path / "data" / "vm1" / "vda").iterdir())
    args = ("prune", "vm1", "--keep-last", "2", "--keep-hourly", "3", "--dry-run")
    result = lbrestore(store_path, *args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "vm1: --keep-last 2 --keep-hourly 3"
    rows = {int(line.split()[0][1:]): line for line in lines[1:-1]}
    assert sorted(rows) == list(range(1, 9))
    assert rows[8].endswith("keep    last #1") and rows[7].endswith("keep    last #2")
    assert rows[6].endswith("hourly #1") and rows[4].endswith("hourly #3")
    assert rows[3].endswith("remove") and rows[1].endswith("remove")
    assert "2026-10-25 03:30:00 +0000" in rows[8]  # local time is TZ's (UTC here)
    assert lines[-1] == "vm1: would keep 5, remove 3 (dry run)"
    assert sorted(p.name for p in (store_path / "data" / "vm1" / "vda").iterdir()) == before
    assert point_ids(store_path, "vm1") == list(range(1, 9))


def test_dry_run_periods_follow_the_local_time_zone(store_path: Path) -> None:
    args = ("prune", "vm1", "--keep-hourly", "8", "--dry-run", "--json")
    utc_plan = json.loads(lbrestore(store_path, *args).stdout)["vms"][0]["points"]
    berlin = lbrestore(store_path, *args, tz="Europe/Berlin")
    berlin_plan = json.loads(berlin.stdout)["vms"][0]["points"]
    assert all(p["rule"] == "hourly" for p in utc_plan)
    # In Berlin 00:30 UTC (#5) and 01:30 UTC (#6) are both 02:30: one hourly period.
    assert {p["id"]: p["rule"] for p in berlin_plan}[5] == "remove"
    assert {p["id"]: p["local_time"] for p in berlin_plan}[5] == "2026-10-25 02:30:00 +0200"
    assert {p["id"]: p["local_time"] for p in berlin_plan}[6] == "2026-10-25 02:30:00 +0100"


def test_json_reports_the_same_plan(store_path: Path) -> None:
    result = lbrestore(store_path, "prune", "vm2", "--keep-monthly", "1", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dry_run"] is True
    (vm,) = report["vms"]
    assert vm["vm"] == "vm2" and vm["policy"] == "--keep-monthly 1" and vm["error"] is None
    assert [(p["id"], p["rule"], p["number"], p["oldest"]) for p in vm["points"]] == [
        (11, "monthly", 1, False),
        (10, "remove", None, False),
        (9, "remove", None, False),
    ]
    assert vm["points"][0]["created"] == "2026-03-05T10:00:00+00:00"
    assert (vm["kept"], vm["planned_removals"], vm["removed"]) == (1, 2, 0)


def test_all_applies_the_configuration_per_vm(store_path: Path) -> None:
    (store_path / "lbrestore.toml").write_text(
        'timezone = "Europe/Berlin"\n[default]\nkeep_last = 1\n[vm.vm2]\nkeep_monthly = 2\n'
    )
    result = lbrestore(store_path, "prune", "--all", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    plans = {v["vm"]: v for v in json.loads(result.stdout)["vms"]}
    assert plans["vm1"]["policy"] == "--keep-last 1" and plans["vm1"]["kept"] == 1
    assert plans["vm2"]["policy"] == "--keep-monthly 2" and plans["vm2"]["kept"] == 2
    assert plans["vm1"]["points"][0]["local_time"].endswith("+0100")  # the configured zone
    text = lbrestore(store_path, "prune", "--all", "--dry-run")
    assert text.stdout.splitlines()[-1] == "vm2: would keep 2, remove 1 (dry run)"
    override = lbrestore(store_path, "prune", "--all", "--keep-last", "3", "--dry-run", "--json")
    plans = {v["vm"]: v for v in json.loads(override.stdout)["vms"]}
    assert {v["policy"] for v in plans.values()} == {"--keep-last 3"}
    assert plans["vm1"]["kept"] == 3 and plans["vm2"]["kept"] == 3


def test_all_skips_vms_without_a_policy(store_path: Path, tmp_path: Path) -> None:
    config = tmp_path / "other.toml"
    config.write_text("[vm.vm2]\nkeep_last = 1\n")
    result = lbrestore(store_path, "prune", "--all", "--config", str(config), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "vm1: no retention policy in the configuration; nothing removed" in result.stdout
    assert "vm2: would keep 1, remove 2 (dry run)" in result.stdout


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (("vm1", "--keep-daily", "0"), 2, "--keep-daily 0: keep values must be at least 1"),
        (("vm1", "--keep-last", "-2"), 2, "--keep-last -2: keep values must be at least 1"),
        (("vm1",), 2, "no keep rule"),
        (("--all",), 2, "no keep rule"),
        (("vm1", "--keep-within", "0d"), 2, "--keep-within: '0d' is not a duration"),
        (("vm1", "--keep-within", "2 days"), 2, "--keep-within: '2 days' is not a duration"),
        (("novm", "--keep-last", "1"), 1, "no VM named 'novm' has restore points; VMs in this"),
        (("vm1@latest", "--keep-last", "1"), 2, "prune takes a VM name, not a restore point"),
        (("../x", "--keep-last", "1"), 2, "invalid VM name"),
        (("vm1", "--keep-daily", "abc"), 2, "'abc' is not a valid integer"),
        (("--keep-last", "1"), 2, "give either a VM or --all"),
        (("vm1", "--all", "--keep-last", "1"), 2, "give either a VM or --all"),
        (("vm1", "--keep-last", "1", "--config", "/nonexistent.toml"), 2, "no such file"),
    ],
)
def test_bad_input_is_one_line(
    store_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    code: int,
    text: str,
) -> None:
    result = in_process(capsys, store_path, "prune", *args)
    assert_one_line(result, code, text)
    assert point_ids(store_path, "vm1") == list(range(1, 9))


@pytest.mark.parametrize(
    ("config", "text"),
    [
        ("[default]\nkeep_daly = 3\n", "unknown key 'default.keep_daly'"),
        ("[vm.vm1]\nkeep_daily = 'x'\n", "vm.vm1.keep_daily: expected a whole number"),
        ("[default]\nkeep_daily = -1\n", "default.keep_daily: -1 must be at least 1"),
        ("[default]\nkeep_within = '3x'\n", "default.keep_within: '3x' is not a duration"),
        ("[default\nkeep_daily = 3\n", "TOML syntax error"),
    ],
)
def test_a_malformed_configuration_is_one_line_naming_the_key(
    store_path: Path, capsys: pytest.CaptureFixture[str], config: str, text: str
) -> None:
    (store_path / "lbrestore.toml").write_text(config)
    for args in (("--all",), ("vm1", "--keep-last", "1", "--dry-run")):
        result = in_process(capsys, store_path, "prune", *args)
        assert_one_line(result, 2, text)
        assert "lbrestore.toml" in result.stderr
    assert point_ids(store_path, "vm1") == list(range(1, 9))


def test_points_within_a_duration_of_now_are_kept(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    times = [(now - timedelta(hours=h)).strftime("%Y-%m-%d %H:%M:%S") for h in (50, 30, 10, 1)]
    store_path = build_store(tmp_path, {"vm1": times})
    result = lbrestore(store_path, "prune", "vm1", "--keep-within", "36H", "--dry-run", "--json")
    points = json.loads(result.stdout)["vms"][0]["points"]
    assert [p["rule"] for p in points] == ["within", "within", "within", "remove"]
