"""The `lbrestore` command line: one group, one error handler, commands registered from modules.

Library code raises; only this module turns known errors into one line and an exit code.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from lbrestore import __version__
from lbrestore.commands import LazyGroup
from lbrestore.errors import KNOWN_ERRORS

DEFAULT_STORE = Path.home() / ".local" / "share" / "lbrestore"


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lbrestore")
@click.option(
    "--store",
    "store_path",
    type=click.Path(path_type=Path, readable=False),  # the store says why it cannot be used
    envvar="LBRESTORE_STORE",
    default=DEFAULT_STORE,
    show_default="$LBRESTORE_STORE or ~/.local/share/lbrestore",
    help="The store folder.",
)
@click.pass_context
def cli(ctx: click.Context, store_path: Path) -> None:
    """Live backup and restore of KVM/QEMU virtual machines."""
    ctx.obj = {"store_path": store_path}


def one_line(exc: click.ClickException) -> str:
    """Click's message in one line; a usage error points at the command's --help."""
    message = " ".join(exc.format_message().split())
    if isinstance(exc, click.UsageError) and exc.ctx is not None:
        message += f" (see '{exc.ctx.command_path} --help')"
    return message


def _run(argv: list[str] | None) -> object:
    """Parse and invoke the command. Not click's `main`: on Ctrl-C it prints a blank line
    before its Abort, and ours prints exactly one line."""
    args = sys.argv[1:] if argv is None else argv
    try:
        with cli.make_context("lbrestore", list(args)) as ctx:
            return cli.invoke(ctx)
    except click.exceptions.Exit as exc:
        return exc.exit_code


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI and map known errors to one line and an exit code."""
    try:
        status = _run(argv)
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("lbrestore: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"lbrestore: {one_line(exc)}", err=True)
        sys.exit(exc.exit_code)
    except KNOWN_ERRORS as exc:
        click.echo(f"lbrestore: {exc}", err=True)
        sys.exit(getattr(exc, "exit_code", 1))
    except BrokenPipeError:
        # Output piped into e.g. `head`: stop quietly, as POSIX tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
    sys.exit(status if isinstance(status, int) else 0)
