"""The command line's contract: help on every command, version, usage errors, lazy loading."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

from lbrestore import __version__, commands
from lbrestore.commands import COMMAND_MODULES, load_command


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbrestore", *args], capture_output=True, text=True, check=False
    )


def test_version_prints_the_package_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert __version__ in result.stdout


def test_unknown_command_is_a_usage_error_without_traceback() -> None:
    result = run_cli("no-such-command")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "no-such-command" in result.stderr


def test_group_help_lists_every_command() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "Live backup and restore" in result.stdout
    for name in COMMAND_MODULES:
        assert f"  {name} " in result.stdout, f"{name} missing from --help"


def test_every_module_command_is_registered_under_its_module() -> None:
    """A command added to a module but not to COMMAND_MODULES would be unreachable."""
    found: dict[str, str] = {}
    for info in pkgutil.iter_modules(commands.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"lbrestore.commands.{info.name}")
        for command in module.COMMANDS:
            assert command.name is not None
            found[command.name] = info.name
    assert found == COMMAND_MODULES


@pytest.mark.parametrize("name", sorted(COMMAND_MODULES))
def test_every_command_has_help_text(name: str) -> None:
    command = load_command(name)
    assert command is not None
    assert command.help and command.help.strip(), f"command {name} has no help text"
    result = run_cli(name, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage: lbrestore " + name in result.stdout


def test_a_store_command_does_not_load_qemu_or_fuse_code() -> None:
    probe = (
        "import sys; from lbrestore.cli import main\n"
        "try:\n    main(['list', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lbqemu', 'lbfuse', 'mfusepy')"
        " and m not in ('lbqemu', 'lbfuse', 'lbqemu.errors', 'lbfuse.errors')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_list_loads_neither_the_data_path_nor_sqlite_utils(tmp_path: Path) -> None:
    """`list` reads only the index: no qcow2 code (construct), no ingest, no sqlite_utils."""
    store = tmp_path / "store"
    assert run_cli("--store", str(store), "init").returncode == 0
    probe = (
        "import sys; from lbrestore.cli import main\n"
        f"try:\n    main(['--store', {str(store)!r}, 'list'])\nexcept SystemExit:\n    pass\n"
        "heavy = ('sqlite_utils', 'construct', 'lbstore.ingest', 'lbstore.qcow2', 'asyncio')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"
