#!/usr/bin/env python3
"""Benchmark: read a fully allocated qcow2 into /dev/null, lbstore's reader vs qemu-img.

Makes LBR_BENCH_MIB MiB (default 1024) of random data, converts it to qcow2 with qemu-img
(64 KiB clusters, all allocated), then times, warm cache, best of LBR_BENCH_REPEAT (default 3):

    ours:   Qcow2Image.readinto in 8 MiB chunks, each written to /dev/null
    theirs: qemu-img convert -n IMG --target-image-opts driver=null-co (QEMU's /dev/null)

and prints both throughputs and `ratio (ours/theirs)`; the target is >= 0.8. Not a test:
it never fails on time. Set LBR_BENCH_DIR to keep the images somewhere other than /tmp.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lbstore.qcow2.reader import Qcow2Image

MiB = 1 << 20
CHUNK = 8 * MiB


def make_image(folder: Path, mib: int) -> Path:
    """A qcow2 holding `mib` MiB of random data, every cluster allocated."""
    raw = folder / "random.raw"
    with open("/dev/urandom", "rb") as src, raw.open("wb") as dst:
        for _ in range(mib):
            dst.write(src.read(MiB))
    image = folder / "bench.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, image], check=True)
    raw.unlink()
    return image


def read_ours(image: Path) -> int:
    """Read every guest byte into a reused buffer and write it to /dev/null."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    with Qcow2Image.open(image) as img, open(os.devnull, "wb", buffering=0) as null:
        for offset in range(0, img.virtual_size, CHUNK):
            got = img.readinto(offset, view)
            null.write(view[:got])
            total += got
    return total


def read_theirs(image: Path, size: int) -> None:
    """qemu-img convert into QEMU's null-co driver: `-O raw IMG /dev/null` itself is refused
    ("Cannot grow device files"), and null-co discards writes just as /dev/null does."""
    target = f"driver=null-co,size={size}"
    subprocess.run(
        ["qemu-img", "convert", "-n", "-f", "qcow2", image, "--target-image-opts", target],
        check=True,
    )


def best_of(repeat: int, func, *args) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        func(*args)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    mib = int(os.environ.get("LBR_BENCH_MIB", "1024"))
    repeat = int(os.environ.get("LBR_BENCH_REPEAT", "3"))
    with tempfile.TemporaryDirectory(dir=os.environ.get("LBR_BENCH_DIR")) as tmp:
        image = make_image(Path(tmp), mib)
        read_ours(image)  # warm the page cache
        assert read_ours(image) == mib * MiB
        ours = best_of(repeat, read_ours, image)
        theirs = best_of(repeat, read_theirs, image, mib * MiB)
    size = mib * MiB
    print(f"qcow2 read of {mib} MiB, fully allocated, warm cache, best of {repeat}")
    print(f"ours   (lbstore Qcow2Image): {size / ours / MiB:10.1f} MiB/s  ({ours:.3f} s)")
    print(f"theirs (qemu-img convert):   {size / theirs / MiB:10.1f} MiB/s  ({theirs:.3f} s)")
    print(f"ratio (ours/theirs): {theirs / ours:.2f}  (target >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
