"""`lbrestore backup --libvirt` (one domain, or --all of them) and `lbrestore forget`."""

from __future__ import annotations

import asyncio

import click

from lbrestore.commands._common import echo_json, is_terminal, with_store
from lbrestore.commands.backup_cmd import progress_hooks, report_summary
from lbrestore.libvirt_backup import LibvirtBackupOptions, run_libvirt_backup
from lbstore.store import Store

__all__ = ["LibvirtBackupOptions", "backup_all", "backup_one"]


@with_store(write=True)
def backup_one(store: Store, vm: str, options: LibvirtBackupOptions, as_json: bool) -> None:
    """One domain's backup, the store opened (and its VM locked) for it."""
    with progress_hooks(is_terminal() and not as_json) as hooks:
        summary = asyncio.run(run_libvirt_backup(store, options, hooks))
    report_summary(summary, as_json)


def backup_all(
    options: LibvirtBackupOptions,
    jobs: int,
    match: str | None,
    include_inactive: bool,
    as_json: bool,
) -> None:
    """Every domain, `jobs` at a time: one line each; exit code 1 if any failed."""
    from lbrestore.commands._common import lock_timeout
    from lbrestore.libvirt_all import backup_domains

    ctx = click.get_current_context()
    store_path = ctx.find_root().obj["store_path"]
    results = backup_domains(
        store_path, options, jobs, include_inactive, lock_timeout(), match=match
    )
    if as_json:
        echo_json([r.to_json() for r in results])
    else:
        for result in results:
            click.echo(result.line(), err=result.error is not None)
    failed = [r.vm for r in results if r.error is not None]
    if failed:
        ctx.exit(1)


COMMANDS: list[click.Command] = []
