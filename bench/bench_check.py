"""Benchmark: `lbrestore check --repair` rebuilding a lost index vs `lbrestore verify`.

A store of LBR_BENCH_POINTS (default 200) restore points of one VM with an LBR_BENCH_MIB
(default 8) MiB disk: a random full, then incrementals that each change a few random clusters
(seeded). Each round deletes index.sqlite (and its -wal/-shm) and times the whole command
`lbrestore check --repair` (which rebuilds the index from the sidecars, then checks every file),
then times the whole command `lbrestore verify` of the same store; the order alternates between
rounds. Prints each command's best time and `ratio (check --repair / verify)`, and how many
points the rebuild recovered (all of them, or the run says so).

Rounds: LBR_BENCH_ROUNDS (default 3). Work folder: LBR_BENCH_DIR, else the system temp folder.
Not a test: it never fails on time.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from lbstore.store import Store

MIB = 1 << 20
CLUSTER = 65536


def build_store(root: Path, points: int, size: int) -> None:
    """`points` points of vm1: a random full, then incrementals of 1-4 random clusters each."""
    rng = random.Random(8)
    Store.init(root)
    start = datetime.now(UTC) - timedelta(hours=points + 1)
    with Store.open(root, write=True) as store:
        for index in range(points):
            with store.begin("vm1", created=start + timedelta(hours=index)) as ingest:
                if index == 0:
                    disk = ingest.add_disk("vda", size, mode="full")
                    disk.write(0, rng.randbytes(size))
                else:
                    disk = ingest.add_disk("vda", size, mode="incremental")
                    clusters = rng.sample(range(size // CLUSTER), rng.randint(1, 4))
                    for cluster in sorted(clusters):
                        disk.write(cluster * CLUSTER, rng.randbytes(CLUSTER))
                ingest.commit()


def drop_index(root: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        (root / f"index.sqlite{suffix}").unlink(missing_ok=True)


def run(command: list[str]) -> tuple[float, str]:
    """Wall time of a whole command and its stdout (after flushing dirty pages)."""
    os.sync()
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
    return elapsed, done.stdout


def main() -> None:
    points = int(os.environ.get("LBR_BENCH_POINTS", "200"))
    size = int(os.environ.get("LBR_BENCH_MIB", "8")) * MIB
    rounds = int(os.environ.get("LBR_BENCH_ROUNDS", "3"))
    with tempfile.TemporaryDirectory(dir=os.environ.get("LBR_BENCH_DIR")) as work:
        root = Path(work) / "store"
        build_store(root, points, size)
        stored = sum(p.stat().st_size for p in (root / "data").rglob("*.qcow2"))
        print(f"{points} points, {size // MIB} MiB disk, {stored / MIB:.1f} MiB of files")
        base = [sys.executable, "-m", "lbrestore", "--store", str(root)]
        times: dict[str, list[float]] = {"check --repair": [], "verify": []}
        for round_index in range(rounds):
            order = ["check --repair", "verify"]
            if round_index % 2:
                order.reverse()
            for name in order:
                if name == "verify":
                    elapsed, _ = run([*base, "verify"])
                else:
                    drop_index(root)
                    elapsed, out = run([*base, "check", "--repair"])
                    if f"recovered {points} restore points" not in out:
                        raise SystemExit(f"the rebuild did not recover every point:\n{out}")
                times[name].append(elapsed)
        for name, samples in times.items():
            listed = " ".join(f"{t:.2f}" for t in samples)
            print(f"{name}: best {min(samples):.3f} s; rounds: {listed}")
        ratio = min(times["check --repair"]) / min(times["verify"])
        print(f"ratio (check --repair / verify): {ratio:.2f}  (whole commands, same store)")


if __name__ == "__main__":
    main()
