"""Store commands: init, list, info, import."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from lbrestore.commands._common import (
    echo_json,
    format_age,
    format_size,
    format_table,
    is_terminal,
    json_option,
    with_store,
)
from lbrestore.errors import UsageError
from lbstore.errors import StoreError
from lbstore.model import RestorePoint, as_utc
from lbstore.names import check_disk_name, check_vm_name
from lbstore.store import Store


@click.command("init")
@click.pass_context
def init_command(ctx: click.Context) -> None:
    """Create an empty store at --store (or $LBRESTORE_STORE)."""
    path = ctx.find_root().obj["store_path"]
    Store.init(path)
    click.echo(f"store ready at {path}")


def point_summary(point: RestorePoint) -> dict[str, Any]:
    """A restore point as ARCHITECTURE.md's `list --json` entry."""
    return {
        "id": point.id,
        "vm": point.vm,
        "created": point.created.isoformat(),
        "kind": point.kind,
        "disks": [
            {"name": d.name, "virtual_size": d.virtual_size, "stored_bytes": d.stored_bytes}
            for d in point.disks
        ],
    }


@click.command("list")
@click.argument("vm", required=False)
@json_option
@with_store(write=False)
def list_command(store: Store, vm: str | None, as_json: bool) -> None:
    """List restore points (of one VM, or all), oldest first."""
    points = store.restore_points(check_vm_name(vm) if vm is not None else None)
    if as_json:
        echo_json([point_summary(p) for p in points])
        return
    if not points:
        click.echo(f"no restore points of {vm}" if vm else "no restore points", err=True)
        return
    now = datetime.now(UTC)
    rows = [
        [
            f"#{p.id}",
            p.vm,
            p.created.strftime("%Y-%m-%d %H:%M:%S"),
            format_age(p.created, now),
            p.kind,
            ",".join(d.name for d in p.disks),
            format_size(p.stored_bytes),
        ]
        for p in points
    ]
    headers = ["ID", "VM", "CREATED (UTC)", "AGE", "KIND", "DISKS", "STORED"]
    click.echo(format_table(headers, rows))


def _file_info(
    store: Store, point: RestorePoint, disk: str, own_clusters: dict[int, int] | None
) -> dict[str, Any]:
    """One file of a chain: where it is, how big, and whether its checksums are complete."""
    record = point.disk(disk)
    assert record is not None
    path = store.file_path(point, disk)
    state = store.checksum_state(point, disk)
    info: dict[str, Any] = {
        "point_id": point.id,
        "created": point.created.isoformat(),
        "file": f"data/{record.file}",
        "mode": record.mode,
        "virtual_size": record.virtual_size,
        "stored_bytes": record.stored_bytes,
        "checksummed_clusters": state["clusters"],
    }
    try:
        size = path.stat().st_size if path.is_file() else None
    except OSError as exc:
        info.update(exists=None, file_bytes=None, checksum_state=f"unreadable: {exc.strerror}")
        return info
    if size is None:
        info.update(exists=False, file_bytes=None, checksum_state="file missing")
        return info
    info.update(exists=True, file_bytes=size)
    stored = None if own_clusters is None else own_clusters.get(point.id)
    if stored is None:
        info["checksum_state"] = "chain unreadable"
    elif stored == state["clusters"]:
        info["checksum_state"] = "complete"
    else:
        info["checksum_state"] = f"{state['clusters']} of {stored} stored clusters"
    return info


def _own_clusters(store: Store, point: RestorePoint, disk: str) -> dict[int, int] | None:
    """Data clusters each file of the chain stores itself (None when the chain is unreadable)."""
    try:
        with store.view(point, disk) as view:
            return view.own_cluster_counts()
    except StoreError:
        return None


def point_info(store: Store, point: RestorePoint) -> dict[str, Any]:
    """Everything `info` reports about one restore point."""
    disks = []
    for record in point.disks:
        chain = store.chain(point, record.name)
        own_clusters = _own_clusters(store, point, record.name)
        files = [_file_info(store, p, record.name, own_clusters) for p in chain]
        disks.append(
            {
                "name": record.name,
                "virtual_size": record.virtual_size,
                "cluster_size": record.cluster_size,
                "stored_bytes": record.stored_bytes,
                "chain_depth": len(chain),
                "chain_stored_bytes": sum(f["stored_bytes"] for f in files),
                "chain": files,
            }
        )
    return {
        **point_summary(point),
        "definition": point.definition,
        "disks": disks,
        "store_problems": store.problems or store.check_files(),
        "recent_events": [
            {k: e[k] for k in ("time", "kind", "message", "point_id", "details")}
            for e in store.events(point.vm)[-10:]
        ],
    }


