"""Boot test plumbing without QEMU: QEMU's message out of its stderr, the UEFI command line,
the order of attempts."""

from __future__ import annotations

from pathlib import Path

import pytest

from lbrestore import boottest
from lbrestore.boottest import BootDisk, BootMachine, BootTestError, qemu_boot_command, qemu_message

KVM_STDERR = """KVM internal error. Suberror: 1
extra data[0]: 0x0000000000000001
extra data[1]: 0x9090909090c3cf04
emulation failure
EAX=000005b8 EBX=000000b7 ECX=00000002 EDX=001000f6
EIP=00008ffc EFL=00000006 [-----P-] CPL=0 II=0 A20=1 SMM=0 HLT=0
ES =0028 00000000 ffffffff 00c09300 DPL=0 DS   [-WA]
GDT=     000f6180 00000037
Code=00 00 00 00 <0f> 0b
"""


def test_qemu_message_keeps_qemu_s_words_without_the_register_dump() -> None:
    assert qemu_message(KVM_STDERR) == "KVM internal error. Suberror: 1 ... emulation failure"
    warned = "qemu-system-x86_64: warning: host doesn't support requested feature\n" + KVM_STDERR
    assert qemu_message(warned).startswith("KVM internal error")
    assert qemu_message("") == ""
    assert qemu_message("qemu: could not open disk\n") == "qemu: could not open disk"


def test_uefi_machine_boots_with_ovmf_pflash(monkeypatch: pytest.MonkeyPatch) -> None:
    disks = [BootDisk("vda", Path("/x/vda.qcow2"))]
    monkeypatch.setattr(boottest, "ovmf_files", lambda: ("/o/CODE.fd", "/o/VARS.fd"))
    command = qemu_boot_command(disks, BootMachine(uefi=True), accelerator="tcg", cpu="max")
    assert "if=pflash,unit=0,format=raw,readonly=on,file=/o/CODE.fd" in command
    assert "if=pflash,unit=1,format=raw,readonly=off,file=/o/VARS.fd" in command
    assert "-snapshot" in command  # the variable store template is never written
    bios = qemu_boot_command(disks, BootMachine(), accelerator="tcg", cpu="max")
    assert not any("pflash" in part for part in bios)
    monkeypatch.setattr(boottest, "ovmf_files", lambda: None)
    with pytest.raises(BootTestError, match="OVMF is not installed"):
        qemu_boot_command(disks, BootMachine(uefi=True), accelerator="tcg", cpu="max")


def test_attempts_fall_back_to_tcg_only_for_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(boottest, "kvm_available", lambda: True)
    assert [a for a, _ in boottest._attempts(None)] == ["kvm", "kvm", "tcg"]
    assert [a for a, _ in boottest._attempts("kvm")] == ["kvm", "kvm"]
    assert boottest._attempts("tcg") == [("tcg", "max")]
    monkeypatch.setattr(boottest, "kvm_available", lambda: False)
    assert boottest._attempts(None) == [("tcg", "max")]
