"""The VM definition for a new host: a rewritten libvirt domain XML and a QEMU start script.

A restore point carries the VM definition captured at backup time (docs/internals.md): machine,
memory, CPUs, disks, NICs and, when known, the libvirt domain XML. A restored VM must not collide
with the original on the network or in libvirt, so it gets a new name (when asked), a new UUID
and new MAC addresses, and its disks point at the restored files. Things that only made sense on
the old host (live ids, device aliases, security labels, tap device names, pty paths, NVRAM
files that were not backed up) are dropped so that libvirt fills them in afresh.

A QEMU command-line script is written in every case, so that a restore is usable without
libvirt. Missing facts (memory unknown, say) are left to QEMU's defaults, never guessed.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shlex
import uuid as uuid_module
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lbrestore.errors import AppError

MAC_PREFIX = "52:54:00"
"""QEMU's locally administered OUI; libvirt and QEMU use it for generated MACs."""

_LIBVIRT_DISK_BUSES = {"virtio-blk-pci": "virtio", "ide-hd": "sata", "scsi-hd": "scsi"}
_NIC_MODELS = {
    "virtio-net-pci": "virtio",
    "e1000": "e1000",
    "e1000e": "e1000e",
    "rtl8139": "rtl8139",
}


class DefinitionError(AppError):
    """The VM definition cannot be turned into a definition for the new host."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"VM definition: {problem}")
        self.problem = problem


@dataclass(frozen=True, slots=True)
class RestoredDisk:
    """A disk as restored: its name in the store, the restored file, format and size."""

    name: str
    path: Path
    format: str
    virtual_size: int


@dataclass(slots=True)
class HostDefinition:
    """What the new host gets: identity, file paths and notes on what was changed or dropped."""

    name: str
    uuid: str
    macs: dict[str, str]
    script_path: Path
    libvirt_xml_path: Path | None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready form for `restore --json`."""
        return {
            "name": self.name,
            "uuid": self.uuid,
            "macs": self.macs,
            "script": str(self.script_path),
            "libvirt_xml": str(self.libvirt_xml_path) if self.libvirt_xml_path else None,
            "notes": self.notes,
        }

    def moved_to(self, folder: Path) -> HostDefinition:
        """The same definition with its files in `folder` (written in a stage folder first)."""
        xml = self.libvirt_xml_path
        return dataclasses.replace(
            self,
            script_path=folder / self.script_path.name,
            libvirt_xml_path=folder / xml.name if xml is not None else None,
        )


def new_mac() -> str:
    """A random MAC address under QEMU's 52:54:00 prefix."""
    tail = secrets.token_bytes(3)
    return MAC_PREFIX + "".join(f":{b:02x}" for b in tail)


def new_uuid() -> str:
    """A random UUID for the restored VM."""
    return str(uuid_module.uuid4())


def qemu_escape(value: str) -> str:
    """A value for a QEMU option list: commas are doubled."""
    return value.replace(",", ",,")


def qemu_device_for(device: str | None, drive_id: str, *, bootindex: int) -> str:
    """The -device option of a disk: the original bus when QEMU can recreate it, else virtio.

    A guest without virtio drivers (installed on IDE/SATA or SCSI) would not boot from
    virtio-blk, so ide-hd and scsi-hd are kept; everything else becomes virtio-blk-pci.
    """
    if device == "ide-hd":
        return f"ide-hd,drive={drive_id},bootindex={bootindex}"
    if device == "scsi-hd":
        return f"scsi-hd,drive={drive_id},bootindex={bootindex}"
    return f"virtio-blk-pci,drive={drive_id},id={drive_id},bootindex={bootindex}"


