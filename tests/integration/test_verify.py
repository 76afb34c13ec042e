"""`lbrestore verify`: bytes flipped on disk, L2 tables changed, files truncated -> exit 3 naming
exactly the restore points whose chains include the damaged file."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from restore_store import KnownStore, build_store, l2_entry_offset, lbrestore, qemu_img_json

# vm1: points 1..5 of vda and vdb; vda starts a new chain at point 4 (a full), so vda's chains
# are 1 <- 2 <- 3 and 4 <- 5, while vdb's is 1 <- 2 <- 3 <- 4 <- 5. vm2 shares the store.


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> KnownStore:
    root = tmp_path_factory.mktemp("verify")
    known = build_store(root, points=5, full_at=(3,), with_definition=False)
    build_store(root, vm="vm2", points=2, seed=7, with_definition=False, store=known.path)
    return known


@pytest.fixture
def store(pristine: KnownStore, tmp_path: Path) -> Path:
    """A private copy of the pristine store, to damage."""
    copy = tmp_path / "store"
    shutil.copytree(pristine.path, copy)
    return copy


def data_file(store: Path, disk: str, point: int) -> Path:
    path = store / "data" / "vm1" / disk / f"{point}.qcow2"
    os.chmod(path, 0o644)
    return path


def flip(path: Path, offset: int, mask: int = 0xFF) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def own_data_ranges(path: Path) -> list[dict[str, int]]:
    """The file's own data ranges per qemu-img map (guest `start`, host `offset`)."""
    return [r for r in qemu_img_json("map", path) if r["data"] and r["depth"] == 0]


def verify(store: Path, *args: str) -> tuple[int, dict[str, object]]:
    result = lbrestore(store, "verify", *args, "--json")
    assert "Traceback" not in result.stderr
    return result.returncode, json.loads(result.stdout)


def damaged_ids(report: dict[str, object]) -> list[int]:
    return sorted(p["id"] for p in report["damaged_points"])  # type: ignore[attr-defined, index]


