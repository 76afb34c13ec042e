"""Boot proof without the store: the hand-made boot sector in a throwaway QEMU."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from fixtures.bootdisk import BOOT_MARKER, boot_sector, write_boot_disk

from lbrestore.boottest import BootDisk, BootTestError, boot_test

# A product option, generous for KVM under nested virtualisation on a busy host. Tests that
# expect no marker use TCG (a boot takes well under a second there) and a short timeout, and prove
# in the same run that an undamaged disk prints its marker under the very same settings.
BOOT_TIMEOUT = 90.0
SHORT_TIMEOUT = 5.0


def qcow2_chain(tmp_path: Path, raw: Path) -> Path:
    """base.qcow2 <- top.qcow2, the boot sector in the base, other data in the top."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, base], check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top],
        check=True,
    )
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x5a 512k 64k", top], check=True, capture_output=True
    )
    base.chmod(0o444)
    top.chmod(0o444)
    return top


def test_boot_sector_layout() -> None:
    sector = boot_sector()
    assert len(sector) == 512
    assert sector[510:] == b"\x55\xaa"
    assert BOOT_MARKER.encode() in sector


def test_boot_disk_prints_its_marker_from_a_read_only_chain(tmp_path: Path) -> None:
    top = qcow2_chain(tmp_path, write_boot_disk(tmp_path / "disk.raw"))
    result = boot_test([BootDisk("vda", top, "qcow2")], timeout=BOOT_TIMEOUT, accelerator="tcg")
    assert result.booted, result.reason
    assert result.accelerator == "tcg"  # the default (KVM when available) runs in test_boot.py
    assert BOOT_MARKER in result.console_tail
    assert result.reason is None
    # -snapshot: the store's files are untouched
    check = subprocess.run(["qemu-img", "check", top], capture_output=True, text=True)
    assert check.returncode == 0


def test_broken_signature_is_refused_by_the_bios(tmp_path: Path) -> None:
    raw = write_boot_disk(tmp_path / "disk.raw", damage="signature")
    result = boot_test([BootDisk("vda", raw, "raw")], timeout=BOOT_TIMEOUT, accelerator="tcg")
    assert not result.booted
    assert result.reason and "no bootable disk" in result.reason
    assert "LBRESTORE-BOOT-OK" not in result.console_tail


def test_marker_is_a_configurable_regular_expression(tmp_path: Path) -> None:
    raw = write_boot_disk(tmp_path / "disk.raw", marker="Debian GNU/Linux 12 host1 ttyS0")
    disks = [BootDisk("vda", raw, "raw")]
    ok = boot_test(
        disks, marker=r"GNU/Linux \d+ \w+ ttyS0", timeout=SHORT_TIMEOUT, accelerator="tcg"
    )
    assert ok.booted, ok.reason
    missing = boot_test(disks, timeout=SHORT_TIMEOUT, accelerator="tcg")
    assert not missing.booted  # the default marker "login:" never appears...
    assert "Debian GNU/Linux 12" in missing.console_tail  # ...though the guest did print
    with pytest.raises(BootTestError):
        boot_test(disks, marker="(unclosed")
    with pytest.raises(BootTestError):
        boot_test(disks, accelerator="xen")


def test_unreadable_disk_reports_qemu_s_message(tmp_path: Path) -> None:
    result = boot_test([BootDisk("vda", tmp_path / "missing.qcow2")], timeout=BOOT_TIMEOUT)
    assert not result.booted
    assert result.reason and "QEMU exited" in result.reason and "missing.qcow2" in result.reason


def _qemu_using(path: Path) -> list[str]:
    """Pids of processes whose command line names `path` (QEMU left running)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(path).encode() in cmdline.read_bytes():
                found.append(cmdline.parent.name)
        except OSError:
            continue
    return found


@pytest.mark.parametrize("accelerator", [None, "tcg"])
def test_a_guest_that_never_stops_printing_ends_and_leaves_no_qemu(
    tmp_path: Path, accelerator: str | None
) -> None:
    """After the marker QEMU goes on writing its console as fast as it can: the boot test still
    ends at the marker, three times in a row, and no QEMU is left running."""
    disk = write_boot_disk(tmp_path / "chatty.raw", damage="chatty")
    for _ in range(3):
        result = boot_test(
            [BootDisk("vda", disk, "raw")], timeout=BOOT_TIMEOUT, accelerator=accelerator
        )
        assert result.booted, result.reason
    assert _qemu_using(disk) == []
