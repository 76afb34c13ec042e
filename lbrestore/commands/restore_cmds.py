"""Restore commands: restore (to a folder or an NBD server) and verify (checksums, boot proof)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from lbrestore.boottest import (
    DEFAULT_BOOT_MARKER,
    DEFAULT_BOOT_TIMEOUT,
    DEFAULT_MEMORY_MIB,
    BootDisk,
    BootMachine,
    BootResult,
    boot_test,
    compile_marker,
)
from lbrestore.commands._common import (
    FiniteFloat,
    echo_json,
    format_size,
    is_terminal,
    json_option,
    with_store,
)
from lbrestore.errors import AppError, UsageError
from lbrestore.restore import (
    FORMATS,
    RestoreResult,
    ordered_disks,
    restore_to_folder,
    restore_to_nbd,
)
from lbrestore.restore_target import check_target_folder, is_nbd_uri
from lbstore.model import RestorePoint
from lbstore.names import check_vm_name
from lbstore.store import Store
from lbstore.verify import VerifyReport, verify_store

DAMAGE_EXIT_CODE = 3


@contextlib.contextmanager
def _progress(label: str, total: int) -> Iterator[Callable[[int], None] | None]:
    """A transient progress bar on a terminal; nothing otherwise."""
    if not is_terminal():
        yield None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


# --- restore -----------------------------------------------------------------------------------


@click.command("restore")
@click.argument("address", metavar="VM@SPEC")
@click.option(
    "--to",
    "target",
    required=True,
    metavar="DIR|nbd://HOST:PORT/EXPORT",
    help="A folder for the disks and VM definition, or an NBD URI "
    "(nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH) to stream one disk to.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="qcow2",
    show_default=True,
    help="Image format of the restored disks (folder targets).",
)
@click.option("--name", "new_name", metavar="NEWNAME", help="Name of the restored VM.")
@click.option(
    "--disk",
    "disks",
    multiple=True,
    metavar="NAME",
    help="Restore only this disk (repeatable; an NBD target takes exactly one).",
)
@click.option("--force", is_flag=True, help="Restore into a folder that already has files.")
@click.option(
    "--no-verify",
    is_flag=True,
    help="Do not check clusters against their checksums while restoring (faster).",
)
@click.option(
    "--define",
    "define_uri",
    metavar="URI",
    help="Define the restored VM on this libvirt (qemu:///system, ...) from DIR/<name>.xml.",
)
@click.option("--start", is_flag=True, help="With --define: start the defined domain.")
@json_option
def restore_command(
    address: str,
    target: str,
    fmt: str,
    new_name: str | None,
    disks: tuple[str, ...],
    force: bool,
    no_verify: bool,
    define_uri: str | None,
    start: bool,
    as_json: bool,
) -> None:
    """Rebuild standalone disks of a restore point, plus a VM definition for a new host.

    With a folder, writes DIR/<disk>.qcow2 (or .raw): thin, no backing file, every cluster
    checked against its checksum, renamed into place only when complete. Also writes
    DIR/start-<name>.sh (a QEMU command line) and DIR/<name>.xml (libvirt) with a new UUID and
    new MAC addresses. With an NBD URI, streams the disk to the server's export.
    """
    if new_name is not None:
        check_vm_name(new_name)
    if start and define_uri is None:
        raise UsageError("--start needs --define URI")
    if is_nbd_uri(target):
        if new_name is not None or force or fmt != "qcow2" or define_uri is not None:
            raise UsageError("--name, --force, --format and --define apply to folder targets only")
    else:  # refused before the store is opened, and again by restore_to_folder
        store_path = click.get_current_context().find_root().obj["store_path"]
        check_target_folder(Path(target), force=force, store=store_path)
    result = _run_restore(
        address=address,
        target=target,
        fmt=fmt,
        new_name=new_name,
        disks=disks,
        force=force,
        verify=not no_verify,
    )
    defined = _define(result, define_uri, start) if define_uri is not None else None
    if as_json:
        echo_json({**result.as_dict(), "defined": defined})
        return
    _print_restore(result)
    if defined is not None:
        state = "defined and started" if start else "defined"
        click.echo(f"domain {defined['name']} {state} on {defined['uri']}")


def _define(result: RestoreResult, uri: str, start: bool) -> dict[str, Any]:
    """Define the restored VM's domain XML on `uri` (and start it): libvirt validates it.

    The disks stay where they were restored: the target libvirt must see them at those paths.
    QEMU runs as its own user, so the (private) folder is made enterable but not listable
    (0711); the disk files stay owner-only until libvirt hands them to QEMU's user."""
    from lbqemu import libvirt as lv

    host = result.definition
    if host is None or host.libvirt_xml_path is None:
        raise AppError("the restore wrote no libvirt domain XML to define")
    folder = host.libvirt_xml_path.parent
    try:
        xml = host.libvirt_xml_path.read_text(encoding="utf-8")
        folder.chmod(0o711)
    except OSError as exc:
        raise AppError(f"cannot prepare {folder} for libvirt: {exc}") from exc
    with lv.connection(uri) as conn:
        name = lv.define(conn, xml, start)
    return {"uri": uri, "name": name, "started": start}


