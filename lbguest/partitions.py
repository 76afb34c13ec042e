"""MBR and GPT partition tables: find each partition's byte range on a disk.

Only reads: the caller hands a function `read(offset, length) -> bytes`. Parsing is bounded
(a fixed number of small reads, entry counts and sizes capped) and never trusts a field: garbage
yields fewer partitions or none, never an exception or a range outside the disk.

Numbers are the ones Linux gives (`sda1`...): MBR primaries 1-4 by slot, logical partitions
inside an extended partition 5, 6, ... in chain order; GPT entry index + 1. A disk whose MBR holds
a protective (0xEE) entry is read as GPT, as Linux does (no valid GPT: no partitions); the GPT
header and entry array must pass their CRC32 checks, else the backup header at the disk's end is
tried.
Sectors are 512 bytes (GPT is also probed with 4096-byte sectors).
"""

from __future__ import annotations

import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from construct import (
    Array,
    Bytes,
    Const,
    ConstructError,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    Struct,
)

ReadFn = Callable[[int, int], bytes]

SECTOR = 512
MBR_SIGNATURE = b"\x55\xaa"
GPT_SIGNATURE = b"EFI PART"
MBR_TYPE_EMPTY = 0x00
MBR_TYPE_PROTECTIVE = 0xEE
MBR_TYPES_EXTENDED = frozenset({0x05, 0x0F, 0x85})
MAX_LOGICAL = 128  # EBR chains longer than this are cut (they are loops or garbage)
MAX_GPT_ENTRIES = 1024
MAX_GPT_ENTRY_SIZE = 4096
MAX_GPT_ARRAY_BYTES = 1 << 20

# --- declarations (UEFI 2.10 section 5.2.1 legacy MBR, 5.3.2 GPT header, 5.3.3 entry) -------

MbrPartitionRecord = Struct(
    "boot_indicator" / Int8ul,
    "starting_chs" / Bytes(3),
    "os_type" / Int8ul,
    "ending_chs" / Bytes(3),
    "starting_lba" / Int32ul,
    "size_in_lba" / Int32ul,
)

Mbr = Struct(
    "boot_code" / Bytes(440),
    "unique_mbr_disk_signature" / Int32ul,
    "unknown" / Int16ul,
    "partition_record" / Array(4, MbrPartitionRecord),
    "signature" / Const(MBR_SIGNATURE),
)

GptHeader = Struct(
    "signature" / Const(GPT_SIGNATURE),
    "revision" / Int32ul,
    "header_size" / Int32ul,
    "header_crc32" / Int32ul,
    "reserved" / Int32ul,
    "my_lba" / Int64ul,
    "alternate_lba" / Int64ul,
    "first_usable_lba" / Int64ul,
    "last_usable_lba" / Int64ul,
    "disk_guid" / Bytes(16),
    "partition_entry_lba" / Int64ul,
    "number_of_partition_entries" / Int32ul,
    "size_of_partition_entry" / Int32ul,
    "partition_entry_array_crc32" / Int32ul,
)
GPT_HEADER_MIN_SIZE = 92

GptPartitionEntry = Struct(
    "partition_type_guid" / Bytes(16),
    "unique_partition_guid" / Bytes(16),
    "starting_lba" / Int64ul,
    "ending_lba" / Int64ul,
    "attributes" / Int64ul,
    "partition_name" / Bytes(72),
)
GPT_ENTRY_MIN_SIZE = 128


@dataclass(frozen=True, slots=True)
class Partition:
    """One partition: its Linux number and byte range on the disk.

    `type` is the MBR type byte as two hex digits ("83") or the GPT type GUID; `name` is the GPT
    partition name (empty for MBR).
    """

    number: int
    start: int
    length: int
    scheme: str
    type: str
    name: str = ""

    @property
    def end(self) -> int:
        """First byte after the partition."""
        return self.start + self.length


def read_partitions(read: ReadFn, disk_size: int) -> list[Partition]:
    """The partitions of a disk, sorted by number; empty when it has no table we understand."""
    if disk_size < SECTOR:
        return []
    mbr = _parse_mbr(_read_exact(read, 0, SECTOR, disk_size))
    if mbr is None:
        return []
    if any(rec.os_type == MBR_TYPE_PROTECTIVE for rec in mbr.partition_record):
        for sector in (SECTOR, 4096):
            gpt = _read_gpt(read, disk_size, sector)
            if gpt is not None:
                return gpt
        return []  # as Linux: a protective entry without a valid GPT means no partitions
    return _mbr_partitions(read, disk_size, mbr)


# --- MBR -------------------------------------------------------------------------------------


def _parse_mbr(sector0: bytes) -> Any:
    """The parsed MBR, or None without the 0x55AA signature."""
    if len(sector0) < SECTOR:
        return None
    try:
        return Mbr.parse(sector0)
    except ConstructError:
        return None


def _mbr_partitions(read: ReadFn, disk_size: int, mbr: Any) -> list[Partition]:
    """Primaries 1-4 by slot, then logical partitions 5+ from the first extended partition."""
    found: list[Partition] = []
    extended: tuple[int, int] | None = None
    for slot, rec in enumerate(mbr.partition_record, start=1):
        if rec.os_type == MBR_TYPE_EMPTY or rec.size_in_lba == 0:
            continue
        start, length = rec.starting_lba * SECTOR, rec.size_in_lba * SECTOR
        if rec.os_type in MBR_TYPES_EXTENDED:
            # The container itself gets no file (Linux shows it as a 1 KiB stub).
            if extended is None:
                extended = (start, length)
            continue
        part = _clipped(slot, start, length, disk_size, "mbr", f"{rec.os_type:02x}")
        if part is not None:
            found.append(part)
    if extended is not None:
        found.extend(_logical_partitions(read, disk_size, *extended))
    return found


