"""libvirt plumbing for the backup job: domains, their disks, checkpoints and pull-mode backups.

This module only speaks libvirt (its Python bindings, Debian's python3-libvirt) and its XML; what
a checkpoint means for a store (which one to redefine, when to delete it, when to resync) is
decided in `lbrestore.libvirt_backup`.

libvirt's calls are synchronous; each is quick except `backupBegin` (it waits for libvirt's
state lock while another job of the domain runs). Every `libvirt.libvirtError` is turned into a
`LibvirtError` where it is raised, with libvirt's message and error code.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from lbqemu.errors import CheckpointUnusableError, LibvirtError, LibvirtUnavailableError

T = TypeVar("T")

try:
    import libvirt
except ImportError:  # pragma: no cover - depends on the host
    libvirt = None


def _quiet(_ctx: object, _error: object) -> None:
    """libvirt's default handler prints every error to stderr; ours are raised instead."""


if libvirt is not None:
    libvirt.registerErrorHandler(_quiet, None)


def available() -> bool:
    """Whether libvirt's Python bindings can be imported."""
    return libvirt is not None


def _module() -> Any:
    if libvirt is None:
        raise LibvirtUnavailableError()
    return libvirt


def _call(operation: str, function: Callable[..., T], *args: Any) -> T:
    """`function(*args)`, with libvirt's error turned into a LibvirtError naming `operation`."""
    module = _module()
    try:
        return function(*args)
    except module.libvirtError as exc:
        code = exc.get_error_code()
        message = exc.get_error_message() or str(exc)
        if code == module.VIR_ERR_CHECKPOINT_INCONSISTENT:
            raise CheckpointUnusableError(operation, message, code) from exc
        raise LibvirtError(operation, message, code) from exc


@contextlib.contextmanager
def connection(uri: str) -> Iterator[Any]:
    """An open libvirt connection to `uri` (qemu:///system, qemu+ssh://host/system, ...)."""
    conn = _call(f"connect to {uri}", _module().open, uri)
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def is_remote(uri: str) -> bool:
    """Whether the URI names another host (its NBD export must then travel over TCP)."""
    rest = uri.partition("://")[2]
    host = rest.split("/", 1)[0].rpartition("@")[2].split(":", 1)[0]
    return host not in ("", "localhost", "127.0.0.1", "[::1]")


# --- domains and their disks ---------------------------------------------------------------------


@dataclass(frozen=True)
class DomainDisk:
    """A disk of a domain as its XML describes it; `target` (`vda`) is its name."""

    target: str
    source: str | None
    format: str | None
    kind: str
    read_only: bool

    @property
    def can_checkpoint(self) -> bool:
        """libvirt keeps checkpoint bitmaps only in writable qcow2 images."""
        return self.format == "qcow2" and not self.read_only


def parse_disks(domain_xml: str) -> list[DomainDisk]:
    """The block disks (`device='disk'`, not cdroms or floppies) of a domain XML, in order."""
    disks = []
    for element in ET.fromstring(domain_xml).iterfind("devices/disk"):
        if element.get("device", "disk") != "disk":
            continue
        target = element.find("target")
        if target is None or not target.get("dev"):
            continue
        source = element.find("source")
        path = None
        if source is not None:
            path = source.get("file") or source.get("dev") or source.get("name")
        driver = element.find("driver")
        disks.append(
            DomainDisk(
                target=str(target.get("dev")),
                source=path,
                format=driver.get("type") if driver is not None else None,
                kind=element.get("type", "file"),
                read_only=element.find("readonly") is not None,
            )
        )
    return disks


def dac_owner(domain_xml: str) -> tuple[int, int] | None:
    """The uid and gid QEMU runs as (the live XML's DAC label `+UID:+GID`), if it says so."""
    for label in ET.fromstring(domain_xml).iterfind("seclabel"):
        if label.get("model") != "dac":
            continue
        text = (label.findtext("label") or label.findtext("imagelabel") or "").strip()
        user, _, group = text.partition(":")
        with contextlib.suppress(ValueError):
            return int(user.lstrip("+")), int(group.lstrip("+"))
    return None


