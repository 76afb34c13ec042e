"""Zero clusters a point stores are part of what readers check (issue 8 item 3).

An overlay marks a cluster the guest zeroed with QCOW_OFLAG_ZERO: "reads as zeros, whatever the
backing file says". The index and the sidecars record each file's own zero clusters, so a lost
mark (the cluster would read its backing file's bytes) or a new one (it would read zeros) is
damage for verify, restore and mount; merges keep the record exact; a rebuilt index has it
again; points committed before it was recorded are read as before. qemu-img is the oracle for
which clusters a file marks zero and for the restored bytes.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from lbstore.sidecar import read_sidecar, rewrite_sidecar, sidecar_path
from lbstore.store import Store

CS = 65536
CLUSTERS = 64
ZEROED = {2: [(4, 4)], 3: [(20, 2)]}  # point -> runs of clusters its image zeroes
REFILLED = {3: [5]}  # clusters a later image fills with data again


def lbrestore(store: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbrestore", "--store", str(store), *map(str, args)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, dict[int, Path]]:
    """vm1@#1 random data, #2 and #3 each zeroing some clusters (imported images); returns the
    store and each point's raw image (what it must read)."""
    rng = random.Random(11)
    data = bytearray(rng.randbytes(CLUSTERS * CS))
    store = tmp_path / "store"
    ok(lbrestore(store, "init"))
    images = {}
    for point in (1, 2, 3):
        for first, count in ZEROED.get(point, []):
            data[first * CS : (first + count) * CS] = bytes(count * CS)
        for cluster in REFILLED.get(point, []):
            data[cluster * CS : (cluster + 1) * CS] = rng.randbytes(CS)
        images[point] = tmp_path / f"{point}.raw"
        images[point].write_bytes(data)
        ok(lbrestore(store, "import", "vm1", "--disk", f"vda={images[point]}"))
    return store, images


def data_file(store: Path, point: int) -> Path:
    return store / "data" / "vm1" / "vda" / f"{point}.qcow2"


def marked_zero(path: Path) -> list[tuple[int, int]]:
    """The clusters the file itself marks zero, as qemu-img map sees them (the oracle)."""
    ranges = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", "-f", "qcow2", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    return [
        (r["start"] // CS, r["length"] // CS)
        for r in ranges
        if r["depth"] == 0 and r["zero"] and not r["data"]
    ]


def recorded(store: Path, point: int) -> list[tuple[int, int]] | None:
    with Store.open(store) as opened:
        runs = opened.zero_runs(point, "vda")
    return None if runs is None else list(runs)


def set_l2_entry(path: Path, cluster: int, value: int) -> None:
    """Overwrite the L2 entry of `cluster` (one L2 table: the disk is 4 MiB)."""
    path.chmod(0o600)
    with path.open("r+b") as f:
        (l1,) = struct.unpack(">Q", f.read(48)[40:48])
        f.seek(l1)
        (entry,) = struct.unpack(">Q", f.read(8))
        f.seek((entry & 0x00FFFFFFFFFFFE00) + 8 * cluster)
        f.write(struct.pack(">Q", value))


def assert_exact(store: Path, point: int, image: Path, tmp_path: Path) -> None:
    out = tmp_path / f"restored-{point}"
    ok(lbrestore(store, "restore", f"vm1@#{point}", "--to", out))
    compare = subprocess.run(
        ["qemu-img", "compare", "-F", "raw", str(out / "vda.qcow2"), str(image)],
        capture_output=True,
        text=True,
    )
    assert compare.returncode == 0, compare.stdout


def test_each_point_records_exactly_the_zero_clusters_its_file_marks(
    store: tuple[Path, dict[int, Path]],
) -> None:
    path, _ = store
    for point in (2, 3):
        assert marked_zero(data_file(path, point)), "the import stored zero clusters"
        assert recorded(path, point) == marked_zero(data_file(path, point))
    assert recorded(path, 1) == []  # a full file needs no zero marks: it has no backing


@pytest.mark.parametrize(("cluster", "value"), [(4, 0), (30, 1)], ids=["lost", "appearing"])
def test_a_changed_zero_mark_is_damage_for_every_reader(
    store: tuple[Path, dict[int, Path]], tmp_path: Path, cluster: int, value: int
) -> None:
    path, _ = store
    set_l2_entry(data_file(path, 2), cluster, value)
    verify = lbrestore(path, "verify", "vm1")
    assert verify.returncode == 3 and f"cluster {cluster}" in verify.stdout, verify.stdout
    restore = lbrestore(path, "restore", "vm1@#2", "--to", tmp_path / "out")
    lines = restore.stderr.strip().splitlines()
    assert restore.returncode == 1 and len(lines) == 1, restore.stderr  # one line, as for damage
    assert f"vm1@#2 disk vda: cluster {cluster}" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("merged", [2, 3, 1], ids=["middle", "newest", "oldest"])
def test_merges_keep_the_record_of_zero_clusters_exact(
    store: tuple[Path, dict[int, Path]], tmp_path: Path, merged: int
) -> None:
    path, images = store
    ok(lbrestore(path, "merge", f"vm1@#{merged}"))
    ok(lbrestore(path, "verify", "vm1"))
    ok(lbrestore(path, "check"))
    for point in {1, 2, 3} - {merged}:
        assert recorded(path, point) == marked_zero(data_file(path, point))
        assert_exact(path, point, images[point], tmp_path)


def test_points_recorded_before_zero_runs_existed_read_as_before(
    store: tuple[Path, dict[int, Path]], tmp_path: Path
) -> None:
    """A store written by a version without the record: no row, no sidecar field."""
    path, images = store
    with sqlite3.connect(path / "index.sqlite") as db:
        db.execute("DELETE FROM zero_runs")
    with Store.open(path) as opened:
        store_id = opened.identity().get("id")
    for point in (1, 2, 3):
        old = read_sidecar(sidecar_path(path / "data", "vm1", "vda", point))
        assert old.disk.zero_runs is not None and old.store_id == store_id
        rewrite_sidecar(
            path / "data",
            dataclasses.replace(old, disk=dataclasses.replace(old.disk, zero_runs=None)),
        )
    assert recorded(path, 2) is None
    ok(lbrestore(path, "verify", "vm1"))
    ok(lbrestore(path, "check"))
    for point in (1, 2, 3):
        assert_exact(path, point, images[point], tmp_path)


def test_a_rebuilt_index_has_the_zero_clusters_again(
    store: tuple[Path, dict[int, Path]],
) -> None:
    path, _ = store
    before = {point: recorded(path, point) for point in (1, 2, 3)}
    for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
        (path / name).unlink(missing_ok=True)
    ok(lbrestore(path, "check", "--repair"))
    assert {point: recorded(path, point) for point in (1, 2, 3)} == before
    set_l2_entry(data_file(path, 3), 20, 0)
    assert lbrestore(path, "verify", "vm1").returncode == 3
