"""Benchmark: write incompressible data into a new qcow2, ours vs `qemu-img convert -O qcow2`.

Each tool reads the same raw file (random bytes from os.urandom) and writes a qcow2 with
64 KiB clusters, in a child process timed as a whole command; best of LBR_BENCH_ROUNDS
rounds (default 5), rotating which tool goes first. Our child reads the raw file in 4 MiB
chunks (the next chunk read ahead in a thread) and hands them to Qcow2Writer.write().

qemu-img convert's default output cache mode is "unsafe": it never flushes the data, while
our writer fsyncs on close. Both are measured: `qemu-img convert` as is, and with
`-t writeback` (flushes on close). The main `ratio (ours/theirs)` is against the latter,
like for like (target >= 0.8); the peak RSS of our child is printed too (target < 100 MiB).

Size: LBR_BENCH_MIB (default 1024). Work folder: LBR_BENCH_DIR, else the system temp folder.
Not a test: it never fails on time.
"""

from __future__ import annotations

import json
import mmap
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK = 4 * 1024 * 1024
MIB = 1024 * 1024


def make_raw(path: Path, size: int) -> None:
    with path.open("wb") as raw:
        for _ in range(size // CHUNK):
            raw.write(os.urandom(CHUNK))
        raw.write(os.urandom(size % CHUNK))
        raw.flush()
        os.fsync(raw.fileno())


def child_write(raw_path: str, out_path: str) -> None:
    """Runs in the child: copy the raw file into a qcow2 with our writer; report max RSS.

    The next 4 MiB chunk is read in a helper thread while the current one is written, so the
    harness reads ahead the way qemu-img overlaps its reads and writes.
    """
    from lbstore.qcow2.writer import Qcow2Writer

    size = os.path.getsize(raw_path)
    # Page-aligned buffers (anonymous mmap), like qemu-img's: the kernel copies them faster.
    buffers = [mmap.mmap(-1, CHUNK), mmap.mmap(-1, CHUNK)]
    fd = os.open(raw_path, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(1) as reader, Qcow2Writer(out_path, size) as writer:
            pending = reader.submit(os.preadv, fd, [buffers[0]], 0)
            offset, index = 0, 0
            while offset < size:
                n = pending.result()
                if n <= 0:
                    break
                following = offset + n
                if following < size:
                    pending = reader.submit(os.preadv, fd, [buffers[1 - index]], following)
                writer.write(offset, memoryview(buffers[index])[:n])
                offset, index = following, 1 - index
    finally:
        os.close(fd)
    maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"maxrss_kib": maxrss_kib}))


def timed(command: list[str]) -> tuple[float, str]:
    """Wall time of a whole command, started after the previous run's dirty pages are flushed
    (so no run pays for another's writeback)."""
    os.sync()
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, result.stdout


QEMU_VARIANTS = {
    # qemu-img convert defaults to cache=unsafe for its output: it never flushes the data.
    "default": [],
    # cache=writeback flushes on close, as our writer fsyncs: the like-for-like comparison.
    "writeback": ["-t", "writeback"],
}


def best_of(rounds: int, raw: Path, folder: Path) -> tuple[dict[str, float], float, float]:
    """Best times of each qemu-img variant and of our writer, in a rotating order.

    Returns (qemu-img seconds per variant, our seconds, our peak RSS in MiB). Each round
    checks with `qemu-img compare` that our image reads the same as qemu-img's.
    """
    ours_out = folder / "ours.qcow2"
    mine = [sys.executable, __file__, "--child", str(raw), str(ours_out)]
    theirs = dict.fromkeys(QEMU_VARIANTS, float("inf"))
    ours, maxrss_mib = float("inf"), 0.0
    tools = ["ours", *QEMU_VARIANTS]
    for round_ in range(rounds):
        for tool in tools[round_ % len(tools) :] + tools[: round_ % len(tools)]:
            if tool == "ours":
                seconds, report = timed(mine)
                ours = min(ours, seconds)
                maxrss_mib = max(maxrss_mib, json.loads(report)["maxrss_kib"] / 1024)
                continue
            out = folder / f"qemu-{tool}.qcow2"
            command = ["qemu-img", "convert", *QEMU_VARIANTS[tool], "-f", "raw", "-O", "qcow2"]
            theirs[tool] = min(theirs[tool], timed([*command, str(raw), str(out)])[0])
        reference = folder / "qemu-default.qcow2"
        subprocess.run(["qemu-img", "compare", "-q", str(reference), str(ours_out)], check=True)
        for image in folder.glob("*.qcow2"):
            image.unlink()
    return theirs, ours, maxrss_mib


def main() -> None:
    size = int(os.environ.get("LBR_BENCH_MIB", "1024")) * MIB
    rounds = int(os.environ.get("LBR_BENCH_ROUNDS", "5"))
    workdir = os.environ.get("LBR_BENCH_DIR")
    folder = Path(tempfile.mkdtemp(prefix="bench-qcow2-write-", dir=workdir))
    try:
        raw = folder / "data.raw"
        make_raw(raw, size)
        theirs, ours, maxrss_mib = best_of(rounds, raw, folder)
        mib = size / MIB
        print(f"data: {mib:.0f} MiB of incompressible data, 64 KiB clusters, best of {rounds}")
        print(f"lbstore Qcow2Writer (fsync):          {mib / ours:8.1f} MiB/s ({ours:.2f} s)")
        for variant, seconds in theirs.items():
            label = f"qemu-img convert ({variant}):"
            print(f"{label:38s}{mib / seconds:8.1f} MiB/s ({seconds:.2f} s)")
        wb, default = theirs["writeback"], theirs["default"]
        print(f"ratio (ours/theirs): {wb / ours:.2f}  (vs -t writeback, both flush; target >= 0.8)")
        print(f"ratio (ours/theirs, qemu-img default cache=unsafe, no flush): {default / ours:.2f}")
        print(f"peak RSS (ours): {maxrss_mib:.1f} MiB  (target < 100 MiB)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child_write(sys.argv[2], sys.argv[3])
    else:
        main()