def test_undamaged_store_exits_0(store: Path) -> None:
    result = lbrestore(store, "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no damage found" in result.stdout
    code, report = verify(store)
    assert code == 0 and report["ok"] is True
    assert report["files_checked"] == 14  # vm1: 5 points x 2 disks, vm2: 2 x 2
    assert report["clusters_checked"] > 100


def test_flipped_byte_in_a_data_cluster(store: Path) -> None:
    path = data_file(store, "vda", 2)
    flip(path, own_data_ranges(path)[0]["offset"] + 1234)
    code, report = verify(store)
    assert code == 3
    assert damaged_ids(report) == [2, 3]  # vda's chain 1 <- 2 <- 3; 4 and 5 are a new chain
    files = report["damaged_files"]
    assert [(f["point_id"], f["disk"]) for f in files] == [(2, "vda")]  # type: ignore[index]
    assert "checksum mismatch" in files[0]["problems"][0]  # type: ignore[index]
    human = lbrestore(store, "verify", "vm1")
    assert human.returncode == 3
    for point in ("vm1@#2", "vm1@#3"):
        assert f"DAMAGED restore point {point} " in human.stdout
    assert "vm1@#1 " not in human.stdout and "vm1@#4 " not in human.stdout


def test_damage_in_an_old_file_of_a_long_chain_damages_every_later_point(store: Path) -> None:
    path = data_file(store, "vdb", 1)
    flip(path, own_data_ranges(path)[-1]["offset"] + 7)
    code, report = verify(store)
    assert code == 3
    assert damaged_ids(report) == [1, 2, 3, 4, 5]  # vdb never restarted its chain


def test_flipped_byte_in_an_l2_table(store: Path) -> None:
    path = data_file(store, "vda", 4)
    first = own_data_ranges(path)[0]
    flip(path, l2_entry_offset(path, first["start"]) + 5, 0x01)  # host offset += 1 MiB
    code, report = verify(store)
    assert code == 3
    assert damaged_ids(report) == [4, 5]
    assert report["damaged_files"][0]["damaged_clusters"] >= 1  # type: ignore[index]


def test_l2_entry_of_an_unallocated_cluster_made_to_point_somewhere(store: Path) -> None:
    path = data_file(store, "vda", 5)
    mapped = {r["start"] for r in own_data_ranges(path)}
    ranges = qemu_img_json("map", path)
    hole = next(r for r in ranges if r["depth"] != 0 and r["start"] not in mapped)
    target = own_data_ranges(path)[0]["offset"]
    with path.open("r+b") as f:
        f.seek(l2_entry_offset(path, hole["start"]))
        f.write(struct.pack(">Q", (1 << 63) | target))
    code, report = verify(store)
    assert code == 3
    assert damaged_ids(report) == [5]
    problems = report["damaged_files"][0]["problems"]  # type: ignore[index]
    assert any("no checksum" in p for p in problems)


def test_truncated_file(store: Path) -> None:
    path = data_file(store, "vda", 3)
    last = own_data_ranges(path)[-1]
    os.truncate(path, last["offset"] + 100)
    code, report = verify(store)
    assert code == 3
    assert damaged_ids(report) == [3]
    problems = " ".join(report["damaged_files"][0]["problems"])  # type: ignore[index]
    assert "truncated" in problems or "past" in problems or "end of file" in problems


def test_file_cut_before_its_metadata(store: Path) -> None:
    path = data_file(store, "vdb", 5)
    os.truncate(path, 4096)
    code, report = verify(store)
    assert code == 3 and damaged_ids(report) == [5]


def test_several_damages_at_once_are_all_reported(store: Path) -> None:
    a = data_file(store, "vda", 1)
    flip(a, own_data_ranges(a)[0]["offset"])
    b = data_file(store, "vda", 5)
    os.truncate(b, b.stat().st_size // 2)
    code, report = verify(store)
    assert code == 3
    assert damaged_ids(report) == [1, 2, 3, 5]
    assert all(p["vm"] == "vm1" for p in report["damaged_points"])  # type: ignore[attr-defined]


def test_scope_of_a_single_point(store: Path) -> None:
    path = data_file(store, "vda", 2)
    flip(path, own_data_ranges(path)[0]["offset"] + 5)
    clean_code, clean = verify(store, "vm1@#5")  # its chains: vda 4 <- 5, vdb 1..5
    assert clean_code == 0 and clean["files_checked"] == 7
    assert clean["boot"] is None  # no boot unless --boot
    code, report = verify(store, "vm1@#3")
    assert code == 3 and damaged_ids(report) == [2, 3]
    other_vm, _ = verify(store, "vm2")
    assert other_vm == 0


def test_sample_checks_a_share_and_still_finds_structural_damage(store: Path) -> None:
    _, full = verify(store, "vm1")
    code, sampled = verify(store, "vm1", "--sample", "30")
    assert code == 0
    assert 0 < sampled["clusters_checked"] < full["clusters_checked"]  # type: ignore[operator]
    path = data_file(store, "vda", 5)
    os.truncate(path, 4096)
    code, report = verify(store, "vm1", "--sample", "1")
    assert code == 3 and damaged_ids(report) == [5]


def test_bad_arguments_give_one_line(store: Path) -> None:
    for args in (["nobody"], ["vm1@#99"], ["vm1", "--sample", "0"], ["--boot"], ["../x"]):
        result = lbrestore(store, "verify", *args)
        assert result.returncode in (1, 2), (args, result.stderr)
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        # one line; click's own usage errors add a usage line and a hint before theirs
        assert len(lines) == 1 or (result.returncode == 2 and lines[-1].startswith("Error:"))


def test_missing_file(store: Path) -> None:
    data_file(store, "vdb", 4).unlink()
    code, report = verify(store, "vm1")
    assert code == 3 and damaged_ids(report) == [4, 5]
    assert "cannot open" in report["damaged_files"][0]["problems"][0]  # type: ignore[index]


def test_files_checked_in_pieces_report_exactly_what_whole_files_do(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large files are split into guest ranges shared by worker processes; the merged report
    must equal the one-file-per-job report (counts, damaged files and clusters, points)."""
    from lbstore import verify as verify_module
    from lbstore.store import Store

    a = data_file(store, "vda", 1)
    ranges = own_data_ranges(a)
    flip(a, ranges[0]["offset"] + 3)
    flip(a, ranges[-1]["offset"] + 3)
    b = data_file(store, "vdb", 2)
    os.truncate(b, own_data_ranges(b)[-1]["offset"] + 100)
    data_file(store, "vdb", 4).unlink()

    def summary(report: verify_module.VerifyReport) -> object:
        return (
            report.files_checked,
            report.clusters_checked,
            report.bytes_checked,
            sorted((str(f.path), f.damaged_clusters) for f in report.damaged_files),
            sorted(p.point.id for p in report.damaged_points),
        )

    with Store.open(store) as opened:
        whole = verify_module.verify_store(opened, workers=1)
        monkeypatch.setattr(verify_module, "PIECE_BYTES", 2 * 65536)
        jobs = list(verify_module._file_jobs(opened, opened.restore_points(None), None))
        assert max(len(job.split()) for job in jobs) > 3  # the split really happens
        pieces = verify_module.verify_store(opened, workers=2)
    assert summary(pieces) == summary(whole)
    assert sorted(p.point.id for p in whole.damaged_points) == [1, 2, 3, 4, 5]
    damaged = {f.path.name: f.damaged_clusters for f in pieces.damaged_files if f.disk == "vda"}
    assert damaged == {"1.qcow2": 2}