def write_host_definition(
    definition: Mapping[str, Any] | None,
    disks: Sequence[RestoredDisk],
    out_dir: Path,
    *,
    name: str,
    file_suffix: str = "",
) -> HostDefinition:
    """Write `start-<name>.sh` (always) and `<name>.xml` (when feasible) into `out_dir`.

    `file_suffix` is appended to the file names (the caller writes to temporary names and
    renames them when the whole restore is complete).
    """
    definition = definition or {}
    host = HostDefinition(
        name=name,
        uuid=new_uuid(),
        macs={_nic_key(nic, i): new_mac() for i, nic in enumerate(_nics(definition))},
        script_path=out_dir / f"start-{name}.sh",
        libvirt_xml_path=None,
    )
    script = qemu_script(definition, disks, host)
    _write_private(out_dir / f"start-{name}.sh{file_suffix}", script, 0o700)
    xml = domain_xml(definition, disks, host)
    if xml is not None:
        host.libvirt_xml_path = out_dir / f"{name}.xml"
        _write_private(out_dir / f"{name}.xml{file_suffix}", xml, 0o600)
    return host


def _write_private(path: Path, text: str, mode: int) -> None:
    """Write a new file readable by its owner only (it names the restored disks), durably."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        os.fchmod(fd, mode)
        file.write(text)
        file.flush()
        os.fsync(fd)


def domain_xml(
    definition: Mapping[str, Any], disks: Sequence[RestoredDisk], host: HostDefinition
) -> str | None:
    """The libvirt domain XML for the new host, or None (with a note) when it is not feasible."""
    source = definition.get("libvirt_xml")
    if source:
        return rewrite_libvirt_xml(source, disks, host)
    return generate_libvirt_xml(definition, disks, host)


# --- libvirt XML rewrite ----------------------------------------------------------------------


def rewrite_libvirt_xml(source: str, disks: Sequence[RestoredDisk], host: HostDefinition) -> str:
    """The source domain XML with new identity, restored disks and host-specific bits removed."""
    try:
        root = ET.fromstring(source)
    except ET.ParseError as exc:
        raise DefinitionError(f"the stored libvirt XML does not parse: {exc}") from exc
    if root.tag != "domain":
        raise DefinitionError(f"the stored libvirt XML is a <{root.tag}>, not a <domain>")
    root.attrib.pop("id", None)
    _set_text(root, "name", host.name)
    _set_text(root, "uuid", host.uuid)
    _drop_stale_elements(root, host)
    devices = root.find("devices")
    if devices is not None:
        _rewrite_disks(devices, disks, host)
        _rewrite_interfaces(devices, host)
        _rewrite_char_devices(devices)
        _rewrite_graphics(devices)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def _set_text(parent: ET.Element, tag: str, text: str) -> None:
    """Set the text of parent's child `tag`, creating it at the top when missing."""
    child = parent.find(tag)
    if child is None:
        child = ET.Element(tag)
        parent.insert(0, child)
    child.text = text


def _drop_stale_elements(root: ET.Element, host: HostDefinition) -> None:
    """Remove what belongs to the old host's running instance, not to the VM."""
    for seclabel in root.findall("seclabel"):
        root.remove(seclabel)
    for parent in root.iter():
        for child in list(parent):
            user_alias = child.tag == "alias" and child.get("name", "").startswith("ua-")
            if child.tag in ("alias", "seclabel") and not user_alias:
                parent.remove(child)
    os_element = root.find("os")
    nvram = os_element.find("nvram") if os_element is not None else None
    if os_element is not None and nvram is not None:
        os_element.remove(nvram)
        host.notes.append("UEFI variables (NVRAM) are not in the backup: libvirt starts afresh")


def _disk_key(disk: ET.Element) -> set[str]:
    """The names a libvirt <disk> may be known by in the store: target dev and alias."""
    keys = set()
    target = disk.find("target")
    if target is not None and target.get("dev"):
        keys.add(target.get("dev", ""))
    alias = disk.find("alias")
    if alias is not None and alias.get("name"):
        keys.add(alias.get("name", "").removeprefix("ua-"))
    return keys


