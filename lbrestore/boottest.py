"""Boot proof: start a restore point in a throwaway QEMU and watch its serial console.

A backup is worth what its restore is worth, and the cheapest convincing restore test is a boot:
the disks are attached read-only through QEMU's `-snapshot` (guest writes go to a temporary
overlay that QEMU deletes), there is no network, and the guest's serial console is read until it
prints a marker (by default a login prompt) or the boot timeout expires. KVM is used when the host
offers it, TCG otherwise; the result says which, because TCG boots are much slower.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lbrestore.errors import AppError
from lbrestore.vmdef import qemu_device_for, qemu_escape

DEFAULT_BOOT_MARKER = r"login:"
DEFAULT_BOOT_TIMEOUT = 120.0
DEFAULT_MEMORY_MIB = 256
CONSOLE_TAIL_CHARS = 2000
_CONSOLE_KEEP_CHARS = 64 * 1024
_QEMU = "qemu-system-x86_64"


class BootTestError(AppError):
    """The boot test could not be run at all (no QEMU, bad marker, no disks)."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"boot test: {problem}")
        self.problem = problem


@dataclass(frozen=True, slots=True)
class BootDisk:
    """One disk to attach: its name (for the device id), image path and image format."""

    name: str
    path: Path
    format: str = "qcow2"
    device: str | None = None


@dataclass(frozen=True, slots=True)
class BootResult:
    """What a boot test saw: whether the marker appeared, how, and the console's tail."""

    booted: bool
    accelerator: str
    seconds: float
    marker: str
    console_tail: str
    reason: str | None = None
    """Why the boot failed ("timeout after 120 s", "QEMU exited with status 1: ..."); None if ok."""
    cpu: str = "default"
    """The CPU model QEMU ran (host, max, or QEMU's default)."""

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready form, for `verify --boot --json`."""
        return {
            "booted": self.booted,
            "accelerator": self.accelerator,
            "cpu": self.cpu,
            "seconds": round(self.seconds, 3),
            "marker": self.marker,
            "reason": self.reason,
            "console_tail": self.console_tail,
        }


def kvm_available() -> bool:
    """True when /dev/kvm exists and this process may open it read-write."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def compile_marker(marker: str) -> re.Pattern[str]:
    """The marker as a regular expression, or a BootTestError that says why it is not one."""
    try:
        return re.compile(marker)
    except re.error as exc:
        raise BootTestError(f"boot marker {marker!r} is not a regular expression: {exc}") from exc


@dataclass(frozen=True, slots=True)
class BootMachine:
    """The throwaway VM: machine type, memory, QEMU binary."""

    machine: str = "q35"
    memory_mib: int = DEFAULT_MEMORY_MIB
    qemu_binary: str = _QEMU


def qemu_boot_command(
    disks: Sequence[BootDisk], vm: BootMachine, *, accelerator: str, cpu: str | None
) -> list[str]:
    """The QEMU command line of a boot test: snapshot disks, no NIC, serial console on stdout."""
    command = [
        vm.qemu_binary,
        "-machine",
        f"{vm.machine},accel={accelerator}",
        *(["-cpu", cpu] if cpu else []),
        "-nodefaults",
        "-display",
        "none",
        "-no-user-config",
        "-m",
        str(vm.memory_mib),
        "-snapshot",
        # A BIOS that finds no bootable disk resets at once, and a reset ends QEMU: a fast,
        # clear failure instead of waiting out the timeout.
        "-boot",
        "strict=on,reboot-timeout=0",
        "-no-reboot",
        "-nic",
        "none",
        "-chardev",
        "stdio,id=console,signal=off",
        "-serial",
        "chardev:console",
        "-monitor",
        "none",
    ]
    for index, disk in enumerate(disks):
        drive_id = f"disk{index}"
        command += [
            "-drive",
            f"file={qemu_escape(str(disk.path))},format={disk.format},if=none,id={drive_id}",
            "-device",
            qemu_device_for(disk.device, drive_id, bootindex=index),
        ]
    return command


def _attempts(accelerator: str | None) -> list[tuple[str, str | None]]:
    """(accelerator, CPU model) to try in turn while QEMU refuses KVM itself.

    The host's CPU model first (modern guests need more than QEMU's default qemu64); some
    nested setups cannot run it, then QEMU's default model; then TCG with every feature.
    """
    tcg: list[tuple[str, str | None]] = [("tcg", "max")]
    if accelerator == "tcg" or (accelerator is None and not kvm_available()):
        return tcg
    kvm: list[tuple[str, str | None]] = [("kvm", "host"), ("kvm", None)]
    return kvm if accelerator == "kvm" else kvm + tcg


