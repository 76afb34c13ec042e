"""`lbrestore prune VM|--all`: thin out restore points by a retention policy (borg's semantics).

The policy comes from the --keep-* options, else from the configuration file
(STORE/lbrestore.toml or --config; lbrestore.retention_config). The plan is lbstore.retention's;
the removals are merges (lbstore.prune), each committed on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any

import click

from lbrestore.commands._common import (
    echo_json,
    format_size,
    is_terminal,
    json_option,
    with_store,
)
from lbrestore.errors import KNOWN_ERRORS, UsageError
from lbrestore.retention_config import CONFIG_NAME, RetentionConfig, load_config
from lbstore.errors import AddressError
from lbstore.model import RestorePoint
from lbstore.names import check_vm_name
from lbstore.prune import PruneResult, execute, plan_vm
from lbstore.retention import COUNT_RULES, Decision, Policy, parse_duration
from lbstore.store import Store

NO_RULE = (
    "no keep rule: give --keep-last/-hourly/-daily/-weekly/-monthly/-yearly/-within or a policy "
    "in the configuration file (a prune without rules would remove all but the newest point)"
)


def _keep_options(func: Any) -> Any:
    """Add --keep-RULE N for every counting rule and --keep-within DURATION."""
    periods = {"hourly": "hours", "daily": "days", "weekly": "ISO weeks", "monthly": "months"}
    periods["yearly"] = "years"
    for rule in reversed(COUNT_RULES):
        if rule == "last":
            text = "Keep the N newest points."
        else:
            text = f"Keep the newest point of each of the N newest {periods[rule]} with points."
        func = click.option(f"--keep-{rule}", f"keep_{rule}", type=int, metavar="N", help=text)(
            func
        )
    return click.option(
        "--keep-within",
        "keep_within",
        metavar="DUR",
        help="Keep every point newer than now - DUR (36H, 2d, 3w, 1m = 31d, 1y = 365d).",
    )(func)


def _command_line_policy(keep_within: str | None, counts: dict[str, int | None]) -> Policy:
    """The policy the --keep-* options give (empty when none was given); values checked.

    `counts` maps keep_RULE to the option's value (None when not given).
    """
    for key, value in counts.items():
        if value is not None and value < 1:
            option = "--" + key.replace("_", "-")
            raise UsageError(f"{option} {value}: keep values must be at least 1")
    within = parse_duration(keep_within, "--keep-within") if keep_within is not None else None
    return Policy(keep_within=within, **counts)


def _load_config(config: Path | None) -> RetentionConfig:
    """--config FILE (must exist), else STORE/lbrestore.toml when present."""
    if config is not None:
        return load_config(config, required=True)
    store_path = click.get_current_context().find_root().obj["store_path"]
    return load_config(Path(store_path) / CONFIG_NAME, required=False)


@click.command("prune")
@click.argument("vm", required=False)
@click.option("--all", "all_vms", is_flag=True, help="Prune every VM of the store.")
@_keep_options
@click.option(
    "--config",
    "config",
    type=click.Path(path_type=Path, dir_okay=False),
    help=f"Retention configuration (default: STORE/{CONFIG_NAME} when it exists).",
)
@click.option("--dry-run", is_flag=True, help="Only list every point and the rule keeping it.")
@json_option
def prune_command(
    vm: str | None,
    all_vms: bool,
    config: Path | None,
    dry_run: bool,
    as_json: bool,
    keep_within: str | None,
    **counts: int | None,
) -> None:
    """Remove restore points a retention policy does not keep (borg's prune rules).

    Rules apply in the order within, last, hourly, daily, weekly, monthly, yearly; each keeps the
    newest point of its N newest periods (local time, ISO weeks) and does not count points an
    earlier rule keeps. The newest point is never removed. Removing is a series of merges, each
    committed on its own. --keep-* options replace the configured policy for every VM.
    """
    if (vm is None) == (not all_vms):
        raise UsageError("give either a VM or --all")
    if vm is not None and "@" in vm:
        raise UsageError(f"{vm!r}: prune takes a VM name, not a restore point address")
    cli_policy = _command_line_policy(keep_within, counts)
    settings = _load_config(config)
    if cli_policy.is_empty and settings.default is None and not settings.vms:
        raise UsageError(NO_RULE)
    if vm is not None and cli_policy.is_empty and settings.policy_for(vm) is None:
        raise UsageError(f"{NO_RULE}; the configuration has no policy for {vm}")
    job = PruneJob(cli_policy, settings, dry_run, as_json, datetime.now(UTC))
    if vm is not None:
        reports = [_prune_vm(job, vm=vm, keep_going=False)]
    else:
        reports = [_prune_vm_keep_going(job, name) for name in _vm_names()]
    if as_json:
        echo_json({"dry_run": dry_run, "vms": reports})
    if any(r["error"] is not None for r in reports):
        raise click.exceptions.Exit(1)


@dataclass(frozen=True)
class PruneJob:
    """What one `prune` invocation applies to each VM."""

    cli_policy: Policy
    settings: RetentionConfig
    dry_run: bool
    as_json: bool
    now: datetime

    def policy_for(self, vm: str) -> Policy | None:
        """The command line's policy when it has rules, else the configured one (or None)."""
        return self.cli_policy if not self.cli_policy.is_empty else self.settings.policy_for(vm)


@with_store(write=False)
def _vm_names(store: Store) -> list[str]:
    return store.vms()


def _prune_vm(job: PruneJob, vm: str, keep_going: bool) -> dict[str, Any]:
    """One VM, in a store session of its own: a dry run only reads; a prune takes that VM's
    writer lock (writers of other VMs go on meanwhile)."""
    run = _plan_only if job.dry_run else _plan_and_remove
    report: dict[str, Any] = run(job=job, vm=vm, keep_going=keep_going)
    return report


def _prune_vm_keep_going(job: PruneJob, vm: str) -> dict[str, Any]:
    """`_prune_vm` for --all: a VM that cannot even be opened (busy) is reported, not raised."""
    try:
        return _prune_vm(job, vm=vm, keep_going=True)
    except KNOWN_ERRORS as exc:
        click.echo(f"lbrestore: {vm}: {exc}", err=True)
        if not job.as_json:
            click.echo(f"{vm}: FAILED: {exc}")
        return {"vm": vm, "policy": None, "points": [], "error": str(exc), "skipped": False}


@with_store(write=False)
def _plan_only(store: Store, job: PruneJob, vm: str, keep_going: bool) -> dict[str, Any]:
    return _prune_in(store, job, vm, keep_going)


@with_store(write=True)
def _plan_and_remove(store: Store, job: PruneJob, vm: str, keep_going: bool) -> dict[str, Any]:
    return _prune_in(store, job, vm, keep_going)


def _prune_in(store: Store, job: PruneJob, vm: str, keep_going: bool) -> dict[str, Any]:
    """Plan and (unless dry) carry out the prune of one VM; its report for --json."""
    check_vm_name(vm)
    if not store.restore_points(vm):
        vms = store.vms()
        known = f"VMs in this store: {', '.join(vms)}" if vms else "the store is empty"
        raise AddressError(vm, f"no VM named {vm!r} has restore points; {known}")
    policy = job.policy_for(vm)
    tz = job.settings.timezone
    if policy is None:
        if not job.as_json:
            click.echo(f"{vm}: no retention policy in the configuration; nothing removed")
        return {"vm": vm, "policy": None, "points": [], "error": None, "skipped": True}
    result = plan_vm(store, vm, policy, job.now, tz)
    error = None
    if job.dry_run:
        if not job.as_json:
            _echo_plan(result, policy, tz)
    else:
        try:
            _remove(store, result)
        except KNOWN_ERRORS as exc:
            if not keep_going:
                raise
            error = str(exc)
            click.echo(f"lbrestore: {vm}: {exc}", err=True)
    if not job.as_json:
        click.echo(_summary(result, job.dry_run, error))
    return _report(result, policy, tz, job.dry_run, error)


def _remove(store: Store, result: PruneResult) -> None:
    """Carry out the plan's removals, with a progress bar on stderr when it is a terminal."""
    if not result.planned:
        return
    if not is_terminal():
        execute(store, result)
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"pruning {result.vm}", total=len(result.planned))

        def advance(done: int, total: int, point: RestorePoint) -> None:
            label = f"pruning {result.vm}: merging #{point.id}"
            bar.update(task, completed=done, description=label)

        execute(store, result, advance)


