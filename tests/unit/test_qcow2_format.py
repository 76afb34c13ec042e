"""Round trips of the construct declarations (parse gives the object, build gives the bytes,
sizes agree), and the declarations read against structures that QEMU itself wrote."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest
from construct import Container

from lbstore.qcow2 import format as fmt

SAMPLES = [
    (
        fmt.HeaderV2,
        dict(
            magic=fmt.QCOW_MAGIC, version=3, backing_file_offset=0x200, backing_file_size=9,
            cluster_bits=16, size=1 << 40, crypt_method=0, l1_size=2048, l1_table_offset=0x30000,
            refcount_table_offset=0x10000, refcount_table_clusters=1, nb_snapshots=2,
            snapshots_offset=0x90000,
        ),
    ),
    (
        fmt.HeaderV3Additional,
        dict(
            incompatible_features=fmt.INCOMPAT_DIRTY | fmt.INCOMPAT_EXTENDED_L2,
            compatible_features=fmt.COMPAT_LAZY_REFCOUNTS,
            autoclear_features=fmt.AUTOCLEAR_BITMAPS,
            refcount_order=4, header_length=112,
        ),
    ),
    (fmt.HeaderV3CompressionType, dict(compression_type=fmt.COMPRESSION_ZSTD, padding=bytes(7))),
    (fmt.HeaderExtensionHeader, dict(type=fmt.HEADER_EXTENSION_BACKING_FORMAT, length=5)),
    (fmt.FeatureNameEntry, dict(type=fmt.FEATURE_TYPE_INCOMPATIBLE, bit=0, name="dirty bit")),
    (
        fmt.BitmapsExtension,
        dict(nb_bitmaps=2, reserved=0, bitmap_directory_size=64, bitmap_directory_offset=0x50000),
    ),
    (fmt.FullDiskEncryptionExtension, dict(offset=0x10000, length=0x200000)),
    (
        fmt.BitmapDirectoryEntry,
        dict(
            bitmap_table_offset=0x60000, bitmap_table_size=1, flags=2, type=1,
            granularity_bits=16, name_size=2, extra_data_size=0,
        ),
    ),
    (
        fmt.SnapshotHeader,
        dict(
            l1_table_offset=0x70000, l1_size=16, id_str_size=1, name_size=2, date_sec=1700000000,
            date_nsec=5, vm_clock_nsec=0, vm_state_size=0, extra_data_size=24,
        ),
    ),
    (fmt.ExtendedL2Entry, dict(entry=fmt.QCOW_OFLAG_COPIED | 0x50000, bitmap=0xFFFF_0000_FFFF)),
]  # fmt: skip


@pytest.mark.parametrize(("struct_", "fields"), SAMPLES, ids=[str(i) for i in range(len(SAMPLES))])
def test_struct_round_trip(struct_, fields: dict) -> None:  # type: ignore[no-untyped-def]
    data = struct_.build(fields)
    assert len(data) == struct_.sizeof()
    parsed = struct_.parse(data)
    assert {k: parsed[k] for k in fields} == fields
    assert struct_.build(parsed) == data


def test_integer_entries_round_trip() -> None:
    for entry, value in [
        (fmt.L1Entry, fmt.QCOW_OFLAG_COPIED | 0x40000),
        (fmt.L2Entry, fmt.QCOW_OFLAG_COMPRESSED | (3 << 54) | 0x12345),
        (fmt.RefcountTableEntry, 0x20000),
        (fmt.RefcountEntry16, 1),
    ]:
        data = entry.build(value)
        assert len(data) == entry.sizeof()
        assert entry.parse(data) == value and data == value.to_bytes(len(data), "big")


def test_header_sizes_match_the_spec() -> None:
    assert fmt.HeaderV2.sizeof() == fmt.HEADER_V2_LENGTH
    assert fmt.HeaderV2.sizeof() + fmt.HeaderV3Additional.sizeof() == fmt.HEADER_V3_MIN_LENGTH
    assert (
        fmt.HEADER_V3_MIN_LENGTH + fmt.HeaderV3CompressionType.sizeof()
        == fmt.HEADER_V3_LENGTH_WITH_COMPRESSION
    )
    assert fmt.FeatureNameEntry.sizeof() == 48
    assert fmt.SnapshotHeader.sizeof() == 40
    assert fmt.BitmapDirectoryEntry.sizeof() == 24
    assert fmt.compressed_offset_bits(16) == 54  # "x = 62 - (cluster_bits - 8)"
    assert fmt.compressed_offset_bits(9) == 61


def test_declarations_read_what_qemu_wrote(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    path = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "1G"], check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
         "-o", "cluster_size=4k,compression_type=zstd", path, "3G"],
        check=True,
    )  # fmt: skip
    subprocess.run(["qemu-img", "snapshot", "-c", "snap1", path], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", path, "bm0"], check=True)
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", path], check=True, capture_output=True
        ).stdout
    )
    data = path.read_bytes()
    header = fmt.HeaderV2.parse(data)
    assert header.version == 3 and 1 << header.cluster_bits == info["cluster-size"] == 4096
    assert header.size == info["virtual-size"]
    name = data[header.backing_file_offset : header.backing_file_offset + header.backing_file_size]
    assert name.decode() == info["backing-filename"] == "base.qcow2"
    v3 = fmt.HeaderV3Additional.parse(data[72:])
    assert v3.incompatible_features & fmt.INCOMPAT_COMPRESSION_TYPE
    assert fmt.HeaderV3CompressionType.parse(data[104:]).compression_type == fmt.COMPRESSION_ZSTD
    exts = _extensions(data, v3.header_length)
    assert exts[fmt.HEADER_EXTENSION_BACKING_FORMAT] == b"qcow2"
    # QEMU leaves the feature name table out when it creates an overlay; the base has one.
    base_data = base.read_bytes()
    table = _extensions(base_data, 112)[fmt.HEADER_EXTENSION_FEATURE_NAME_TABLE]
    names = {fmt.FeatureNameEntry.parse(table[i : i + 48]).name for i in range(0, len(table), 48)}
    assert {"dirty bit", "corrupt bit", "compression type"} <= names
    bitmaps = fmt.BitmapsExtension.parse(exts[fmt.HEADER_EXTENSION_BITMAPS])
    entry = fmt.BitmapDirectoryEntry.parse(data[bitmaps.bitmap_directory_offset :])
    name_at = bitmaps.bitmap_directory_offset + 24 + entry.extra_data_size
    assert data[name_at : name_at + entry.name_size] == b"bm0"
    snap = fmt.SnapshotHeader.parse(data[header.snapshots_offset :])
    at = header.snapshots_offset + 40 + snap.extra_data_size + snap.id_str_size
    assert data[at : at + snap.name_size] == b"snap1"
    assert snap.l1_size == header.l1_size


def _extensions(data: bytes, offset: int) -> dict[int, bytes]:
    found = {}
    while True:
        ext = fmt.HeaderExtensionHeader.parse(data[offset:])
        if ext.type == fmt.HEADER_EXTENSION_END:
            return found
        found[ext.type] = data[offset + 8 : offset + 8 + ext.length]
        offset += 8 + (ext.length + 7) // 8 * 8


def test_feature_name_entry_pads_with_nul() -> None:
    data = fmt.FeatureNameEntry.build(Container(type=2, bit=0, name="bitmaps"))
    assert data[2:9] == b"bitmaps" and data[9:] == bytes(39)
    assert struct.unpack(">BB", data[:2]) == (2, 0)
