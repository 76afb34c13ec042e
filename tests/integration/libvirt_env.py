"""A real libvirtd for the tests, started by hand (no systemd here), and guest-less test domains.

One libvirtd (and virtlogd) serves every test worker of a run: the first worker that needs it
starts it, each worker registers itself, and the last one to leave stops it again, under a file
lock. A libvirtd that was already running when the tests began is used and left running.
/dev/kvm is made root:kvm 0660 for the run (no udev here; libvirt re-probes QEMU on every call
when it cannot open it) and its mode is put back afterwards.

Test domains run as root (a static DAC label), so their disks can live in pytest's tmp folders.
Guest writes go through libvirt's monitor passthrough (HMP qemu-io): tests only.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE = Path("/run/lbrestore-tests-libvirtd")
URI = "qemu:///system"
SOCKET = Path("/run/libvirt/libvirt-sock")
PIDFILES = {"libvirtd": Path("/run/libvirtd.pid"), "virtlogd": Path("/run/virtlogd.pid")}
PREFIX = "lbrt-"


def missing() -> str | None:
    """Why libvirt tests cannot run here, or None."""
    for tool in ("libvirtd", "virtlogd", "virsh"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (Debian: libvirt-daemon-system)"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "libvirt's Python bindings are missing (Debian: python3-libvirt)"
    if os.geteuid() != 0:
        return "starting the system libvirtd needs root"
    return None


def _alive(pidfile: Path) -> bool:
    """Whether the pid file names a live process (not a zombie nobody reaped)."""
    try:
        pid = int(pidfile.read_text().strip())
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    STATE.mkdir(mode=0o700, exist_ok=True)
    with open(STATE / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _users() -> list[Path]:
    users = []
    for entry in (STATE / "users").glob("*"):
        try:
            os.kill(int(entry.name), 0)
            users.append(entry)
        except (OSError, ValueError):
            entry.unlink(missing_ok=True)
    return users


def _start() -> None:
    with contextlib.suppress(KeyError, OSError):
        mode = os.stat("/dev/kvm")
        (STATE / "kvm-mode").write_text(f"{mode.st_uid} {mode.st_gid} {mode.st_mode & 0o7777}")
        os.chown("/dev/kvm", 0, grp.getgrnam("kvm").gr_gid)
        os.chmod("/dev/kvm", 0o660)
    for daemon in ("virtlogd", "libvirtd"):
        if not _alive(PIDFILES[daemon]):
            subprocess.run([daemon, "-d"], check=True)
    (STATE / "started").touch()
    _wait_until_serving()


def _wait_until_serving() -> None:
    """Until a connection works (a socket file left by an earlier daemon may already exist)."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    deadline = time.monotonic() + 30
    while True:
        try:
            libvirt.open(URI).close()
            return
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                raise RuntimeError("libvirtd did not serve within 30 s") from None
            time.sleep(0.1)


def _stop() -> None:
    _destroy_test_domains()
    for daemon in ("libvirtd", "virtlogd"):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(PIDFILES[daemon].read_text().strip()), signal.SIGTERM)
    for daemon in ("libvirtd", "virtlogd"):
        deadline = time.monotonic() + 10
        while _alive(PIDFILES[daemon]) and time.monotonic() < deadline:
            time.sleep(0.05)
    with contextlib.suppress(OSError, ValueError):
        uid, gid, mode = (int(x) for x in (STATE / "kvm-mode").read_text().split())
        os.chown("/dev/kvm", uid, gid)
        os.chmod("/dev/kvm", mode)
    (STATE / "started").unlink(missing_ok=True)


def _destroy_test_domains() -> None:
    import libvirt

    with contextlib.suppress(libvirt.libvirtError):
        conn = libvirt.open(URI)
        for dom in conn.listAllDomains(0):
            if dom.name().startswith(PREFIX):
                remove_domain(dom)
        conn.close()


@contextlib.contextmanager
def running_libvirtd() -> Iterator[None]:
    """libvirtd for this worker: started if nobody runs it, stopped by the last user."""
    me = STATE / "users" / str(os.getpid())
    with _locked():
        (STATE / "users").mkdir(exist_ok=True)
        if not _alive(PIDFILES["libvirtd"]) or not SOCKET.exists():
            _start()
        me.touch()
    try:
        yield
    finally:
        with _locked():
            me.unlink(missing_ok=True)
            if not _users() and (STATE / "started").exists():
                _stop()