_NIC_DEVICES = {"virtio": "virtio-net-pci", "e1000": "e1000", "e1000e": "e1000e"}
_DISK_DEVICES = {"virtio": "virtio-blk-pci", "sata": "ide-hd", "ide": "ide-hd", "scsi": "scsi-hd"}


def domain_facts(domain_xml: str) -> dict[str, Any]:
    """What a domain XML says about the machine, in the shape of the QMP path's definition
    (name, uuid, machine, memory_mib, cpus, arch, disk devices, nics); None where it is silent."""
    root = ET.fromstring(domain_xml)
    memory = root.find("memory")
    memory_mib = None
    if memory is not None and (memory.text or "").strip().isdigit():
        scale = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "b": 1, "bytes": 1}
        memory_mib = int(memory.text or 0) * scale.get(memory.get("unit", "KiB"), 1 << 10) >> 20
    os_type = root.find("os/type")
    vcpu = (root.findtext("vcpu") or "").strip()
    nics = []
    for index, nic in enumerate(root.iterfind("devices/interface")):
        mac = nic.find("mac")
        model = nic.find("model")
        kind = model.get("type", "virtio") if model is not None else "virtio"
        nics.append(
            {
                "id": f"net{index}",
                "model": _NIC_DEVICES.get(kind, kind),
                "mac": mac.get("address") if mac is not None else None,
            }
        )
    devices = {}
    for disk in root.iterfind("devices/disk"):
        target = disk.find("target")
        if target is not None and target.get("dev"):
            devices[str(target.get("dev"))] = _DISK_DEVICES.get(target.get("bus", ""))
    os_element = root.find("os")
    loader = root.find("os/loader")
    uefi = (os_element is not None and os_element.get("firmware") == "efi") or (
        loader is not None and loader.get("type") == "pflash"
    )
    return {
        "name": root.findtext("name"),
        "uuid": root.findtext("uuid"),
        "firmware": "uefi" if uefi else None,
        "machine": os_type.get("machine") if os_type is not None else None,
        "memory_mib": memory_mib,
        "cpus": int(vcpu) if vcpu.isdigit() else None,
        "arch": os_type.get("arch") if os_type is not None else None,
        "disk_devices": devices,
        "nics": nics,
    }


