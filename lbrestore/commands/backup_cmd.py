"""`lbrestore backup`: a live backup of a running VM into the store."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from lbqemu.nbd import Run
from lbrestore.backup import BackupHooks, BackupOptions, BackupSummary, run_backup
from lbrestore.commands._common import (
    FiniteFloat,
    echo_json,
    format_size,
    is_terminal,
    json_option,
    with_store,
)
from lbrestore.errors import UsageError
from lbstore.names import check_vm_name
from lbstore.store import Store

WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def _warn_qmp_tcp(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """QMP has no authentication: over TCP, whoever reaches the port controls the VM."""
    if value is not None and value.startswith("tcp:"):
        click.echo(
            f"lbrestore: warning: QMP over TCP ({value}) has no authentication or encryption: "
            "anyone who can reach it controls the VM; prefer unix:PATH",
            err=True,
        )
    return value


def _check_scratch_dir(
    ctx: click.Context, param: click.Parameter, value: Path | None
) -> Path | None:
    """A scratch folder where files can really be created (not /proc, /sys, a read-only
    mount), refused before the store is opened or QEMU is touched."""
    if value is None:
        return None
    try:
        with tempfile.TemporaryFile(dir=value, prefix=".lbrestore-probe-"):
            pass
    except OSError as exc:
        raise UsageError(
            f"--scratch-dir {value}: cannot create files there ({exc.strerror or exc})"
        ) from None
    return value


def _warn_insecure_nbd(nbd: str | None, insecure_tcp: bool) -> None:
    if not insecure_tcp or nbd is None or not nbd.startswith("tcp:"):
        return
    host = nbd[4:].rpartition(":")[0]
    where = "on every interface" if host in WILDCARD_HOSTS else f"on {host}"
    click.echo(
        f"lbrestore: warning: --insecure-tcp: the disks are exported over NBD {where} without "
        "TLS or authentication: anyone who can reach it reads them, unencrypted",
        err=True,
    )


@contextmanager
def progress_hooks(enabled: bool) -> Iterator[BackupHooks]:
    """A rich progress bar on a terminal (stderr); no hooks otherwise."""
    if not enabled:
        yield BackupHooks()
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as progress:
        tasks: dict[str, object] = {}

        def plan(disk: str, runs: list[Run]) -> None:
            total = sum(r.length for r in runs)
            tasks[disk] = progress.add_task(disk, total=total or 1)

        def advance(disk: str, offset: int, length: int) -> None:
            if disk in tasks:
                progress.advance(tasks[disk], length)  # type: ignore[arg-type]

        yield BackupHooks(plan=plan, progress=advance)


def _print_summary(summary: BackupSummary) -> None:
    click.echo(
        f"restore point #{summary.point_id} of {summary.vm}: {summary.kind}, "
        f"{format_size(summary.bytes_read)} read, {format_size(summary.bytes_stored)} stored "
        f"in {summary.duration:.1f} s ({format_size(int(summary.throughput))}/s)"
    )
    for disk in summary.disks:
        why = f" ({disk.reason})" if disk.reason else ""
        zeros = f", {format_size(disk.bytes_zero)} zeroed" if disk.bytes_zero else ""
        click.echo(
            f"  {disk.name}: {disk.mode}{why}, {format_size(disk.bytes_read)} read{zeros}, "
            f"{format_size(disk.bytes_stored)} stored"
        )
    freeze = summary.guest_freeze
    if freeze is not None and freeze["frozen"]:
        click.echo(f"  guest filesystems frozen ({freeze['filesystems']}) around the snapshot")
    elif freeze is not None:
        click.echo(f"  warning: guest not frozen, crash-consistent: {freeze['refused']}", err=True)
    for problem in summary.problems:
        click.echo(f"  warning: {problem}", err=True)


@click.command("backup")
@click.argument("vm", required=False)
@click.option(
    "--qmp",
    "qmp",
    metavar="unix:PATH|tcp:HOST:PORT",
    callback=_warn_qmp_tcp,
    help="QEMU's QMP socket (tcp: has no authentication: a warning is printed).",
)
@click.option(
    "--libvirt",
    "libvirt_uri",
    metavar="URI",
    help="Back up the libvirt domain VM through libvirt (qemu:///system, qemu+ssh://HOST/system).",
)
@click.option(
    "--all",
    "all_domains",
    is_flag=True,
    help="With --libvirt: every running domain (one summary line each).",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1, max=64),
    default=2,
    show_default=True,
    help="With --all: how many domains are backed up at the same time.",
)
@click.option(
    "--match",
    "match",
    metavar="GLOB",
    help="With --all: only the domains whose name matches GLOB (shell pattern, e.g. 'web-*').",
)
@click.option(
    "--include-inactive",
    is_flag=True,
    help="With --all: also the defined domains that are not running (their disks read directly).",
)
@click.option(
    "--connect-timeout",
    type=FiniteFloat(min=0),
    default=10.0,
    show_default=True,
    help="Seconds to keep retrying the QMP connection (QEMU may still be starting).",
)
@click.option(
    "--disk",
    "disks",
    multiple=True,
    metavar="NAME",
    help="Back up only this disk (device id, else node name; target dev with --libvirt); "
    "repeatable. Default: all disks.",
)
@click.option("--full", is_flag=True, help="Read every disk whole (a new full restore point).")
@click.option(
    "--qga",
    metavar="unix:PATH",
    help="qemu-guest-agent socket: freeze guest filesystems around the snapshot instant.",
)
@click.option(
    "--qga-timeout",
    type=FiniteFloat(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds to wait for the guest agent.",
)
@click.option(
    "--nbd",
    metavar="unix:PATH|tcp:HOST:PORT",
    help="Where QEMU exports the disks over NBD (default: a private unix socket).",
)
@click.option(
    "--tls-creds",
    type=click.Path(file_okay=False, path_type=Path),
    help="x509 credentials folder (ca-cert.pem, server-*.pem, client-*.pem) for NBD over TCP.",
)
@click.option(
    "--insecure-tcp",
    is_flag=True,
    help="Allow NBD over TCP without TLS (disk contents travel unencrypted).",
)
@click.option(
    "--scratch-dir",
    type=click.Path(file_okay=False, path_type=Path),
    callback=_check_scratch_dir,
    help="Where the fleecing scratch files go (QEMU must be able to write there).",
)
@json_option
def backup_command(
    vm: str | None,
    qmp: str | None,
    libvirt_uri: str | None,
    all_domains: bool,
    jobs: int,
    match: str | None,
    include_inactive: bool,
    connect_timeout: float,
    disks: tuple[str, ...],
    full: bool,
    qga: str | None,
    qga_timeout: float,
    nbd: str | None,
    tls_creds: Path | None,
    insecure_tcp: bool,
    scratch_dir: Path | None,
    as_json: bool,
) -> None:
    """Back up a running VM: a point-in-time view of its disks, only changed clusters pulled.

    The first backup of a disk reads it whole; later ones read what changed since the previous
    restore point (QEMU's persistent dirty bitmaps, or libvirt's checkpoints with --libvirt).
    When a bitmap cannot be trusted (QEMU crashed, disk resized, ...) the disk is resynced:
    read whole, only changed clusters stored.
    """
    _check_target(vm, qmp, libvirt_uri, all_domains, match, qga)
    _warn_insecure_nbd(nbd, insecure_tcp)
    if libvirt_uri is not None:
        from lbrestore.commands import libvirt_cmds

        lv_options = libvirt_cmds.LibvirtBackupOptions(
            vm=check_vm_name(vm) if vm else "",
            uri=libvirt_uri,
            disks=disks,
            full=full,
            nbd=nbd,
            tls_creds=str(tls_creds) if tls_creds else None,
            insecure_tcp=insecure_tcp,
            scratch_dir=scratch_dir,
        )
        if all_domains:
            libvirt_cmds.backup_all(lv_options, jobs, match, include_inactive, as_json)
        else:
            libvirt_cmds.backup_one(vm=lv_options.vm, options=lv_options, as_json=as_json)
        return
    assert vm is not None and qmp is not None
    options = BackupOptions(
        vm=check_vm_name(vm),
        qmp=qmp,
        connect_timeout=connect_timeout,
        disks=disks,
        full=full,
        qga=qga,
        qga_timeout=qga_timeout,
        nbd=nbd,
        tls_creds=str(tls_creds) if tls_creds else None,
        insecure_tcp=insecure_tcp,
        scratch_dir=scratch_dir,
    )
    _backup_qmp(vm=options.vm, options=options, as_json=as_json)


def _check_target(
    vm: str | None,
    qmp: str | None,
    libvirt_uri: str | None,
    all_domains: bool,
    match: str | None,
    qga: str | None,
) -> None:
    """Exactly one way to reach the VM; --all only with --libvirt and without a VM name."""
    if (qmp is None) == (libvirt_uri is None):
        raise UsageError("give either --qmp ADDRESS or --libvirt URI")
    if all_domains and libvirt_uri is None:
        raise UsageError("--all needs --libvirt URI")
    if not all_domains and match is not None:
        raise UsageError("--match works with --all only")
    if all_domains and vm is not None:
        raise UsageError("give either a VM name or --all, not both")
    if not all_domains and vm is None:
        raise UsageError("missing the VM name (or --all with --libvirt)")
    if libvirt_uri is not None and qga is not None:
        raise UsageError("--qga works with --qmp only (libvirt owns the guest agent's socket)")


@with_store(write=True)
def _backup_qmp(store: Store, vm: str, options: BackupOptions, as_json: bool) -> None:
    with progress_hooks(is_terminal() and not as_json) as hooks:
        summary = asyncio.run(run_backup(store, options, hooks))
    report_summary(summary, as_json)


def report_summary(summary: BackupSummary, as_json: bool) -> None:
    if as_json:
        echo_json(summary.to_json())
    else:
        _print_summary(summary)


COMMANDS = [backup_command]
