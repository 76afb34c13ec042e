"""The command line's contract: help on every command, version, usage errors."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from lbrestore import __version__
from lbrestore.cli import _register_commands, cli


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


def _all_commands() -> list[tuple[str, click.Command]]:
    _register_commands()
    return sorted(cli.commands.items())


def test_group_has_help() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "Live backup and restore" in result.stdout


@pytest.mark.parametrize("name", [name for name, _ in _all_commands()] or ["--help"])
def test_every_command_has_help_text(name: str) -> None:
    if name == "--help":
        return
    command = cli.commands[name]
    assert command.help and command.help.strip(), f"command {name} has no help text"
    result = run_cli(name, "--help")
    assert result.returncode == 0, result.stderr