class Domain:
    """One libvirt domain: its XML, checkpoints and backup job."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.name: str = handle.name()

    @classmethod
    def lookup(cls, conn: Any, name: str) -> Domain:
        return cls(_call(f"find domain {name}", conn.lookupByName, name))

    def capacity(self, target: str) -> int:
        """The disk's virtual size in bytes."""
        info = _call(f"size of {self.name}'s disk {target}", self.handle.blockInfo, target, 0)
        return int(info[0])

    def is_active(self) -> bool:
        return bool(_call(f"state of {self.name}", self.handle.isActive))

    def xml(self, inactive: bool = False) -> str:
        """The domain XML: the live one, or the persistent definition (`inactive`)."""
        flags = _module().VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return str(_call(f"XML of {self.name}", self.handle.XMLDesc, flags))

    def definition_xml(self) -> str:
        """The definition to keep with a backup: the persistent one, else the live one."""
        persistent = _call(f"state of {self.name}", self.handle.isPersistent)
        return self.xml(inactive=bool(persistent))

    # --- checkpoints ------------------------------------------------------------------------

    def checkpoint_names(self) -> list[str]:
        found = _call(f"checkpoints of {self.name}", self.handle.listAllCheckpoints, 0)
        return sorted(str(c.getName()) for c in found)

    def _checkpoint(self, name: str) -> Any:
        return _call(f"checkpoint {name}", self.handle.checkpointLookupByName, name, 0)

    def checkpoint_xml(self, name: str) -> str:
        """The checkpoint's XML without the domain's (what is needed to redefine it)."""
        flags = _module().VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN
        return str(_call(f"checkpoint {name}", self._checkpoint(name).getXMLDesc, flags))

    def redefine_checkpoint(self, checkpoint_xml: str) -> None:
        """Make libvirt know a checkpoint again, checking that its bitmaps are in the images.

        The `<parent>` is dropped: it names a checkpoint that may no longer exist (another
        tool's, or this store's, deleted since); libvirt then sees no relation, which is what
        holds (every checkpoint bitmap records on its own)."""
        module = _module()
        root = ET.fromstring(checkpoint_xml)
        for parent in root.findall("parent"):
            root.remove(parent)
        flags = (
            module.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
            | module.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE
        )
        name = root.findtext("name") or "?"
        try:
            _call(
                f"redefine checkpoint {name}",
                self.handle.checkpointCreateXML,
                ET.tostring(root, encoding="unicode"),
                flags,
            )
        except CheckpointUnusableError:
            raise
        except LibvirtError as exc:
            raise CheckpointUnusableError(exc.operation, exc.problem, exc.code) from exc

    def delete_checkpoint(self, name: str, *, metadata_only: bool) -> None:
        """Delete a checkpoint: with its bitmaps, or only libvirt's record of it (the bitmaps
        stay in the images and keep recording)."""
        flags = _module().VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY if metadata_only else 0
        _call(f"delete checkpoint {name}", self._checkpoint(name).delete, flags)

    def delete_bitmap(self, name: str, target: str) -> bool:
        """Delete the bitmap `name` of one disk of a running domain through libvirt (it owns
        QEMU's monitor): a checkpoint naming just that bitmap is redefined, then deleted with
        it. False when the disk has no such bitmap (the stand-in is then dropped again)."""
        stand_in = (
            f"<domaincheckpoint><name>{name}</name><creationTime>1</creationTime><disks>"
            f"<disk name='{target}' checkpoint='bitmap' bitmap='{name}'/></disks>"
            "</domaincheckpoint>"
        )
        flags = _module().VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
        _call(f"checkpoint {name}", self.handle.checkpointCreateXML, stand_in, flags)
        try:
            self.delete_checkpoint(name, metadata_only=False)
        except LibvirtError:
            self.delete_checkpoint(name, metadata_only=True)
            return False
        return True

    # --- pull-mode backup -------------------------------------------------------------------

    def begin_pull_backup(self, backup_xml: str, checkpoint_xml: str | None) -> None:
        _call(
            f"begin the backup of {self.name}",
            self.handle.backupBegin,
            backup_xml,
            checkpoint_xml,
            0,
        )

    def backup_xml(self) -> str:
        return str(_call(f"backup job of {self.name}", self.handle.backupGetXMLDesc, 0))

    def has_job(self) -> bool:
        info = _call(f"job of {self.name}", self.handle.jobInfo)
        return bool(info and info[0] != _module().VIR_DOMAIN_JOB_NONE)

    def abort_job(self) -> None:
        """End the pull-mode backup job (it ends only this way); its exports go with it."""
        _call(f"end the backup job of {self.name}", self.handle.abortJob)


@dataclass(frozen=True)
class BackupDisk:
    """One disk in a pull-mode backup: `incremental` names the checkpoint to read changes
    since (None: the whole disk); `scratch` is the file for copy-before-write data."""

    target: str
    scratch: str
    incremental: str | None = None


def pull_backup_xml(
    disks: list[BackupDisk],
    excluded: list[str],
    *,
    socket: str | None = None,
    tcp: tuple[str, int] | None = None,
    tls: bool = False,
) -> str:
    """The `<domainbackup mode='pull'>` XML: an NBD server on `socket`, or on `tcp` (host, port)
    with TLS (libvirt's backup_tls_x509_cert_dir on the server side)."""
    root = ET.Element("domainbackup", mode="pull")
    if socket is not None:
        ET.SubElement(root, "server", transport="unix", socket=socket)
    elif tcp is not None:
        server = ET.SubElement(root, "server", transport="tcp", name=tcp[0], port=str(tcp[1]))
        if tls:
            server.set("tls", "yes")
    listed = ET.SubElement(root, "disks")
    for disk in disks:
        element = ET.SubElement(listed, "disk", name=disk.target, backup="yes", type="file")
        if disk.incremental:
            element.set("backupmode", "incremental")
            element.set("incremental", disk.incremental)
        else:
            element.set("backupmode", "full")
        ET.SubElement(element, "scratch", file=disk.scratch)
    for target in excluded:
        ET.SubElement(listed, "disk", name=target, backup="no")
    return ET.tostring(root, encoding="unicode")


