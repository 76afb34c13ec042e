"""CLI commands, one module per concern. Each module exposes COMMANDS, a list of click commands."""

from __future__ import annotations

import importlib

import click

_MODULES: tuple[str, ...] = ()


def all_commands() -> list[click.Command]:
    """Every command of every command module, in a stable order."""
    commands: list[click.Command] = []
    for name in _MODULES:
        module = importlib.import_module(f"lbrestore.commands.{name}")
        commands.extend(module.COMMANDS)
    return commands
