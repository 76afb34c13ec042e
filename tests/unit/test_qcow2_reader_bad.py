"""Bad input: every damaged, hostile or looping image gives one Qcow2Error naming the file.

Images are written by qemu-img/qemu-io, then damaged on purpose (fields named as in qcow2.txt).
"""

from __future__ import annotations

import itertools
import os
import random
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from lbstore.errors import Qcow2Error, UnsupportedFeatureError
from lbstore.qcow2 import format as fmt
from lbstore.qcow2.reader import Qcow2Image, RawImage, open_image

# Header field offsets ("Header" in qcow2.txt).
VERSION, BACKING_OFFSET, BACKING_SIZE, CLUSTER_BITS, SIZE = 4, 8, 16, 20, 24
CRYPT, L1_SIZE, L1_OFFSET, RT_OFFSET, RT_CLUSTERS = 32, 36, 40, 48, 56
NB_SNAPSHOTS, INCOMPAT, REFCOUNT_ORDER, HEADER_LENGTH, COMPRESSION = 60, 72, 96, 100, 104


def run(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A 1 MiB v3 image: data at 0-128k, a compressed cluster at 512k, zeros at 256k."""
    path = tmp_path_factory.mktemp("bad") / "good.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "1M")
    run(
        "qemu-io", "-f", "qcow2",
        "-c", "write -P 0x11 0 128k", "-c", "write -z 256k 64k", "-c", "write -c -P 0x22 512k 64k",
        path,
    )  # fmt: skip
    return path.read_bytes()


def be64(data: bytes | bytearray, offset: int) -> int:
    return int(struct.unpack_from(">Q", data, offset)[0])


def layout(data: bytes) -> dict[str, int]:
    """Host offsets of the L1 table, the first L2 table, the first data cluster and the
    compressed cluster of the `good` image."""
    l1 = be64(data, L1_OFFSET)
    l2 = be64(data, l1) & fmt.L1E_OFFSET_MASK
    entry = be64(data, l2 + 8 * 8)  # guest 512k: the compressed cluster
    return {
        "l1": l1,
        "l2": l2,
        "data": be64(data, l2) & fmt.L2E_OFFSET_MASK,
        "compressed": entry & ((1 << fmt.compressed_offset_bits(16)) - 1),
    }


def put(data: bytearray, offset: int, fmt_char: str, value: int) -> None:
    struct.pack_into(">" + fmt_char, data, offset, value)


Mutation = Callable[[bytearray], bytes | bytearray]


def _l1_entry(value: int) -> Mutation:
    def mutate(d: bytearray) -> bytearray:
        put(d, layout(bytes(d))["l1"], "Q", value)
        return d

    return mutate


OPEN_ERRORS: list[tuple[str, Mutation, str]] = [
    ("empty file", lambda d: b"", "bad magic"),
    ("three bytes", lambda d: d[:3], "bad magic"),
    ("truncated header", lambda d: d[:50], "truncated"),
    ("truncated v3 header", lambda d: d[:100], "truncated"),
    ("truncated before the tables", lambda d: d[:4096], "past end of file"),
    ("wrong magic", lambda d: b"QFI\xfa" + d[4:], "bad magic"),
    ("garbage", lambda d: random.Random(1).randbytes(65536), "bad magic"),
    ("version 4", lambda d: _set(d, VERSION, "I", 4), "unknown qcow2 version 4"),
    ("cluster_bits 8", lambda d: _set(d, CLUSTER_BITS, "I", 8), "cluster_bits 8 out of range"),
    ("cluster_bits 22", lambda d: _set(d, CLUSTER_BITS, "I", 22), "cluster_bits 22"),
    ("cluster_bits huge", lambda d: _set(d, CLUSTER_BITS, "I", 2**32 - 1), "cluster_bits"),
    ("header_length small", lambda d: _set(d, HEADER_LENGTH, "I", 50), "header_length 50"),
    ("header_length huge", lambda d: _set(d, HEADER_LENGTH, "I", 1 << 20), "header_length"),
    ("huge l1_size", lambda d: _set(d, L1_SIZE, "I", 2**32 - 1), "l1_size 4294967295 too large"),
    ("l1_size too small", lambda d: _set(d, L1_SIZE, "I", 0), "l1_size 0 too small"),
    ("l1_size past EOF", lambda d: _set(d, L1_SIZE, "I", 100_000), "L1 table .* past end of file"),
    ("huge virtual size", lambda d: _set(d, SIZE, "Q", 1 << 62), "too large"),
    ("L1 unaligned", lambda d: _set(d, L1_OFFSET, "Q", 0x30008), "L1 table offset .* not aligned"),
    ("L1 past EOF", lambda d: _set(d, L1_OFFSET, "Q", 1 << 40), "L1 table .* past end of file"),
    ("L1 at offset 0", lambda d: _set(d, L1_OFFSET, "Q", 0), "overlaps the header"),
    ("refcount table past EOF", lambda d: _set(d, RT_OFFSET, "Q", 1 << 30), "refcount table"),
    ("no refcount table", lambda d: _set(d, RT_CLUSTERS, "I", 0), "no refcount table"),
    ("nb_snapshots huge", lambda d: _set(d, NB_SNAPSHOTS, "I", 10**6), "nb_snapshots"),
    ("refcount_order 7", lambda d: _set(d, REFCOUNT_ORDER, "I", 7), "refcount_order 7"),
    ("corrupt bit", lambda d: _set(d, INCOMPAT, "Q", fmt.INCOMPAT_CORRUPT), "marked corrupt"),
    ("zstd without its bit", lambda d: _set(d, COMPRESSION, "B", 1), "disagrees"),
    ("L2 table past EOF", _l1_entry(1 << 40), "L1 entry 0 .* past end of file"),
    ("L2 table unaligned", _l1_entry(0x40200), "L1 entry 0 .* unaligned"),
    ("backing name too long", lambda d: _backing(d, 0x1000, 5000), "too long"),
    ("backing name outside", lambda d: _backing(d, 0x20000, 10), "outside the first cluster"),
    ("backing name past EOF", lambda d: _backing(d, 0x10000, 10, cut=True), "past end of file"),
    ("backing file missing", lambda d: _backing(d, 0x200, 7, b"nothere"), "'nothere' not found"),
    ("backing name has NUL", lambda d: _backing(d, 0x200, 4, b"a\0bc"), "NUL"),
    ("backing name not UTF-8", lambda d: _backing(d, 0x200, 2, b"\xff\xfe"), "UTF-8"),
    ("extension too large", lambda d: _set(d, 112 + 4, "I", 1 << 20), "header extension"),
]

UNSUPPORTED: list[tuple[str, Mutation, str]] = [
    ("version 1", lambda d: _set(d, VERSION, "I", 1), "qcow version 1"),
    ("unknown incompatible bit", lambda d: _set(d, INCOMPAT, "Q", 1 << 10), "bit 10"),
    ("external data file bit", lambda d: _set(d, INCOMPAT, "Q", 4), "external data file"),
    ("LUKS", lambda d: _set(d, CRYPT, "I", 2), "LUKS encryption"),
    ("compression type 2", lambda d: _set(_set(d, INCOMPAT, "Q", 8), COMPRESSION, "B", 2),
     "type 2"),
]  # fmt: skip


def _set(d: bytearray, offset: int, fmt_char: str, value: int) -> bytearray:
    put(d, offset, fmt_char, value)
    return d


def _backing(
    d: bytearray, offset: int, size: int, name: bytes = b"", *, cut: bool = False
) -> bytearray:
    put(d, BACKING_OFFSET, "Q", offset)
    put(d, BACKING_SIZE, "I", size)
    if name:
        d[offset : offset + len(name)] = name
    if cut:
        del d[offset + 5 :]
    return d


def _write(tmp_path: Path, good: bytes, mutate: Mutation) -> Path:
    path = tmp_path / "bad.qcow2"
    path.write_bytes(bytes(mutate(bytearray(good))))
    return path


@pytest.mark.parametrize(
    ("case", "mutate", "problem"), OPEN_ERRORS, ids=[c[0] for c in OPEN_ERRORS]
)
def test_bad_header_or_tables_fail_on_open(
    tmp_path: Path, good: bytes, case: str, mutate: Mutation, problem: str
) -> None:
    path = _write(tmp_path, good, mutate)
    with pytest.raises(Qcow2Error, match=problem) as info:
        Qcow2Image.open(path)
    assert info.value.path == path
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("case", "mutate", "feature"), UNSUPPORTED, ids=[c[0] for c in UNSUPPORTED]
)
def test_unsupported_features_name_the_feature(
    tmp_path: Path, good: bytes, case: str, mutate: Mutation, feature: str
) -> None:
    path = _write(tmp_path, good, mutate)
    with pytest.raises(UnsupportedFeatureError, match=feature) as info:
        Qcow2Image.open(path)
    assert str(path) in str(info.value)


def test_good_image_reads(tmp_path: Path, good: bytes) -> None:
    """The unmutated image opens and reads, so the cases above fail only by their damage."""
    path = _write(tmp_path, good, lambda d: d)
    with Qcow2Image.open(path) as image:
        assert image.read(0, 4) == b"\x11" * 4
        assert image.read(512 << 10, 4) == b"\x22" * 4


def test_garbage_is_a_raw_image_when_probing(tmp_path: Path) -> None:
    """Raw has no magic: without a format, any non-image file is a raw disk (documented)."""
    path = tmp_path / "garbage"
    path.write_bytes(random.Random(2).randbytes(5000))
    with open_image(path) as image:
        assert isinstance(image, RawImage) and image.virtual_size == 5000
    with pytest.raises(Qcow2Error, match="bad magic"):
        open_image(path, format="qcow2")


def _cut_data(d: bytearray, at: dict[str, int]) -> None:
    del d[at["data"] + 100 :]


def _unaligned_data(d: bytearray, at: dict[str, int]) -> None:
    put(d, at["l2"], "Q", at["data"] + 512)


def _data_past_eof(d: bytearray, at: dict[str, int]) -> None:
    put(d, at["l2"], "Q", 1 << 45)


def _garble_compressed(d: bytearray, at: dict[str, int]) -> None:
    d[at["compressed"] : at["compressed"] + 64] = b"\xff" * 64


def _compressed_past_eof(d: bytearray, at: dict[str, int]) -> None:
    put(d, at["l2"] + 64, "Q", fmt.QCOW_OFLAG_COMPRESSED | (1 << 40))


READ_ERRORS: list[tuple[str, Callable[[bytearray, dict[str, int]], None], str]] = [
    ("data past EOF", _cut_data, "past end of file"),
    ("data unaligned", _unaligned_data, "unaligned host"),
    ("data entry past EOF", _data_past_eof, "past end of file"),
    ("compressed garbage", _garble_compressed, "compressed cluster"),
    ("compressed past EOF", _compressed_past_eof, "compressed cluster .* past end of file"),
]


@pytest.mark.parametrize(
    ("case", "damage", "problem"), READ_ERRORS, ids=[c[0] for c in READ_ERRORS]
)
def test_bad_data_pointers_fail_on_read(
    tmp_path: Path, good: bytes, case: str, damage: Callable, problem: str
) -> None:
    data = bytearray(good)
    damage(data, layout(good))
    path = tmp_path / "bad.qcow2"
    path.write_bytes(bytes(data))
    with Qcow2Image.open(path) as image, pytest.raises(Qcow2Error, match=problem) as info:
        image.read(0, image.virtual_size)
    assert str(path) in str(info.value)


def _chain(folder: Path, count: int) -> list[Path]:
    paths = [folder / f"img{i}.qcow2" for i in range(count)]
    run("qemu-img", "create", "-q", "-f", "qcow2", paths[0], "1M")
    for lower, upper in itertools.pairwise(paths):
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", lower.name, "-F", "qcow2", upper, "1M")
    return paths


def test_backing_chain_that_loops(tmp_path: Path) -> None:
    paths = _chain(tmp_path, 3)
    run("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", paths[2].name, "-F", "qcow2", paths[0])
    with pytest.raises(Qcow2Error, match="backing chain loops") as info:
        Qcow2Image.open(paths[2])
    assert str(paths[0]) in str(info.value)


def test_image_that_is_its_own_backing_file(tmp_path: Path) -> None:
    (path,) = _chain(tmp_path, 1)
    run("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", path.name, "-F", "qcow2", path)
    with pytest.raises(Qcow2Error, match="backing chain loops"):
        Qcow2Image.open(path)


def test_chain_deeper_than_the_limit(tmp_path: Path) -> None:
    paths = _chain(tmp_path, 5)
    with Qcow2Image.open(paths[-1], max_chain_depth=4) as image:
        assert image.read(0, 4) == bytes(4)
    with pytest.raises(Qcow2Error, match="deeper than the limit of 3") as info:
        Qcow2Image.open(paths[-1], max_chain_depth=3)
    assert str(paths[-1]) in str(info.value)


def test_backing_format_not_supported(tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    run("qemu-img", "create", "-q", "-f", "vmdk", base, "1M")
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "vmdk", top)
    with pytest.raises(UnsupportedFeatureError, match="backing file format 'vmdk'"):
        Qcow2Image.open(top)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(Qcow2Error, match="cannot open"):
        open_image(tmp_path / "absent.qcow2")
    with pytest.raises(Qcow2Error, match="a directory"):
        Qcow2Image.open(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(Qcow2Error, match="not a regular file"):  # and does not block
        open_image(fifo)


def test_unknown_incompatible_feature_is_named_from_the_feature_table(
    tmp_path: Path, good: bytes
) -> None:
    data = bytearray(good)
    at = data.find(b"extended L2 entries")  # an entry of QEMU's feature name table
    assert at > 0
    data[at - 2 : at + 46] = fmt.FeatureNameEntry.build(
        dict(type=fmt.FEATURE_TYPE_INCOMPATIBLE, bit=10, name="future feature")
    )
    put(data, INCOMPAT, "Q", 1 << 10)
    path = tmp_path / "future.qcow2"
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedFeatureError, match="future feature") as info:
        Qcow2Image.open(path)
    assert info.value.feature == "future feature"


@pytest.mark.parametrize(
    ("bitmap", "problem"),
    [(0x1_0000_0001, "both allocated and zero"), (0x1, "without a host cluster")],
)
def test_bad_extended_l2_bitmaps_fail_on_read(tmp_path: Path, bitmap: int, problem: str) -> None:
    path = tmp_path / "ext.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", path, "1M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 2k", path)
    data = bytearray(path.read_bytes())
    l2 = be64(data, be64(data, L1_OFFSET)) & fmt.L1E_OFFSET_MASK
    if "host" in problem:
        put(data, l2, "Q", 0)  # no host cluster, yet subcluster 0 allocated
    put(data, l2 + 8, "Q", bitmap)
    path.write_bytes(bytes(data))
    with Qcow2Image.open(path) as image, pytest.raises(Qcow2Error, match=problem):
        image.read(0, 4096)
