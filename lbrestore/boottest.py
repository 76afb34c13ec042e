"""Boot proof: start a restore point in a throwaway QEMU and watch its serial console.

A backup is worth what its restore is worth, and the cheapest convincing restore test is a boot:
the disks are attached read-only through QEMU's `-snapshot` (guest writes go to a temporary
overlay that QEMU deletes), there is no network, and the guest's serial console is read until it
prints a marker (by default a login prompt) or the boot timeout expires. KVM is used when the host
offers it, TCG otherwise; the result says which, because TCG boots are much slower.

QEMU does not always exit when the guest cannot go on: a KVM "internal error" (a nested KVM that
cannot emulate an instruction), a guest panic or an I/O error leave QEMU alive with the guest
stopped. The test therefore watches QEMU's run state over a private QMP monitor too, reports the
state with QEMU's own message, and retries under TCG when KVM stopped the guest. A guest whose
VM definition says UEFI boots with OVMF's firmware (when it is installed).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lbqemu.errors import QemuError
from lbqemu.qmp import QmpSession
from lbrestore.errors import AppError
from lbrestore.vmdef import qemu_device_for, qemu_escape

DEFAULT_BOOT_MARKER = r"login:"
DEFAULT_BOOT_TIMEOUT = 120.0
DEFAULT_MEMORY_MIB = 256
CONSOLE_TAIL_CHARS = 2000
_CONSOLE_KEEP_CHARS = 64 * 1024
_QEMU = "qemu-system-x86_64"
_STATUS_POLL_SECONDS = 0.25
_CLEANUP_SECONDS = 5.0  # how long a finished attempt's watchers may take to end
OVMF_PAIRS = (
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
)
"""OVMF's firmware code and its variable store template, where distributions install them."""
STOPPED_STATES = {
    "internal-error": "QEMU stopped the guest with an internal error",
    "guest-panicked": "the guest kernel panicked",
    "io-error": "a disk I/O error stopped the guest",
    "shutdown": "the guest shut down",
    "paused": "the guest was paused",
    "watchdog": "the guest's watchdog fired",
}
"""QEMU run states (query-status) in which the guest no longer runs, and what they mean."""


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
    stopped_state: str | None = None
    """QEMU's run state when it stopped the guest but stayed alive (internal-error, ...)."""
    earlier: tuple[BootResult, ...] = field(default=())
    """Failed attempts before this one (KVM that stopped the guest, before the TCG retry)."""
    firmware: str = "bios"
    """"uefi" (OVMF) or "bios" (SeaBIOS)."""

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready form, for `verify --boot --json`."""
        return {
            "booted": self.booted,
            "accelerator": self.accelerator,
            "cpu": self.cpu,
            "seconds": round(self.seconds, 3),
            "marker": self.marker,
            "reason": self.reason,
            "stopped_state": self.stopped_state,
            "firmware": self.firmware,
            "console_tail": self.console_tail,
            "earlier_attempts": [attempt.as_dict() for attempt in self.earlier],
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
    uefi: bool = False
    """Boot with OVMF (the VM definition says UEFI) instead of SeaBIOS."""


def ovmf_files() -> tuple[str, str] | None:
    """(firmware code, variable store template) of an installed OVMF, or None."""
    for code, variables in OVMF_PAIRS:
        if os.path.exists(code) and os.path.exists(variables):
            return code, variables
    return None


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
        # A kernel with the pvpanic driver reports its panic: QEMU pauses the guest
        # (guest-panicked), and the test says so instead of waiting for the timeout.
        "-device",
        "pvpanic",
        "-action",
        "panic=pause",
    ]
    if vm.uefi:
        firmware = ovmf_files()
        if firmware is None:
            raise BootTestError("the VM boots with UEFI, but OVMF is not installed (package ovmf)")
        # -snapshot covers the variable store too: the template itself is never written.
        for unit, (path, readonly) in enumerate(((firmware[0], "on"), (firmware[1], "off"))):
            command += [
                "-drive",
                f"if=pflash,unit={unit},format=raw,readonly={readonly},file={qemu_escape(path)}",
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
    """(accelerator, CPU model) to try in turn while KVM cannot run the guest.

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

    `accelerator` None means KVM when available, else TCG; when KVM cannot run the guest (QEMU
    refuses it, or stops the guest with an internal error) the boot is retried under TCG, and
    the result lists the failed attempts. Returns a BootResult in every case where QEMU could
    be started; raises BootTestError when the test cannot be run (no disks, no QEMU, marker
    not a regular expression, UEFI without OVMF).
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
    commands = [
        (accel, cpu, qemu_boot_command(disks, vm, accelerator=accel, cpu=cpu))
        for accel, cpu in _attempts(accelerator)
    ]
    result = asyncio.run(_boot_attempts(commands, pattern, marker, timeout))
    return dataclasses.replace(result, firmware="uefi" if vm.uefi else "bios")


