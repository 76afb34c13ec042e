"""CLI commands, one module per concern, each exposing COMMANDS, a list of click commands.

The group loads a command's module only when that command runs (or when help lists them all),
so `lbrestore import` never pays for asyncio, QMP or FUSE start-up. COMMAND_MODULES names the
module of every command; a test checks it against every module's COMMANDS.
"""

from __future__ import annotations

import importlib

import click

COMMAND_MODULES: dict[str, str] = {
    "init": "store_cmds",
    "list": "store_cmds",
    "info": "store_cmds",
    "import": "store_cmds",
    "backup": "backup_cmd",
    "mount": "mount_cmds",
    "umount": "mount_cmds",
    "restore": "restore_cmds",
    "verify": "restore_cmds",
    "merge": "merge_cmd",
    "prune": "prune_cmd",
    "check": "check_cmd",
    "forget": "forget_cmd",
    "ls": "guest_cmds",
    "extract": "guest_cmds",
    "diff": "guest_cmds",
}


def load_command(name: str) -> click.Command | None:
    """The command called `name`, importing only its module; None when there is no such command."""
    module_name = COMMAND_MODULES.get(name)
    if module_name is None:
        return None
    module = importlib.import_module(f"{__name__}.{module_name}")
    for command in module.COMMANDS:
        if command.name == name:
            return command
    raise LookupError(f"{module.__name__} has no command {name!r}")


class LazyGroup(click.Group):
    """A click group whose commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMAND_MODULES))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, cmd_name) or load_command(cmd_name)