def _rewrite_disks(
    devices: ET.Element, disks: Sequence[RestoredDisk], host: HostDefinition
) -> None:
    """Point disks at the restored files; empty removable media; drop disks not restored.

    Disks are matched by name (target dev or user alias); disks left over are matched in order.
    """
    elements = [d for d in devices.findall("disk") if d.get("device", "disk") == "disk"]
    by_name = {d.name: d for d in disks}
    matched: dict[int, RestoredDisk] = {}
    for index, element in enumerate(elements):
        for key in _disk_key(element):
            if key in by_name:
                matched[index] = by_name.pop(key)
                break
    leftovers = [d for d in disks if d.name in by_name]
    for index in range(len(elements)):
        if index not in matched and leftovers:
            matched[index] = leftovers.pop(0)
    for index, element in enumerate(elements):
        restored = matched.get(index)
        if restored is None:
            devices.remove(element)
            host.notes.append(f"disk {sorted(_disk_key(element))} is not in the restore point")
        else:
            _point_disk_at(element, restored)
    for element in devices.findall("disk"):
        if element.get("device") in ("cdrom", "floppy"):
            for child in element.findall("source"):
                element.remove(child)
            element.set("type", "file")
    for restored in leftovers:
        host.notes.append(f"restored disk {restored.name} has no <disk> in the libvirt XML")


def _point_disk_at(element: ET.Element, restored: RestoredDisk) -> None:
    """Make a <disk> a plain file disk on the restored image."""
    element.set("type", "file")
    for tag in ("source", "backingStore", "mirror", "auth", "encryption", "reservations"):
        for child in element.findall(tag):
            element.remove(child)
    driver = element.find("driver")
    if driver is None:
        driver = ET.Element("driver")
        element.insert(0, driver)
    driver.set("name", "qemu")
    driver.set("type", restored.format)
    source = ET.Element("source", {"file": str(restored.path)})
    element.insert(list(element).index(driver) + 1, source)


def _rewrite_interfaces(devices: ET.Element, host: HostDefinition) -> None:
    """New MACs on every NIC; tap device names are the old host's."""
    macs = iter(host.macs.values())
    for interface in devices.findall("interface"):
        for child in interface.findall("target"):
            interface.remove(child)
        mac = interface.find("mac")
        if mac is None:
            mac = ET.Element("mac")
            interface.insert(0, mac)
        address = next(macs, None) or new_mac()
        mac.set("address", address)


def _rewrite_char_devices(devices: ET.Element) -> None:
    """Drop old pty paths and generated unix socket paths; libvirt makes new ones."""
    for element in devices:
        if element.tag not in ("serial", "console", "channel", "parallel"):
            continue
        element.attrib.pop("tty", None)
        for source in element.findall("source"):
            path = source.get("path", "")
            if element.get("type") == "pty" or path.startswith("/var/lib/libvirt/"):
                element.remove(source)


def _rewrite_graphics(devices: ET.Element) -> None:
    """Automatically assigned display ports belong to the old host's running instance."""
    for graphics in devices.findall("graphics"):
        if graphics.get("autoport") == "yes":
            graphics.attrib.pop("port", None)
            graphics.attrib.pop("websocket", None)


# --- libvirt XML from the captured definition -------------------------------------------------


