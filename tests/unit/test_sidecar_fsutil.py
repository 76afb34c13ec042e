"""Sidecars (round trip, integrity digest, truncation, atomic rewrite) and no-replace placement."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lbstore.checksums import ChecksumChunk
from lbstore.errors import StoreIntegrityError
from lbstore.fsutil import rename_noreplace, replace_durably
from lbstore.index import CommitDisk
from lbstore.sidecar import (
    Sidecar,
    SidecarError,
    decode_sidecar,
    encode_sidecar,
    read_sidecar,
    rewrite_sidecar,
    sidecar_path,
    write_sidecar,
)
from lbstore.store import Store

MIB = 1 << 20


def sample(point_id: int = 7, backing: int | None = 6) -> Sidecar:
    rows = (
        ChecksumChunk(0, ((0, 2), (5, 1)), bytes(range(96))).encode(),
        ChecksumChunk(3, ((9, 1),), b"\x01" * 32).encode(),
    )
    return Sidecar(
        store_id="0f1e2d3c-aaaa-bbbb-cccc-000000000001",
        point_id=point_id,
        vm="vm1",
        created=datetime(2026, 11, 27, 10, 0, 0, 123456, tzinfo=UTC),
        kind="incremental",
        definition={"name": "vm1", "memory_mib": 512},
        point_disks=("vda", "vdb"),
        disk=CommitDisk(
            name="vda",
            file=f"vm1/vda/{point_id}.qcow2",
            backing_point_id=backing,
            mode="compare",
            virtual_size=4 * MIB,
            cluster_size=65536,
            stored_bytes=4 * 65536,
            checksums=rows,
        ),
    )


def test_a_sidecar_round_trips(tmp_path: Path) -> None:
    sidecar = sample()
    data = encode_sidecar(sidecar)
    assert data.startswith(b"LBPOINT1")
    assert decode_sidecar(data) == sidecar
    path = sidecar_path(tmp_path, "vm1", "vda", 7)
    path.parent.mkdir(parents=True)
    write_sidecar(path, sidecar)
    assert read_sidecar(path) == sidecar
    assert decode_sidecar(encode_sidecar(sample(backing=None))).disk.backing_point_id is None


def test_every_flipped_byte_and_every_truncation_is_refused() -> None:
    data = encode_sidecar(sample())
    for position in range(0, len(data), 7):
        damaged = bytearray(data)
        damaged[position] ^= 0x20
        with pytest.raises(SidecarError):
            decode_sidecar(bytes(damaged))
    for length in (0, 8, 40, len(data) // 2, len(data) - 1):
        with pytest.raises(SidecarError):
            decode_sidecar(data[:length])


def test_an_existing_sidecar_is_never_replaced_by_write_but_rewritten_whole_by_merge(
    tmp_path: Path,
) -> None:
    path = sidecar_path(tmp_path, "vm1", "vda", 7)
    path.parent.mkdir(parents=True)
    write_sidecar(path, sample())
    with pytest.raises(FileExistsError):
        write_sidecar(path, sample(backing=None))
    assert read_sidecar(path).disk.backing_point_id == 6
    merged = sample(backing=5)
    assert rewrite_sidecar(tmp_path, merged) == path
    assert read_sidecar(path) == merged
    assert [p.name for p in path.parent.iterdir()] == ["7.point"]  # no temporary left behind


def test_rename_noreplace_leaves_an_existing_target_alone(tmp_path: Path) -> None:
    source, target = tmp_path / "new", tmp_path / "old"
    source.write_bytes(b"new")
    target.write_bytes(b"committed")
    with pytest.raises(FileExistsError):
        rename_noreplace(source, target)
    assert target.read_bytes() == b"committed" and source.read_bytes() == b"new"
    (tmp_path / "dir").mkdir()
    with pytest.raises(FileExistsError):
        rename_noreplace(source, tmp_path / "dir")
    rename_noreplace(source, tmp_path / "free")
    assert (tmp_path / "free").read_bytes() == b"new" and not source.exists()
    replace_durably(target, b"replaced")
    assert target.read_bytes() == b"replaced"


def test_commit_refuses_to_place_a_file_over_an_existing_one(tmp_path: Path) -> None:
    Store.init(tmp_path / "store")
    with Store.open(tmp_path / "store", write=True) as store:
        ingest = store.begin("vm1")
        ingest.add_disk("vda", MIB).write(0, b"\x07" * MIB)
        squatter = store.data_dir / "vm1" / "vda" / f"{ingest.point_id}.qcow2"
        squatter.parent.mkdir(parents=True)
        squatter.write_bytes(b"a file that must survive")
        with pytest.raises(StoreIntegrityError, match="already exists"):
            ingest.commit()
        assert squatter.read_bytes() == b"a file that must survive"
        assert store.restore_points() == []
        assert not squatter.with_suffix(".point").exists()
    assert int((tmp_path / "store" / "last-point-id").read_text()) == ingest.point_id


def test_ids_stay_above_the_high_water_mark_and_files_in_data(tmp_path: Path) -> None:
    root = tmp_path / "store"
    Store.init(root)
    (root / "last-point-id").write_text("41\n")
    with Store.open(root, write=True) as store:
        with store.begin("vm1") as ingest:
            ingest.add_disk("vda", MIB).write(0, b"\x01" * MIB)
            point = ingest.commit()
        assert point.id == 42
    os.replace(
        root / "data" / "vm1" / "vda" / "42.qcow2", root / "data" / "vm1" / "vda" / "90.qcow2"
    )
    (root / "last-point-id").write_text("0\n")
    with Store.open(root, readonly_index=True) as store:  # a plain reader refuses: #90 unknown
        assert store.high_water() == 90