async def _boot_attempts(
    commands: list[tuple[str, str | None, list[str]]],
    pattern: re.Pattern[str],
    marker: str,
    timeout: float,
) -> BootResult:
    """Run the attempts in turn, within one deadline, until one is not KVM's failure."""
    deadline = time.monotonic() + timeout
    failed: list[BootResult] = []
    for accel, cpu, command in commands:
        remaining = deadline - time.monotonic()
        if failed and (remaining <= 0 or (accel == "kvm" and _kvm_cannot_emulate(failed))):
            continue
        result = await _boot_once(command, pattern, marker, max(remaining, 0.001), accel, cpu)
        if result.booted or not _kvm_failed(result):
            return _with_earlier(result, failed)
        failed.append(result)
    return _with_earlier(failed[-1], failed[:-1])


def _kvm_cannot_emulate(failed: list[BootResult]) -> bool:
    """KVM stopped the guest with an internal error: another CPU model will not help."""
    return any(r.stopped_state == "internal-error" for r in failed)


def _with_earlier(result: BootResult, earlier: list[BootResult]) -> BootResult:
    if not earlier:
        return result
    return BootResult(
        result.booted,
        result.accelerator,
        result.seconds,
        result.marker,
        result.console_tail,
        result.reason,
        cpu=result.cpu,
        stopped_state=result.stopped_state,
        earlier=tuple(earlier),
        firmware=result.firmware,
    )


def _kvm_failed(result: BootResult) -> bool:
    """True when KVM itself could not run the guest: QEMU died in KVM, or stopped the guest
    with an internal error (a nested KVM that cannot emulate what the guest does)."""
    if result.booted or result.accelerator != "kvm":
        return False
    if result.stopped_state == "internal-error":
        return True
    reason = result.reason or ""
    return not result.console_tail and reason.startswith("QEMU exited") and "kvm" in reason.lower()


async def _boot_once(
    command: list[str],
    pattern: re.Pattern[str],
    marker: str,
    timeout: float,
    accel: str,
    cpu: str | None,
) -> BootResult:
    """One QEMU run: the marker, QEMU's exit, a stopped guest, or the timeout."""
    started = time.monotonic()
    async with _running_qemu(command) as run:
        await run.watch(pattern, timeout)
    seconds = time.monotonic() - started
    console, stderr = _text(run.console), _text(run.stderr)
    tail = console[-CONSOLE_TAIL_CHARS:]
    cpu_name = cpu or "default"
    if run.matched:
        return BootResult(True, accel, seconds, marker, tail, cpu=cpu_name)
    if run.stopped_state is not None:
        what = STOPPED_STATES.get(run.stopped_state, "QEMU stopped the guest")
        said = qemu_message(stderr)
        reason = f"{what} (QEMU status {run.stopped_state}) before the boot marker {marker!r}" + (
            f": {said}" if said else ""
        )
    elif run.status is None:
        reason = f"no boot marker {marker!r} within the boot timeout of {timeout:g} s"
    elif run.status == 0:
        reason = f"the guest reset or powered off before the boot marker {marker!r}"
        if "Kernel panic" in console:
            reason = f"the guest kernel panicked and reset before the boot marker {marker!r}"
        elif not console.strip():
            reason += " (no bootable disk?)"
    else:
        said = qemu_message(stderr) or "no message"
        reason = f"QEMU exited with status {run.status} before the boot marker: {said}"
    return BootResult(
        False, accel, seconds, marker, tail, reason, cpu=cpu_name, stopped_state=run.stopped_state
    )


_REGISTER_DUMP = re.compile(r"^([A-Z0-9]{2,4}\s*=|extra data\[|Code=|[A-Z]{2}\s+=)")


