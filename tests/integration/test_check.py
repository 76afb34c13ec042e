"""`lbrestore check [--repair] [--json]` through the real CLI, with qemu-img as the oracle.

check only reads (runs while another process holds the store's lock, leaves the index's bytes
as they were) and names every problem with the points it affects; --repair fixes what it can
without losing data, moves what nothing describes to lost+found/, and says what it cannot fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import blake3
import pytest

from lbstore.lock import StoreLock

MIB = 1 << 20


def lbrestore(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbrestore", "--store", str(store), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def digest(path: Path) -> bytes:
    return blake3.blake3(path.read_bytes()).digest()


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, dict[int, Path]]:
    """vm1 with three points of a 2 MiB disk, each a few clusters different."""
    root = tmp_path / "store"
    assert lbrestore(root, "init").returncode == 0
    data = bytearray(blake3.blake3(b"base").digest(length=2 * MIB))
    images = {}
    for point_id in (1, 2, 3):
        data[point_id * 200_000 : point_id * 200_000 + 5000] = bytes([point_id]) * 5000
        raw = tmp_path / f"vda-{point_id}.raw"
        raw.write_bytes(data)
        result = lbrestore(root, "import", "vm1", "--disk", f"vda={raw}")
        assert result.returncode == 0, result.stderr
        images[point_id] = raw
    return root, images


def assert_exact(root: Path, images: dict[int, Path]) -> None:
    for point_id, raw in images.items():
        qcow2 = root / "data" / "vm1" / "vda" / f"{point_id}.qcow2"
        compared = subprocess.run(
            ["qemu-img", "compare", "-F", "raw", str(qcow2), str(raw)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert compared.returncode == 0, compared.stdout


def test_a_clean_store_checks_clean(store: tuple[Path, dict[int, Path]]) -> None:
    root, _ = store
    result = lbrestore(root, "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "checked 3 restore points, 3 files: clean"
    report = json.loads(lbrestore(root, "check", "--json").stdout)
    assert report["ok"] is True and report["problems"] == [] and report["files_checked"] == 3


def test_check_only_reads_and_repair_fixes_without_losing_data(
    store: tuple[Path, dict[int, Path]],
) -> None:
    root, images = store
    folder = root / "data" / "vm1" / "vda"
    (folder / "notes.txt").write_text("left by someone")
    (folder / "77.qcow2").write_bytes((folder / "1.qcow2").read_bytes())  # no sidecar, no row
    (root / "tmp" / "123").mkdir()
    (root / "tmp" / "123" / "vda.qcow2").write_bytes(b"half written")
    side = bytearray((folder / "2.point").read_bytes())
    side[40] ^= 1
    os.chmod(folder / "2.point", 0o644)
    (folder / "2.point").write_bytes(side)
    (folder / "1.point").unlink()
    files = {p: digest(p) for p in folder.glob("*.qcow2")}
    index = digest(root / "index.sqlite")

    lock = StoreLock(root / "lock")  # a writer holds the store: check neither waits nor writes
    lock.acquire(1.0, "a test writer")
    try:
        busy = lbrestore(root, "check")
    finally:
        lock.release()
    assert busy.returncode == 3, busy.stdout + busy.stderr
    assert "tmp/123" not in busy.stdout  # a live writer's tmp/ is work in progress
    result = lbrestore(root, "check", "--json")
    assert result.returncode == 3
    problems = json.loads(result.stdout)["problems"]
    kinds = {(p["kind"], p["path"]): p for p in problems}
    assert kinds[("orphan", "data/vm1/vda/notes.txt")]["repairable"] is True
    assert kinds[("tmp-leftover", "tmp/123")]
    sidecar_2 = kinds[("sidecar", "data/vm1/vda/2.qcow2")]
    assert (
        sidecar_2["points"] == ["vm1@#2", "vm1@#3"] and "integrity digest" in sidecar_2["message"]
    )
    assert kinds[("sidecar", "data/vm1/vda/1.qcow2")]["points"] == ["vm1@#1", "vm1@#2", "vm1@#3"]
    assert any(p["kind"] == "orphan" and p["points"] == ["vm1@#77"] for p in problems)
    assert digest(root / "index.sqlite") == index
    assert {p: digest(p) for p in folder.glob("*.qcow2")} == files

    repaired = lbrestore(root, "check", "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    out = repaired.stdout
    assert "removed tmp/123" in out
    assert "moved data/vm1/vda/77.qcow2 to lost+found/vm1/vda/77.qcow2" in out
    assert "wrote the missing sidecar of vm1@#1 disk vda" in out
    assert "rewrote the sidecar of vm1@#2 disk vda" in out
    assert (root / "lost+found" / "vm1" / "vda" / "notes.txt").read_text() == "left by someone"
    assert digest(root / "lost+found" / "vm1" / "vda" / "77.qcow2") == files[folder / "1.qcow2"]
    assert list((root / "tmp").iterdir()) == []
    assert lbrestore(root, "check").returncode == 0
    assert_exact(root, images)
    assert {p: digest(p) for p in folder.glob("?.qcow2")} == {
        p: d for p, d in files.items() if p.name != "77.qcow2"
    }
    imported = lbrestore(root, "import", "vm1", "--disk", f"vda={images[3]}")
    assert "vm1@#78 " in imported.stdout, imported.stderr  # above the id seen in lost+found


def test_what_cannot_be_repaired_is_named_and_left_alone(
    store: tuple[Path, dict[int, Path]],
) -> None:
    root, _ = store
    folder = root / "data" / "vm1" / "vda"
    os.chmod(folder / "2.qcow2", 0o644)
    subprocess.run(
        ["qemu-img", "rebase", "-u", "-F", "raw", "-b", "/etc/shadow", str(folder / "2.qcow2")],
        check=True,
    )
    size = (folder / "1.qcow2").stat().st_size
    os.chmod(folder / "1.qcow2", 0o644)
    os.truncate(folder / "1.qcow2", size // 2)
    (folder / "3.qcow2").unlink()
    before = {p.name: digest(p) for p in folder.iterdir()}

    result = lbrestore(root, "check")
    assert result.returncode == 3, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("header:"))
    assert "'/etc/shadow'" in header and "(affects vm1@#2, vm1@#3)" in header
    structure = next(line for line in lines if line.startswith("structure:"))
    assert "1.qcow2" in structure and "past end of file" in structure
    assert "(affects vm1@#1, vm1@#2, vm1@#3)" in structure
    missing = next(line for line in lines if line.startswith("missing-file:"))
    assert "data/vm1/vda/3.qcow2" in missing and "cannot be repaired" in missing

    repaired = lbrestore(root, "check", "--repair")
    assert repaired.returncode == 3, repaired.stdout + repaired.stderr
    assert "cannot be repaired without losing data" in repaired.stdout
    assert {p.name: digest(p) for p in folder.iterdir()} == before  # nothing touched
    assert "Traceback" not in repaired.stderr


def test_sidecars_follow_a_merge_and_rebuild_the_merged_chain(
    store: tuple[Path, dict[int, Path]],
) -> None:
    root, images = store
    merged = lbrestore(root, "merge", "vm1@#2")
    assert merged.returncode == 0, merged.stderr
    folder = root / "data" / "vm1" / "vda"
    assert sorted(p.name for p in folder.iterdir()) == ["1.point", "1.qcow2", "3.point", "3.qcow2"]
    assert lbrestore(root, "check").returncode == 0  # sidecars say what the index says
    (root / "index.sqlite").write_bytes(b"")
    repaired = lbrestore(root, "check", "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "recovered 2 restore points" in repaired.stdout
    del images[2]
    assert_exact(root, images)
    imported = lbrestore(root, "import", "vm1", "--disk", f"vda={images[3]}")
    assert "vm1@#4 " in imported.stdout, imported.stderr  # #2 is never given again
