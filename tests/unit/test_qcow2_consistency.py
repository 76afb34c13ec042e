"""The structural checker against its oracle, `qemu-img check`, on images QEMU's tools made.

Clean images must check clean, leaks made on purpose must be counted as qemu-img counts them
and repaired so that qemu-img checks clean and the content is unchanged (`qemu-img compare`),
and corruptions must be reported and never "repaired". A seeded loop of mutated images
compares the verdict (clean or not) with qemu-img's.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lbstore.errors import Qcow2Error
from lbstore.qcow2 import format as fmt
from lbstore.qcow2.consistency import (
    ConsistencyReport,
    check_image,
    decode_refcounts,
    repair_leaks,
    set_refcount,
)
from lbstore.qcow2.writer import Qcow2Writer

L1_OFFSET, RT_OFFSET, SNAPSHOTS_OFFSET = 40, 48, 64
MUTATIONS = 160


def run(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


def qemu_check(path: Path) -> tuple[bool, int | None, int | None]:
    """(clean, leaks, corruptions) as `qemu-img check --output=json` reports them; the counts
    are None when qemu-img could not open or finish checking the image."""
    proc = subprocess.run(
        ["qemu-img", "check", "--output=json", str(path)], capture_output=True, text=True
    )
    try:
        result = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return False, None, None
    return proc.returncode == 0, result.get("leaks", 0), result.get("corruptions", 0)


def identical(a: Path, b: Path) -> bool:
    proc = subprocess.run(["qemu-img", "compare", str(a), str(b)], capture_output=True)
    return proc.returncode == 0


def be64(data: bytes | bytearray, offset: int) -> int:
    return int(struct.unpack_from(">Q", data, offset)[0])


def cluster_bits(data: bytes | bytearray) -> int:
    return int(struct.unpack_from(">I", data, 20)[0])


def refcount_entry(data: bytes | bytearray, cluster: int) -> int:
    """File offset of the 16-bit refcount entry of host cluster `cluster`."""
    bits = cluster_bits(data)
    per_block = (1 << bits) // 2
    block = be64(data, be64(data, RT_OFFSET) + 8 * (cluster // per_block))
    assert block, f"no refcount block covers cluster {cluster}"
    return block + 2 * (cluster % per_block)


def first_l2(data: bytes | bytearray) -> int:
    return be64(data, be64(data, L1_OFFSET)) & fmt.L1E_OFFSET_MASK


# --- images made by QEMU's tools -------------------------------------------------------------

QIO = ("qemu-io", "-f", "qcow2")


def make_plain(opts: str) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, path, "8M")
        run(
            *QIO,
            "-c", "write -P 1 0 300k", "-c", "write -c -P 2 2M 2M",
            "-c", "write -z 4M 128k", "-c", "discard 100k 64k", "-c", "write -P 3 7M 5k",
            path,
        )  # fmt: skip

    return build


def make_preallocated(path: Path) -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", path, "8M")
    run(*QIO, "-c", "write -P 1 0 300k", "-c", "write -z 4M 128k", "-c", "discard 1M 64k", path)


def make_snapshots_and_bitmaps(path: Path) -> None:
    make_plain("cluster_size=4096")(path)
    run("qemu-img", "snapshot", "-c", "s1", path)
    run(*QIO, "-c", "write -P 7 0 8k", "-c", "write -c -P 8 6M 64k", path)
    run("qemu-img", "snapshot", "-c", "s2", path)
    run("qemu-img", "bitmap", "--add", path, "b1")
    run("qemu-img", "bitmap", "--add", "-g", "512", path, "b2")
    run(*QIO, "-c", "write -P 9 5M 70k", path)


def make_overlay(path: Path) -> None:
    base = path.with_name("base.qcow2")
    make_plain("cluster_size=65536")(base)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", path)
    run(*QIO, "-c", "write -P 9 64k 64k", "-c", "write -c -P 4 1M 128k", path)


IMAGES: dict[str, Callable[[Path], None]] = {
    "v2": make_plain("compat=0.10"),
    "v3-512": make_plain("cluster_size=512"),
    "v3-4k": make_plain("cluster_size=4096"),
    "v3-64k": make_plain("cluster_size=65536"),
    "v3-2M": make_plain("cluster_size=2097152"),
    "zstd": make_plain("compression_type=zstd"),
    "extended-l2": make_plain("extended_l2=on"),
    "refcount-1bit": make_plain("refcount_bits=1,cluster_size=4096"),
    "refcount-8bit": make_plain("refcount_bits=8"),
    "refcount-64bit": make_plain("refcount_bits=64,cluster_size=1024"),
    "lazy-refcounts": make_plain("lazy_refcounts=on"),
    "prealloc-metadata": make_preallocated,
    "snapshots-bitmaps": make_snapshots_and_bitmaps,
    "overlay": make_overlay,
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    made = {}
    for name, build in IMAGES.items():
        path = tmp_path_factory.mktemp(name) / "disk.qcow2"
        build(path)
        made[name] = path
    return made


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_images_made_by_qemu_check_clean_like_qemu_img(images: dict[str, Path], name: str) -> None:
    path = images[name]
    report = check_image(path)
    assert qemu_check(path) == (True, 0, 0)
    assert report.is_clean, report.problems
    assert (report.leaks, report.corruptions, report.problems) == (0, 0, [])


def test_a_file_written_by_the_project_checks_clean(tmp_path: Path) -> None:
    path = tmp_path / "written.qcow2"
    with Qcow2Writer(path, 8 << 20, cluster_size=4096, compression="zlib") as writer:
        writer.write(0, bytes(range(256)) * 64)
        writer.write_zeroes(1 << 20, 64 << 10)
        writer.write(3 << 20, b"\x5a" * (200 << 10))
    plain = tmp_path / "plain.qcow2"
    with Qcow2Writer(plain, 8 << 20, backing_file="written.qcow2", backing_format="qcow2") as w:
        w.write(64 << 10, b"\x11" * (128 << 10))
        w.write_zeroes(2 << 20, 1 << 20)
    for image in (path, plain):
        assert qemu_check(image) == (True, 0, 0)
        assert check_image(image).is_clean, check_image(image).problems


# --- leaks -------------------------------------------------------------------------------------


def leak_clusters(path: Path, count: int, step: int = 1) -> list[int]:
    """Grow the file by `count * step` clusters and give every `step`-th a refcount of 1:
    clusters that nothing references (leaks). Returns their indexes."""
    data = bytearray(path.read_bytes())
    size = 1 << cluster_bits(data)
    first = -(-len(data) // size)
    leaked = [first + i * step for i in range(count)]
    data.extend(bytes((first + count * step) * size - len(data)))
    for cluster in leaked:
        struct.pack_into(">H", data, refcount_entry(data, cluster), 1)
    path.write_bytes(data)
    return leaked


def test_leaks_are_counted_like_qemu_img_and_repaired(tmp_path: Path) -> None:
    path = tmp_path / "leaky.qcow2"
    make_plain("cluster_size=4096")(path)
    leaked = leak_clusters(path, 5, step=2)
    before = tmp_path / "before.qcow2"
    shutil.copyfile(path, before)

    report = check_image(path)
    assert qemu_check(path) == (False, 5, 0)
    assert (report.leaks, report.corruptions, report.leaked_bytes) == (5, 0, 5 * 4096)
    assert f"{leaked[0] * 4096:#x}" in " ".join(report.problems)

    repair = repair_leaks(path)
    assert (repair.repaired, repair.left, repair.refused) == (5, 0, None)
    assert qemu_check(path) == (True, 0, 0)
    assert check_image(path).is_clean
    assert identical(path, before)


def test_leaks_in_a_snapshot_image_with_bitmaps(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    make_snapshots_and_bitmaps(path)
    before = tmp_path / "before.qcow2"
    shutil.copyfile(path, before)
    leak_clusters(path, 3)
    assert qemu_check(path) == (False, 3, 0)
    assert check_image(path).leaks == 3
    assert repair_leaks(path).repaired == 3
    assert qemu_check(path) == (True, 0, 0)
    assert identical(path, before)
    for image in (path, before):  # the snapshot's content is unchanged too
        out = image.with_suffix(".s1.raw")
        run("qemu-img", "convert", "-O", "raw", "-l", "snapshot.name=s1", image, out)
    assert path.with_suffix(".s1.raw").read_bytes() == before.with_suffix(".s1.raw").read_bytes()


def test_leaks_left_by_a_killed_qemu_io_are_counted_like_qemu_img(tmp_path: Path) -> None:
    """qemu-io killed (SIGKILL) while it writes, with caches small enough that refcount
    blocks reach the file before the L2 tables that reference the new clusters."""
    path = tmp_path / "killed.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, "64M")
    opts = f"driver=qcow2,file.filename={path},l2-cache-size=1024,refcount-cache-size=1024"
    proc = subprocess.Popen(
        ["qemu-io", "--image-opts", "-c", "write -P 1 0 48M", opts],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while proc.poll() is None and path.stat().st_size < 4 << 20:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    clean, leaks, corruptions = qemu_check(path)
    report = check_image(path)
    assert (report.is_clean, report.leaks, report.corruptions) == (clean, leaks, corruptions)
    before = tmp_path / "before.qcow2"
    shutil.copyfile(path, before)
    assert repair_leaks(path).repaired == leaks
    assert qemu_check(path) == (True, 0, 0)
    assert identical(path, before)


def test_a_partial_leak_of_a_shared_cluster_is_lowered_to_its_references(tmp_path: Path) -> None:
    """A cluster two L1 tables share (a snapshot) with refcount 3 has one reference too many."""
    path = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "1M")
    run(*QIO, "-c", "write -P 5 0 4k", path)
    run("qemu-img", "snapshot", "-c", "s1", path)
    data = bytearray(path.read_bytes())
    cluster = (be64(data, first_l2(data)) & fmt.L2E_OFFSET_MASK) >> 12
    entry = refcount_entry(data, cluster)
    assert struct.unpack_from(">H", data, entry)[0] == 2
    struct.pack_into(">H", data, entry, 3)
    path.write_bytes(data)
    assert qemu_check(path) == (False, 1, 0)
    assert check_image(path).leaks == 1
    assert repair_leaks(path).repaired == 1
    assert qemu_check(path) == (True, 0, 0)


# --- crash safety of the repair ----------------------------------------------------------------

_KILLER = """
import os, signal, sys
from lbstore.qcow2 import consistency
limit, half = int(sys.argv[2]), sys.argv[3] == "half"
real = consistency._pwrite
done = [0]
def killing_pwrite(image, data, offset):
    if done[0] == limit:
        if half:
            real(image, data[: len(data) // 2], offset)
        os.kill(os.getpid(), signal.SIGKILL)
    done[0] += 1
    real(image, data, offset)
consistency._pwrite = killing_pwrite
consistency.repair_leaks(sys.argv[1])
print(done[0])
"""


def repair_in_child(path: Path, limit: int, how: str) -> subprocess.CompletedProcess[str]:
    """repair_leaks in a child that SIGKILLs itself at write number `limit` (before it, or
    half-way through it with how="half"); limit -1 never kills and prints the write count."""
    return subprocess.run(
        [sys.executable, "-c", _KILLER, str(path), str(limit), how],
        capture_output=True,
        text=True,
    )


def test_repair_killed_at_any_write_leaves_a_readable_file_at_worst_leaky(tmp_path: Path) -> None:
    """SIGKILL before a write of the repair, or half-way through it: qemu-img finds no
    corruption, only fewer leaks, and the content never changes."""
    original = tmp_path / "leaky.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", original, "4M")
    run(*QIO, "-c", "write -P 1 0 1M", "-c", "discard 64k 512k", original)
    data = bytearray(original.read_bytes())
    for cluster in range(128 + 1, 128 + 1024, 7):  # discarded clusters, several blocks
        entry = refcount_entry(data, cluster)
        if struct.unpack_from(">H", data, entry)[0] == 0:
            struct.pack_into(">H", data, entry, 1)
    original.write_bytes(data)
    _clean, total, corruptions = qemu_check(original)
    assert total is not None and total > 20 and corruptions == 0

    path = tmp_path / "victim.qcow2"
    shutil.copyfile(original, path)
    writes = int(repair_in_child(path, -1, "whole").stdout)
    assert writes > 10 and qemu_check(path) == (True, 0, 0)
    for limit in sorted(random.Random(7).sample(range(writes), 5)):
        for how in ("whole", "half"):
            shutil.copyfile(original, path)
            proc = repair_in_child(path, limit, how)
            assert proc.returncode == -signal.SIGKILL, proc.stderr
            clean, leaks, corruptions = qemu_check(path)
            assert (clean, corruptions) == (False, 0), (limit, how)
            assert leaks is not None and 0 < leaks <= total, (limit, how)
            assert identical(path, original)
            assert check_image(path).leaks == leaks
            assert repair_leaks(path).repaired == leaks  # a second repair finishes the job
            assert qemu_check(path) == (True, 0, 0)


# --- corruptions -------------------------------------------------------------------------------


def corrupt_copy(tmp_path: Path, name: str, edit: Callable[[bytearray], None]) -> Path:
    path = tmp_path / f"{name}.qcow2"
    make_plain("cluster_size=4096")(path)
    data = bytearray(path.read_bytes())
    edit(data)
    path.write_bytes(data)
    return path


def zero_refcount_of_data(data: bytearray) -> None:
    host = be64(data, first_l2(data)) & fmt.L2E_OFFSET_MASK
    struct.pack_into(">H", data, refcount_entry(data, host >> 12), 0)


def l2_entry_past_eof(data: bytearray) -> None:
    entry = be64(data, first_l2(data))
    far = (len(data) + (1 << 20)) & ~4095
    struct.pack_into(">Q", data, first_l2(data), (entry & ~fmt.L2E_OFFSET_MASK) | far)


def l2_entry_onto_its_table(data: bytearray) -> None:
    l2 = first_l2(data)
    struct.pack_into(">Q", data, l2 + 8, fmt.QCOW_OFLAG_COPIED | l2)


def l2_entry_unaligned(data: bytearray) -> None:
    struct.pack_into(">Q", data, first_l2(data), be64(data, first_l2(data)) + 512)


CORRUPTIONS = {
    "refcount zeroed under data": (zero_refcount_of_data, "refcount too low"),
    "L2 entry past EOF": (l2_entry_past_eof, "past the end of the file"),
    "L2 entry onto its own table": (l2_entry_onto_its_table, "overlap"),
    "L2 entry unaligned": (l2_entry_unaligned, "not cluster aligned"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruptions_are_reported_and_never_repaired(tmp_path: Path, name: str) -> None:
    edit, words = CORRUPTIONS[name]
    path = corrupt_copy(tmp_path, "bad", edit)
    content = path.read_bytes()
    clean, _leaks, _corruptions = qemu_check(path)
    report = check_image(path)
    assert not clean
    assert not report.is_clean and report.corruptions > 0
    assert words in " ".join(report.problems), report.problems
    repair = repair_leaks(path)
    assert repair.refused is not None and "corruption" in repair.refused
    assert repair.repaired == 0
    assert path.read_bytes() == content


def test_a_damaged_header_is_a_corruption_not_an_exception(tmp_path: Path) -> None:
    path = corrupt_copy(tmp_path, "hdr", lambda d: struct.pack_into(">I", d, 20, 40))
    report = check_image(path)
    assert report.corruptions == 1 and report.problems[0].startswith("header:")
    with pytest.raises(Qcow2Error, match="cannot open"):
        check_image(tmp_path / "missing.qcow2")


# --- seeded mutations against the oracle -------------------------------------------------------


def metadata_regions(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of the header, L1, refcount table and block, L2 and snapshot tables."""
    data = path.read_bytes()
    l1, rt = be64(data, L1_OFFSET), be64(data, RT_OFFSET)
    regions = [(0, 112), (l1, 64), (rt, 64), (be64(data, rt), 256), (first_l2(data), 512)]
    if be64(data, SNAPSHOTS_OFFSET):
        regions.append((be64(data, SNAPSHOTS_OFFSET), 128))
    return regions


def mutate(data: bytes, regions: list[tuple[int, int]], rng: random.Random) -> bytes:
    buf = bytearray(data)
    start, length = rng.choice(regions)
    for _ in range(rng.randint(1, 3)):
        pos = start + rng.randrange(length)
        if rng.random() < 0.5:
            buf[pos] ^= 1 << rng.randrange(8)
        else:
            buf[pos] = rng.randrange(256)
    return bytes(buf)


@pytest.mark.parametrize("name", ["snapshots-bitmaps", "v3-512", "extended-l2", "refcount-1bit"])
def test_mutated_images_get_qemu_img_s_verdict(
    images: dict[str, Path], tmp_path: Path, name: str
) -> None:
    source = images[name]
    data = source.read_bytes()
    regions = metadata_regions(source)
    path = source.with_name(f"mutant-{os.getpid()}.qcow2")  # beside its backing file, if any
    disagreements = []
    try:
        for seed in range(MUTATIONS // 4):
            path.write_bytes(mutate(data, regions, random.Random(f"{name}-{seed}")))
            clean, leaks, corruptions = qemu_check(path)
            report = check_image(path)
            if report.is_clean != clean or (corruptions == 0 and report.leaks != leaks):
                disagreements.append((seed, (clean, leaks, corruptions), report))
    finally:
        path.unlink(missing_ok=True)
    assert disagreements == []


# --- pure pieces -------------------------------------------------------------------------------


@pytest.mark.parametrize("order", range(7))
def test_refcount_entries_round_trip_at_every_width(order: int) -> None:
    rng = random.Random(order)
    bits = 1 << order
    count = 64
    block = bytearray(count * bits // 8)
    values = [rng.randrange(min(1 << bits, 1 << 16)) for _ in range(count)]
    for index, value in enumerate(values):
        set_refcount(block, index, value, order)
    assert list(decode_refcounts(bytes(block), order)) == values


def test_report_is_clean_only_without_leaks_and_corruptions() -> None:
    assert ConsistencyReport(Path("x"), 0, 0).is_clean
    assert not ConsistencyReport(Path("x"), 1, 0).is_clean
    assert not ConsistencyReport(Path("x"), 0, 1).is_clean


def test_any_damage_anywhere_gives_a_report_never_an_exception(
    images: dict[str, Path], tmp_path: Path
) -> None:
    """Truncations, bit flips and junk anywhere in the file (data included): a report, never
    an exception; a file cut to half its size is never clean."""
    names = sorted(images)
    path = tmp_path / "hostile.qcow2"
    for seed in range(MUTATIONS // 2):
        rng = random.Random(seed)
        data = bytearray(images[rng.choice(names)].read_bytes())
        op = rng.choice(("truncate", "halve", "flip", "junk"))
        if op == "truncate":
            del data[rng.randrange(len(data)) :]
        elif op == "halve":
            del data[len(data) // 2 :]
        elif op == "flip":
            for _ in range(rng.randint(1, 20)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        else:
            at = rng.randrange(len(data))
            data[at : at + 4096] = rng.randbytes(len(data[at : at + 4096]))
        path.write_bytes(data)
        report = check_image(path)
        if op == "halve":
            assert not report.is_clean, seed
        if report.leaks and not report.corruptions:
            assert repair_leaks(path).refused is None
