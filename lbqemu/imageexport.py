"""A disk image exported read-only over NBD by qemu-nbd, for VMs that are not running.

An inactive libvirt domain has no QEMU to ask for a point-in-time view: its images do not change
while they are read (qemu-nbd holds QEMU's image lock, so the domain cannot start meanwhile),
so the image itself is the view. A persistent dirty bitmap stored in the image can be exported
with it (`qemu:dirty-bitmap:NAME`), which lets the pull read only what changed.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from lbqemu.errors import NbdError

START_TIMEOUT = 30.0


@contextlib.contextmanager
def exported_image(
    image: str, fmt: str | None, socket: Path, export: str, bitmap: str | None = None
) -> Iterator[Path]:
    """qemu-nbd serving `image` read-only as `export` on `socket` (with `bitmap`), stopped and
    waited for on every path."""
    command = [
        "qemu-nbd", "--read-only", "--persistent", "--shared=4", "--cache=none", "--aio=native",
        f"--socket={socket}", f"--export-name={export}",
    ]  # fmt: skip
    if fmt:
        command.append(f"--format={fmt}")
    if bitmap:
        command.append(f"--bitmap={bitmap}")
    command.append(image)
    try:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
    except OSError as exc:
        raise NbdError(export, f"cannot run qemu-nbd: {exc}") from exc
    try:
        _wait_for(socket, process, export)
        yield socket
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


def _wait_for(socket: Path, process: subprocess.Popen[bytes], export: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not socket.exists():
        if process.poll() is not None:
            err = process.stderr.read().decode(errors="replace") if process.stderr else ""
            lines = err.strip().splitlines() or [f"exit code {process.returncode}"]
            raise NbdError(export, f"qemu-nbd failed: {lines[-1]}")
        if time.monotonic() > deadline:
            raise NbdError(export, f"qemu-nbd did not listen within {START_TIMEOUT:g} s")
        time.sleep(0.02)
