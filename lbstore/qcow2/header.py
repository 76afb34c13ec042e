"""Parse and validate a qcow2 header, its extensions and its table locations.

Everything here is checked against the file's real size before anything is allocated from it,
so that a damaged or hostile header yields a `Qcow2Error` naming the file and the problem, never
a huge allocation or a crash. Section names refer to QEMU's docs/interop/qcow2.txt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from construct import ConstructError

from lbstore.errors import Qcow2Error, UnsupportedFeatureError
from lbstore.qcow2 import format as fmt

ReadAt = Callable[[int, int], bytes]
"""Read up to `length` bytes at `offset` (short at end of file)."""

COMPRESSION_NAMES = {fmt.COMPRESSION_ZLIB: "zlib", fmt.COMPRESSION_ZSTD: "zstd"}
CRYPT_NAMES = {fmt.CRYPT_AES: "AES encryption", fmt.CRYPT_LUKS: "LUKS encryption"}


@dataclass(frozen=True, slots=True)
class BitmapsInfo:
    """Where the persistent bitmap directory lives ("Bitmaps extension"); not interpreted."""

    nb_bitmaps: int
    directory_size: int
    directory_offset: int


@dataclass(frozen=True, slots=True)
class Qcow2Header:
    """The validated header of one qcow2 file, with its extensions resolved."""

    version: int
    cluster_bits: int
    virtual_size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int
    compatible_features: int
    autoclear_features: int
    refcount_order: int
    header_length: int
    compression_type: int
    backing_file: str | None
    backing_format: str | None
    data_file: str | None
    bitmaps: BitmapsInfo | None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)

    @property
    def cluster_size(self) -> int:
        """Bytes per cluster."""
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        """True when L2 entries are 128 bits with subcluster bitmaps."""
        return bool(self.incompatible_features & fmt.INCOMPAT_EXTENDED_L2)

    @property
    def l2_entry_size(self) -> int:
        """Bytes per L2 entry (8, or 16 with extended L2)."""
        return fmt.L2_ENTRY_SIZE_EXTENDED if self.extended_l2 else fmt.L2_ENTRY_SIZE

    @property
    def l2_bits(self) -> int:
        """log2 of the number of entries in one L2 table."""
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    @property
    def dirty(self) -> bool:
        """True when the image was not closed cleanly (refcounts may be stale; data is fine)."""
        return bool(self.incompatible_features & fmt.INCOMPAT_DIRTY)


def l1_entries_needed(virtual_size: int, cluster_bits: int, l2_bits: int) -> int:
    """Number of L1 entries that a disk of `virtual_size` bytes needs."""
    span = 1 << (cluster_bits + l2_bits)
    return (virtual_size + span - 1) // span


def parse_header(path: Path, read_at: ReadAt, file_size: int) -> Qcow2Header:
    """Read, parse and validate the header of the qcow2 file at `path`."""
    raw = read_at(0, fmt.HEADER_V3_LENGTH_WITH_COMPRESSION)
    if len(raw) < 4 or raw[:4] != fmt.QCOW_MAGIC:
        raise Qcow2Error(path, "not a qcow2 image (bad magic)")
    if len(raw) < fmt.HEADER_V2_LENGTH:
        raise Qcow2Error(path, f"truncated: header needs 72 bytes, file has {len(raw)}")
    base = _parse(path, fmt.HeaderV2, raw, "header")
    version = base.version
    if version == 1:
        raise UnsupportedFeatureError(path, "qcow version 1")
    if version not in (2, 3):
        raise Qcow2Error(path, f"unknown qcow2 version {version}")
    cluster_bits = base.cluster_bits
    if not fmt.MIN_CLUSTER_BITS <= cluster_bits <= fmt.MAX_CLUSTER_BITS:
        raise Qcow2Error(
            path,
            f"cluster_bits {cluster_bits} out of range "
            f"{fmt.MIN_CLUSTER_BITS}..{fmt.MAX_CLUSTER_BITS}",
        )
    cluster_size = 1 << cluster_bits
    v3 = _parse_v3_fields(path, raw, version, cluster_size)
    first_cluster = read_at(0, cluster_size)
    ext = _parse_extensions(path, first_cluster, v3["header_length"], base, cluster_size)
    backing_file = _read_backing_name(path, read_at, base, cluster_size, file_size)
    header = Qcow2Header(
        version=version,
        cluster_bits=cluster_bits,
        virtual_size=base.size,
        crypt_method=base.crypt_method,
        l1_size=base.l1_size,
        l1_table_offset=base.l1_table_offset,
        refcount_table_offset=base.refcount_table_offset,
        refcount_table_clusters=base.refcount_table_clusters,
        nb_snapshots=base.nb_snapshots,
        snapshots_offset=base.snapshots_offset,
        backing_file=backing_file,
        **v3,
        **ext,
    )
    _check_features(path, header)
    _check_tables(path, header, file_size)
    return header


def _parse(path: Path, struct: Any, data: bytes, what: str) -> Any:
    try:
        return struct.parse(data)
    except ConstructError as exc:
        raise Qcow2Error(path, f"cannot parse {what}: {exc}") from exc


def _parse_v3_fields(path: Path, raw: bytes, version: int, cluster_size: int) -> dict:
    """The version 3 header fields, or their implied values for version 2."""
    if version == 2:
        return {
            "incompatible_features": 0,
            "compatible_features": 0,
            "autoclear_features": 0,
            "refcount_order": fmt.DEFAULT_REFCOUNT_ORDER,
            "header_length": fmt.HEADER_V2_LENGTH,
            "compression_type": fmt.COMPRESSION_ZLIB,
        }
    if len(raw) < fmt.HEADER_V3_MIN_LENGTH:
        raise Qcow2Error(path, f"truncated: version 3 header needs 104 bytes, file has {len(raw)}")
    add = _parse(path, fmt.HeaderV3Additional, raw[fmt.HEADER_V2_LENGTH :], "version 3 header")
    length = add.header_length
    if length < fmt.HEADER_V3_MIN_LENGTH or length > cluster_size:
        raise Qcow2Error(path, f"header_length {length} out of range 104..{cluster_size}")
    compression_type = fmt.COMPRESSION_ZLIB
    if length >= fmt.HEADER_V3_LENGTH_WITH_COMPRESSION:
        if len(raw) < fmt.HEADER_V3_LENGTH_WITH_COMPRESSION:
            raise Qcow2Error(path, f"truncated: header_length is {length}, file has {len(raw)}")
        compression_type = raw[fmt.HEADER_V3_MIN_LENGTH]
    if add.refcount_order > fmt.MAX_REFCOUNT_ORDER:
        raise Qcow2Error(path, f"refcount_order {add.refcount_order} out of range 0..6")
    return {
        "incompatible_features": add.incompatible_features,
        "compatible_features": add.compatible_features,
        "autoclear_features": add.autoclear_features,
        "refcount_order": add.refcount_order,
        "header_length": length,
        "compression_type": compression_type,
    }


def _parse_extensions(path: Path, first: bytes, start: int, base: Any, cluster_size: int) -> dict:
    """Walk the header extensions between the header and the backing file name."""
    found: dict = {"backing_format": None, "data_file": None, "bitmaps": None}
    names: dict[tuple[int, int], str] = {}
    found["feature_names"] = names
    end = base.backing_file_offset or cluster_size
    end = min(end, cluster_size)
    offset = start
    while offset < end:
        if offset + 8 > len(first):
            raise Qcow2Error(path, f"truncated: header extension at {offset} past end of file")
        ext_type = int.from_bytes(first[offset : offset + 4], "big")
        ext_len = int.from_bytes(first[offset + 4 : offset + 8], "big")
        offset += 8
        if ext_type == fmt.HEADER_EXTENSION_END:
            break
        if ext_len > end - offset or offset + ext_len > len(first):
            raise Qcow2Error(path, f"header extension {ext_type:#x} of {ext_len} bytes too large")
        data = first[offset : offset + ext_len]
        _apply_extension(path, ext_type, data, found, names)
        offset += (ext_len + 7) & ~7
    return found


def _apply_extension(
    path: Path, ext_type: int, data: bytes, found: dict, names: dict[tuple[int, int], str]
) -> None:
    if ext_type == fmt.HEADER_EXTENSION_BACKING_FORMAT:
        found["backing_format"] = _decode_name(path, data, "backing format")
    elif ext_type == fmt.HEADER_EXTENSION_EXTERNAL_DATA_FILE:
        found["data_file"] = _decode_name(path, data, "external data file name")
    elif ext_type == fmt.HEADER_EXTENSION_FEATURE_NAME_TABLE:
        for pos in range(0, len(data) - 47, 48):
            # Decoded by hand: a damaged name must not stop the image from opening.
            name = data[pos + 2 : pos + 48].rstrip(b"\0").decode("ascii", "replace")
            names[(data[pos], data[pos + 1])] = name
    elif ext_type == fmt.HEADER_EXTENSION_BITMAPS:
        if len(data) < fmt.BitmapsExtension.sizeof():
            raise Qcow2Error(path, f"bitmaps extension of {len(data)} bytes too short")
        bm = fmt.BitmapsExtension.parse(data)
        found["bitmaps"] = BitmapsInfo(
            bm.nb_bitmaps, bm.bitmap_directory_size, bm.bitmap_directory_offset
        )
    # Unknown extensions, and the encryption header (refused with crypt_method), are skipped.


def _decode_name(path: Path, data: bytes, what: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Qcow2Error(path, f"{what} is not valid UTF-8") from exc
    if "\0" in text:
        raise Qcow2Error(path, f"{what} contains a NUL byte")
    return text


def _read_backing_name(
    path: Path, read_at: ReadAt, base: Any, cluster_size: int, file_size: int
) -> str | None:
    offset = base.backing_file_offset
    size = base.backing_file_size
    if offset == 0 or size == 0:
        return None
    if size > fmt.MAX_BACKING_FILE_NAME:
        raise Qcow2Error(path, f"backing file name of {size} bytes too long (max 1023)")
    if offset > cluster_size:
        raise Qcow2Error(path, f"backing file name offset {offset} outside the first cluster")
    if offset + size > file_size:
        raise Qcow2Error(path, f"truncated: backing file name at {offset} past end of file")
    return _decode_name(path, read_at(offset, size), "backing file name")


def _feature_name(header: Qcow2Header, kind: int, bit: int) -> str:
    return header.feature_names.get((kind, bit)) or f"incompatible feature bit {bit}"


def _check_features(path: Path, header: Qcow2Header) -> None:
    """Refuse what cannot be read correctly; name the feature."""
    incompat = header.incompatible_features
    unknown = incompat & ~fmt.INCOMPAT_KNOWN_MASK
    if unknown:
        bit = (unknown & -unknown).bit_length() - 1
        name = _feature_name(header, fmt.FEATURE_TYPE_INCOMPATIBLE, bit)
        raise UnsupportedFeatureError(path, name)
    if incompat & fmt.INCOMPAT_CORRUPT:
        raise Qcow2Error(path, "image is marked corrupt (run qemu-img check -r)")
    if incompat & fmt.INCOMPAT_EXTERNAL_DATA_FILE or header.data_file is not None:
        raise UnsupportedFeatureError(path, "external data file")
    if header.crypt_method != fmt.CRYPT_NONE:
        name = CRYPT_NAMES.get(header.crypt_method, f"encryption method {header.crypt_method}")
        raise UnsupportedFeatureError(path, name)
    ctype = header.compression_type
    if bool(incompat & fmt.INCOMPAT_COMPRESSION_TYPE) != (ctype != fmt.COMPRESSION_ZLIB):
        raise Qcow2Error(path, f"compression_type {ctype} disagrees with the feature bit")
    if ctype not in COMPRESSION_NAMES:
        raise UnsupportedFeatureError(path, f"compression type {ctype}")
    if header.extended_l2 and header.cluster_bits < fmt.EXTENDED_L2_MIN_CLUSTER_BITS:
        raise Qcow2Error(path, "extended L2 entries need a cluster size of at least 16 KiB")


def _check_tables(path: Path, h: Qcow2Header, file_size: int) -> None:
    """Bound the L1, refcount and snapshot tables by the spec, QEMU's limits and the file."""
    needed = l1_entries_needed(h.virtual_size, h.cluster_bits, h.l2_bits)
    max_l1 = fmt.QCOW_MAX_L1_SIZE // fmt.L1_ENTRY_SIZE
    if needed > max_l1:
        raise Qcow2Error(path, f"virtual size {h.virtual_size} too large for this cluster size")
    if h.l1_size < needed:
        raise Qcow2Error(path, f"l1_size {h.l1_size} too small for virtual size {h.virtual_size}")
    if h.l1_size > max_l1:
        raise Qcow2Error(path, f"l1_size {h.l1_size} too large (max {max_l1})")
    _check_table(path, "L1 table", h.l1_table_offset, h.l1_size * 8, h.cluster_size, file_size)
    if h.refcount_table_clusters == 0:
        raise Qcow2Error(path, "refcount_table_clusters is 0: no refcount table")
    reftable_bytes = h.refcount_table_clusters * h.cluster_size
    if reftable_bytes > fmt.QCOW_MAX_REFTABLE_SIZE:
        raise Qcow2Error(path, f"refcount table of {h.refcount_table_clusters} clusters too large")
    _check_table(
        path, "refcount table", h.refcount_table_offset, reftable_bytes, h.cluster_size, file_size
    )
    if h.nb_snapshots > fmt.QCOW_MAX_SNAPSHOTS:
        raise Qcow2Error(path, f"nb_snapshots {h.nb_snapshots} too large")
    if h.nb_snapshots:
        min_bytes = h.nb_snapshots * fmt.SnapshotHeader.sizeof()
        _check_table(
            path, "snapshot table", h.snapshots_offset, min_bytes, h.cluster_size, file_size
        )
    if h.bitmaps is not None and h.bitmaps.nb_bitmaps:
        bm = h.bitmaps
        _check_table(
            path,
            "bitmap directory",
            bm.directory_offset,
            bm.directory_size,
            h.cluster_size,
            file_size,
        )


def _check_table(
    path: Path, what: str, offset: int, length: int, alignment: int, file_size: int
) -> None:
    if length == 0:
        return
    if offset % alignment:
        raise Qcow2Error(path, f"{what} offset {offset:#x} not aligned to {alignment}")
    if offset == 0 and alignment > 8:
        raise Qcow2Error(path, f"{what} offset is 0 (overlaps the header)")
    if offset + length > file_size:
        raise Qcow2Error(
            path,
            f"{what} at {offset:#x} ({length} bytes) past end of file ({file_size} bytes)",
        )