def remove_domain(dom: Any) -> None:
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # raised errors suffice

    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            with contextlib.suppress(libvirt.libvirtError):
                dom.abortJob()
            dom.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        dom.undefineFlags(
            libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        )


# --- test domains ---------------------------------------------------------------------------


def virt_type() -> str:
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu"


def domain_xml(name: str, disks: dict[str, Path], *, root: bool = True) -> str:
    """A guest-less domain: q35, 64 MiB, one virtio disk per entry (target dev -> qcow2)."""
    devices = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{path}'/><target dev='{target}' bus='virtio'/></disk>"
        for target, path in disks.items()
    )
    label = (
        "<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>"
        if root
        else ""
    )
    return (
        f"<domain type='{virt_type()}'><name>{name}</name><memory unit='MiB'>64</memory>"
        "<vcpu>1</vcpu><os><type arch='x86_64' machine='q35'>hvm</type></os>"
        f"{label}<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>{devices}"
        "<interface type='user'><model type='virtio'/></interface>"
        "</devices></domain>"
    )


@dataclass
class GuestlessDomain:
    """A running test domain and its disk images."""

    name: str
    disks: dict[str, Path]
    handle: Any = field(repr=False)

    def hmp(self, line: str) -> str:
        import libvirt_qemu

        return str(libvirt_qemu.qemuMonitorCommand(self.handle, line, 1))

    def qmp(self, command: str, **args: Any) -> Any:
        import json

        import libvirt_qemu

        request = json.dumps({"execute": command, "arguments": args})
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(self.handle, request, 0))
        if "error" in reply:
            raise RuntimeError(f"{command}: {reply['error']}")
        return reply["return"]

    def device(self, target: str) -> str:
        """The QOM path of a disk's device (libvirt names it by alias: virtio-disk0, ...)."""
        root = ET.fromstring(self.handle.XMLDesc(0))
        for disk in root.iterfind("devices/disk"):
            if disk.find("target").get("dev") == target:  # type: ignore[union-attr]
                alias = disk.find("alias").get("name")  # type: ignore[union-attr]
                return f"/machine/peripheral/{alias}/virtio-backend"
        raise KeyError(target)

    def qemu_io(self, target: str, command: str) -> None:
        out = self.hmp(f'qemu-io -d {self.device(target)} "{command}"')
        if "error" in out.lower() or "fail" in out.lower():
            raise RuntimeError(f"qemu-io {target} {command!r}: {out.strip()}")

    def node(self, target: str) -> str:
        """The format node of a disk (where its bitmaps live)."""
        for node in self.qmp("query-named-block-nodes", flat=True):
            if node.get("drv") == "qcow2" and node.get("file") == str(self.disks[target]):
                return str(node["node-name"])
        raise KeyError(target)

    def bitmaps(self, target: str) -> list[dict[str, Any]]:
        for node in self.qmp("query-named-block-nodes", flat=True):
            if node.get("node-name") == self.node(target):
                return list(node.get("dirty-bitmaps") or [])
        return []

    def snapshot_all(self, dest_dir: Path, tag: str) -> dict[str, Path]:
        """Every disk as a raw file at this instant (the domain paused: QEMU flushes first)."""
        self.handle.suspend()
        try:
            result = {}
            for target, path in self.disks.items():
                dest = dest_dir / f"{tag}-{self.name}-{target}.raw"
                subprocess.run(
                    ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(path), str(dest)],
                    check=True,
                )
                result[target] = dest
            return result
        finally:
            self.handle.resume()


def create_disk(path: Path, size: int) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    return path


@contextlib.contextmanager
def guestless_domain(
    conn: Any,
    folder: Path,
    name: str,
    sizes: dict[str, int],
    images: dict[str, Path] | None = None,
) -> Iterator[GuestlessDomain]:
    """Define and start a guest-less domain (new qcow2 disks of `sizes`, or existing `images`);
    destroyed and undefined on exit."""
    folder.mkdir(parents=True, exist_ok=True)
    disks = images or {t: create_disk(folder / f"{name}-{t}.qcow2", s) for t, s in sizes.items()}
    dom = conn.defineXML(domain_xml(name, disks))
    try:
        dom.create()
        yield GuestlessDomain(name, disks, dom)
    finally:
        remove_domain(dom)
