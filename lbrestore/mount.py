"""Mounting restore points: the glue between the store's chain views and lbfuse.

`lbrestore mount VM@SPEC` resolves the point, checks (or creates) the mountpoint, and starts a
serving process (`lbrestore mount VM@#ID MOUNTPOINT --foreground`) detached from the terminal
(lbfuse.server); it returns once the kernel shows the mount. The mount's source name tells
which point is served (`lbrestore:vm1@7:pid4242`); `lbrestore umount` is lbfuse.mountpoints'
unmount. The mechanics (mountpoints, the serving process, mountinfo, unmount) live in lbfuse;
here is only what a restore point adds: its views and its vm.json.

Views are opened before the mount appears and stay open until it is gone, so a mount keeps
reading the files it opened even if the restore point is merged away meanwhile.
"""

from __future__ import annotations

import json
import os
import queue
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lbfuse import mountpoints, server
from lbfuse.vfs import ReadOnlyTree, build_restore_point_tree
from lbguest.files import GuestFiles

if TYPE_CHECKING:
    from lbstore.model import RestorePoint
    from lbstore.store import Store

VIEWS_PER_DISK = 2
AUTO_PREFIX = "lbrestore-"


class _View(Protocol):
    """What the mount needs of a store chain view."""

    virtual_size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def readinto(self, offset: int, dest: memoryview) -> int: ...

    def close(self) -> None: ...


class ViewSource:
    """Chain views of one disk seen as a `DiskSource` (lbfuse.vfs): `size` and exact reads.

    A view is not thread-safe, so the source keeps a pool of views of the same disk and each
    read borrows one: the kernel's parallel readahead requests are served at once (the reads
    themselves release the GIL).
    """

    thread_safe = True

    def __init__(self, views: Sequence[_View]) -> None:
        self.size = views[0].virtual_size
        self.alignment: int = getattr(views[0], "cluster_size", 0)
        """Reads of whole clusters go straight into the caller's buffer (lbguest splits its
        reads on this)."""
        self._idle: queue.SimpleQueue[_View] = queue.SimpleQueue()
        for view in views:
            self._idle.put(view)

    def read(self, offset: int, length: int) -> bytes:
        """The view's bytes; the tree never asks past the end."""
        view = self._idle.get()
        try:
            return view.read(offset, length)
        finally:
            self._idle.put(view)

    def readinto(self, offset: int, dest: memoryview) -> int:
        """Fill all of `dest` straight from the chain's files (the view writes zeros too)."""
        view = self._idle.get()
        try:
            return view.readinto(offset, dest)
        finally:
            self._idle.put(view)


# --- what is mounted ------------------------------------------------------------------------


def point_metadata(point: RestorePoint) -> dict[str, Any]:
    """The content of vm.json: the restore point as `list --json` shows it, plus its definition."""
    return {
        "id": point.id,
        "vm": point.vm,
        "created": _utc(point.created).isoformat(),
        "kind": point.kind,
        "disks": [
            {
                "name": disk.name,
                "virtual_size": disk.virtual_size,
                "stored_bytes": disk.stored_bytes,
                "cluster_size": disk.cluster_size,
            }
            for disk in point.disks
        ],
        "definition": point.definition,
    }


def open_point_tree(
    store: Store,
    point: RestorePoint,
    stack: ExitStack,
    *,
    cache_disks: bool = False,
    verify: bool = True,
) -> ReadOnlyTree:
    """Open views of every disk of `point` (closed by `stack`) and build the mounted tree.

    The guest's filesystems are found (partition tables and magics only) but parsed on first
    use of files/ or vm.json, whose "guest_files" says what each one is, its journal sentence,
    and what was left out and why.

    With `verify` (the default) every read is checked against the index (lbstore.integrity:
    the clusters each file maps, and each cluster's digest): a damaged cluster reads as EIO,
    is logged and recorded in the store's events, instead of returning wrong bytes.
    """
    from lbstore.integrity import damage_reporter, verified_views

    sources = {}
    report = damage_reporter(store, point.vm)
    for disk in point.disks:
        views: Sequence[_View]
        if verify:
            views = verified_views(store, point, disk.name, VIEWS_PER_DISK, report)
        else:
            views = [store.view(point, disk.name) for _ in range(VIEWS_PER_DISK)]
        for view in views:
            stack.callback(view.close)
        sources[disk.name] = ViewSource(views)
    guest = GuestFiles.open(sources)

    def vm_json() -> bytes:
        meta = {**point_metadata(point), "guest_files": guest.summary()}
        return json.dumps(meta, indent=2).encode() + b"\n"

    return build_restore_point_tree(
        sources,
        vm_json,
        _utc(point.created),
        uid=os.getuid(),
        gid=os.getgid(),
        cache_disks=cache_disks,
        guest=guest,
    )


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# --- mounting ------------------------------------------------------------------------------


def make_mountpoint(point: RestorePoint) -> Path:
    """A new empty folder `lbrestore-<vm>-<id>-XXXX` under $XDG_RUNTIME_DIR (else /tmp)."""
    return mountpoints.make_mountpoint(f"{AUTO_PREFIX}{point.vm}-{point.id}-")


def mount_label(point: RestorePoint) -> str:
    """The served point in the mount's source name (the serving process's pid follows)."""
    return f"lbrestore:{point.vm}@{point.id}"


def serve_point(
    store: Store,
    point: RestorePoint,
    mountpoint: Path,
    *,
    remove_after: bool,
    kernel_cache: bool = False,
    verify: bool = True,
) -> None:
    """Mount `point` at `mountpoint` and serve it until unmounted (or SIGINT/SIGTERM/SIGHUP).

    With `remove_after`, the mountpoint folder is removed when serving ends, also on failure.
    `kernel_cache`: whether the kernel caches disk and partition files (see lbfuse.mount);
    `verify`: whether reads are checked against the index (see open_point_tree).
    """
    server.serve_in_foreground(
        lambda stack: open_point_tree(store, point, stack, cache_disks=kernel_cache, verify=verify),
        mountpoint,
        label=mount_label(point),
        remove_after=remove_after,
        kernel_cache=kernel_cache,
    )


def start_background_mount(
    store_path: Path,
    point: RestorePoint,
    mountpoint: Path,
    *,
    remove_after: bool,
    kernel_cache: bool = False,
    verify: bool = True,
) -> int:
    """Start a process serving `point` (`lbrestore mount ... --foreground`) and return its pid
    once the mount is ready; on failure nothing is left (lbfuse.server.start_background)."""
    command = [
        sys.executable, "-m", "lbrestore", "--store", str(store_path),
        "mount", f"{point.vm}@#{point.id}", str(mountpoint), "--foreground",
        "--kernel-cache" if kernel_cache else "--no-kernel-cache",
    ]  # fmt: skip
    if remove_after:
        command.append("--remove-mountpoint")
    if not verify:
        command.append("--no-verify")
    return server.start_background(command, mountpoint, remove_after=remove_after)