def _local(decision: Decision, tz: tzinfo | None) -> str:
    return decision.created.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S %z")


def _echo_plan(result: PruneResult, policy: Policy, tz: tzinfo | None) -> None:
    click.echo(f"{result.vm}: {policy.describe()}")
    for decision in result.decisions:
        action = "keep  " if decision.keep else "remove"
        rule = f"  {decision.label}" if decision.keep else ""
        click.echo(f"  #{decision.point_id:<6} {_local(decision, tz)}  {action}{rule}")


def _summary(result: PruneResult, dry_run: bool, error: str | None) -> str:
    if dry_run:
        return f"{result.vm}: would keep {result.kept}, remove {len(result.planned)} (dry run)"
    line = (
        f"{result.vm}: kept {result.kept}, removed {len(result.removed)}, "
        f"freed {format_size(result.freed_bytes)} ({result.freed_bytes} bytes)"
    )
    if error is not None:
        line += f"; FAILED after {len(result.removed)} of {len(result.planned)} removals"
    return line


def _report(
    result: PruneResult, policy: Policy, tz: tzinfo | None, dry_run: bool, error: str | None
) -> dict[str, Any]:
    removed = set(result.removed)
    return {
        "vm": result.vm,
        "policy": policy.describe(),
        "points": [
            {
                "id": d.point_id,
                "created": d.created.isoformat(),
                "local_time": _local(d, tz),
                "rule": d.rule,
                "number": d.number,
                "oldest": d.oldest,
                "removed": d.point_id in removed,
            }
            for d in result.decisions
        ],
        "kept": result.kept,
        "planned_removals": len(result.planned),
        "removed": len(result.removed),
        "freed_bytes": result.freed_bytes,
        "copied_bytes": result.copied_bytes,
        "error": error,
        "skipped": False,
    }


COMMANDS = [prune_command]