def _logical_partitions(
    read: ReadFn, disk_size: int, ext_start: int, ext_length: int
) -> Iterator[Partition]:
    """Walk the EBR chain of an extended partition: bounded, loop-safe, clipped to it."""
    ext_end = min(ext_start + ext_length, disk_size)
    seen: set[int] = set()
    ebr_offset = ext_start
    number = 5
    while len(seen) < MAX_LOGICAL and ext_start <= ebr_offset < ext_end and ebr_offset not in seen:
        seen.add(ebr_offset)
        ebr = _parse_mbr(_read_exact(read, ebr_offset, SECTOR, disk_size))
        if ebr is None:
            return
        first, link = ebr.partition_record[0], ebr.partition_record[1]
        if first.os_type != MBR_TYPE_EMPTY and first.size_in_lba:
            start = ebr_offset + first.starting_lba * SECTOR
            length = min(first.size_in_lba * SECTOR, max(0, ext_end - start))
            part = _clipped(number, start, length, ext_end, "mbr", f"{first.os_type:02x}")
            if part is not None:
                yield part
                number += 1
        if link.os_type not in MBR_TYPES_EXTENDED or link.starting_lba == 0:
            return
        ebr_offset = ext_start + link.starting_lba * SECTOR


# --- GPT -------------------------------------------------------------------------------------


def _read_gpt(read: ReadFn, disk_size: int, sector: int) -> list[Partition] | None:
    """GPT partitions from the primary header, else the backup one; None when neither is valid."""
    primary = _gpt_header(read, disk_size, sector, 1)
    if primary is not None:
        entries = _gpt_entries(read, disk_size, sector, primary)
        if entries is not None:
            return entries
    backup_lba = primary.alternate_lba if primary is not None else disk_size // sector - 1
    backup = _gpt_header(read, disk_size, sector, backup_lba) if backup_lba != 1 else None
    return None if backup is None else _gpt_entries(read, disk_size, sector, backup)


def _gpt_header(read: ReadFn, disk_size: int, sector: int, lba: int) -> Any:
    """A GPT header at `lba` whose signature, size, CRC and own LBA check out, else None."""
    if lba <= 0 or (lba + 1) * sector > disk_size:
        return None
    raw = _read_exact(read, lba * sector, sector, disk_size)
    try:
        header = GptHeader.parse(raw)
    except ConstructError:
        return None
    if not GPT_HEADER_MIN_SIZE <= header.header_size <= sector or header.my_lba != lba:
        return None
    blanked = raw[:16] + b"\0\0\0\0" + raw[20 : header.header_size]
    if zlib.crc32(blanked) != header.header_crc32:
        return None
    return header


def _gpt_entries(read: ReadFn, disk_size: int, sector: int, header: Any) -> list[Partition] | None:
    """The used entries of a header's entry array; None when the array is out of bounds or bad."""
    count = header.number_of_partition_entries
    size = header.size_of_partition_entry
    if not (0 < count <= MAX_GPT_ENTRIES) or not GPT_ENTRY_MIN_SIZE <= size <= MAX_GPT_ENTRY_SIZE:
        return None
    if size % 8 or count * size > MAX_GPT_ARRAY_BYTES:
        return None
    array_offset = header.partition_entry_lba * sector
    array = _read_exact(read, array_offset, count * size, disk_size)
    if len(array) != count * size:
        return None
    if zlib.crc32(array) != header.partition_entry_array_crc32:
        return None
    found = []
    for index in range(count):
        entry = GptPartitionEntry.parse(array[index * size : index * size + GPT_ENTRY_MIN_SIZE])
        if entry.partition_type_guid == bytes(16) or entry.ending_lba < entry.starting_lba:
            continue
        start = entry.starting_lba * sector
        length = (entry.ending_lba - entry.starting_lba + 1) * sector
        part = _clipped(
            index + 1,
            start,
            length,
            disk_size,
            "gpt",
            str(uuid.UUID(bytes_le=entry.partition_type_guid)),
            _gpt_name(entry.partition_name),
        )
        if part is not None:
            found.append(part)
    return found


def _gpt_name(raw: bytes) -> str:
    """A GPT partition name: UTF-16LE up to the first NUL."""
    text = raw.decode("utf-16-le", errors="replace")
    return text.split("\0", 1)[0]


# --- helpers ---------------------------------------------------------------------------------


def _clipped(
    number: int, start: int, length: int, limit: int, scheme: str, kind: str, name: str = ""
) -> Partition | None:
    """A Partition cut to end at `limit`; None when nothing of it lies inside."""
    if start <= 0 or start >= limit or length <= 0:
        return None
    return Partition(number, start, min(length, limit - start), scheme, kind, name)


def _read_exact(read: ReadFn, offset: int, length: int, disk_size: int) -> bytes:
    """Up to `length` bytes at `offset`, never past the disk's end; short near the end."""
    if offset < 0 or offset >= disk_size:
        return b""
    return bytes(read(offset, min(length, disk_size - offset)))
