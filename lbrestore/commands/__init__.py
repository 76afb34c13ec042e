"""CLI commands, one module per concern. Each public module exposes COMMANDS, a list of commands.

Modules are discovered, so adding a command module needs no edit here. Modules whose name starts
with an underscore hold shared helpers, not commands.
"""

from __future__ import annotations

import importlib
import pkgutil

import click


def all_commands() -> list[click.Command]:
    """Every command of every command module, in a stable order."""
    commands: list[click.Command] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        commands.extend(module.COMMANDS)
    return commands
