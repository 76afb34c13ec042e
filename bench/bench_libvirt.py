"""Benchmark: `lbrestore backup --libvirt` against virtnbdbackup on the same libvirt domain.

A guest-less domain under a real libvirtd (started as the tests start it) with one disk of
LBR_BENCH_MIB MiB (default 2048) whose first half is random data. Per round, interleaved:

1. full: `virtnbdbackup -l full` into an empty folder, then `sync` of it (lbrestore's point is
   durable when its command ends), against `lbrestore backup VM --libvirt URI` (`--full` after
   the first round);
2. 1% of the clusters rewritten through the device (scattered 64 KiB writes);
3. incremental: `virtnbdbackup -l inc` + `sync` against `lbrestore backup --libvirt`.

Both tools read the same changes: each takes its own checkpoint before the writes. Every time
is a whole process, start to exit. The best of LBR_BENCH_ROUNDS rounds (default 3) counts.
Prints `ratio (ours/theirs)` lines. Not a test: never fails on time.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

import libvirt_env  # noqa: E402
from bench_backup import CHILD_ENV, lbrestore_command, make_disk, run_timed  # noqa: E402

MiB = 1 << 20
CLUSTER = 64 * 1024
DOMAIN = "lbrt-bench-libvirt"


def ours(store: Path, *extra: str) -> tuple[float, dict[str, object]]:
    args = [*lbrestore_command(), "--store", str(store), "backup", DOMAIN,
            "--libvirt", libvirt_env.URI, "--json", *extra]  # fmt: skip
    elapsed, _, out = run_timed(args)
    return elapsed, json.loads(out)


def theirs(level: str, folder: Path) -> float:
    args = ["virtnbdbackup", "-U", libvirt_env.URI, "-d", DOMAIN, "-l", level,
            "-o", str(folder), "-n"]  # fmt: skip
    elapsed, _, _ = run_timed(args)
    return elapsed + run_timed(["sync", "-f", str(folder)])[0]


def dirty_one_percent(dom: libvirt_env.GuestlessDomain, size: int, seed: int) -> int:
    clusters = size // CLUSTER
    chosen = random.Random(seed).sample(range(clusters), max(clusters // 100, 1))
    for i, cluster in enumerate(chosen):
        dom.qemu_io("vda", f"write -P {i % 250 + 1} {cluster * CLUSTER} {CLUSTER}")
    return len(chosen) * CLUSTER


def measure(dom: libvirt_env.GuestlessDomain, folder: Path, size: int, rounds: int) -> None:
    store = folder / "store"
    subprocess.run([*lbrestore_command(), "--store", str(store), "init"],
                   check=True, capture_output=True)  # fmt: skip
    full_ours, full_theirs, inc_ours, inc_theirs = [], [], [], []
    dirty = 0
    for n in range(rounds):
        out = folder / f"virtnbdbackup-{n}"
        full_theirs.append(theirs("full", out))
        elapsed, summary = ours(store, *(["--full"] if n else []))
        assert summary["kind"] == "full", summary
        full_ours.append(elapsed)
        dirty = dirty_one_percent(dom, size, seed=n)
        inc_theirs.append(theirs("inc", out))
        elapsed, summary = ours(store)
        assert summary["kind"] == "incremental" and summary["bytes_read"] == dirty, summary
        inc_ours.append(elapsed)
        shutil.rmtree(out)
    data = size / 2 / MiB
    fo, ft, io, it = min(full_ours), min(full_theirs), min(inc_ours), min(inc_theirs)
    print(f"full (best of {rounds}, whole commands): lbrestore backup --libvirt {fo:.2f} s "
          f"({data / fo:.0f} MiB/s), virtnbdbackup -l full + sync {ft:.2f} s "
          f"({data / ft:.0f} MiB/s)")  # fmt: skip
    print(f"ratio (ours/theirs) full backup throughput: {ft / fo:.2f}  (target >= 2)")
    print(f"incremental ({dirty // 1024} KiB dirty, 1% of clusters, best of {rounds}): "
          f"lbrestore {io:.3f} s, virtnbdbackup -l inc + sync {it:.3f} s")  # fmt: skip
    print(f"ratio (ours/theirs) incremental time: {io / it:.2f}  (target <= 0.4)")


def main() -> None:
    why = libvirt_env.missing() or (
        None if shutil.which("virtnbdbackup") else "virtnbdbackup is not installed"
    )
    if why is not None:  # `make bench` goes on with the other benchmarks
        print(f"bench_libvirt: skipped: {why}")
        return
    import libvirt

    size = int(os.environ.get("LBR_BENCH_MIB", "2048")) * MiB
    rounds = int(os.environ.get("LBR_BENCH_ROUNDS", "3"))
    work = os.environ.get("LBR_BENCH_DIR")
    with tempfile.TemporaryDirectory(prefix="lbr-bench-", dir=work) as tmp:
        folder = Path(tmp)
        CHILD_ENV.pop("PYTHONDONTWRITEBYTECODE", None)
        CHILD_ENV["PYTHONPYCACHEPREFIX"] = str(folder / "pycache")
        image = make_disk(folder, size)
        with libvirt_env.running_libvirtd():
            conn = libvirt.open(libvirt_env.URI)
            try:
                with libvirt_env.guestless_domain(
                    conn, folder, DOMAIN, {}, images={"vda": image}
                ) as dom:
                    print(f"disk: {size // MiB} MiB, {size // 2 // MiB} MiB random data, "
                          f"domain type {libvirt_env.virt_type()}")  # fmt: skip
                    measure(dom, folder, size, rounds)
            finally:
                conn.close()


if __name__ == "__main__":
    main()
