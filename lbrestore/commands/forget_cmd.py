"""`lbrestore forget`: remove this store's bitmaps and checkpoints from a VM."""

from __future__ import annotations

import asyncio

import click

from lbrestore.commands._common import FiniteFloat, echo_json, json_option, with_store
from lbrestore.errors import UsageError
from lbrestore.forget import forget_libvirt, forget_qmp
from lbstore.names import check_vm_name
from lbstore.store import Store


@click.command("forget")
@click.argument("vm")
@click.option("--qmp", metavar="unix:PATH|tcp:HOST:PORT", help="QEMU's QMP socket.")
@click.option("--libvirt", "libvirt_uri", metavar="URI", help="The VM is this libvirt's domain.")
@click.option(
    "--connect-timeout",
    type=FiniteFloat(min=0),
    default=10.0,
    show_default=True,
    help="Seconds to keep retrying the QMP connection.",
)
@json_option
@with_store(write=True)
def forget_command(
    store: Store,
    vm: str,
    qmp: str | None,
    libvirt_uri: str | None,
    connect_timeout: float,
    as_json: bool,
) -> None:
    """Remove this store's dirty bitmaps (and libvirt checkpoints) from a VM's disks.

    For a store that is retired: otherwise its bitmaps stay in the disk images and record every
    write for good. Other stores' and other tools' bitmaps are left alone. The restore points
    stay; the VM's next backup into this store is a resync.
    """
    check_vm_name(vm)
    if (qmp is None) == (libvirt_uri is None):
        raise UsageError("give either --qmp ADDRESS or --libvirt URI")
    if libvirt_uri is not None:
        report = forget_libvirt(store, vm, libvirt_uri)
    else:
        assert qmp is not None
        report = asyncio.run(forget_qmp(store, vm, qmp, connect_timeout))
    if as_json:
        echo_json(report.to_json())
        return
    click.echo(f"{vm}: {len(report.removed)} removed" + "".join(f"\n  {r}" for r in report.removed))
    for problem in report.problems:
        click.echo(f"  warning: {problem}", err=True)


COMMANDS = [forget_command]
