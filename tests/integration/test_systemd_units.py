"""contrib/systemd: the shipped units pass `systemd-analyze verify` and say what the README says."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS_DIR = Path(__file__).resolve().parents[2] / "contrib" / "systemd"
UNITS = (
    "lbrestore-backup@.service",
    "lbrestore-backup@.timer",
    "lbrestore-prune.service",
    "lbrestore-prune.timer",
)
INSTALLED = "/usr/local/bin/lbrestore"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"

needs_systemd_analyze = pytest.mark.skipif(
    not Path(SYSTEMD_ANALYZE).is_file(), reason="systemd-analyze is not installed"
)


def lbrestore_binary() -> Path:
    """The lbrestore console script of this environment (verify wants ExecStart to exist)."""
    script = Path(sys.executable).parent / "lbrestore"
    assert script.is_file(), f"{script} missing: run `make setup`"
    return script


def render(folder: Path, edit: dict[str, tuple[str, str]] | None = None) -> list[Path]:
    """The units with ExecStart pointing at this environment's lbrestore, written to `folder`."""
    paths = []
    for name in UNITS:
        text = (UNITS_DIR / name).read_text().replace(INSTALLED, str(lbrestore_binary()))
        if edit and name in edit:
            old, new = edit[name]
            assert old in text
            text = text.replace(old, new)
        (folder / name).write_text(text)
        paths.append(folder / name)
    return paths


def verify(paths: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", *map(str, paths)],
        capture_output=True,
        text=True,
        check=False,
        cwd=paths[0].parent,
    )


@needs_systemd_analyze
def test_units_verify_without_any_warning(tmp_path: Path) -> None:
    result = verify(render(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == "", result.stdout + result.stderr


@needs_systemd_analyze
@pytest.mark.parametrize(
    ("unit", "old", "new", "complaint"),
    [
        ("lbrestore-prune.service", "UMask=0077", "UMaks=0077", "Unknown key 'UMaks'"),
        ("lbrestore-backup@.service", "Type=oneshot", "Type=oneshoot", "Failed to parse"),
        ("lbrestore-prune.timer", "OnCalendar=", "OnCalendar=nonsense ", "calendar specification"),
    ],
)
def test_the_check_would_catch_a_broken_unit(
    tmp_path: Path, unit: str, old: str, new: str, complaint: str
) -> None:
    result = verify(render(tmp_path, {unit: (old, new)}))
    assert complaint in result.stdout + result.stderr


def test_units_are_private_and_run_the_documented_commands() -> None:
    backup = (UNITS_DIR / "lbrestore-backup@.service").read_text()
    prune = (UNITS_DIR / "lbrestore-prune.service").read_text()
    for service in (backup, prune):
        assert "\nUMask=0077\n" in service
        assert "\nType=oneshot\n" in service
        assert "PrivateNetwork" not in service and "IPAddressDeny" not in service
    assert f"\nExecStart={INSTALLED} backup %i --qmp ${{LBRESTORE_QMP}} " in backup
    assert "\nEnvironmentFile=/etc/lbrestore/backup-%i.env\n" in backup
    assert "AF_INET AF_INET6" in backup  # remote QMP and NBD over TCP keep working
    assert f"\nExecStart={INSTALLED} prune --all\n" in prune
    for timer in ("lbrestore-backup@.timer", "lbrestore-prune.timer"):
        text = (UNITS_DIR / timer).read_text()
        assert "\nPersistent=true\n" in text and "\nWantedBy=timers.target\n" in text
    readme = (UNITS_DIR.parents[1] / "README.md").read_text()
    assert "## Scheduled backups and consolidation" in readme
    for name in UNITS:
        assert name in readme
    assert "prune --all" in readme and "crontab" in readme
