"""Benchmark: live backup of a running VM, every command timed as a user runs it.

Every time below is a whole process, from its start to its exit (imports, store open, QMP
set-up, the work, the commit), as `qemu-img` is timed; nothing divides a command's own
reported duration.

1. Full backup of a disk of LBR_BENCH_MIB MiB (default 2048) holding half of that in random
   data: `lbrestore backup` versus `qemu-img convert -O qcow2` of the same kind of
   point-in-time NBD export followed by `sync` of its output (lbrestore's point is durable
   when the command ends). The export is set up before qemu-img's clock starts.
2. An incremental after rewriting 1% of the clusters: its whole-command time as a share of
   the full backup's.
3. `lbrestore list` on a store of LBR_BENCH_LIST_POINTS restore points (default 100), warm
   cache, next to two reference start-ups: `python -c pass` (this interpreter) and
   `qemu-img --version`.

Python commands run as from an installed package: with compiled bytecode (an environment that
sets PYTHONDONTWRITEBYTECODE would otherwise compile every module of lbrestore from source at
every start); the bytecode goes to a cache in the work folder (PYTHONPYCACHEPREFIX).

Each backup side runs LBR_BENCH_ROUNDS times (default 3), interleaved, and the best counts;
`list` and the references run LBR_BENCH_LIST_RUNS times (default 15), the median counts.
Prints `ratio` lines and the receiver's peak RSS. Not a test: never fails on time.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from qemu_vm import Disk, MiB, TestVM  # noqa: E402

from lbqemu.discovery import list_disks  # noqa: E402
from lbqemu.fleece import PointInTimeView  # noqa: E402
from lbqemu.qmp import QmpSession  # noqa: E402
from lbstore.store import Store  # noqa: E402

CLUSTER = 64 * 1024


def lbrestore_command() -> list[str]:
    """The console script a user runs (`lbrestore`), else `python -m lbrestore`."""
    script = Path(sys.executable).parent / "lbrestore"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lbrestore"]


def make_disk(folder: Path, size: int) -> Path:
    """A qcow2 of `size` bytes whose first half is random data."""
    raw = folder / "random.raw"
    with open(raw, "wb") as out:
        left = size // 2
        while left:
            piece = min(left, 16 * MiB)
            out.write(os.urandom(piece))
            left -= piece
    disk = folder / "vda.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)],
                   check=True)  # fmt: skip
    subprocess.run(["qemu-img", "resize", "-q", str(disk), str(size)], check=True)
    raw.unlink()
    return disk


CHILD_ENV = dict(os.environ)
"""The environment of timed commands (see the module's docstring: compiled bytecode)."""


def run_timed(args: list[str]) -> tuple[float, int, str]:
    """(wall seconds from start to exit, peak RSS in KiB, stdout) of one child process, reaped
    with wait4 so that the RSS is its own."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen(args, stdout=out, stderr=err, env=CHILD_ENV)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"bench: {' '.join(args[:4])} failed: {err.read().decode().strip()}")
        return elapsed, usage.ru_maxrss, out.read().decode()


def lbrestore_backup(store: Path, vm: TestVM, *extra: str) -> tuple[float, dict[str, Any], int]:
    """(wall seconds, --json summary, peak RSS KiB) of one `lbrestore backup` command."""
    args = [*lbrestore_command(), "--store", str(store), "backup", vm.name,
            "--qmp", vm.qmp_address, "--json", *extra]  # fmt: skip
    elapsed, rss, out = run_timed(args)
    return elapsed, json.loads(out), rss


async def qemu_img_from_view(vm: TestVM, dest: Path) -> tuple[float, int]:
    """`qemu-img convert` of a fleecing view of vda (the export lbrestore reads), then `sync`
    of its output: (wall seconds of both, peak RSS KiB). The view is made before the clock
    starts."""
    async with QmpSession(vm.qmp_address) as session:
        disks = [d for d in await list_disks(session) if d.name == "vda"]
        async with PointInTimeView(session, [(disks[0], None)], token="bench") as view:
            uri = f"nbd+unix:///vda?socket={view.endpoint.path}"
            convert = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, str(dest)]
            started = time.monotonic()
            _, rss, _ = await asyncio.to_thread(run_timed, convert)
            await asyncio.to_thread(run_timed, ["sync", str(dest)])
            elapsed = time.monotonic() - started
    dest.unlink()
    return elapsed, rss


def dirty_one_percent(vm: TestVM, size: int, seed: int) -> int:
    clusters = size // CLUSTER
    chosen = random.Random(seed).sample(range(clusters), max(clusters // 100, 1))
    for i, cluster in enumerate(chosen):
        vm.qemu_io("vda", f"write -P {i % 250 + 1} {cluster * CLUSTER} {CLUSTER}")
    return len(chosen) * CLUSTER


def measure_backups(vm: TestVM, store: Path, folder: Path, size: int, rounds: int) -> None:
    """Best of `rounds` for each side, interleaved (the machine may be shared and noisy)."""
    theirs, ours, incs = [], [], []
    our_rss = their_rss = 0
    for n in range(rounds):
        elapsed, rss = asyncio.run(qemu_img_from_view(vm, folder / "theirs.qcow2"))
        theirs.append(elapsed)
        their_rss = max(their_rss, rss)
        elapsed, full, rss = lbrestore_backup(store, vm, *(["--full"] if n else []))
        assert full["kind"] == "full", full
        ours.append(elapsed)
        our_rss = max(our_rss, rss)
    dirty = 0
    for n in range(rounds):
        dirty = dirty_one_percent(vm, size, seed=n)
        elapsed, incremental, _ = lbrestore_backup(store, vm)
        assert incremental["kind"] == "incremental", incremental
        incs.append(elapsed)
    mib = size / 2 / MiB
    best, qemu, inc = min(ours), min(theirs), min(incs)
    print(f"full (best of {rounds}, whole commands): lbrestore backup {best:.2f} s "
          f"({mib / best:.0f} MiB/s), qemu-img convert + sync {qemu:.2f} s "
          f"({mib / qemu:.0f} MiB/s)")  # fmt: skip
    print(f"ratio (ours/theirs) full backup throughput: {qemu / best:.2f}  (target >= 0.9)")
    print(f"peak RSS: lbrestore backup {our_rss / 1024:.0f} MiB (target < 200 MiB), "
          f"qemu-img convert {their_rss / 1024:.0f} MiB")  # fmt: skip
    print(f"incremental (best of {rounds}, whole command): {dirty // 1024} KiB dirty "
          f"(1% of clusters), {inc:.3f} s, kind=incremental")  # fmt: skip
    print(f"ratio (incremental/full) time: {inc / best:.3f}  (target <= 0.05)")


def build_list_store(path: Path, points: int, definition: dict[str, Any] | None) -> None:
    """A store of `points` restore points of one small disk (each rewrites one cluster), each
    carrying a VM definition as a backup does."""
    Store.init(path)
    rng = random.Random(7)
    with Store.open(path, write=True) as store:
        for _ in range(points):
            with store.begin("vm1") as ingest:
                disk = ingest.add_disk("vda", 4 * MiB)
                disk.write(rng.randrange(64) * CLUSTER, rng.randbytes(CLUSTER))
                ingest.definition = definition
                ingest.commit()


def median_wall(args: list[str], runs: int) -> float:
    """Median wall seconds of `runs` runs of a command, after one warm-up run."""
    run_timed(args)
    return statistics.median(run_timed(args)[0] for _ in range(runs))


def measure_list(folder: Path, points: int, runs: int, definition: dict[str, Any] | None) -> None:
    store = folder / "list-store"
    build_list_store(store, points, definition)
    listing = [*lbrestore_command(), "--store", str(store), "list"]
    shown = run_timed(listing)[2]
    assert shown.count("vm1") >= points, shown
    ours = median_wall(listing, runs)
    python = median_wall([sys.executable, "-c", "pass"], runs)
    qemu_img = median_wall(["qemu-img", "--version"], runs)
    print(f"lbrestore list ({points} points, warm cache, median of {runs}): {ours * 1000:.0f} ms "
          f"(target <= 150 ms); python -c pass {python * 1000:.0f} ms, "
          f"qemu-img --version {qemu_img * 1000:.0f} ms")  # fmt: skip
    print(f"ratio (list/python start-up) time: {ours / python:.2f}; "
          f"(list/qemu-img --version): {ours / qemu_img:.2f}")  # fmt: skip


def main() -> None:
    size = int(os.environ.get("LBR_BENCH_MIB", "2048")) * MiB
    rounds = int(os.environ.get("LBR_BENCH_ROUNDS", "3"))
    list_points = int(os.environ.get("LBR_BENCH_LIST_POINTS", "100"))
    list_runs = int(os.environ.get("LBR_BENCH_LIST_RUNS", "15"))
    work = os.environ.get("LBR_BENCH_DIR")
    with tempfile.TemporaryDirectory(prefix="lbr-bench-", dir=work) as tmp:
        folder = Path(tmp)
        CHILD_ENV.pop("PYTHONDONTWRITEBYTECODE", None)
        CHILD_ENV["PYTHONPYCACHEPREFIX"] = str(folder / "pycache")
        vm = TestVM(workdir=folder, name="bench")
        vm.disks["vda"] = Disk("vda", make_disk(folder, size), size)
        store = folder / "store"
        subprocess.run([*lbrestore_command(), "--store", str(store), "init"],
                       check=True, capture_output=True)  # fmt: skip
        vm.start()
        try:
            print(f"disk: {size // MiB} MiB, {size // 2 // MiB} MiB random data, accel={vm.accel}")
            measure_backups(vm, store, folder, size, rounds)
        finally:
            vm.quit()
        with Store.open(store) as opened:
            definition = opened.restore_points("bench")[-1].definition
        measure_list(folder, list_points, list_runs, definition)


if __name__ == "__main__":
    main()
