"""qcow2 on-disk structures, as construct declarations and constants. No logic lives here.

Names follow QEMU's docs/interop/qcow2.txt; section names of that document are cited inline.
All integers are big-endian.
"""

from __future__ import annotations

from construct import (
    Bytes,
    Const,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    PaddedString,
    Struct,
)

# --- "Header" ---------------------------------------------------------------------------------

QCOW_MAGIC = b"QFI\xfb"

HEADER_V2_LENGTH = 72
HEADER_V3_MIN_LENGTH = 104
HEADER_V3_LENGTH_WITH_COMPRESSION = 112  # 104 + compression_type (1 byte) + 7 bytes padding
MAX_BACKING_FILE_NAME = 1023  # "backing_file_size": must not be longer than 1023 bytes

MIN_CLUSTER_BITS = 9  # 512 bytes
MAX_CLUSTER_BITS = 21  # 2 MiB

# Header bytes 0-71 are common to versions 2 and 3.
HeaderV2 = Struct(
    "magic" / Const(QCOW_MAGIC),
    "version" / Int32ub,
    "backing_file_offset" / Int64ub,
    "backing_file_size" / Int32ub,
    "cluster_bits" / Int32ub,
    "size" / Int64ub,
    "crypt_method" / Int32ub,
    "l1_size" / Int32ub,
    "l1_table_offset" / Int64ub,
    "refcount_table_offset" / Int64ub,
    "refcount_table_clusters" / Int32ub,
    "nb_snapshots" / Int32ub,
    "snapshots_offset" / Int64ub,
)

# Header bytes 72-103, version 3 only.
HeaderV3Additional = Struct(
    "incompatible_features" / Int64ub,
    "compatible_features" / Int64ub,
    "autoclear_features" / Int64ub,
    "refcount_order" / Int32ub,
    "header_length" / Int32ub,
)

# Header bytes 104-111, version 3 with header_length >= 112 ("Additional fields").
HeaderV3CompressionType = Struct(
    "compression_type" / Int8ub,
    "padding" / Bytes(7),
)

# incompatible_features bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_EXTERNAL_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION_TYPE = 1 << 3
INCOMPAT_EXTENDED_L2 = 1 << 4

INCOMPAT_NAMES = {
    INCOMPAT_DIRTY: "dirty",
    INCOMPAT_CORRUPT: "corrupt",
    INCOMPAT_EXTERNAL_DATA_FILE: "external data file",
    INCOMPAT_COMPRESSION_TYPE: "compression type",
    INCOMPAT_EXTENDED_L2: "extended L2 entries",
}

INCOMPAT_KNOWN_MASK = (
    INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_EXTERNAL_DATA_FILE
    | INCOMPAT_COMPRESSION_TYPE
    | INCOMPAT_EXTENDED_L2
)

# compatible_features bits
COMPAT_LAZY_REFCOUNTS = 1 << 0

# autoclear_features bits
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# crypt_method values
CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2

# compression_type values
COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1

# --- "Header extensions" ----------------------------------------------------------------------

HEADER_EXTENSION_END = 0x00000000
HEADER_EXTENSION_BACKING_FORMAT = 0xE2792ACA
HEADER_EXTENSION_FEATURE_NAME_TABLE = 0x6803F857
HEADER_EXTENSION_BITMAPS = 0x23852875
HEADER_EXTENSION_FULL_DISK_ENCRYPTION = 0x0537BE77
HEADER_EXTENSION_EXTERNAL_DATA_FILE = 0x44415441

HeaderExtensionHeader = Struct(
    "type" / Int32ub,
    "length" / Int32ub,
)

# One entry of the feature name table (48 bytes).
FEATURE_TYPE_INCOMPATIBLE = 0
FEATURE_TYPE_COMPATIBLE = 1
FEATURE_TYPE_AUTOCLEAR = 2

FeatureNameEntry = Struct(
    "type" / Int8ub,
    "bit" / Int8ub,
    "name" / PaddedString(46, "ascii"),
)

BitmapsExtension = Struct(
    "nb_bitmaps" / Int32ub,
    "reserved" / Int32ub,
    "bitmap_directory_size" / Int64ub,
    "bitmap_directory_offset" / Int64ub,
)

FullDiskEncryptionExtension = Struct(
    "offset" / Int64ub,
    "length" / Int64ub,
)

# The backing file format and external data file extensions hold a bare string (no NUL).

# --- "Bitmaps": bitmap directory entry (fixed part; name and extra data follow) ---------------