@with_store(write=False)
def _run_restore(
    store: Store,
    address: str,
    target: str,
    fmt: str,
    new_name: str | None,
    disks: tuple[str, ...],
    force: bool,
    verify: bool,
) -> RestoreResult:
    point = store.resolve(address)
    names = ordered_disks(point, disks)
    total = sum(d.virtual_size for d in point.disks if d.name in names)
    with _progress(f"restoring {point.vm}@#{point.id}", total) as progress:
        if is_nbd_uri(target):
            return restore_to_nbd(
                store, point, target, disks=disks, progress=progress, verify=verify
            )
        return restore_to_folder(
            store,
            point,
            Path(target),
            fmt=fmt,
            name=new_name,
            force=force,
            disks=disks,
            progress=progress,
            verify=verify,
        )


def _print_restore(result: RestoreResult) -> None:
    point = result.point
    for disk in result.disks:
        click.echo(
            f"restored {point.vm}@#{point.id} disk {disk.name} -> {disk.target} "
            f"({format_size(disk.virtual_size)}, {format_size(disk.data_bytes)} of data, "
            f"{disk.verified_clusters} clusters verified)"
        )
    definition = result.definition
    if definition is None:
        return
    click.echo(f"start script: {definition.script_path}")
    if definition.libvirt_xml_path is not None:
        click.echo(f"libvirt XML: {definition.libvirt_xml_path}")
    click.echo(f"new identity: name {definition.name}, uuid {definition.uuid}")
    for nic, mac in definition.macs.items():
        click.echo(f"  {nic}: new MAC {mac}")
    for note in definition.notes:
        click.echo(f"note: {note}")


# --- verify ------------------------------------------------------------------------------------


@click.command("verify")
@click.argument("address", metavar="[VM[@SPEC]]", required=False)
@click.option(
    "--sample",
    "sample_percent",
    type=FiniteFloat(0, 100, min_open=True),
    metavar="PERCENT",
    help="Check a random share of the stored clusters (structure is always checked in full).",
)
@click.option("--boot", is_flag=True, help="Also boot the restore point in a throwaway QEMU.")
@click.option(
    "--boot-timeout",
    type=FiniteFloat(0, min_open=True),
    default=DEFAULT_BOOT_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="How long the guest may take to print its boot marker.",
)
@click.option(
    "--boot-marker",
    "--boot-pattern",
    "boot_marker",
    default=DEFAULT_BOOT_MARKER,
    show_default=True,
    metavar="REGEX",
    help="Regular expression the serial console must show for a successful boot.",
)
@click.option(
    "--boot-accel",
    type=click.Choice(["auto", "kvm", "tcg"]),
    default="auto",
    show_default=True,
    help="Accelerator of the boot test (auto: KVM when available, and TCG when KVM cannot "
    "run the guest).",
)
@json_option
def verify_command(
    address: str | None,
    sample_percent: float | None,
    boot: bool,
    boot_timeout: float,
    boot_marker: str,
    boot_accel: str,
    as_json: bool,
) -> int:
    """Re-read stored clusters and check their checksums; optionally prove a point boots.

    Without an argument the whole store is checked; with VM, all of its restore points; with
    VM@SPEC, the files of that point's chains. Every restore point whose view includes a
    damaged file is listed, and the exit code is 3. --boot boots VM@SPEC (VM alone: its latest
    point) with -snapshot and no network, and succeeds when the serial console matches
    --boot-marker within --boot-timeout; a failed boot also exits 3. A guest that QEMU stops
    (KVM internal error, kernel panic) fails at once with QEMU's message; with the default
    accelerator, a guest KVM cannot run is booted again under TCG. UEFI guests boot with OVMF.
    """
    if boot:
        if address is None:
            raise UsageError("--boot needs a VM or VM@SPEC to boot")
        compile_marker(boot_marker)
    report, boot_result = _run_verify(
        address=address,
        sample_percent=sample_percent,
        boot=boot,
        boot_options={"marker": boot_marker, "timeout": boot_timeout, "accel": boot_accel},
    )
    if as_json:
        data = report.as_dict()
        data["boot"] = boot_result.as_dict() if boot_result else None
        echo_json(data)
    else:
        _print_report(report)
        if boot_result is not None:
            _print_boot(boot_result)
    booted = boot_result is None or boot_result.booted
    return 0 if report.ok and booted else DAMAGE_EXIT_CODE


