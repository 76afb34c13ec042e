"""Benchmark: `lbrestore import` of a fully allocated raw image as a full restore point, vs
`qemu-img convert -O qcow2` of the same image.

Ours includes everything a restore point costs: reading the image, a BLAKE3 checksum of every
cluster, the qcow2 file, fsync, rename and the index transaction (plus Python's start-up, as a
whole command). qemu-img convert's default cache mode does not flush its output, ours fsyncs:
the main ratio is against `qemu-img convert -t writeback` (flushes on close), like for like;
the plain command is printed too. Both run as child processes, best of LBR_BENCH_ROUNDS
(default 3), alternating which goes first; the image is read once first so both read from the
page cache. Prints throughputs, `ratio (ours/theirs)` (target >= 0.8) and our peak RSS; on a
shared, busy host wall times swing widely, so the CPU seconds of each side are printed too.

lbrestore runs as an installed command does, with its bytecode cached (pip compiles it at
install): a development shell's PYTHONDONTWRITEBYTECODE=1 would make every run compile the
project's modules again (~50 ms of CPU). The cache goes to the work folder
(PYTHONPYCACHEPREFIX) and is filled by one untimed import of a small image first.

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
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
CHUNK = 4 * MIB


def make_raw(path: Path, size: int) -> None:
    """Incompressible, fully allocated data."""
    with path.open("wb") as raw:
        for _ in range(size // CHUNK):
            raw.write(os.urandom(CHUNK))
        raw.write(os.urandom(size % CHUNK))


@dataclass
class Sample:
    """One child's wall time, CPU time (user + system) and peak RSS (KiB)."""

    wall: float
    cpu: float
    rss: int


def timed(command: list[str], env: dict[str, str] | None = None) -> Sample:
    """Run one child process and measure it."""
    began = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - began
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"failed ({process.returncode}): {' '.join(command)}")
    return Sample(elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss)


def installed_env(work: Path) -> dict[str, str]:
    """The environment of an installed lbrestore: bytecode cached (in the work folder)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    return env


def run_ours(work: Path, raw: Path, round_no: int | str) -> Sample:
    store = work / f"store{round_no}"
    shutil.rmtree(store, ignore_errors=True)
    lbrestore = [sys.executable, "-m", "lbrestore", "--store", str(store)]
    env = installed_env(work)
    subprocess.run([*lbrestore, "init"], check=True, stdout=subprocess.DEVNULL, env=env)
    result = timed([*lbrestore, "import", "vm1", "--disk", f"vda={raw}"], env)
    shutil.rmtree(store)
    return result


def warm_up(work: Path) -> None:
    """One untimed import of a small image: fills the bytecode cache."""
    small = work / "warm-up.raw"
    make_raw(small, MIB)
    run_ours(work, small, "warm-up")
    small.unlink()


def run_theirs(work: Path, raw: Path, flush: bool) -> Sample:
    out = work / "theirs.qcow2"
    out.unlink(missing_ok=True)
    cache = ["-t", "writeback"] if flush else []
    result = timed(["qemu-img", "convert", *cache, "-f", "raw", "-O", "qcow2", str(raw), str(out)])
    out.unlink()
    return result


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
        warm_up(work)
        ours: list[Sample] = []
        theirs: list[Sample] = []
        unsafe: list[Sample] = []
        for round_no in range(rounds):
            order = ["ours", "theirs"] if round_no % 2 == 0 else ["theirs", "ours"]
            for who in order:
                if who == "ours":
                    ours.append(run_ours(work, raw, round_no))
                else:
                    theirs.append(run_theirs(work, raw, flush=True))
                    unsafe.append(run_theirs(work, raw, flush=False))
        report(size, rounds, ours, theirs, unsafe)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(
    size: int, rounds: int, ours: list[Sample], theirs: list[Sample], unsafe: list[Sample]
) -> None:
    """Print throughputs (best wall time), CPU seconds (best) and the ratios."""
    mib = size / MIB
    wall = {
        name: min(s.wall for s in samples)
        for name, samples in (("ours", ours), ("theirs", theirs), ("unsafe", unsafe))
    }
    cpu = {
        name: min(s.cpu for s in samples)
        for name, samples in (("ours", ours), ("theirs", theirs), ("unsafe", unsafe))
    }
    print(f"image: {mib:.0f} MiB fully allocated, best of {rounds} rounds")
    print(
        f"lbrestore import (checksums, fsync, index): {mib / wall['ours']:8.1f} MiB/s, "
        f"CPU {cpu['ours']:.2f} s"
    )
    print(
        f"qemu-img convert -O qcow2 -t writeback:      {mib / wall['theirs']:8.1f} MiB/s, "
        f"CPU {cpu['theirs']:.2f} s"
    )
    print(
        f"qemu-img convert -O qcow2 (no flush):        {mib / wall['unsafe']:8.1f} MiB/s, "
        f"CPU {cpu['unsafe']:.2f} s"
    )
    print(f"ratio (ours/theirs): {wall['theirs'] / wall['ours']:.2f}  (target >= 0.8)")
    print(f"ratio (ours/theirs, no-flush qemu-img): {wall['unsafe'] / wall['ours']:.2f}")
    print(f"ratio (ours/theirs, CPU seconds, theirs/ours): {cpu['theirs'] / cpu['ours']:.2f}")
    print(f"peak RSS of lbrestore import: {max(s.rss for s in ours) / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
