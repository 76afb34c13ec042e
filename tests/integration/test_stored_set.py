"""Readers check what they read against the index's set of stored clusters (issue 8 item 3).

Reproduced as the issue says: one 512-byte sector of a qcow2 L2 table zeroed, and a flipped data
byte. `restore` must fail naming the damage instead of writing wrong bytes with exit 0; a mount
answers EIO (and logs the damage) instead of serving bytes that fail their checksum; `import`
never builds on the damaged chain; an incremental on it is refused. Real qcow2 files, real
qemu-img (the oracle for restored bytes), real FUSE.
"""

from __future__ import annotations

import errno
import os
import random
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbstore.errors import DamagedClusterError, StoreIntegrityError
from lbstore.integrity import check_chain, verified_views
from lbstore.store import Store

MIB = 1 << 20
CS = 65536
SIZE = 12 * MIB
CHANGED = range(16, 48)  # guest clusters the second image changes (stored in the top file)


def lbrestore(store: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbrestore", "--store", str(store), *map(str, args)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def one_line(result: subprocess.CompletedProcess[str], code: int, *texts: str) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for text in texts:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, bytes, bytes]:
    """A store with vm1@#1 (base image) and vm1@#2 (32 clusters changed): both imported."""
    rng = random.Random(8)
    base = bytearray(rng.randbytes(SIZE))
    top = bytearray(base)
    for cluster in CHANGED:
        top[cluster * CS : (cluster + 1) * CS] = rng.randbytes(CS)
    store = tmp_path / "store"
    ok(lbrestore(store, "init"))
    for name, data in (("base.raw", base), ("top.raw", top)):
        (tmp_path / name).write_bytes(data)
        ok(lbrestore(store, "import", "vm1", "--disk", f"vda={tmp_path / name}"))
    return store, bytes(base), bytes(top)


def top_file(store: Path) -> Path:
    return store / "data" / "vm1" / "vda" / "2.qcow2"


def l2_offset(path: Path) -> int:
    """The file offset of the first L2 table (qcow2 header: l1_table_offset at byte 40)."""
    with path.open("rb") as f:
        (l1,) = struct.unpack(">Q", f.read(48)[40:48])
        f.seek(l1)
        (entry,) = struct.unpack(">Q", f.read(8))
    return entry & 0x00FFFFFFFFFFFE00


def writable(path: Path) -> None:
    path.chmod(0o644)  # committed files are read-only; the test plays the attacker


def zero_l2_sector(path: Path) -> None:
    """Zero the 512-byte sector of the L2 table that maps guest clusters 0..63."""
    writable(path)
    with path.open("r+b") as f:
        f.seek(l2_offset(path))
        f.write(bytes(512))


def flip_data_byte(path: Path, cluster: int) -> None:
    """Flip one byte inside guest cluster `cluster` as the file stores it."""
    with path.open("rb") as f:
        f.seek(l2_offset(path) + 8 * cluster)
        (entry,) = struct.unpack(">Q", f.read(8))
    host = entry & 0x00FFFFFFFFFFFE00
    assert host, "the cluster must be stored in this file"
    writable(path)
    with path.open("r+b") as f:
        f.seek(host + 1000)
        byte = f.read(1)
        f.seek(host + 1000)
        f.write(bytes([byte[0] ^ 0x40]))


def test_restore_of_intact_chain_is_exact(chain: tuple[Path, bytes, bytes], tmp_path: Path) -> None:
    store, _, top = chain
    ok(lbrestore(store, "restore", "vm1@latest", "--to", tmp_path / "out", "--format", "raw"))
    assert (tmp_path / "out" / "vda.raw").read_bytes() == top


def test_zeroed_l2_sector_fails_restore_naming_the_damage(
    chain: tuple[Path, bytes, bytes], tmp_path: Path
) -> None:
    store, base, top = chain
    zero_l2_sector(top_file(store))
    # Unchecked, the chain now reads the base's old bytes where the top file lost its mapping.
    flat = tmp_path / "flat.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", top_file(store), flat], check=True, capture_output=True
    )
    assert (
        flat.read_bytes() != top and flat.read_bytes()[16 * CS : 48 * CS] == base[16 * CS : 48 * CS]
    )
    result = lbrestore(store, "restore", "vm1@latest", "--to", tmp_path / "out")
    line = one_line(result, 1, "vm1@#2 disk vda: cluster 16", "no longer maps it", "2.qcow2")
    assert "listed in the index" in line
    assert not (tmp_path / "out").exists()  # nothing partial left behind
    # The older point does not read the damaged file: it still restores exactly.
    ok(lbrestore(store, "restore", "vm1@#1", "--to", tmp_path / "old", "--format", "raw"))
    assert (tmp_path / "old" / "vda.raw").read_bytes() == base


def test_a_mapped_cluster_the_index_does_not_list_is_damage(
    chain: tuple[Path, bytes, bytes], tmp_path: Path
) -> None:
    store, _, _ = chain
    with sqlite3.connect(store / "index.sqlite") as db:
        db.execute("DELETE FROM checksums WHERE point_id = 2")
    result = lbrestore(store, "restore", "vm1@latest", "--to", tmp_path / "out")
    one_line(result, 1, "vm1@#2 disk vda: cluster 16", "index lists no checksum")