def boot_test(
    disks: Sequence[BootDisk],
    *,
    marker: str = DEFAULT_BOOT_MARKER,
    timeout: float = DEFAULT_BOOT_TIMEOUT,
    vm: BootMachine | None = None,
    accelerator: str | None = None,
) -> BootResult:
    """Boot `disks` (the first is the boot disk) and wait for `marker` on the serial console.

    `accelerator` None means KVM when available, else TCG. Returns a BootResult in every case
    where QEMU could be started; raises BootTestError when the test cannot be run (no disks,
    no QEMU, marker not a regular expression).
    """
    vm = vm or BootMachine()
    if not disks:
        raise BootTestError("the restore point has no disks to boot")
    if timeout <= 0:
        raise BootTestError(f"boot timeout must be positive, not {timeout}")
    pattern = compile_marker(marker)
    if accelerator not in (None, "kvm", "tcg"):
        raise BootTestError(f"accelerator must be kvm or tcg, not {accelerator!r}")
    if shutil.which(vm.qemu_binary) is None:
        raise BootTestError(f"{vm.qemu_binary} not found")
    deadline = time.monotonic() + timeout
    result: BootResult | None = None
    for accel, cpu in _attempts(accelerator):
        remaining = deadline - time.monotonic()
        if result is not None and (remaining <= 0 or not _kvm_refused(result)):
            break
        command = qemu_boot_command(disks, vm, accelerator=accel, cpu=cpu)
        result = _boot_once(command, pattern, marker, max(remaining, 0.001), accel, cpu)
    assert result is not None
    return result


def _boot_once(
    command: list[str],
    pattern: re.Pattern[str],
    marker: str,
    timeout: float,
    accel: str,
    cpu: str | None,
) -> BootResult:
    """One QEMU run: the marker, QEMU's exit or the timeout."""
    started = time.monotonic()
    with _running_qemu(command) as process:
        matched, console, stderr, status = _watch_console(process, pattern, started + timeout)
    seconds = time.monotonic() - started
    tail = console[-CONSOLE_TAIL_CHARS:]
    cpu_name = cpu or "default"
    if matched:
        return BootResult(True, accel, seconds, marker, tail, cpu=cpu_name)
    if status is None:
        reason = f"no boot marker {marker!r} within the boot timeout of {timeout:g} s"
    elif status == 0:
        reason = f"the guest reset before the boot marker {marker!r} (no bootable disk?)"
    else:
        last = stderr.strip().splitlines()[-1:] or ["no message"]
        reason = f"QEMU exited with status {status} before the boot marker: {last[0]}"
    return BootResult(False, accel, seconds, marker, tail, reason, cpu=cpu_name)


def _kvm_refused(result: BootResult) -> bool:
    """True when QEMU died in KVM itself before the guest printed anything."""
    reason = result.reason or ""
    return (
        not result.booted
        and not result.console_tail
        and reason.startswith("QEMU exited")
        and "kvm" in reason.lower()
    )


@contextlib.contextmanager
def _running_qemu(command: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """Start QEMU with its temporary snapshot files in a private folder; stop it on every path."""
    with tempfile.TemporaryDirectory(prefix="lbrestore-boot-") as scratch:
        env = dict(os.environ, TMPDIR=scratch)
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
        except OSError as exc:
            raise BootTestError(f"cannot start {command[0]}: {exc}") from exc
        try:
            yield process
        finally:
            _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate QEMU (it has nothing to save: its disks are snapshots) and reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def _watch_console(
    process: subprocess.Popen[bytes], pattern: re.Pattern[str], deadline: float
) -> tuple[bool, str, str, int | None]:
    """Read console (stdout) and stderr until the marker, QEMU's exit or the deadline.

    Returns (matched, console text, stderr text, exit status or None if QEMU still runs).
    """
    assert process.stdout is not None and process.stderr is not None
    console, stderr = bytearray(), bytearray()
    buffers = {process.stdout.fileno(): console, process.stderr.fileno(): stderr}
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        open_fds = len(buffers)
        while open_fds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for key, _ in selector.select(timeout=min(remaining, 1.0)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fd)
                    open_fds -= 1
                    continue
                buffer = buffers[key.fd]
                buffer += chunk
                del buffer[:-_CONSOLE_KEEP_CHARS]
                if key.fd == process.stdout.fileno() and pattern.search(_text(console)):
                    return True, _text(console), _text(stderr), None
    status = process.poll() if open_fds == 0 else None
    if open_fds == 0 and status is None:
        status = process.wait()
    return False, _text(console), _text(stderr), status


def _text(data: bytes | bytearray) -> str:
    """Console bytes as text; serial consoles carry whatever the guest sends."""
    return data.decode("utf-8", errors="replace")
