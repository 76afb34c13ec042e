"""The serving process of a mount: run it in the foreground, or start it in the background.

A background mount is a detached child process that serves in the foreground (the caller
gives its command line); `start_background` returns once the kernel shows the mount, or
raises the child's last error line. The serving process puts its pid in the mount's source
name (`lbfuse.mountpoints.source_name`), so `lbfuse.mountpoints.unmount` can wait for it.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import IO, TYPE_CHECKING

from lbfuse.errors import MountFailedError
from lbfuse.mountpoints import (
    POLL_INTERVAL_S,
    check_mountpoint,
    force_unmount,
    last_line,
    remove_mountpoint,
    source_name,
)

if TYPE_CHECKING:
    from lbfuse.vfs import ReadOnlyTree

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


# --- the foreground server ------------------------------------------------------------------


def serve_in_foreground(
    open_tree: Callable[[ExitStack], ReadOnlyTree],
    mountpoint: Path,
    *,
    label: str,
    remove_after: bool,
    kernel_cache: bool = False,
) -> None:
    """Mount the tree that `open_tree` builds at `mountpoint` and serve it until unmounted
    (or SIGINT/SIGTERM/SIGHUP).

    `open_tree` opens what the tree reads (closing it through the stack it is given) before
    the mount appears; it stays open until the mount is gone. The mount's source name is
    `label` plus this process's pid. With `remove_after`, the mountpoint folder is removed
    when serving ends, also on failure. `kernel_cache`: see lbfuse.mount.
    """
    from lbfuse.mount import serve  # mfusepy: loaded only by the process that serves

    try:
        mountpoint = check_mountpoint(mountpoint)
        allow_open_files()
        with ExitStack() as stack:
            tree = open_tree(stack)
            name = source_name(label, os.getpid(), auto=remove_after)
            serve(tree, mountpoint, fsname=name, kernel_cache=kernel_cache)
    finally:
        if remove_after:
            remove_mountpoint(mountpoint)


def allow_open_files() -> None:
    """Raise the soft limit on open files to the hard one: a served tree may hold many files
    open (a store view holds its whole chain: views x depth x disks descriptors, past 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- background mounts ----------------------------------------------------------------------


def start_background(command: list[str], mountpoint: Path, *, remove_after: bool) -> int:
    """Run `command` (a process that serves `mountpoint` in the foreground) detached, and
    return its pid once the mount is ready.

    On any failure nothing is left: the process is stopped, a mount it made is removed, and the
    folder too when `remove_after`. The error carries the process's last output line.
    """
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


def _spawn_detached(command: list[str], output: IO[bytes]) -> subprocess.Popen[bytes]:
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


def _wait_until_mounted(
    process: subprocess.Popen[bytes], mountpoint: Path, output: IO[bytes]
) -> None:
    """Return when `mountpoint` is a mount; raise MountFailedError if the process ends first."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        returncode = process.poll()
        if returncode is not None:
            output.seek(0)
            text = output.read().decode(errors="replace")
            raise MountFailedError(
                mountpoint,
                f"the mount did not start: {last_line(text) or f'exit status {returncode}'}",
                returncode=returncode,
                output=text,
            )
        if os.path.ismount(mountpoint):
            return
        if time.monotonic() > deadline:
            raise MountFailedError(mountpoint, f"the mount was not ready in {READY_TIMEOUT_S:g} s")
        time.sleep(POLL_INTERVAL_S)


def _abandon(process: subprocess.Popen[bytes], mountpoint: Path) -> None:
    """Stop a serving process that failed to come up, and any mount it managed to make."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    force_unmount(mountpoint)