@click.command("info")
@click.argument("address", metavar="VM@SPEC")
@json_option
@with_store(write=False)
def info_command(store: Store, address: str, as_json: bool) -> None:
    """Show one restore point: its disks, chains, files, sizes and checksum state.

    SPEC is latest, #ID, N{s,m,h,d,w}-ago or an ISO-8601 time (no zone means UTC).
    """
    point = store.resolve(address)
    info = point_info(store, point)
    if as_json:
        echo_json(info)
        return
    click.echo(
        f"{point.vm}@#{point.id}  {point.kind}  created {info['created']} "
        f"({format_age(point.created)})"
    )
    for disk in info["disks"]:
        click.echo(
            f"disk {disk['name']}: {format_size(disk['virtual_size'])}, "
            f"cluster {format_size(disk['cluster_size'])}, chain depth {disk['chain_depth']}, "
            f"stored here {format_size(disk['stored_bytes'])}, "
            f"in chain {format_size(disk['chain_stored_bytes'])}"
        )
        for f in disk["chain"]:
            click.echo(
                f"  #{f['point_id']:<5} {f['mode']:<11} {format_size(f['stored_bytes']):>10}  "
                f"{f['file']}  checksums: {f['checksum_state']}"
            )
    for problem in info["store_problems"]:
        click.echo(f"store problem: {problem}")
    for event in info["recent_events"][-5:]:
        click.echo(f"event {event['time'][:19]}Z {event['kind']}: {event['message']}")


def _parse_disks(specs: tuple[str, ...]) -> dict[str, Path]:
    disks: dict[str, Path] = {}
    for spec in specs:
        name, sep, image = spec.partition("=")
        if not sep or not image:
            raise UsageError(f"--disk {spec!r}: expected NAME=IMAGE")
        check_disk_name(name)
        if name in disks:
            raise UsageError(f"--disk {name} given twice")
        disks[name] = Path(image)
    return disks


def _parse_at(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return as_utc(datetime.fromisoformat(text))
    except ValueError:
        raise UsageError(f"--at {text!r}: not an ISO-8601 time (e.g. 2026-11-27T10:00)") from None
    except OverflowError:  # 0001-01-01T00:00:00+01:00 is before the year 1 in UTC
        raise UsageError(f"--at {text!r}: outside the years 1 to 9999 in UTC") from None


@click.command("import")
@click.argument("vm")
@click.option(
    "--disk",
    "disks",
    multiple=True,
    required=True,
    metavar="NAME=IMAGE",
    help="A disk of the VM and the raw or qcow2 image holding it (repeatable).",
)
@click.option("--at", "at", metavar="ISO-TIME", help="The restore point's time (default: now).")
@click.option(
    "--full",
    is_flag=True,
    help="Store full files (a new chain) instead of the clusters that differ from the newest "
    "restore point.",
)
@click.pass_context
def import_command(
    ctx: click.Context, vm: str, disks: tuple[str, ...], at: str | None, full: bool
) -> None:
    """Store existing raw or qcow2 images as a restore point of VM.

    The VM's first import stores full files; later imports store only the clusters that differ
    from the newest restore point (a resync), building an incremental chain. A previous chain
    that reads damaged (files that do not map what the index lists) is never built on: the
    import is refused, and --full starts a new chain.
    """
    from lbstore.importer import open_import_image  # the writer's modules: not for `list`

    check_vm_name(vm)
    images = _parse_disks(disks)
    created = _parse_at(at)
    total = 0
    for path in images.values():  # refuse bad images before taking the store's lock
        with open_import_image(path) as image:
            total += image.virtual_size
    _run_import(vm=vm, images=images, created=created, total=total, full=full)


@with_store(write=True)
def _run_import(
    store: Store,
    vm: str,
    images: dict[str, Path],
    created: datetime | None,
    total: int,
    full: bool,
) -> None:
    from lbstore.importer import import_images

    if is_terminal():
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task(f"importing {vm}", total=total)
            point = import_images(
                store,
                vm,
                images,
                created=created,
                progress=lambda n: bar.advance(task, n),
                full=full,
            )
    else:
        point = import_images(store, vm, images, created=created, full=full)
    sizes = ", ".join(
        f"{d.name} {format_size(d.virtual_size)} (stored {format_size(d.stored_bytes)})"
        for d in point.disks
    )
    click.echo(f"imported {point.vm}@#{point.id} ({point.kind}): {sizes}")


COMMANDS = [init_command, list_command, info_command, import_command]
