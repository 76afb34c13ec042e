"""Boot proof end to end: a hand-made bootable disk is imported, `verify --boot` boots it; a point
whose boot sector was damaged fails; the restored disk boots from the generated start script."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
from pathlib import Path

import pytest
from fixtures.bootdisk import BOOT_MARKER, write_boot_disk
from restore_store import lbrestore

from lbstore.store import Store

SHORT_TIMEOUT = "5"  # TCG boots this disk in well under a second; see the control in each test


def boot_on_tcg(store: Path, address: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """`lbrestore verify ADDRESS --boot` on TCG with the short timeout (plus `extra` options)."""
    return lbrestore(
        store,
        "verify",
        address,
        "--boot",
        "--boot-accel",
        "tcg",
        "--boot-timeout",
        SHORT_TIMEOUT,
        *extra,
    )


@pytest.fixture(scope="module")
def boot_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vmb@#1 boots; #2 has a broken 0x55AA signature; #3 has its code overwritten (hangs)."""
    root = tmp_path_factory.mktemp("boot")
    store = root / "store"
    assert lbrestore(store, "init").returncode == 0
    extra = {300 << 10: b"data beyond the boot sector" * 100}
    for damage in (None, "signature", "code"):
        image = write_boot_disk(
            root / f"disk-{damage}.raw", size=2 << 20, damage=damage, extra=extra
        )
        result = lbrestore(store, "import", "vmb", "--disk", f"vda={image}")
        assert result.returncode == 0, result.stderr
    return store


def test_imported_boot_disk_boots_with_the_default_accelerator(boot_store: Path) -> None:
    result = lbrestore(boot_store, "verify", "vmb@#1", "--boot", "--boot-timeout", "120")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "boot: OK" in result.stdout
    assert "KVM" in result.stdout or "TCG" in result.stdout  # it says which


def test_damaged_boot_sectors_fail_with_the_console_tail(boot_store: Path) -> None:
    control = boot_on_tcg(boot_store, "vmb@#1", "--json")
    assert control.returncode == 0, control.stdout + control.stderr
    assert BOOT_MARKER in json.loads(control.stdout)["boot"]["console_tail"]
    for point, reason in (("#2", "no bootable disk"), ("#3", "within the boot timeout")):
        result = boot_on_tcg(boot_store, f"vmb@{point}", "--json")
        assert result.returncode == 3, result.stderr
        report = json.loads(result.stdout)
        assert report["ok"] is True  # the store is intact: the guest is what is broken
        assert report["boot"]["booted"] is False and reason in report["boot"]["reason"]

    human = lbrestore(boot_store, "verify", "vmb@#2", "--boot", "--boot-accel", "tcg")
    assert human.returncode == 3 and "boot: FAILED (TCG" in human.stdout
    assert "no bootable disk" in human.stdout


def test_custom_marker(boot_store: Path) -> None:
    ok = boot_on_tcg(boot_store, "vmb@#1", "--boot-marker", r"BOOT-OK\s+login")
    assert ok.returncode == 0, ok.stdout
    bad = lbrestore(boot_store, "verify", "vmb@#1", "--boot", "--boot-marker", "(")
    assert bad.returncode in (1, 2) and "regular expression" in bad.stderr


def test_boot_disk_damaged_in_the_store_is_damage_too(boot_store: Path, tmp_path: Path) -> None:
    """Checksums run with --boot: a flipped byte in the store fails even if the guest boots."""
    store = tmp_path / "store"
    subprocess.run(["cp", "-a", boot_store, store], check=True)
    with Store.open(store) as opened:
        path = opened.file_path(opened.resolve("vmb@#1"), "vda")
    ranges = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", path], capture_output=True, text=True, check=True
        ).stdout
    )
    data = next(r for r in ranges if r["data"] and r["start"] > 0)
    os.chmod(path, 0o644)
    with path.open("r+b") as f:
        f.seek(data["offset"] + 3)
        f.write(b"\xff\xfe")
    result = boot_on_tcg(store, "vmb@#1")
    assert result.returncode == 3
    assert "boot: OK" in result.stdout and "DAMAGED restore point vmb@#1" in result.stdout


def test_restored_disk_boots_from_the_generated_script(boot_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "restored"
    result = lbrestore(boot_store, "restore", "vmb@#1", "--to", str(out))
    assert result.returncode == 0, result.stderr
    process = subprocess.Popen(
        [out / "start-vmb.sh", "-display", "none", "-machine", "accel=tcg", "-snapshot"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, NET="none"),
    )
    console = b""
    try:
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while BOOT_MARKER.encode() not in console:
                selector.select()
                chunk = os.read(process.stdout.fileno(), 4096)
                assert chunk, f"QEMU ended: {process.communicate()[1]!r}, console {console!r}"
                console += chunk
    finally:
        process.kill()
        process.communicate()
    assert BOOT_MARKER.encode() in console
    check = subprocess.run(["qemu-img", "check", out / "vda.qcow2"], capture_output=True)
    assert check.returncode == 0


def test_vm_without_spec_checks_all_points_and_boots_the_latest(boot_store: Path) -> None:
    result = boot_on_tcg(boot_store, "vmb", "--json")
    report = json.loads(result.stdout)
    assert report["files_checked"] == 3 and report["points_checked"] == [1, 2, 3]
    assert report["ok"] is True and report["boot"]["booted"] is False  # #3 hangs
    assert result.returncode == 3
