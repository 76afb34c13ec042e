"""Benchmark: `lbrestore import` of a fully allocated raw image as a full restore point, vs
`qemu-img convert -O qcow2` of the same image.

Ours includes everything a restore point costs: reading the image, a BLAKE3 checksum of every
cluster, the qcow2 file, fsync, rename and the index transaction (plus Python's start-up, as a
whole command). qemu-img convert's default cache mode does not flush its output, ours fsyncs:
the main ratio is against `qemu-img convert -t writeback` (flushes on close), like for like;
the plain command is printed too. Both run as child processes, best of LBR_BENCH_ROUNDS
(default 3), alternating which goes first; the image is read once first so both read from the
page cache. Prints throughputs, `ratio (ours/theirs)` (target >= 0.8) and our peak RSS.

Size: LBR_BENCH_MIB (default 1024). Work folder: LBR_BENCH_DIR, else the system temp folder.
Not a test: it never fails on time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1 << 20
CHUNK = 4 * MIB


def make_raw(path: Path, size: int) -> None:
    """Incompressible, fully allocated data."""
    with path.open("wb") as raw:
        for _ in range(size // CHUNK):
            raw.write(os.urandom(CHUNK))
        raw.write(os.urandom(size % CHUNK))


def timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall time and peak RSS (KiB) of one child process."""
    began = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - began
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"failed ({process.returncode}): {' '.join(command)}")
    return elapsed, usage.ru_maxrss


def run_ours(work: Path, raw: Path, round_no: int) -> tuple[float, int]:
    store = work / f"store{round_no}"
    shutil.rmtree(store, ignore_errors=True)
    lbrestore = [sys.executable, "-m", "lbrestore", "--store", str(store)]
    subprocess.run([*lbrestore, "init"], check=True, stdout=subprocess.DEVNULL)
    result = timed([*lbrestore, "import", "vm1", "--disk", f"vda={raw}"])
    shutil.rmtree(store)
    return result


def run_theirs(work: Path, raw: Path, flush: bool) -> float:
    out = work / "theirs.qcow2"
    out.unlink(missing_ok=True)
    cache = ["-t", "writeback"] if flush else []
    elapsed, _ = timed(
        ["qemu-img", "convert", *cache, "-f", "raw", "-O", "qcow2", str(raw), str(out)]
    )
    out.unlink()
    return elapsed


def main() -> None:
    size = int(os.environ.get("LBR_BENCH_MIB", "1024")) * MIB
    rounds = int(os.environ.get("LBR_BENCH_ROUNDS", "3"))
    base = os.environ.get("LBR_BENCH_DIR") or tempfile.gettempdir()
    work = Path(tempfile.mkdtemp(prefix="bench-store-import-", dir=base))
    try:
        raw = work / "disk.raw"
        make_raw(raw, size)
        with raw.open("rb") as f:  # warm the page cache for both sides
            while f.read(CHUNK):
                pass
        ours, theirs, theirs_unsafe, rss = [], [], [], 0
        for round_no in range(rounds):
            order = ["ours", "theirs"] if round_no % 2 == 0 else ["theirs", "ours"]
            for who in order:
                if who == "ours":
                    elapsed, peak = run_ours(work, raw, round_no)
                    ours.append(elapsed)
                    rss = max(rss, peak)
                else:
                    theirs.append(run_theirs(work, raw, flush=True))
                    theirs_unsafe.append(run_theirs(work, raw, flush=False))
        mib = size / MIB
        best_ours, best_theirs, best_unsafe = min(ours), min(theirs), min(theirs_unsafe)
        print(f"image: {mib:.0f} MiB fully allocated, best of {rounds} rounds")
        print(f"lbrestore import (checksums, fsync, index): {mib / best_ours:8.1f} MiB/s")
        print(f"qemu-img convert -O qcow2 -t writeback:      {mib / best_theirs:8.1f} MiB/s")
        print(f"qemu-img convert -O qcow2 (no flush):        {mib / best_unsafe:8.1f} MiB/s")
        print(f"ratio (ours/theirs): {best_theirs / best_ours:.2f}  (target >= 0.8)")
        print(f"ratio (ours/theirs, no-flush qemu-img): {best_unsafe / best_ours:.2f}")
        print(f"peak RSS of lbrestore import: {rss / 1024:.1f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
