"""Bad input to the store commands: one clear line, the right exit code, every point intact.

Invalid names, images that are not disk images, a missing file, a store path that is a file,
a read-only store (a read-only bind mount: chmod does not stop root), and a full filesystem
(a 4 MiB tmpfs).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from lbstore.store import Store

MIB = 1 << 20


def lbrestore(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbrestore", "--store", str(store), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def assert_one_clear_line(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert text in lines[0], lines[0]


def write_image(path: Path, size: int, seed: int) -> bytes:
    data = blake3.blake3(str(seed).encode()).digest(length=size)
    path.write_bytes(data)
    return data


def view_digest(store_path: Path, address: str, disk: str = "vda") -> bytes:
    with Store.open(store_path) as store, store.view(store.resolve(address), disk) as view:
        return blake3.blake3(view.read(0, view.virtual_size)).digest()


@pytest.fixture
def store_with_point(tmp_path: Path) -> tuple[Path, bytes]:
    store = tmp_path / "store"
    image = tmp_path / "base.raw"
    data = write_image(image, MIB, 1)
    assert lbrestore(store, "init").returncode == 0
    result = lbrestore(store, "import", "vm1", "--disk", f"vda={image}")
    assert result.returncode == 0, result.stderr
    return store, blake3.blake3(data).digest()


def assert_intact(store: Path, digest: bytes) -> None:
    with Store.open(store) as opened:
        assert len(opened.restore_points()) == 1
    assert view_digest(store, "vm1@#1") == digest


@pytest.mark.parametrize("name", ["../x", "", "x" * 200, "a/b"])
def test_invalid_names(store_with_point: tuple[Path, bytes], tmp_path: Path, name: str) -> None:
    store, digest = store_with_point
    image = tmp_path / "base.raw"
    result = lbrestore(store, "import", name, "--disk", f"vda={image}")
    assert_one_clear_line(result, 2, "invalid VM name")  # a usage error (issue 8)
    result = lbrestore(store, "import", "vm1", "--disk", f"{name}={image}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert "disk" in result.stderr or "NAME=IMAGE" in result.stderr
    assert_intact(store, digest)
    assert sorted(p.name for p in (store / "data").iterdir()) == ["vm1"]


def test_images_that_are_not_disk_images(
    store_with_point: tuple[Path, bytes], tmp_path: Path
) -> None:
    store, digest = store_with_point
    text = tmp_path / "notes.txt"
    text.write_text("this is not a disk\n")
    result = lbrestore(store, "import", "vm1", "--disk", f"vda={text}")
    assert_one_clear_line(result, 1, "not a disk image")
    vmdk = tmp_path / "disk.vmdk"
    vmdk.write_bytes(b"KDMV" + bytes(MIB - 4))
    result = lbrestore(store, "import", "vm1", "--disk", f"vda={vmdk}")
    assert_one_clear_line(result, 1, "VMDK")
    broken = tmp_path / "broken.qcow2"
    broken.write_bytes(b"QFI\xfb\x00\x00\x00\x03" + bytes(4088))
    result = lbrestore(store, "import", "vm1", "--disk", f"vda={broken}")
    assert_one_clear_line(result, 1, "not a usable disk image")
    result = lbrestore(store, "import", "vm1", "--disk", f"vda={tmp_path}")
    assert_one_clear_line(result, 1, "not a regular file")
    assert_intact(store, digest)


def test_a_missing_image(store_with_point: tuple[Path, bytes], tmp_path: Path) -> None:
    store, digest = store_with_point
    result = lbrestore(store, "import", "vm1", "--disk", f"vda={tmp_path / 'nope.raw'}")
    assert_one_clear_line(result, 1, "no such file")
    result = lbrestore(store, "import", "vm1", "--disk", "vda")
    assert_one_clear_line(result, 2, "NAME=IMAGE")
    result = lbrestore(store, "import", "vm1", "--disk", f"vda={tmp_path}/base.raw", "--at", "x")
    assert_one_clear_line(result, 2, "not an ISO-8601 time")
    assert_intact(store, digest)


def test_a_store_path_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    assert_one_clear_line(lbrestore(path, "init"), 1, "not a folder")
    assert_one_clear_line(lbrestore(path, "list"), 1, "not a folder")
    image = tmp_path / "a.raw"
    write_image(image, MIB, 2)
    assert_one_clear_line(lbrestore(path, "import", "vm1", "--disk", f"vda={image}"), 1, "folder")
    assert path.read_text() == "x"
    assert_one_clear_line(lbrestore(tmp_path / "none", "list"), 1, "lbrestore init")


@pytest.fixture
def mount_point(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount")
    target = tmp_path / "mnt"
    target.mkdir()
    yield target
    subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


def test_a_read_only_store(
    store_with_point: tuple[Path, bytes], tmp_path: Path, mount_point: Path
) -> None:
    store, digest = store_with_point
    subprocess.run(["mount", "--bind", str(store), str(mount_point)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(mount_point)], check=True)
    image = tmp_path / "other.raw"
    write_image(image, MIB, 3)
    result = lbrestore(mount_point, "import", "vm1", "--disk", f"vda={image}")
    assert_one_clear_line(result, 1, "read-only")
    listed = lbrestore(mount_point, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert '"id": 1' in listed.stdout
    assert lbrestore(mount_point, "info", "vm1@latest").returncode == 0
    assert view_digest(mount_point, "vm1@latest") == digest
    assert_intact(store, digest)


def test_a_full_filesystem(tmp_path: Path, mount_point: Path) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], check=True)
    store = mount_point / "store"
    small = tmp_path / "small.raw"
    data = write_image(small, MIB, 4)
    assert lbrestore(store, "init").returncode == 0
    assert lbrestore(store, "import", "vm1", "--disk", f"vda={small}").returncode == 0
    digest = blake3.blake3(data).digest()
    big = tmp_path / "big.raw"
    write_image(big, 8 * MIB, 5)
    result = lbrestore(store, "import", "vm1", "--disk", f"vda={big}")
    assert_one_clear_line(result, 1, "no space left")
    assert_intact(store, digest)
    with Store.open(store, write=True) as opened:
        assert list((store / "tmp").iterdir()) == []
        assert opened.index.pending_points() == []
    changed = bytearray(data)
    changed[:4096] = bytes(4096)
    small.write_bytes(changed)
    result = lbrestore(store, "import", "vm1", "--disk", f"vda={small}")
    assert result.returncode == 0, result.stderr  # the next import fits and succeeds
    assert view_digest(store, "vm1@latest") == blake3.blake3(changed).digest()
    assert view_digest(store, "vm1@#1") == digest