BitmapDirectoryEntry = Struct(
    "bitmap_table_offset" / Int64ub,
    "bitmap_table_size" / Int32ub,
    "flags" / Int32ub,
    "type" / Int8ub,
    "granularity_bits" / Int8ub,
    "name_size" / Int16ub,
    "extra_data_size" / Int32ub,
)

BITMAP_TYPE_DIRTY_TRACKING = 1  # the only bitmap type
BME_FLAG_IN_USE = 1 << 0
BME_FLAG_AUTO = 1 << 1
BME_KNOWN_FLAGS = BME_FLAG_IN_USE | BME_FLAG_AUTO  # other flag bits are reserved
BME_MIN_GRANULARITY_BITS = 9
BME_MAX_GRANULARITY_BITS = 31

# "Bitmap table": one 64-bit entry per cluster of bitmap data.
BME_TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55: offset of the data cluster
BME_TABLE_ENTRY_RESERVED_MASK = 0xFF000000000001FE  # bits 1-8 and 56-63 must be zero
BME_TABLE_ENTRY_FLAG_ALL_ONES = 1 << 0  # no data cluster: the cluster reads as all ones
BITMAP_TABLE_ENTRY_SIZE = 8

# --- "Snapshots": snapshot table entry (fixed part; extra data, id and name follow) -----------

SnapshotHeader = Struct(
    "l1_table_offset" / Int64ub,
    "l1_size" / Int32ub,
    "id_str_size" / Int16ub,
    "name_size" / Int16ub,
    "date_sec" / Int32ub,
    "date_nsec" / Int32ub,
    "vm_clock_nsec" / Int64ub,
    "vm_state_size" / Int32ub,
    "extra_data_size" / Int32ub,
)

QCOW_MAX_SNAPSHOTS = 65536  # QEMU's limit on nb_snapshots
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024  # QEMU's limit on a snapshot's extra_data_size
SNAPSHOT_EXTRA_DATA_V3 = 16  # version 3: extra data holds at least vm_state_size_large, disk_size
QCOW_MAX_L1_SIZE = 0x2000000  # QEMU's limit on the L1 table, in bytes (32 MiB)
QCOW_MAX_REFTABLE_SIZE = 0x800000  # QEMU's limit on the refcount table, in bytes (8 MiB)

# --- "Host cluster management": refcount table and blocks -------------------------------------

REFCOUNT_TABLE_OFFSET_MASK = 0xFFFFFFFFFFFFFE00  # bits 9-63
REFCOUNT_TABLE_RESERVED_MASK = 0x1FF  # bits 0-8 must be zero
RefcountTableEntry = Int64ub
# Refcount blocks hold cluster_size * 8 / 2**refcount_order big-endian unsigned entries of
# 2**refcount_order bits each; 16-bit (the default) is the common case.
RefcountEntry16 = Int16ub
DEFAULT_REFCOUNT_ORDER = 4  # 16-bit refcounts
MAX_REFCOUNT_ORDER = 6

# --- "Cluster mapping": L1 and L2 entries -----------------------------------------------------

L1_ENTRY_SIZE = 8
L1Entry = Int64ub
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55: offset of the L2 table
L1E_RESERVED_MASK = 0x7F000000000001FF  # bits 0-8 and 56-62 must be zero

L2_ENTRY_SIZE = 8
L2_ENTRY_SIZE_EXTENDED = 16
L2Entry = Int64ub
ExtendedL2Entry = Struct(
    "entry" / Int64ub,
    "bitmap" / Int64ub,  # bits 0-31: subcluster allocated; bits 32-63: subcluster reads as zero
)

QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0  # "Standard Cluster Descriptor": bit 0, all zeros

L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55: host cluster offset (standard clusters)
L2E_STANDARD_RESERVED_MASK = 0x3F000000000001FE  # bits 1-8 and 56-61 must be zero

# "Compressed Clusters Descriptor": x = 62 - (cluster_bits - 8)
COMPRESSED_SECTOR_SIZE = 512


def compressed_offset_bits(cluster_bits: int) -> int:
    """Number of low bits of a compressed cluster descriptor that hold the host offset (x)."""
    return 62 - (cluster_bits - 8)


EXTENDED_L2_MIN_CLUSTER_BITS = 14  # QEMU: extended L2 needs clusters >= 16 KiB

# Extended L2 entries: the second 64 bits hold the subcluster allocation (bits 0-31) and
# zero (bits 32-63) bitmaps.
SUBCLUSTERS_PER_CLUSTER = 32
