"""Mounting restore points: the glue between the store's chain views and lbfuse.

`lbrestore mount VM@SPEC` resolves the point, checks (or creates) the mountpoint, and starts a
serving process (`lbrestore mount VM@#ID MOUNTPOINT --foreground`) detached from the terminal; it
returns once the kernel shows the mount (or reports the serving process's error line). The
serving process puts its pid in the mount's source name (`lbrestore:vm1@7:pid4242`, see
/proc/self/mountinfo), so `lbrestore umount` can unmount with `fusermount3 -u` and then wait
until that process is gone: no process is left behind. A mountpoint folder created by lbrestore
is removed by the serving process when it stops.

Views are opened before the mount appears and stay open until it is gone, so a mount keeps
reading the files it opened even if the restore point is merged away meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lbfuse.errors import (
    MountFailedError,
    MountpointError,
    NotMountedError,
    UnmountError,
)
from lbfuse.mount import FS_SUBTYPE, serve
from lbfuse.vfs import ReadOnlyTree, build_restore_point_tree

if TYPE_CHECKING:
    from lbstore.model import RestorePoint
    from lbstore.store import Store

VIEWS_PER_DISK = 2
KERNEL_CACHE_DEFAULT: bool | None = False
"""Whether disk and partition files go through the page cache when the user does not say
(`--kernel-cache` / `--no-kernel-cache`); None: when the mount's readahead can be raised.

Streamed (False) because it reads faster: bench/bench_mount_read.py (1 GiB, depth-25 chain,
2 shared cores, best of 5, 3 runs) read 2440-3160 MiB/s streamed (ratio to qemu-img 0.47-0.62,
0.36-0.42 CPU s/GiB) but 1580-2650 MiB/s cached even with 4 MiB readahead (ratio 0.31-0.50,
0.66 CPU s/GiB: page-cache allocation and one more copy per byte); with the kernel's 128 KiB
readahead cached ran at ~900 MiB/s. Cached wins on repeated reads and allows mmap; flip this
(True or None) if that matters more than streaming speed.
"""
READY_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.02
AUTO_PREFIX = "lbrestore-"
FSTYPE = f"fuse.{FS_SUBTYPE}"
_PID_IN_SOURCE = re.compile(r":pid(\d+)(:auto)?$")


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
    store: Store, point: RestorePoint, stack: ExitStack, *, cache_disks: bool = False
) -> ReadOnlyTree:
    """Open a view of every disk of `point` (closed by `stack`) and build the mounted tree."""
    sources = {}
    for disk in point.disks:
        views = []
        for _ in range(VIEWS_PER_DISK):
            view = store.view(point, disk.name)
            stack.callback(view.close)
            views.append(view)
        sources[disk.name] = ViewSource(views)
    vm_json = json.dumps(point_metadata(point), indent=2).encode() + b"\n"
    return build_restore_point_tree(
        sources,
        vm_json,
        _utc(point.created),
        uid=os.getuid(),
        gid=os.getgid(),
        cache_disks=cache_disks,
    )


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# --- mountpoints ----------------------------------------------------------------------------


def check_mountpoint(path: Path) -> Path:
    """The real path of the mountpoint when it is an empty folder that is not a mount already."""
    path = Path(os.path.realpath(path))
    try:
        if not path.is_dir():
            problem = "is not a folder" if path.exists() else "does not exist"
            raise MountpointError(path, f"the mountpoint {problem}")
        if os.path.ismount(path):
            raise MountpointError(path, "the mountpoint is already a mount")
        with os.scandir(path) as entries:
            if next(entries, None) is not None:
                raise MountpointError(path, "the mountpoint is not empty")
    except OSError as exc:
        raise MountpointError(path, f"cannot use the mountpoint: {exc.strerror or exc}") from exc
    return path


def make_mountpoint(point: RestorePoint) -> Path:
    """A new empty folder `lbrestore-<vm>-<id>-XXXX` under $XDG_RUNTIME_DIR (else /tmp)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    if not os.path.isdir(base) or not os.access(base, os.W_OK | os.X_OK):
        base = tempfile.gettempdir()
    try:
        return Path(tempfile.mkdtemp(prefix=f"{AUTO_PREFIX}{point.vm}-{point.id}-", dir=base))
    except OSError as exc:
        raise MountpointError(base, f"cannot create a mountpoint: {exc.strerror}") from exc


