"""A throwaway QEMU virtual machine for integration tests (no guest OS needed).

The VM follows ARCHITECTURE.md's test recipe: q35, `accel=kvm:tcg`, `-S`, one qcow2 file per disk
attached to a virtio-blk-pci device whose id is the disk name. It has two QMP monitors: `ctl.sock`
for the test itself (this harness, synchronous) and `qmp.sock` for the code under test, because a
QMP socket serves one client at a time and tests write through the device while a backup runs.

Guest writes go through the device with `human-monitor-command` + `qemu-io`, so they hit the same
paths as a guest's writes (dirty bitmaps, copy-before-write).
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20
SPARE_ROOT_PORTS = 4


class VMError(RuntimeError):
    """The test VM failed to start or to answer; carries the command line and QEMU's output."""


class SyncQmp:
    """A minimal blocking QMP client (JSON lines over a unix socket).

    Not qemu.qmp's legacy client: that one runs its own event loop, so it cannot be called from
    a hook that runs on the event loop of the backup job under test."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(str(path))
            self.file = self.sock.makefile("rwb")
            greeting = self._read()
            if "QMP" not in greeting:
                raise VMError(f"unexpected QMP greeting: {greeting}")
            self.execute("qmp_capabilities", None)
        except BaseException:
            self.sock.close()
            raise

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise VMError("QMP connection closed")
        return dict(json.loads(line))

    def execute(self, command: str, args: dict[str, Any] | None) -> dict[str, Any]:
        """Send one command; return its reply (events in between are dropped)."""
        message: dict[str, Any] = {"execute": command}
        if args:
            message["arguments"] = args
        self.file.write(json.dumps(message).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "return" in reply or "error" in reply:
                return reply

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        self.sock.close()


@dataclass
class Disk:
    """One disk of the test VM: its device id, node names and qcow2 file."""

    name: str
    path: Path
    size: int
    hotplugged: bool = False
    anonymous: bool = False  # attached to a device without an id: named by its node
    fmt: str = "qcow2"

    @property
    def node(self) -> str:
        return f"fmt-{self.name}"

    @property
    def file_node(self) -> str:
        return f"file-{self.name}"


@dataclass
class TestVM:
    """A QEMU process with N qcow2 disks that can be stopped, killed and restarted in place."""

    workdir: Path
    disks: dict[str, Disk] = field(default_factory=dict)
    name: str = "vm1"
    accel: str = "unknown"
    proc: subprocess.Popen[bytes] | None = None
    _ctl: SyncQmp | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _free_ports: list[str] = field(default_factory=list)

    __test__ = False  # not a pytest test class despite the name

    @property
    def qmp_socket(self) -> Path:
        """The QMP socket reserved for the code under test."""
        return self.workdir / "qmp.sock"

    @property
    def qmp_address(self) -> str:
        return f"unix:{self.qmp_socket}"

    @property
    def second_qmp_address(self) -> str:
        """Another QMP monitor for code under test (two receivers at once)."""
        return f"unix:{self.workdir / 'qmp2.sock'}"

    @property
    def ctl_socket(self) -> Path:
        return self.workdir / "ctl.sock"

    def create_disk(self, name: str, size: int, fmt: str = "qcow2") -> Disk:
        """Create the image file of a disk (qcow2 or raw; not yet attached)."""
        path = self.workdir / f"{name}.{fmt}"
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True)
        disk = Disk(name, path, size, fmt=fmt)
        self.disks[name] = disk
        return disk

    def command_line(self) -> list[str]:
        """The QEMU command line for the current set of disks."""
        args = [
            "qemu-system-x86_64",
            "-machine", "q35,accel=kvm:tcg",
            "-name", self.name,
            "-m", "64",
            "-S", "-nodefaults", "-display", "none",
            "-qmp", f"unix:{self.ctl_socket},server=on,wait=off",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            "-qmp", f"{self.second_qmp_address},server=on,wait=off",
            "-netdev", "user,id=hostnet0,restrict=on",
            "-device", "virtio-net-pci,netdev=hostnet0,id=net0,mac=52:54:00:12:34:56",
        ]  # fmt: skip
        for disk in self.disks.values():
            device = f"virtio-blk-pci,drive={disk.node}"
            args += [
                "-blockdev",
                f"driver=file,filename={disk.path},node-name={disk.file_node}",
                "-blockdev",
                f"driver={disk.fmt},file={disk.file_node},node-name={disk.node}",
                "-device",
                device if disk.anonymous else f"{device},id={disk.name}",
            ]
        self._free_ports = [f"rp{i}" for i in range(SPARE_ROOT_PORTS)]
        for i, port in enumerate(self._free_ports):
            args += ["-device", f"pcie-root-port,id={port},chassis={i + 1}"]
        return args

    def start(self) -> None:
        """Launch QEMU and connect the harness monitor, retrying until QEMU accepts."""
        for sock in (self.ctl_socket, self.qmp_socket, self.workdir / "qmp2.sock"):
            sock.unlink(missing_ok=True)
        args = self.command_line()
        log = open(self.workdir / "qemu.log", "ab")  # noqa: SIM115 - lives as long as QEMU
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                output = (self.workdir / "qemu.log").read_text(errors="replace")
                raise VMError(f"QEMU exited with {self.proc.returncode}: {args}\n{output}")
            try:
                ctl = SyncQmp(self.ctl_socket)
                break
            except OSError:  # the socket exists before QEMU accepts: retry
                if time.monotonic() > deadline:
                    raise VMError(f"QEMU never accepted QMP: {args}") from None
                time.sleep(0.05)
        self._ctl = ctl
        kvm = self.cmd("query-kvm")
        self.accel = "kvm" if kvm.get("enabled") else "tcg"
        self.cmd("cont")

    def cmd(self, command: str, /, **args: Any) -> Any:
        """Run one QMP command on the harness monitor; raises VMError with QEMU's message."""
        assert self._ctl is not None, "VM not running"
        with self._lock:
            reply = self._ctl.execute(command, args or None)
        if "error" in reply:
            raise VMError(f"{command}: {reply['error'].get('desc')}")
        return reply["return"]

    def hmp(self, line: str) -> str:
        """Run one human monitor command; returns its text output."""
        return str(self.cmd("human-monitor-command", **{"command-line": line}))

    def qemu_io(self, disk: str, command: str) -> None:
        """A guest-like write through the disk's device (`write -P 0xab 0 64k`, `discard ...`)."""
        out = self.hmp(f'qemu-io -d /machine/peripheral/{disk}/virtio-backend "{command}"')
        if "error" in out.lower() or "fail" in out.lower():
            raise VMError(f"qemu-io {disk} {command!r}: {out.strip()}")

    def snapshot(self, disk: str, dest: Path) -> Path:
        """The disk's contents at this instant as a raw file (VM stopped during the copy)."""
        self.cmd("stop")
        try:
            subprocess.run(
                ["qemu-img", "convert", "-U", "-f", self.disks[disk].fmt, "-O", "raw",
                 str(self.disks[disk].path), str(dest)],
                check=True,
            )  # fmt: skip
        finally:
            self.cmd("cont")
        return dest

    def snapshot_all(self, dest_dir: Path, tag: str) -> dict[str, Path]:
        """Snapshots of every disk taken within one stop/cont."""
        self.cmd("stop")
        try:
            result = {}
            for name, disk in self.disks.items():
                dest = dest_dir / f"{tag}-{name}.raw"
                subprocess.run(
                    ["qemu-img", "convert", "-U", "-f", disk.fmt, "-O", "raw",
                     str(disk.path), str(dest)],
                    check=True,
                )  # fmt: skip
                result[name] = dest
            return result
        finally:
            self.cmd("cont")

    def add_disk(self, name: str, size: int) -> Disk:
        """Hot-plug a new disk (blockdev-add + device_add on a spare PCIe root port)."""
        disk = self.create_disk(name, size)
        disk.hotplugged = True
        self.cmd(
            "blockdev-add", driver="file", filename=str(disk.path), **{"node-name": disk.file_node}
        )
        self.cmd("blockdev-add", driver="qcow2", file=disk.file_node, **{"node-name": disk.node})
        port = self._free_ports.pop(0)
        self.cmd("device_add", driver="virtio-blk-pci", drive=disk.node, id=name, bus=port)
        return disk

    def resize(self, disk: str, size: int) -> None:
        """Grow a disk while the VM runs (block_resize on its format node)."""
        self.cmd("block_resize", **{"node-name": self.disks[disk].node, "size": size})
        self.disks[disk].size = size

    def bitmaps(self, disk: str) -> list[dict[str, Any]]:
        """The dirty bitmaps on a disk's format node, as QEMU reports them."""
        for node in self.cmd("query-named-block-nodes", flat=True):
            if node.get("node-name") == self.disks[disk].node:
                return list(node.get("dirty-bitmaps", []))
        return []

    def _close_ctl(self) -> None:
        if self._ctl is not None:
            with contextlib.suppress(Exception):
                self._ctl.close()
            self._ctl = None

    def quit(self) -> None:
        """Clean shutdown: persistent bitmaps are written to the qcow2 files."""
        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            self.cmd("quit")
        self._close_ctl()
        self.proc.wait(timeout=60)
        self.proc = None

    def kill9(self) -> None:
        """Crash QEMU (SIGKILL): bitmaps loaded from the files become inconsistent."""
        if self.proc is None:
            return
        self._close_ctl()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        self.proc = None

    def restart(self, *, crash: bool = False) -> None:
        """Stop QEMU (cleanly, or with SIGKILL) and start it again on the same disk files."""
        if crash:
            self.kill9()
        else:
            self.quit()
        self.start()


@contextlib.contextmanager
def running_vm(
    workdir: Path, disks: dict[str, int] | None = None, name: str = "vm1"
) -> Iterator[TestVM]:
    """A started TestVM with the given disks (name -> size); always killed afterwards."""
    workdir.mkdir(parents=True, exist_ok=True)
    vm = TestVM(workdir=workdir, name=name)
    for disk_name, size in (disks or {"vda": 32 * MiB, "vdb": 16 * MiB}).items():
        vm.create_disk(disk_name, size)
    vm.start()
    try:
        yield vm
    finally:
        with contextlib.suppress(Exception):
            vm.quit()
        if vm.proc is not None:
            vm.kill9()