def test_incremental_and_import_never_build_on_a_damaged_chain(
    chain: tuple[Path, bytes, bytes], tmp_path: Path
) -> None:
    store, _, top = chain
    zero_l2_sector(top_file(store))
    with Store.open(store) as opened:
        point = opened.resolve("vm1@latest")
        with opened.view(point, "vda") as view, pytest.raises(DamagedClusterError) as info:
            check_chain(opened, point, "vda", view)
    assert info.value.cluster == 16 and "vm1@#2 disk vda" in str(info.value)
    with (
        Store.open(store, write=True) as opened,
        opened.begin("vm1") as ingest,
        pytest.raises(StoreIntegrityError, match=r"reads damaged.*cluster 16.*--full"),
    ):
        ingest.add_disk("vda", SIZE, mode="incremental")
    refused = lbrestore(store, "import", "vm1", "--disk", f"vda={tmp_path / 'top.raw'}")
    one_line(refused, 1, "reads damaged", "--full")
    with Store.open(store) as opened:
        assert opened.resolve("vm1@latest").id == 2  # nothing built on the damaged file
    out = ok(lbrestore(store, "import", "vm1", "--full", "--disk", f"vda={tmp_path / 'top.raw'}"))
    assert "(full)" in out  # a new chain, not an overlay on the damaged file
    with Store.open(store) as opened:
        new = opened.resolve("vm1@latest")
        assert new.id > 2 and new.disks[0].backing_point_id is None
    ok(lbrestore(store, "restore", "vm1@latest", "--to", tmp_path / "new", "--format", "raw"))
    assert (tmp_path / "new" / "vda.raw").read_bytes() == top


def test_import_full_starts_a_new_chain(chain: tuple[Path, bytes, bytes], tmp_path: Path) -> None:
    store = chain[0]
    out = ok(lbrestore(store, "import", "vm1", "--full", "--disk", f"vda={tmp_path / 'top.raw'}"))
    assert "vm1@#3 (full)" in out
    with Store.open(store) as opened:
        assert opened.point(3).disks[0].backing_point_id is None
        assert opened.events("vm1", kind="chain-broken") == []


def test_verified_views_refuse_damaged_clusters_and_serve_the_rest(
    chain: tuple[Path, bytes, bytes],
) -> None:
    store, _, top = chain
    flip_data_byte(top_file(store), 20)
    reported: list[DamagedClusterError] = []
    with Store.open(store) as opened:
        point = opened.resolve("vm1@latest")
        (view,) = verified_views(opened, point, "vda", 1, reported.append)
        with view:
            assert view.read(0, 16 * CS) == top[: 16 * CS]
            assert view.read(21 * CS + 5, 3 * CS) == top[21 * CS + 5 : 24 * CS + 5]  # unaligned
            with pytest.raises(DamagedClusterError, match="cluster 20 does not match"):
                view.read(19 * CS + 100, CS)
            assert view.read(SIZE - 10, 100) == top[-10:]
    assert [e.cluster for e in reported] == [20]


@pytest.fixture
def mounted(chain: tuple[Path, bytes, bytes], tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse")
    store = chain[0]
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    yield store, mountpoint
    if os.path.ismount(mountpoint):
        lbrestore(store, "umount", mountpoint)
    if os.path.ismount(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


def read_range(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def test_mount_answers_eio_for_a_flipped_byte_and_logs_it(
    chain: tuple[Path, bytes, bytes], mounted: tuple[Path, Path]
) -> None:
    store, mountpoint = mounted
    top = chain[2]
    flip_data_byte(top_file(store), 20)
    ok(lbrestore(store, "mount", "vm1@latest", mountpoint))
    disk = mountpoint / "vda.raw"
    assert read_range(disk, 0, 16 * CS) == top[: 16 * CS]
    with pytest.raises(OSError) as info:
        read_range(disk, 20 * CS, CS)
    assert info.value.errno == errno.EIO
    assert read_range(disk, 24 * CS, 4 * CS) == top[24 * CS : 28 * CS]
    ok(lbrestore(store, "umount", mountpoint))
    with Store.open(store) as opened:
        (event,) = opened.events("vm1", kind="damage")
    assert "cluster 20 does not match its checksum" in event["message"]


def test_mount_answers_eio_where_an_l2_sector_was_zeroed(
    chain: tuple[Path, bytes, bytes], mounted: tuple[Path, Path]
) -> None:
    store, mountpoint = mounted
    zero_l2_sector(top_file(store))
    ok(lbrestore(store, "mount", "vm1@latest", mountpoint))
    with pytest.raises(OSError) as info:
        read_range(mountpoint / "vda.raw", 16 * CS, CS)
    assert info.value.errno == errno.EIO
    ok(lbrestore(store, "umount", mountpoint))
    ok(lbrestore(store, "mount", "--no-verify", "vm1@latest", mountpoint))
    # Unchecked, the same read returns the base's old bytes: what the check prevents.
    assert read_range(mountpoint / "vda.raw", 16 * CS, CS) == chain[1][16 * CS : 17 * CS]