def remove_mountpoint(path: Path) -> None:
    """Remove a folder lbrestore created, if it is still there and empty."""
    with contextlib.suppress(OSError):
        os.rmdir(path)


def fsname(point: RestorePoint, pid: int, *, auto: bool = False) -> str:
    """The mount's source name: which point, which process serves it, and (`:auto`) whether
    lbrestore created the mountpoint folder (then `umount` may remove it)."""
    return f"lbrestore:{point.vm}@{point.id}:pid{pid}" + (":auto" if auto else "")


# --- serving (the foreground process) -------------------------------------------------------


def serve_point(
    store: Store,
    point: RestorePoint,
    mountpoint: Path,
    *,
    remove_after: bool,
    cache_disks: bool | None = None,
) -> None:
    """Mount `point` at `mountpoint` and serve it until unmounted (or SIGINT/SIGTERM/SIGHUP).

    With `remove_after`, the mountpoint folder is removed when serving ends, also on failure.
    `cache_disks`: whether the kernel caches disk and partition files (see lbfuse.mount);
    None: KERNEL_CACHE_DEFAULT.
    """
    if cache_disks is None:
        cache_disks = KERNEL_CACHE_DEFAULT
    try:
        mountpoint = check_mountpoint(mountpoint)
        _allow_open_files()
        with ExitStack() as stack:
            tree = open_point_tree(store, point, stack, cache_disks=cache_disks is not False)
            name = fsname(point, os.getpid(), auto=remove_after)
            serve(tree, mountpoint, fsname=name, kernel_cache=cache_disks)
    finally:
        if remove_after:
            remove_mountpoint(mountpoint)


def _allow_open_files() -> None:
    """Raise the soft limit on open files to the hard one: every view holds its whole chain
    open (VIEWS_PER_DISK x depth x disks descriptors; a deep chain passes 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- background mounts ----------------------------------------------------------------------


def start_background_mount(
    store_path: Path,
    point: RestorePoint,
    mountpoint: Path,
    *,
    remove_after: bool,
    cache_disks: bool | None = None,
) -> int:
    """Start a serving process and return its pid once the mount is ready.

    On any failure nothing is left: the process is stopped, a mount it made is removed, and the
    folder too when `remove_after`. The error carries the serving process's last output line.
    """
    command = [
        sys.executable, "-m", "lbrestore", "--store", str(store_path),
        "mount", f"{point.vm}@#{point.id}", str(mountpoint), "--foreground",
    ]  # fmt: skip
    if remove_after:
        command.append("--remove-mountpoint")
    if cache_disks is not None:
        command.append("--kernel-cache" if cache_disks else "--no-kernel-cache")
    with tempfile.TemporaryFile() as output:
        process = _spawn_detached(command, output)
        try:
            _wait_until_mounted(process, mountpoint, output)
        except BaseException:
            _abandon(process, mountpoint)
            if remove_after:
                remove_mountpoint(mountpoint)
            raise
    return process.pid


def _spawn_detached(command: list[str], output: Any) -> subprocess.Popen[bytes]:
    """Start the serving process out of the terminal's reach.

    It gets a process group of its own (Ctrl-C in the terminal does not reach it) and ignores
    SIGHUP (closing the terminal does not unmount); SIGTERM still unmounts. It stays in the
    caller's session on purpose: with the scheduler's autogroups a session of its own made
    reads through the mount about 40% slower (reader and server then wake each other across
    scheduling groups).
    """
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=output,
            process_group=0,
        )
    finally:
        signal.signal(signal.SIGHUP, previous)


def _wait_until_mounted(process: subprocess.Popen[bytes], mountpoint: Path, output: Any) -> None:
    """Return when `mountpoint` is a mount; raise MountFailedError if the process ends first."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        returncode = process.poll()
        if returncode is not None:
            output.seek(0)
            text = output.read().decode(errors="replace")
            raise MountFailedError(
                mountpoint,
                f"the mount did not start: {_last_line(text) or f'exit status {returncode}'}",
                returncode=returncode,
                output=text,
            )
        if os.path.ismount(mountpoint):
            return
        if time.monotonic() > deadline:
            raise MountFailedError(mountpoint, f"the mount was not ready in {READY_TIMEOUT_S:g} s")
        time.sleep(POLL_INTERVAL_S)