@with_store(write=False)
def _run_verify(
    store: Store,
    address: str | None,
    sample_percent: float | None,
    boot: bool,
    boot_options: dict[str, Any],
) -> tuple[VerifyReport, BootResult | None]:
    point: RestorePoint | None = None  # checksums of this point's chains only
    vm: str | None = None
    to_boot: RestorePoint | None = None
    if address is not None and "@" in address:
        point = store.resolve(address)
        to_boot = point if boot else None
    elif address is not None:
        vm = check_vm_name(address)
        if boot:
            to_boot = store.resolve(f"{vm}@latest")
    total = _bytes_to_check(store, point, vm, sample_percent)
    with _progress("verifying", total) as progress:
        report = verify_store(
            store,
            vm=vm,
            point=point,
            sample_percent=sample_percent,
            progress=progress,
        )
    boot_result = _boot(store, to_boot, boot_options) if to_boot is not None else None
    return report, boot_result


def _bytes_to_check(
    store: Store, point: RestorePoint | None, vm: str | None, sample: float | None
) -> int:
    """Roughly what verification will read, for the progress bar."""
    if point is not None:
        files = {
            (p.id, d.name): p.disk(d.name) for d in point.disks for p in store.chain(point, d.name)
        }
        total = sum(r.stored_bytes for r in files.values() if r is not None)
    else:
        total = sum(p.stored_bytes for p in store.restore_points(vm))
    return int(total * (sample or 100) / 100)


def _boot(store: Store, point: RestorePoint, options: dict[str, Any]) -> BootResult:
    """Boot the point's disks (chain top files, under -snapshot) and watch for the marker.

    QEMU follows the files' backing names itself: each chain is opened through a view first,
    which refuses a header naming anything but the index's files before QEMU sees it.
    """
    for name in ordered_disks(point):
        store.view(point, name).close()
    definition = point.definition or {}
    captured = {d.get("name"): d for d in definition.get("disks") or []}
    disks = [
        BootDisk(
            name, store.file_path(point, name), "qcow2", (captured.get(name) or {}).get("device")
        )
        for name in ordered_disks(point)
    ]
    machine = str(definition.get("machine") or "q35")
    vm = BootMachine(
        machine="pc" if "q35" not in machine and "pc" in machine else "q35",
        memory_mib=int(definition.get("memory_mib") or DEFAULT_MEMORY_MIB),
        uefi=definition.get("firmware") == "uefi",
    )
    return boot_test(
        disks,
        marker=options["marker"],
        timeout=options["timeout"],
        vm=vm,
        accelerator=None if options["accel"] == "auto" else options["accel"],
    )


def _print_report(report: VerifyReport) -> None:
    sample = f" (sample {report.sample_percent:g}%)" if report.sample_percent else ""
    click.echo(
        f"checked {report.files_checked} files, {report.clusters_checked} clusters, "
        f"{format_size(report.bytes_checked)}{sample}"
    )
    for damage in report.damaged_files:
        click.echo(
            f"damaged file {damage.path} ({damage.vm}@#{damage.point_id} disk {damage.disk}, "
            f"{damage.damaged_clusters} clusters):"
        )
        for problem in damage.problems:
            click.echo(f"  {problem}")
    for damaged in report.damaged_points:
        created = damaged.point.created.strftime("%Y-%m-%d %H:%M:%S")
        files = ", ".join(f.path.name for f in damaged.files)
        click.echo(
            f"DAMAGED restore point {damaged.point.vm}@#{damaged.point.id} ({created} UTC): "
            f"reads {files}"
        )
    if report.ok:
        click.echo("no damage found")
    else:
        click.echo(f"damage found: {len(report.damaged_points)} restore points affected")


def _print_boot(result: BootResult) -> None:
    for attempt in result.earlier:
        click.echo(
            f"boot: {attempt.accelerator.upper()} (cpu {attempt.cpu}) could not run the guest "
            f"({attempt.seconds:.1f} s): {attempt.reason}"
        )
    if result.earlier:
        click.echo(f"boot: retrying under {result.accelerator.upper()}")
    accel = f"{result.accelerator.upper()}, cpu {result.cpu}"
    if result.firmware == "uefi":
        accel += ", UEFI"
    if result.booted:
        click.echo(
            f"boot: OK in {result.seconds:.1f} s ({accel}): console matched {result.marker!r}"
        )
        return
    click.echo(f"boot: FAILED ({accel}, {result.seconds:.1f} s): {result.reason}")
    tail = result.console_tail.strip()
    click.echo("console tail:" if tail else "console: (nothing printed)")
    for line in tail.splitlines()[-20:]:
        click.echo(f"  {line}")


COMMANDS = [restore_command, verify_command]
