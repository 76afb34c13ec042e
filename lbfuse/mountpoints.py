"""Mountpoints and mounts as the kernel shows them: check, create, find, unmount, wait.

A mount made by lbfuse shows as `fuse.lbrestore` in /proc/self/mountinfo, and its source name
ends in `:pid<N>` (the serving process) and `:auto` when the mountpoint folder was created for
it (see `source_name`). That is all `unmount` needs: it unmounts with `fusermount3 -u`, waits
until the serving process is gone (no process is left behind) and removes a created folder.

This module is the one reader of /proc/self/mountinfo (`mounts`). It does not import mfusepy,
so unmounting and listing mounts cost no FUSE library start-up.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lbfuse.errors import MountpointError, NotMountedError, UnmountError

FS_SUBTYPE = "lbrestore"
"""Mounts show as `fuse.lbrestore` in /proc/self/mountinfo: how `unmount` recognises ours."""
FSTYPE = f"fuse.{FS_SUBTYPE}"
MOUNTINFO = "/proc/self/mountinfo"
EXIT_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.02
_PID_IN_SOURCE = re.compile(r":pid(\d+)(:auto)?$")


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


def make_mountpoint(prefix: str) -> Path:
    """A new empty folder `<prefix>XXXX` under $XDG_RUNTIME_DIR (else the temporary folder)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    if not os.path.isdir(base) or not os.access(base, os.W_OK | os.X_OK):
        base = tempfile.gettempdir()
    try:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    except OSError as exc:
        raise MountpointError(base, f"cannot create a mountpoint: {exc.strerror}") from exc


def remove_mountpoint(path: Path) -> None:
    """Remove a folder made by `make_mountpoint`, if it is still there and empty."""
    with contextlib.suppress(OSError):
        os.rmdir(path)


def source_name(label: str, pid: int, *, auto: bool = False) -> str:
    """A mount's source name: `label`, the serving process, and (`:auto`) whether the
    mountpoint folder was created for the mount (then `unmount` may remove it)."""
    return f"{label}:pid{pid}" + (":auto" if auto else "")


# --- reading /proc/self/mountinfo -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of /proc/self/mountinfo (the fields lbfuse needs)."""

    mountpoint: Path
    device: str
    """"MAJOR:MINOR" of the mount's (for FUSE: anonymous) device, as /sys/class/bdi names it."""
    fstype: str
    source: str
    options: tuple[str, ...]
    """The per-mount options (`ro`, `nosuid`...) followed by the filesystem's own ones."""

    @property
    def pid(self) -> int | None:
        """The serving process, from a source name made by `source_name` (`...:pid<N>`)."""
        match = _PID_IN_SOURCE.search(self.source)
        return int(match.group(1)) if match else None

    @property
    def auto_created(self) -> bool:
        """Whether the mountpoint folder was created for the mount (source ends in `:auto`)."""
        match = _PID_IN_SOURCE.search(self.source)
        return bool(match and match.group(2))


def unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (space, tab, newline, backslash)."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def parse_mountinfo_line(line: str) -> MountEntry | None:
    """One mountinfo line (proc(5)): `id parent MAJ:MIN root mountpoint options [tags] - fstype
    source super-options`; None for a line that does not have that shape."""
    fields = line.split()
    if "-" not in fields:
        return None
    sep = fields.index("-")
    if sep < 6 or len(fields) < sep + 3:
        return None
    super_options = fields[sep + 3].split(",") if len(fields) > sep + 3 else []
    return MountEntry(
        mountpoint=Path(unescape(fields[4])),
        device=fields[2],
        fstype=fields[sep + 1],
        source=unescape(fields[sep + 2]),
        options=(*fields[5].split(","), *super_options),
    )


def mounts() -> Iterator[MountEntry]:
    """The mounts this process sees, in mount order."""
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            entry = parse_mountinfo_line(line)
            if entry is not None:
                yield entry


def find_mount(path: Path) -> MountEntry | None:
    """The last (topmost) mount at `path` (a real path), if any."""
    found = None
    for entry in mounts():
        if entry.mountpoint == path:
            found = entry
    return found


# --- unmounting -----------------------------------------------------------------------------


def unmount(mountpoint: Path) -> None:
    """Unmount a lbfuse mount and wait until its serving process has exited.

    Refuses folders that are not lbfuse mounts; a busy mount (files still open) is reported,
    not forced. A folder created for the mount is removed.
    """
    path = Path(os.path.realpath(os.path.abspath(mountpoint)))
    entry = find_mount(path)
    if entry is None or entry.fstype != FSTYPE:
        what = "not mounted" if entry is None else f"a {entry.fstype} mount, not lbrestore's"
        raise NotMountedError(path, f"cannot unmount: {what}")
    result = subprocess.run(
        ["fusermount3", "-u", str(path)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        reason = last_line(result.stderr).removeprefix("fusermount3: ") or "fusermount3 failed"
        raise UnmountError(path, f"cannot unmount: {reason}")
    if entry.pid is not None:
        wait_for_exit(path, entry.pid)
    if entry.auto_created:  # normally already removed by the serving process itself
        remove_mountpoint(path)


def force_unmount(path: Path) -> None:
    """Detach a mount at `path` even when busy (`fusermount3 -u -z`), if there is one."""
    if find_mount(path) is not None:
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)


def wait_for_exit(path: Path, pid: int) -> None:
    """Wait until process `pid` is gone (or a zombie: it has finished, its parent will reap it)."""
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    while is_running(pid):
        if time.monotonic() > deadline:
            raise UnmountError(path, f"the serving process {pid} did not exit")
        time.sleep(POLL_INTERVAL_S)


def is_running(pid: int) -> bool:
    """True while `pid` exists and has not finished."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def last_line(text: str) -> str:
    """The last non-empty line of a process's output, without a `lbrestore: ` prefix."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1].removeprefix("lbrestore: ") if lines else ""
