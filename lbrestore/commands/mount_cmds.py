"""`lbrestore mount` and `lbrestore umount`: look inside a restore point through FUSE."""

from __future__ import annotations

from pathlib import Path

import click

from lbfuse import mountpoints
from lbrestore import mount as mounting
from lbrestore.commands._common import with_store
from lbstore.store import Store


@click.command("mount")
@click.argument("address", metavar="VM@SPEC")
@click.argument("mountpoint", required=False, type=click.Path(path_type=Path))
@click.option(
    "--foreground",
    is_flag=True,
    help="Serve in this process until unmounted (Ctrl-C unmounts) instead of in the background.",
)
@click.option(
    "--kernel-cache/--no-kernel-cache",
    default=False,
    help="Whether the kernel caches disk and partition files: cached files allow mmap and "
    "fast repeated reads; streamed ones (the default) read large ranges faster.",
)
@click.option(
    "--no-verify",
    is_flag=True,
    help="Do not check reads against the index's checksums (a damaged cluster then returns "
    "its wrong bytes instead of an I/O error).",
)
@click.option("--remove-mountpoint", is_flag=True, hidden=True)
@with_store()
def mount_command(
    store: Store,
    address: str,
    mountpoint: Path | None,
    foreground: bool,
    kernel_cache: bool,
    no_verify: bool,
    remove_mountpoint: bool,
) -> None:
    """Mount a restore point read-only at MOUNTPOINT.

    The folder shows <disk>.raw (the whole disk), <disk>-part<N>.raw (each MBR or GPT
    partition, numbered as Linux does) and vm.json (the point's metadata). Only you can read
    it. Without MOUNTPOINT a new folder is created under $XDG_RUNTIME_DIR (or /tmp); the
    mountpoint is printed either way. Unmount with `lbrestore umount MOUNTPOINT`.

    Disk and partition files are streamed straight from the store's files by default (which
    the kernel caches already) and cannot be mmap()ed; --kernel-cache caches them a second
    time (and raises the mount's readahead when run as root).

    Every read is checked against the index (the clusters each file stores and their
    checksums): a damaged cluster reads as an I/O error (EIO), logged in the store's events.

    SPEC: latest, #ID, N{s,m,h,d,w}-ago or an ISO-8601 time.
    """
    point = store.resolve(address)
    if mountpoint is None:
        mountpoint, remove_after = mounting.make_mountpoint(point), True
    else:
        mountpoint = mountpoints.check_mountpoint(mountpoint)
        remove_after = remove_mountpoint
    if foreground:
        click.echo(str(mountpoint))
        mounting.serve_point(
            store,
            point,
            mountpoint,
            remove_after=remove_after,
            kernel_cache=kernel_cache,
            verify=not no_verify,
        )
        return
    mounting.start_background_mount(
        store.path,
        point,
        mountpoint,
        remove_after=remove_after,
        kernel_cache=kernel_cache,
        verify=not no_verify,
    )
    click.echo(str(mountpoint))


@click.command("umount")
@click.argument("mountpoint", type=click.Path(path_type=Path))
def umount_command(mountpoint: Path) -> None:
    """Unmount a restore point mounted with `lbrestore mount`.

    Returns once the serving process has exited; a folder that `lbrestore mount` created is
    removed. A mount still in use (open files, a shell inside it) is reported, not forced.
    """
    mountpoints.unmount(mountpoint)


COMMANDS = [mount_command, umount_command]
