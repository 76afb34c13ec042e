"""Fixtures for tests against a real QEMU: a VM factory, a store, and in-process backups."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu_vm import MiB, TestVM, running_vm

from lbrestore.backup import BackupHooks, BackupOptions, BackupSummary, run_backup
from lbstore.store import Store

__all__ = ["MiB"]


def pytest_report_header() -> str:
    """Say whether the test VMs (`accel=kvm:tcg`) will run on KVM or fall back to TCG."""
    usable = os.access("/dev/kvm", os.R_OK | os.W_OK)
    return f"test VMs: accel={'kvm' if usable else 'tcg (no usable /dev/kvm)'}"


@pytest.fixture
def make_vm(tmp_path: Path) -> Iterator[Callable[..., TestVM]]:
    """Start VMs (`make_vm({"vda": 32 * MiB})`); all are killed when the test ends."""
    with contextlib.ExitStack() as stack:
        count = 0

        def make(disks: dict[str, int] | None = None, name: str = "vm1") -> TestVM:
            nonlocal count
            count += 1
            return stack.enter_context(running_vm(tmp_path / f"vm{count}", disks, name))

        yield make


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """An initialised, empty store."""
    path = tmp_path / "store"
    Store.init(path)
    return path


def backup(
    store_path: Path,
    vm: TestVM,
    hooks: BackupHooks | None = None,
    **options: Any,
) -> BackupSummary:
    """One backup of `vm` into the store, in this process (as `lbrestore backup` does it)."""
    options.setdefault("qmp", vm.qmp_address)
    opts = BackupOptions(vm=vm.name, **options)
    with Store.open(store_path, write=True) as store:
        return asyncio.run(run_backup(store, opts, hooks))


def stored_file(store_path: Path, point_id: int, disk: str) -> Path:
    """The qcow2 file of a disk in a restore point (its chain resolves through backing files)."""
    with Store.open(store_path) as store:
        return store.file_path(store.point(point_id), disk)


def assert_point_equals(store_path: Path, point_id: int, snapshots: dict[str, Path]) -> None:
    """Each disk of the point reads exactly like its raw snapshot (`qemu-img compare`)."""
    for disk, raw in snapshots.items():
        qcow2 = stored_file(store_path, point_id, disk)
        done = subprocess.run(
            ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(qcow2), str(raw)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, f"point #{point_id} disk {disk}: {done.stdout}{done.stderr}"


def points(store_path: Path, vm: str = "vm1") -> list[tuple[int, str]]:
    """(id, kind) of every committed restore point of `vm`."""
    with Store.open(store_path) as store:
        return [(p.id, p.kind) for p in store.restore_points(vm)]


def our_bitmaps(vm: TestVM, disk: str) -> list[dict[str, Any]]:
    """lbrestore's bitmaps on a disk."""
    return [b for b in vm.bitmaps(disk) if str(b.get("name", "")).startswith("lbr-")]


@pytest.fixture(scope="session")
def libvirt_conn() -> Iterator[Any]:
    """A connection to a real libvirtd (started for the run when nobody runs it)."""
    import libvirt_env

    why = libvirt_env.missing()
    if why is not None:
        pytest.skip(why)
    import libvirt

    with libvirt_env.running_libvirtd():
        conn = libvirt.open(libvirt_env.URI)
        try:
            yield conn
        finally:
            conn.close()


@pytest.fixture
def make_domain(libvirt_conn: Any, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start guest-less libvirt domains (`make_domain({"vda": 16 * MiB})`); removed after."""
    import libvirt_env

    with contextlib.ExitStack() as stack:
        count = 0

        def make(sizes: dict[str, int] | None = None) -> libvirt_env.GuestlessDomain:
            nonlocal count
            count += 1
            name = f"{libvirt_env.PREFIX}{os.getpid()}-{tmp_path.name[-24:]}-{count}"
            return stack.enter_context(
                libvirt_env.guestless_domain(
                    libvirt_conn, tmp_path / "domains", name, sizes or {"vda": 16 * MiB}
                )
            )

        yield make


@pytest.fixture(scope="session")
def linux_guest() -> Any:
    """The real tiny Linux guest's image (built from Debian packages once, then cached)."""
    from fixtures.linux_guest import GuestBuildError, linux_guest_image

    try:
        return linux_guest_image()
    except GuestBuildError as exc:
        pytest.fail(f"cannot build the Linux guest image: {exc}")