def _last_line(text: str) -> str:
    """The serving process's error line, without its `lbrestore: ` prefix."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1].removeprefix("lbrestore: ") if lines else ""


def _abandon(process: subprocess.Popen[bytes], mountpoint: Path) -> None:
    """Stop a serving process that failed to come up, and any mount it managed to make."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if _find_mount(mountpoint) is not None:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


# --- unmounting -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of /proc/self/mountinfo (the fields lbrestore needs)."""

    mountpoint: Path
    fstype: str
    source: str

    @property
    def pid(self) -> int | None:
        """The serving process, from a lbrestore source name (`...:pid<N>`)."""
        match = _PID_IN_SOURCE.search(self.source)
        return int(match.group(1)) if match else None

    @property
    def auto_created(self) -> bool:
        """Whether lbrestore created the mountpoint folder (source name ends in `:auto`)."""
        match = _PID_IN_SOURCE.search(self.source)
        return bool(match and match.group(2))


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (space, tab, newline, backslash)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> Iterator[MountEntry]:
    """The mounts this process sees."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if "-" not in fields:
                continue
            sep = fields.index("-")
            if sep < 5 or len(fields) < sep + 3:
                continue
            yield MountEntry(
                Path(_unescape(fields[4])), fields[sep + 1], _unescape(fields[sep + 2])
            )


def _find_mount(path: Path) -> MountEntry | None:
    """The last (topmost) mount at `path`, if any."""
    found = None
    for entry in mounts():
        if entry.mountpoint == path:
            found = entry
    return found


def unmount(mountpoint: Path) -> None:
    """Unmount a lbrestore mount and wait until its serving process has exited.

    Refuses folders that are not lbrestore mounts; a busy mount (files still open) is reported,
    not forced. A folder created by `lbrestore mount` is removed.
    """
    path = Path(os.path.realpath(os.path.abspath(mountpoint)))
    entry = _find_mount(path)
    if entry is None or entry.fstype != FSTYPE:
        what = "not mounted" if entry is None else f"a {entry.fstype} mount, not lbrestore's"
        raise NotMountedError(path, f"cannot unmount: {what}")
    result = subprocess.run(
        ["fusermount3", "-u", str(path)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        reason = _last_line(result.stderr).removeprefix("fusermount3: ") or "fusermount3 failed"
        raise UnmountError(path, f"cannot unmount: {reason}")
    if entry.pid is not None:
        _wait_for_exit(path, entry.pid)
    if entry.auto_created:  # normally already removed by the serving process itself
        remove_mountpoint(path)


def _wait_for_exit(path: Path, pid: int) -> None:
    """Wait until process `pid` is gone (or a zombie: it has finished, its parent will reap it)."""
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    while _is_running(pid):
        if time.monotonic() > deadline:
            raise UnmountError(path, f"the serving process {pid} did not exit")
        time.sleep(POLL_INTERVAL_S)


def _is_running(pid: int) -> bool:
    """True while `pid` exists and has not finished."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