def generate_libvirt_xml(
    definition: Mapping[str, Any], disks: Sequence[RestoredDisk], host: HostDefinition
) -> str | None:
    """A domain XML built from the captured facts; None when memory is unknown (libvirt needs
    it, and it is never guessed)."""
    memory_mib = definition.get("memory_mib")
    if not memory_mib:
        host.notes.append("memory size unknown: no libvirt XML generated, see the QEMU script")
        return None
    root = ET.Element("domain", {"type": "kvm"})
    ET.SubElement(root, "name").text = host.name
    ET.SubElement(root, "uuid").text = host.uuid
    ET.SubElement(root, "memory", {"unit": "MiB"}).text = str(int(memory_mib))
    ET.SubElement(root, "vcpu").text = str(int(definition.get("cpus") or 1))
    os_element = ET.SubElement(root, "os")
    if definition.get("firmware") == "uefi":
        os_element.set("firmware", "efi")  # libvirt picks OVMF and makes the NVRAM
    os_type = ET.SubElement(os_element, "type", {"arch": "x86_64"})
    if definition.get("machine"):
        os_type.set("machine", str(definition["machine"]))
    os_type.text = "hvm"
    features = ET.SubElement(root, "features")
    ET.SubElement(features, "acpi")
    devices = ET.SubElement(root, "devices")
    devices_by_name = {d.get("name"): d for d in definition.get("disks") or []}
    for index, disk in enumerate(disks):
        _generated_disk(devices, disk, devices_by_name.get(disk.name) or {}, index)
    for index, nic in enumerate(_nics(definition)):
        interface = ET.SubElement(devices, "interface", {"type": "user"})
        ET.SubElement(interface, "mac", {"address": host.macs[_nic_key(nic, index)]})
        model = _NIC_MODELS.get(str(nic.get("model")), "virtio")
        ET.SubElement(interface, "model", {"type": model})
    ET.SubElement(devices, "serial", {"type": "pty"})
    ET.SubElement(devices, "console", {"type": "pty"})
    host.notes.append("libvirt XML generated from the captured definition (user networking)")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def _generated_disk(
    devices: ET.Element, disk: RestoredDisk, captured: Mapping[str, Any], index: int
) -> None:
    """One <disk> element of a generated domain, on the bus the disk was captured on."""
    bus = _LIBVIRT_DISK_BUSES.get(str(captured.get("device")), "virtio")
    prefix = {"virtio": "vd", "sata": "sd", "scsi": "sd"}[bus]
    element = ET.SubElement(devices, "disk", {"type": "file", "device": "disk"})
    ET.SubElement(element, "driver", {"name": "qemu", "type": disk.format})
    ET.SubElement(element, "source", {"file": str(disk.path)})
    ET.SubElement(element, "target", {"dev": prefix + _drive_letters(index), "bus": bus})
    if index == 0:
        ET.SubElement(element, "boot", {"order": "1"})


def _drive_letters(index: int) -> str:
    """a, b, ..., z, aa, ab, ... as libvirt and Linux name drives."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return letters


def _nics(definition: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The captured NICs (a list of objects), tolerant of a missing field."""
    nics = definition.get("nics") or []
    return [n for n in nics if isinstance(n, Mapping)]


def _nic_key(nic: Mapping[str, Any], index: int) -> str:
    """The key a NIC's new MAC is filed under: its id, else its position."""
    return str(nic.get("id") or f"nic{index}")


# --- QEMU start script -------------------------------------------------------------------------


def qemu_script(
    definition: Mapping[str, Any], disks: Sequence[RestoredDisk], host: HostDefinition
) -> str:
    """A POSIX shell script that starts the restored VM with qemu-system-x86_64.

    Disk paths are relative to the script's folder, so the folder can be moved. Extra QEMU
    options are passed through ("$@"), e.g. `-S -display none`; NET=none starts it without NICs.
    """
    lines = [
        "#!/bin/sh",
        f"# Start {host.name}, restored by lbrestore, with QEMU.",
        "# Extra QEMU options may follow, e.g. -S -display none; NET=none starts it without NICs;",
        "# CPU=host (or another model) for guests that need more than QEMU's default CPU model;",
        "# ACCEL=tcg where KVM cannot run the guest (default kvm:tcg, KVM when the host has it).",
        *[f"# {note}" for note in _script_notes(definition)],
        "set -eu",
        'DIR=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)',
        "D=$(printf '%s' \"$DIR\" | sed 's/,/,,/g')",
        'NET="${NET:-user}"',
        'ACCEL="${ACCEL:-kvm:tcg}"',
        'if [ "$NET" = none ]; then',
        '  set -- -nic none "$@"',
        "else",
        "  set --" + _nic_arguments(definition, host) + ' "$@"',
        "fi",
        'if [ -n "${CPU:-}" ]; then',
        '  set -- -cpu "$CPU" "$@"',
        "fi",
        *(_uefi_lines(host) if definition.get("firmware") == "uefi" else []),
        "set --" + _script_arguments(definition, disks, host) + ' "$@"',
        'exec "${QEMU:-qemu-system-x86_64}" "$@"',
    ]
    return "\n".join(lines) + "\n"


OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"


def _uefi_lines(host: HostDefinition) -> list[str]:
    """OVMF's firmware (OVMF_CODE=), and a variable store beside the script, made from OVMF's
    template on the first start (the old host's UEFI variables are not in the backup)."""
    variables = f"{host.name}_VARS.fd"  # VM names need no quoting ([A-Za-z0-9._-])
    return [
        f'OVMF_CODE="${{OVMF_CODE:-{OVMF_CODE}}}"',
        f'OVMF_VARS="${{OVMF_VARS:-$DIR/{variables}}}"',
        f'[ -e "$OVMF_VARS" ] || cp "${{OVMF_VARS_TEMPLATE:-{OVMF_VARS}}}" "$OVMF_VARS"',
        'set -- -drive "if=pflash,unit=0,format=raw,readonly=on,file=$(printf \'%s\' "$OVMF_CODE"'
        " | sed 's/,/,,/g')\" \\",
        '  -drive "if=pflash,unit=1,format=raw,file=$(printf \'%s\' "$OVMF_VARS"'
        ' | sed \'s/,/,,/g\')" "$@"',
    ]


def _script_notes(definition: Mapping[str, Any]) -> list[str]:
    """Comments for facts that were unknown and left to QEMU's defaults."""
    notes = []
    for key, what in (("machine", "machine type"), ("memory_mib", "memory"), ("cpus", "CPUs")):
        if not definition.get(key):
            notes.append(f"{what} unknown at backup time: QEMU's default is used")
    if definition.get("firmware") == "uefi":
        notes.append("UEFI: OVMF_CODE= (firmware) and OVMF_VARS= (its variables) may be set")
    return notes


def _script_arguments(
    definition: Mapping[str, Any], disks: Sequence[RestoredDisk], host: HostDefinition
) -> str:
    """The QEMU arguments, one option per continuation line, quoted for the shell."""
    machine = str(definition.get("machine") or "")
    machine_option = (shlex.quote(f"{machine},") if machine else "") + '"accel=$ACCEL"'
    options: list[tuple[str, ...]] = [
        ("-name", shlex.quote(qemu_escape(host.name))),
        ("-machine", machine_option),
        ("-uuid", host.uuid),
        ("-nodefaults",),
    ]
    if definition.get("memory_mib"):
        options.append(("-m", str(int(definition["memory_mib"]))))
    if definition.get("cpus"):
        options.append(("-smp", str(int(definition["cpus"]))))
    options += [("-vga", "std"), ("-serial", "mon:stdio")]
    captured = {d.get("name"): d for d in definition.get("disks") or []}
    for index, disk in enumerate(disks):
        node = f"disk{index}"
        file_name = shlex.quote(qemu_escape(disk.path.name))
        device = (captured.get(disk.name) or {}).get("device")
        options += [
            ("-blockdev", f'"driver=file,filename=$D/"{file_name},node-name={node}-file'),
            ("-blockdev", f"driver={disk.format},file={node}-file,node-name={node}"),
            ("-device", qemu_device_for(device, node, bootindex=index)),
        ]
    return _continued(options)


def _nic_arguments(definition: Mapping[str, Any], host: HostDefinition) -> str:
    """The -nic options: the captured NICs with new MACs on "$NET" networking (user by default)."""
    options: list[tuple[str, ...]] = []
    for index, nic in enumerate(_nics(definition)):
        model = str(nic.get("model") or "virtio-net-pci")
        mac = host.macs[_nic_key(nic, index)]
        options.append(("-nic", f'"$NET",model={shlex.quote(qemu_escape(model))},mac={mac}'))
    return _continued(options or [("-nic", "none")], indent="    ")


def _continued(options: Sequence[tuple[str, ...]], indent: str = "  ") -> str:
    """Options (each with its value, if any), one per shell continuation line."""
    return "".join(f" \\\n{indent}{' '.join(option)}" for option in options)
