"""Benchmark: merge a 1%-dirty incremental into a 4 GiB full, ours vs `qemu-img commit`.

The store holds two points of one disk: a full (LBR_BENCH_FULL_SHARE of its clusters hold
random data, the rest are holes: quick to build) and an incremental on it with 1% of the
clusters rewritten (LBR_BENCH_DIRTY_SHARE). Each round starts from fresh copies (untimed):

- ours: `lbrestore merge VM@#FULL` (the whole command): the full is removed and its successor
  becomes the new full, which costs what the incremental's clusters cost;
- theirs: `qemu-img commit -d INC.qcow2` on copies of the same two files: the overlay's clusters
  written into (a copy of) the same base, the overlay left as it is;
- copying the full: `cp FULL.qcow2 COPY` (what rewriting the full into a new file would cost at
  the very least).

Every command is timed as a whole, after `sync`, and again until its writes are durable (a
`sync` after it). Prints `ratio (ours/theirs)` as their time / our time (target >= 1.0), and
the merge's time as a share of copying the full (target <= 5%). Best of LBR_BENCH_ROUNDS
(default 2). Size: LBR_BENCH_MIB (default 4096). Work folder: LBR_BENCH_DIR, else the system
temp folder. Not a test: it never fails on time.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _restore_chain import CLUSTER, DISK, MIB, VM, Sample, run_timed

FULL_SHARE = float(os.environ.get("LBR_BENCH_FULL_SHARE", "0.5"))
DIRTY_SHARE = float(os.environ.get("LBR_BENCH_DIRTY_SHARE", "0.01"))


def build(store_path: Path, size: int, seed: int = 9) -> tuple[int, Path, Path]:
    """The store with a full and a 1%-dirty incremental; (full's id, full file, inc file)."""
    from lbstore.store import Store

    rng = random.Random(seed)
    clusters = size // CLUSTER
    Store.init(store_path)
    files = []
    with Store.open(store_path, write=True, vm=VM) as store:
        for share in (FULL_SHARE, DIRTY_SHARE):
            with store.begin(VM) as ingest:
                disk = ingest.add_disk(DISK, size, cluster_size=CLUSTER)
                chosen = sorted(rng.sample(range(clusters), max(1, int(clusters * share))))
                run: list[int] = []
                for cluster in [*chosen, -1]:
                    if run and (cluster != run[-1] + 1 or len(run) == 64):
                        disk.write(run[0] * CLUSTER, rng.randbytes(len(run) * CLUSTER))
                        run = []
                    if cluster >= 0:
                        run.append(cluster)
                point = ingest.commit()
            files.append((point.id, store.file_path(point, DISK)))
    return files[0][0], files[0][1], files[1][1]


def best(samples: list[Sample], durable: bool) -> float:
    return min(s.durable if durable else s.elapsed for s in samples)


def main() -> None:
    size = int(os.environ.get("LBR_BENCH_MIB", "4096")) * MIB
    rounds = int(os.environ.get("LBR_BENCH_ROUNDS", "2"))
    with tempfile.TemporaryDirectory(dir=os.environ.get("LBR_BENCH_DIR")) as work_dir:
        work = Path(work_dir)
        source = work / "store"
        print(f"building a {size // MIB} MiB full and a 1%-dirty incremental ...", flush=True)
        full_id, full, inc = build(source, size)
        samples: dict[str, list[Sample]] = {"ours": [], "qemu-img commit": [], "copy": []}
        for _ in range(rounds):
            samples["copy"].append(run_timed(["cp", str(full), str(work / "copy.qcow2")]))
            theirs = work / "theirs"
            theirs.mkdir()
            shutil.move(work / "copy.qcow2", theirs / full.name)
            shutil.copy(inc, theirs / inc.name)
            samples["qemu-img commit"].append(
                run_timed(["qemu-img", "commit", "-q", "-d", str(theirs / inc.name)])
            )
            ours = work / "ours"
            subprocess.run(["cp", "-a", str(source), str(ours)], check=True)
            command = [sys.executable, "-m", "lbrestore", "--store", str(ours), "merge"]
            samples["ours"].append(run_timed([*command, f"{VM}@#{full_id}"]))
            _check_same(ours / "data" / VM / DISK / inc.name, theirs / full.name)
            shutil.rmtree(theirs)
            shutil.rmtree(ours)
        report(samples)


def _check_same(ours: Path, theirs: Path) -> None:
    """Both results must read the same (a benchmark of a wrong answer measures nothing)."""
    done = subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", str(ours), str(theirs)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"merge and qemu-img commit disagree: {done.stdout}{done.stderr}")


def report(samples: dict[str, list[Sample]]) -> None:
    for name, runs in samples.items():
        print(
            f"{name:16s} best {best(runs, False):7.3f} s, until durable "
            f"{best(runs, True):7.3f} s, CPU {min(s.cpu for s in runs):6.3f} s"
        )
    for label, durable in (("", False), (" until durable", True)):
        ours, theirs = best(samples["ours"], durable), best(samples["qemu-img commit"], durable)
        copy = best(samples["copy"], durable)
        print(f"ratio (ours/theirs){label}: {theirs / ours:.2f} (target >= 1.0)")
        print(
            f"merge time as share of copying the full{label}: {100 * ours / copy:.1f}% "
            "(target <= 5%)"
        )


if __name__ == "__main__":
    main()
