"""Partition table parsing, checked against sfdisk (which wrote the tables and reads them back)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbguest.partitions import (
    GptHeader,
    GptPartitionEntry,
    Mbr,
    MbrPartitionRecord,
    Partition,
    read_partitions,
)

MIB = 1 << 20


def _image(tmp_path: Path, script: str, size: int = 64 * MIB, name: str = "disk.img") -> Path:
    """A sparse image partitioned by `sfdisk` from a script."""
    path = tmp_path / name
    with path.open("wb") as f:
        f.truncate(size)
    subprocess.run(["sfdisk", "-q", str(path)], input=script, text=True, check=True)
    return path


def _sfdisk_ranges(path: Path) -> dict[int, tuple[int, int]]:
    """{number: (start byte, length)} as sfdisk reports, extended containers left out."""
    out = subprocess.run(["sfdisk", "-J", str(path)], capture_output=True, text=True, check=True)
    table = json.loads(out.stdout)["partitiontable"]
    sector = table.get("sectorsize", 512)
    ranges = {}
    for part in table["partitions"]:
        if table["label"] == "dos" and part["type"].lower() in ("5", "f", "85"):
            continue
        number = int(part["node"].removeprefix(str(path)))
        ranges[number] = (part["start"] * sector, part["size"] * sector)
    return ranges


def _parse(path: Path) -> list[Partition]:
    data = path.read_bytes()
    return read_partitions(lambda off, n: data[off : off + n], len(data))


def _ranges(parts: list[Partition]) -> dict[int, tuple[int, int]]:
    return {p.number: (p.start, p.length) for p in parts}


# --- real tables ------------------------------------------------------------------------------


def test_mbr_primaries_match_sfdisk(tmp_path: Path) -> None:
    path = _image(tmp_path, "label: dos\n,8M,83\n,16M,c\n,,83\n")
    parts = _parse(path)
    assert _ranges(parts) == _sfdisk_ranges(path)
    assert [p.number for p in parts] == [1, 2, 3]
    assert {p.scheme for p in parts} == {"mbr"}
    assert parts[1].type == "0c"


def test_mbr_gap_keeps_slot_numbers(tmp_path: Path) -> None:
    # Slot 2 empty: Linux still calls the third slot's partition 3.
    path = _image(
        tmp_path, "label: dos\n1: start=2048, size=4096, type=83\n3: start=8192, type=83\n"
    )
    assert sorted(_ranges(_parse(path))) == [1, 3]
    assert _ranges(_parse(path)) == _sfdisk_ranges(path)


def test_mbr_logical_partitions_are_numbered_from_5(tmp_path: Path) -> None:
    script = "label: dos\n1: size=8M, type=83\n2: size=40M, type=5\n"
    script += "5: size=4M, type=83\n6: size=4M, type=82\n7: size=4M, type=83\n"
    path = _image(tmp_path, script)
    parts = _parse(path)
    assert _ranges(parts) == _sfdisk_ranges(path)
    assert [p.number for p in parts] == [1, 5, 6, 7]


def test_gpt_entries_match_sfdisk_with_names(tmp_path: Path) -> None:
    script = 'label: gpt\nsize=8M, type=L, name="boot"\nsize=16M, type=S\ntype=L, name="rootfs"\n'
    path = _image(tmp_path, script)
    parts = _parse(path)
    assert _ranges(parts) == _sfdisk_ranges(path)
    assert [(p.number, p.name, p.scheme) for p in parts] == [
        (1, "boot", "gpt"),
        (2, "", "gpt"),
        (3, "rootfs", "gpt"),
    ]
    assert parts[0].type == "0fc63daf-8483-4772-8e79-3d69d8477de4"


def test_gpt_entry_gap_keeps_index_numbers(tmp_path: Path) -> None:
    path = _image(tmp_path, "label: gpt\n1: start=2048, size=4096\n4: start=8192, size=4096\n")
    assert sorted(_ranges(_parse(path))) == [1, 4]
    assert _ranges(_parse(path)) == _sfdisk_ranges(path)


def test_gpt_with_damaged_primary_header_uses_the_backup(tmp_path: Path) -> None:
    path = _image(tmp_path, "label: gpt\n,8M\n,8M\n")
    expected = _ranges(_parse(path))
    with path.open("r+b") as f:
        f.seek(512 + 24)  # my_lba field of the primary header: CRC no longer matches
        f.write(b"\xff")
    assert _ranges(_parse(path)) == expected


def test_gpt_with_damaged_entry_arrays_everywhere_is_no_table(tmp_path: Path) -> None:
    path = _image(tmp_path, "label: gpt\n,8M\n")
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(2 * 512)  # primary entry array
        f.write(b"\x01")
        f.seek(size - 33 * 512)  # backup entry array
        f.write(b"\x01")
    # Linux shows no partitions for a protective MBR without a valid GPT; neither do we.
    assert _parse(path) == []


def test_no_table_and_tiny_disks(tmp_path: Path) -> None:
    assert read_partitions(lambda off, n: bytes(n), 64 * MIB) == []
    assert read_partitions(lambda off, n: bytes(n), 100) == []
    assert read_partitions(lambda off, n: b"", 0) == []


def test_partition_clipped_at_disk_end(tmp_path: Path) -> None:
    path = _image(tmp_path, "label: dos\n,,83\n", size=8 * MIB)
    data = bytearray(path.read_bytes())
    entry = 446
    struct.pack_into("<I", data, entry + 12, 1 << 31)  # size far past the end
    parts = read_partitions(lambda off, n: bytes(data[off : off + n]), len(data))
    assert parts == [Partition(1, 2048 * 512, len(data) - 2048 * 512, "mbr", "83")]


def test_ebr_loop_terminates(tmp_path: Path) -> None:
    script = "label: dos\n1: size=8M, type=5\n5: size=2M, type=83\n6: size=2M, type=83\n"
    path = _image(tmp_path, script, size=16 * MIB)
    data = bytearray(path.read_bytes())
    ext_start = _sfdisk_raw_start(path, 1)
    (link_lba,) = struct.unpack_from("<I", data, ext_start + 446 + 16 + 8)
    second = ext_start + link_lba * 512
    # The second EBR's link points at the second EBR itself: a loop.
    struct.pack_into("<B", data, second + 446 + 16 + 4, 0x05)
    struct.pack_into("<II", data, second + 446 + 16 + 8, link_lba, 2048)
    parts = read_partitions(lambda off, n: bytes(data[off : off + n]), len(data))
    assert [p.number for p in parts] == [5, 6]


def _sfdisk_raw_start(path: Path, number: int) -> int:
    out = subprocess.run(["sfdisk", "-J", str(path)], capture_output=True, text=True, check=True)
    part = json.loads(out.stdout)["partitiontable"]["partitions"][number - 1]
    return int(part["start"]) * 512


# --- declarations round-trip ----------------------------------------------------------------


def test_structures_round_trip(tmp_path: Path) -> None:
    path = _image(tmp_path, "label: gpt\n,8M\n")
    data = path.read_bytes()
    assert Mbr.build(Mbr.parse(data[:512])) == data[:512]
    assert Mbr.sizeof() == 512 and MbrPartitionRecord.sizeof() == 16
    header = GptHeader.parse(data[512:1024])
    assert GptHeader.build(header) == data[512 : 512 + GptHeader.sizeof()]
    assert GptHeader.sizeof() == 92 and GptPartitionEntry.sizeof() == 128
    assert zlib.crc32(data[1024 : 1024 + 128 * 128]) == header.partition_entry_array_crc32


# --- garbage: never raises, never out of range ------------------------------------------------


def _check_sane(parts: list[Partition], size: int) -> None:
    numbers = [p.number for p in parts]
    assert len(set(numbers)) == len(numbers)
    for part in parts:
        assert part.number >= 1
        assert 0 < part.start < size
        assert part.length > 0 and part.end <= size


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(head=st.binary(min_size=0, max_size=2048), size=st.integers(0, 1 << 40))
def test_garbage_never_raises(head: bytes, size: int) -> None:
    sig = head[:510] + b"\x55\xaa" + head[512:] if len(head) >= 512 else head

    def read(off: int, n: int) -> bytes:
        assert off >= 0 and off + n <= size
        chunk = sig[off : off + n]
        return chunk + bytes(n - len(chunk))

    _check_sane(read_partitions(read, size), size)


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(0, 1 << 32 - 1),
    entry_size=st.integers(0, 1 << 32 - 1),
    entry_lba=st.integers(0, (1 << 64) - 1),
)
def test_gpt_header_fields_are_bounded(count: int, entry_size: int, entry_lba: int) -> None:
    size = 16 * MIB
    disk = bytearray(34 * 512)
    disk[446 + 4] = 0xEE
    struct.pack_into("<II", disk, 446 + 8, 1, size // 512 - 1)
    disk[510:512] = b"\x55\xaa"
    fields = dict(
        revision=0x10000, header_size=92, header_crc32=0, reserved=0, my_lba=1,
        alternate_lba=size // 512 - 1, first_usable_lba=34, last_usable_lba=size // 512 - 34,
        disk_guid=os.urandom(16), partition_entry_lba=entry_lba,
        number_of_partition_entries=count, size_of_partition_entry=entry_size,
        partition_entry_array_crc32=0,
    )  # fmt: skip
    raw = bytearray(GptHeader.build(fields))
    struct.pack_into("<I", raw, 16, zlib.crc32(bytes(raw)))
    disk[512 : 512 + len(raw)] = raw
    reads: list[int] = []

    def read(off: int, n: int) -> bytes:
        reads.append(n)
        return bytes(disk[off : off + n]).ljust(n, b"\0")

    _check_sane(read_partitions(read, size), size)
    assert max(reads) <= 1 << 20


@pytest.mark.parametrize("sector_field", [0, 1])
def test_mbr_zero_start_is_ignored(sector_field: int) -> None:
    disk = bytearray(4096)
    disk[446 + 4] = 0x83
    struct.pack_into("<II", disk, 446 + 8, 0, 4 * sector_field)
    disk[510:512] = b"\x55\xaa"
    assert read_partitions(lambda off, n: bytes(disk[off : off + n]), len(disk)) == []


def _synthetic_gpt(sector: int, size: int, ranges: list[tuple[int, int]]) -> bytearray:
    """A disk with a protective MBR and a primary GPT for `sector`-byte sectors (no backup)."""
    disk = bytearray(size)
    disk[446 + 4] = 0xEE
    struct.pack_into("<II", disk, 446 + 8, 1, min(size // 512 - 1, 0xFFFFFFFF))
    disk[510:512] = b"\x55\xaa"
    linux = bytes.fromhex("af3dc60f838472478e793d69d8477de4")  # 0FC63DAF-... as stored
    entries = bytearray(128 * 128)
    for index, (first, last) in enumerate(ranges):
        fields = dict(
            partition_type_guid=linux, unique_partition_guid=os.urandom(16),
            starting_lba=first, ending_lba=last, attributes=0,
            partition_name=f"p{index}".encode("utf-16-le").ljust(72, b"\0"),
        )  # fmt: skip
        entries[index * 128 : (index + 1) * 128] = GptPartitionEntry.build(fields)
    disk[2 * sector : 2 * sector + len(entries)] = entries
    header = dict(
        revision=0x10000, header_size=92, header_crc32=0, reserved=0, my_lba=1,
        alternate_lba=size // sector - 1, first_usable_lba=6, last_usable_lba=size // sector - 6,
        disk_guid=os.urandom(16), partition_entry_lba=2, number_of_partition_entries=128,
        size_of_partition_entry=128, partition_entry_array_crc32=zlib.crc32(entries),
    )  # fmt: skip
    raw = bytearray(GptHeader.build(header))
    struct.pack_into("<I", raw, 16, zlib.crc32(bytes(raw)))
    disk[sector : sector + len(raw)] = raw
    return disk


def test_gpt_with_4096_byte_sectors() -> None:
    disk = _synthetic_gpt(4096, 16 * MIB, [(256, 511), (512, 2047)])
    parts = read_partitions(lambda off, n: bytes(disk[off : off + n]), len(disk))
    assert [(p.number, p.start, p.length, p.name) for p in parts] == [
        (1, MIB, MIB, "p0"),
        (2, 2 * MIB, 6 * MIB, "p1"),
    ]


def test_gpt_entry_array_crc_is_checked() -> None:
    disk = _synthetic_gpt(512, 16 * MIB, [(2048, 4095)])
    assert len(read_partitions(lambda off, n: bytes(disk[off : off + n]), len(disk))) == 1
    disk[2 * 512 + 40] ^= 1  # inside entry 0, CRC not updated; no backup to fall back to
    assert read_partitions(lambda off, n: bytes(disk[off : off + n]), len(disk)) == []