def qemu_message(stderr: str) -> str:
    """QEMU's own words from its stderr, without the register dump that may follow them:
    e.g. "KVM internal error. Suberror: 1 ... emulation failure"."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    words = [line for line in lines if not _REGISTER_DUMP.match(line)]
    words = [line for line in words if "warning:" not in line] or words
    if len(words) > 2:
        words = [words[0], words[-1]]
    return " ... ".join(words)


class _QemuRun:
    """A started QEMU: its output so far, and how the run ended."""

    def __init__(self, process: asyncio.subprocess.Process, qmp_address: str) -> None:
        self.process = process
        self.qmp_address = qmp_address
        self.console = bytearray()
        self.stderr = bytearray()
        self.matched = False
        self.stopped_state: str | None = None
        self.status: int | None = None
        self._marker_seen = asyncio.Event()
        self._draining = False

    async def watch(self, pattern: re.Pattern[str], timeout: float) -> None:
        """Until the marker, QEMU's exit, a stopped guest or the timeout, whichever is first."""
        assert self.process.stdout is not None and self.process.stderr is not None
        pumps = [
            asyncio.create_task(self._pump(self.process.stdout, self.console, pattern)),
            asyncio.create_task(self._pump(self.process.stderr, self.stderr, None)),
        ]
        ends = [
            asyncio.create_task(self._marker_seen.wait()),
            asyncio.create_task(self._exit(pumps)),
            asyncio.create_task(self._stopped_guest()),
        ]
        try:
            await asyncio.wait(ends, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if self.stopped_state is not None:
                # QEMU writes its message before it stops the guest: let the pipe drain.
                await asyncio.wait(pumps, timeout=0.5)
        finally:
            # The attempt is over. QEMU goes on printing, and with nobody reading, a full pipe
            # would block its vCPU (holding the big lock), so neither QMP nor SIGTERM would get
            # through: keep draining while QEMU is stopped, and only then end the readers.
            self._draining = True
            for task in ends:
                task.cancel()
            await _stop(self.process)
            for task in pumps:
                task.cancel()
            tasks: list[asyncio.Task[object]] = [*ends, *pumps]
            await asyncio.wait(tasks, timeout=_CLEANUP_SECONDS)

    async def _pump(
        self, stream: asyncio.StreamReader, buffer: bytearray, pattern: re.Pattern[str] | None
    ) -> None:
        while chunk := await stream.read(65536):
            if self._draining:
                continue
            buffer += chunk
            del buffer[:-_CONSOLE_KEEP_CHARS]
            if pattern is not None and pattern.search(_text(buffer)):
                self.matched = True
                self._marker_seen.set()

    async def _exit(self, pumps: list[asyncio.Task[None]]) -> None:
        await asyncio.wait(pumps)  # not gather: cancelling this task must not end the readers
        self.status = await self.process.wait()

    async def _stopped_guest(self) -> None:
        """Return when QEMU reports a run state in which the guest no longer runs."""
        try:
            async with QmpSession(self.qmp_address, connect_timeout=30) as qmp:
                while True:
                    status = (await qmp.execute("query-status", timeout=30)).get("status")
                    if status in STOPPED_STATES:
                        self.stopped_state = str(status)
                        return
                    await asyncio.sleep(_STATUS_POLL_SECONDS)
        except QemuError:
            # QEMU went away (its exit is seen by _exit) or never listened: nothing to watch.
            await asyncio.Event().wait()


@contextlib.asynccontextmanager
async def _running_qemu(command: list[str]) -> AsyncIterator[_QemuRun]:
    """Start QEMU with a private QMP monitor and its temporary snapshot files in a private
    folder; stop it on every path."""
    with tempfile.TemporaryDirectory(prefix="lbrestore-boot-") as scratch:
        qmp_path = Path(scratch) / "qmp.sock"
        monitor = ["-qmp", f"unix:{qemu_escape(str(qmp_path))},server=on,wait=off"]
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                *monitor,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=dict(os.environ, TMPDIR=scratch),
            )
        except OSError as exc:
            raise BootTestError(f"cannot start {command[0]}: {exc}") from exc
        try:
            yield _QemuRun(process, f"unix:{qmp_path}")
        finally:
            await _stop(process)


async def _stop(process: asyncio.subprocess.Process) -> None:
    """Terminate QEMU (it has nothing to save: its disks are snapshots) and reap it."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def _text(data: bytes | bytearray) -> str:
    """Console bytes as text; serial consoles carry whatever the guest sends."""
    return data.decode("utf-8", errors="replace")
