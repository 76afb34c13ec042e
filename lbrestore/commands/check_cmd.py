"""`lbrestore check [--repair] [--json]`: the store against its index (lbstore.check)."""

from __future__ import annotations

import click

from lbrestore.commands._common import echo_json, json_option, lock_timeout
from lbstore.check import CheckReport, check_store, repair_store


@click.command("check")
@click.option(
    "--repair",
    is_flag=True,
    help="Take every lock and repair what can be repaired without losing data: rebuild a "
    "lost index from the sidecars, remove tmp leftovers, move files nothing describes to "
    "lost+found/. Says what it cannot repair.",
)
@json_option
@click.pass_context
def check_command(ctx: click.Context, repair: bool, as_json: bool) -> None:
    """Check the store against its index: files, headers, backing names, qcow2 structure,
    sidecars, orphans, tmp leftovers. Only reads, unless --repair.

    Exit 0 when clean, 3 when problems are found (or left after --repair), 1 on error.
    """
    path = ctx.find_root().obj["store_path"]
    report = repair_store(path, lock_timeout=lock_timeout()) if repair else check_store(path)
    if as_json:
        echo_json(report.as_dict())
    else:
        _print_report(report, repair)
    ctx.exit(report.exit_code)  # 0 clean, 3 problems: the contract of check and verify


def _print_report(report: CheckReport, repair: bool) -> None:
    for action in report.repaired:
        click.echo(f"repaired: {action}")
    for loss in report.unrepaired:
        click.echo(f"NOT REPAIRED: {loss} (its files are kept in lost+found/)")
    for problem in report.problems:
        click.echo(problem.line())
    for work in report.in_progress:
        click.echo(f"in progress (not a problem): {work}")
    summary = f"checked {report.points_checked} restore points, {report.files_checked} files: "
    if report.unrepaired:
        click.echo(summary + f"{len(report.unrepaired)} restore point(s) could not be recovered")
    elif report.ok:
        click.echo(summary + ("store repaired and clean" if report.repaired else "clean"))
    else:
        left = "left after repair" if repair else "found"
        click.echo(summary + f"{len(report.problems)} problem(s) {left}")


COMMANDS = [check_command]