def checkpoint_xml(name: str, with_bitmap: list[str], without: list[str]) -> str:
    """A `<domaincheckpoint>`: a bitmap for each of `with_bitmap`, none for `without`."""
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = name
    listed = ET.SubElement(root, "disks")
    for target in with_bitmap:
        ET.SubElement(listed, "disk", name=target, checkpoint="bitmap")
    for target in without:
        ET.SubElement(listed, "disk", name=target, checkpoint="no")
    return ET.tostring(root, encoding="unicode")


def exports(backup_xml: str) -> dict[str, tuple[str, str | None]]:
    """target -> (export name, dirty bitmap name or None) of a running pull-mode backup."""
    result = {}
    for element in ET.fromstring(backup_xml).iterfind("disks/disk"):
        if element.get("backup") == "no":
            continue
        target = str(element.get("name"))
        result[target] = (element.get("exportname") or target, element.get("exportbitmap"))
    return result


def backup_socket(backup_xml: str) -> str | None:
    """The unix socket of a running pull-mode backup's NBD server (None for TCP)."""
    server = ET.fromstring(backup_xml).find("server")
    if server is None or server.get("transport", "tcp") != "unix":
        return None
    return server.get("socket")


def checkpoint_name(checkpoint_xml_text: str) -> str:
    return ET.fromstring(checkpoint_xml_text).findtext("name") or ""


def checkpoint_disks(checkpoint_xml_text: str) -> list[str]:
    """The disks whose changes a checkpoint's bitmaps record."""
    root = ET.fromstring(checkpoint_xml_text)
    return [
        str(d.get("name"))
        for d in root.iterfind("disks/disk")
        if d.get("checkpoint", "bitmap") == "bitmap"
    ]


# --- whole connection ----------------------------------------------------------------------------


def domain_names(conn: Any, include_inactive: bool) -> list[str]:
    """Running domains (and defined inactive ones with `include_inactive`), sorted by name."""
    module = _module()
    flags = 0 if include_inactive else module.VIR_CONNECT_LIST_DOMAINS_ACTIVE
    found = _call("list domains", conn.listAllDomains, flags)
    return sorted(str(d.name()) for d in found)


def define(conn: Any, domain_xml: str, start: bool) -> str:
    """Define a domain from its XML (and start it): its name."""
    handle = _call("define the domain", conn.defineXML, domain_xml)
    if start:
        _call(f"start {handle.name()}", handle.create)
    return str(handle.name())


# --- images of an inactive domain, read directly -----------------------------------------------


def image_bitmaps(path: str) -> dict[str, bool]:
    """The persistent bitmaps in a qcow2 image (`qemu-img info`): name -> whether it can be
    trusted (not left `in-use` by a QEMU that did not shut down cleanly)."""
    info = _qemu_img("info", "--output=json", "-U", path)
    specific = (json.loads(info).get("format-specific") or {}).get("data") or {}
    return {
        str(b["name"]): "in-use" not in (b.get("flags") or [])
        for b in specific.get("bitmaps") or []
    }


def remove_image_bitmap(path: str, name: str) -> None:
    _qemu_img("bitmap", "--remove", path, name)


def _qemu_img(*args: str) -> str:
    try:
        done = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    except OSError as exc:
        raise LibvirtError(f"qemu-img {args[0]}", str(exc)) from exc
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["failed"]
        raise LibvirtError(f"qemu-img {args[0]} {args[-1]}", lines[-1])
    return done.stdout
