"""Fuzz the reader with mutated headers and tables of small valid images (seeded, bounded).

Every outcome must be a successful open and read, or a Qcow2Error: never another exception,
never a hang. The number of examples is fixed (not a time budget), so runs are reproducible:
a failure prints the image, the seed and the mutations to replay it.
"""

from __future__ import annotations

import random
import struct
import subprocess
from itertools import islice
from pathlib import Path

import pytest

from lbstore.errors import Qcow2Error
from lbstore.qcow2 import format as fmt
from lbstore.qcow2.reader import open_image

EXAMPLES_PER_IMAGE = 800
MAX_READ = 1 << 20
INTERESTING_64 = [0, 1, 0x200, 0x10000, 1 << 31, 1 << 32, 1 << 40, 1 << 62, 1 << 63, 2**64 - 1]
INTERESTING_32 = [0, 1, 7, 8, 9, 16, 21, 22, 104, 112, 0x7FFFFFFF, 0xFFFFFFFF]

BASE_IMAGES = {
    "v3_512": (["-o", "cluster_size=512"], "256k"),
    "v2_64k": (["-o", "compat=0.10"], "1M"),
    "extl2_16k": (["-o", "cluster_size=16k,extended_l2=on"], "512k"),
    "zstd_4k": (["-o", "cluster_size=4k,compression_type=zstd"], "256k"),
    "overlay_4k": (["-o", "cluster_size=4k", "-b", "base.qcow2", "-F", "qcow2"], "320k"),
}
WRITES = [
    "write -P 0x11 0 3k",
    "write -c -P 0x22 64k 64k",
    "write -z 160k 16k",
    "write -P 0x33 200k 5k",
]


def _make_base(folder: Path, name: str) -> bytes:
    opts, size = BASE_IMAGES[name]
    if "-b" in opts:  # the overlay's backing file, which the mutations leave alone
        base = folder / "base.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "256k"], check=True)
        subprocess.run(
            ["qemu-io", "-c", "write -P 0x77 0 256k", base], check=True, capture_output=True
        )
    path = folder / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, path, size], check=True)
    qemu_io = ["qemu-io", "-f", "qcow2"]
    for command in WRITES:
        qemu_io += ["-c", command]
    subprocess.run([*qemu_io, path], check=True, capture_output=True)
    return path.read_bytes()


def _table_regions(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of the header cluster, the L1 table, the L2 tables and refcount table."""
    cluster = 1 << struct.unpack_from(">I", data, 20)[0]
    l1_size, l1_offset, rt_offset = struct.unpack_from(">IQQ", data, 36)
    regions = [(0, min(cluster, 4096)), (l1_offset, l1_size * 8), (rt_offset, 64)]
    for i in range(l1_size):
        l2 = struct.unpack_from(">Q", data, l1_offset + 8 * i)[0] & fmt.L1E_OFFSET_MASK
        if l2:
            regions.append((l2, min(cluster, 4096)))
    return regions


def _mutate(data: bytearray, regions: list[tuple[int, int]], rng: random.Random) -> list[str]:
    done = []
    for _ in range(rng.randint(1, 4)):
        start, length = rng.choice(regions)
        pos = start + rng.randrange(max(1, length))
        choice = rng.randrange(5)
        if pos >= len(data):  # truncated by an earlier mutation
            continue
        if choice == 0:
            data[pos] ^= 1 << rng.randrange(8)
        elif choice == 1:
            data[pos] = rng.randrange(256)
        elif choice == 2 and pos + 8 <= len(data):
            struct.pack_into(">Q", data, pos & ~7, rng.choice(INTERESTING_64))
        elif choice == 3 and pos + 4 <= len(data):
            struct.pack_into(">I", data, pos & ~3, rng.choice(INTERESTING_32))
        else:
            del data[rng.randrange(len(data)) :]  # truncate
        done.append(f"{choice}@{pos:#x}")
    return done


def _exercise(path: Path, rng: random.Random) -> None:
    """Open, map and read the image, with bounded lengths whatever the header claims."""
    with open_image(path, format="qcow2", max_chain_depth=3) as image:
        size = image.virtual_size
        for _ in islice(image.runs(0, min(size, 4 << 20)), 100_000):
            pass
        image.read(0, min(size, MAX_READ))
        if size:
            offset = rng.randrange(size)
            image.read(offset, rng.randrange(1, 70_000))


@pytest.mark.parametrize("name", list(BASE_IMAGES))
def test_mutated_images_give_a_read_or_a_qcow2_error(tmp_path: Path, name: str) -> None:
    good = _make_base(tmp_path, name)
    regions = _table_regions(good)
    path = tmp_path / "mutated.qcow2"
    rng = random.Random(f"lbstore-fuzz-{name}")
    outcomes = {"read": 0, "error": 0}
    for example in range(EXAMPLES_PER_IMAGE):
        data = bytearray(good)
        mutations = _mutate(data, regions, rng)
        path.write_bytes(data)
        try:
            _exercise(path, rng)
            outcomes["read"] += 1
        except Qcow2Error as exc:
            assert exc.problem and exc.path is not None
            outcomes["error"] += 1
        except Exception as exc:  # pragma: no cover - this is the failure being hunted
            raise AssertionError(
                f"{name} example {example} mutations {mutations}: {type(exc).__name__}: {exc}"
            ) from exc
    # Both outcomes occur: the mutations reach the validation, and not everything is refused.
    assert outcomes["read"] > 20 and outcomes["error"] > 20, outcomes
