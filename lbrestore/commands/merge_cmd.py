"""`lbrestore merge VM@SPEC`: remove one restore point; every other point reads as before."""

from __future__ import annotations

import click

from lbrestore.commands._common import echo_json, format_size, json_option, with_store
from lbrestore.errors import UsageError
from lbstore.errors import AddressError
from lbstore.merge import MergeResult, merge_point
from lbstore.names import check_vm_name
from lbstore.store import Store


@click.command("merge")
@click.argument("address", metavar="VM@SPEC")
@json_option
def merge_command(address: str, as_json: bool) -> None:
    """Remove the restore point VM@SPEC, folding its data into the next point.

    Every other restore point reads exactly as before. The point's clusters that the next
    point lacks are copied into it (or, when cheaper, the next point's clusters into this
    point's file, which then takes the next point's place); the oldest full hands its role to
    the next point; the newest point is simply dropped (the VM's next backup resyncs).
    Mounts and restores that have the point open keep reading it until they finish.
    """
    vm, at, spec = address.partition("@")
    check_vm_name(vm)  # a bad name is a usage error (exit 2), as everywhere
    if not at or not spec:  # `merge vm1` would quietly mean vm1@latest: removing needs a name
        raise UsageError(
            f"{address!r}: merge removes one restore point; name it as VM@SPEC "
            f"(e.g. {vm}@#ID or {vm}@latest; `lbrestore list {vm}` shows them)"
        )
    result = _run_merge(vm=vm, address=address)
    if as_json:
        echo_json(result.to_json())
        return
    click.echo(_describe(result))


@with_store(write=True)
def _run_merge(store: Store, vm: str, address: str) -> MergeResult:
    try:
        point = store.resolve(address)
    except AddressError:
        for finished in store.finished_merges:  # this merge was interrupted; opening ended it
            if address == f"{vm}@#{finished.point_id}":
                return finished
        raise  # malformed: usage (2); well-formed but matching nothing: runtime (1), as info
    return merge_point(store, point)


def _describe(result: MergeResult) -> str:
    """One line: which point went, where each disk's data went, how much was written."""
    parts = []
    for disk in result.disks:
        if disk.successor is None:
            parts.append(f"{disk.disk} dropped (no later point)")
        else:
            parts.append(
                f"{disk.disk} folded into #{disk.successor} ({disk.direction}, "
                f"{format_size(disk.bytes_copied)} written)"
            )
    return f"merged {result.vm}@#{result.point_id} away: {'; '.join(parts)}"


COMMANDS = [merge_command]
