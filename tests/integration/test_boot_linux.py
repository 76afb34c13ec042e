"""`verify --boot` with a real Linux guest (Debian kernel, syslinux, busybox initramfs).

On a host whose KVM cannot run real boot loaders (a nested KVM stops them with "KVM internal
error ... emulation failure" and QEMU stays alive, paused), the default accelerator must notice the
stopped guest, say so with QEMU's message, and boot again under TCG. Where KVM runs the guest, the
first attempt simply succeeds. A point whose boot partition was zeroed fails with exit 3.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from fixtures.linux_guest import (
    BOOT_MARKER,
    BOOT_SIZE,
    BOOT_START,
    LinuxGuestImage,
    boot_restored,
    check_report,
    copy_image,
    running_guest,
    set_kernel_args,
)
from restore_store import lbrestore


@pytest.fixture(scope="module")
def guest_store(tmp_path_factory: pytest.TempPathFactory, linux_guest: LinuxGuestImage) -> Path:
    """lg@#1: the guest's disk as built; lg@#2: the same with its boot partition zeroed;
    lg@#3: a kernel that panics before user space prints its marker."""
    root = tmp_path_factory.mktemp("linuxboot")
    store = root / "store"
    assert lbrestore(store, "init").returncode == 0
    raw = root / "zeroed.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", linux_guest.path, raw], check=True)
    with raw.open("r+b") as disk:
        disk.seek(BOOT_START)
        disk.write(bytes(BOOT_SIZE))
    panics = root / "panics.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", linux_guest.path, panics], check=True)
    set_kernel_args(panics, "lbrestore.panic")
    for image in (linux_guest.path, raw, panics):
        done = lbrestore(store, "import", "lg", "--disk", f"vda={image}")
        assert done.returncode == 0, done.stderr
    return store


def test_linux_point_boots_with_the_default_accelerator(guest_store: Path) -> None:
    done = lbrestore(guest_store, "verify", "lg@#1", "--boot", "--boot-pattern", BOOT_MARKER)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "boot: OK" in done.stdout
    if "could not run the guest" in done.stdout:  # this host's KVM stopped it: say so, use TCG
        assert "KVM (cpu host) could not run the guest" in done.stdout
        assert "QEMU status internal-error" in done.stdout
        assert "KVM internal error" in done.stdout  # QEMU's own words
        assert "retrying under TCG" in done.stdout and "(TCG, cpu max)" in done.stdout


def test_kvm_only_reports_the_stopped_guest(guest_store: Path) -> None:
    """--boot-accel kvm never falls back: where KVM stops the guest, that is the failure."""
    done = lbrestore(
        guest_store, "verify", "lg@#1", "--boot", "--boot-accel", "kvm",
        "--boot-pattern", BOOT_MARKER, "--boot-timeout", "120",
    )  # fmt: skip
    if done.returncode == 0:
        pytest.skip("this host's KVM runs the guest: nothing stops it")
    assert done.returncode == 3, done.stderr
    assert "boot: FAILED (KVM" in done.stdout
    assert "QEMU status internal-error" in done.stdout and "KVM internal error" in done.stdout
    assert "TCG" not in done.stdout


def test_zeroed_boot_partition_fails_with_a_reason(guest_store: Path) -> None:
    done = lbrestore(
        guest_store, "verify", "lg@#2", "--boot", "--boot-pattern", BOOT_MARKER,
        "--boot-timeout", "120",
    )  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr
    assert "no damage found" in done.stdout  # the store is intact; the guest is broken
    assert "boot: FAILED" in done.stdout
    assert "before the boot marker 'LBR-LINUX-GUEST-UP'" in done.stdout


def test_uefi_guest_is_booted_with_ovmf(tmp_path: Path, linux_guest: LinuxGuestImage) -> None:
    """A guest running on OVMF is recorded as UEFI: verify --boot and the restored start
    script boot it with OVMF (the disk has syslinux.efi at EFI/BOOT/BOOTX64.EFI)."""
    store = tmp_path / "store"
    assert lbrestore(store, "init").returncode == 0
    disk = copy_image(linux_guest, tmp_path / "vda.qcow2")
    with running_guest(disk, tmp_path / "vm", qga=False, uefi=True) as guest:
        guest.wait_for("BdsDxe")  # OVMF's own words: the original runs UEFI
        guest.wait_for(BOOT_MARKER)
        synced = guest.wait_synced(3)
        done = lbrestore(store, "backup", "lg", "--qmp", guest.qmp_address)
        assert done.returncode == 0, done.stderr
    info = lbrestore(store, "info", "lg@latest", "--json")
    assert '"firmware": "uefi"' in info.stdout, info.stdout
    boot = lbrestore(
        store, "verify", "lg@latest", "--boot", "--boot-accel", "tcg",
        "--boot-pattern", BOOT_MARKER, "--json",
    )  # fmt: skip
    assert boot.returncode == 0, boot.stdout + boot.stderr
    result = json.loads(boot.stdout)["boot"]
    assert result["firmware"] == "uefi" and "BdsDxe" in result["console_tail"]
    target = tmp_path / "restored"
    done = lbrestore(store, "restore", "lg@latest", "--to", str(target), "--name", "lgu")
    assert done.returncode == 0, done.stderr
    assert "firmware='efi'" in (target / "lgu.xml").read_text().replace('"', "'")
    console = boot_restored(target / "start-lgu.sh")
    assert "BdsDxe" in console and BOOT_MARKER in console, console[-2000:]
    report = check_report(console)
    assert all(report.results.get(seq) == "OK" for seq in range(1, synced + 1)), console[-2000:]


def test_kernel_panic_stops_the_boot_with_a_reason(guest_store: Path) -> None:
    """The guest's pvpanic device reports the panic: QEMU pauses it (guest-panicked), and the
    boot fails at once instead of waiting out the timeout."""
    done = lbrestore(
        guest_store, "verify", "lg@#3", "--boot", "--boot-accel", "tcg",
        "--boot-pattern", BOOT_MARKER, "--boot-timeout", "600", "--json",
    )  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr
    boot = json.loads(done.stdout)["boot"]
    assert boot["stopped_state"] == "guest-panicked", boot
    assert "the guest kernel panicked" in boot["reason"]
    assert boot["console_tail"].strip()  # what the guest printed last (its trace, cut anywhere)
