"""Benchmark: live backup of a running VM against QEMU's own tool reading the same NBD export.

1. Full backup of a disk of LBR_BENCH_MIB MiB (default 2048) holding half of that in random
   data, by `lbrestore backup` (a separate process, so its peak RSS is its own), versus
   `qemu-img convert -O qcow2` reading the same kind of point-in-time NBD export into a qcow2.
2. An incremental after rewriting 1% of the clusters, versus that full backup.

Each side runs LBR_BENCH_ROUNDS times (default 3), interleaved, and the best time counts.
Prints `ratio (ours/theirs)` lines and the receiver's peak RSS. Not a test: never fails on time.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from qemu_vm import Disk, MiB, TestVM  # noqa: E402

from lbqemu.discovery import list_disks  # noqa: E402
from lbqemu.fleece import PointInTimeView  # noqa: E402
from lbqemu.qmp import QmpSession  # noqa: E402

CLUSTER = 64 * 1024


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


def child_peak_rss(args: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in KiB, stdout) of a child, reaped with wait4 for its own RSS."""
    started = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(args[:4])} failed: {err.decode().strip()}")
    return elapsed, usage.ru_maxrss, out.decode()


def lbrestore_backup(store: Path, vm: TestVM, *extra: str) -> tuple[dict[str, object], int]:
    args = [sys.executable, "-m", "lbrestore", "--store", str(store), "backup", vm.name,
            "--qmp", vm.qmp_address, "--json", *extra]  # fmt: skip
    _, rss, out = child_peak_rss(args)
    return json.loads(out), rss


async def qemu_img_from_view(vm: TestVM, dest: Path, cache: str) -> tuple[float, int]:
    """`qemu-img convert -t CACHE` of a fleecing view of vda (the export lbrestore reads)."""
    async with QmpSession(vm.qmp_address) as session:
        disks = [d for d in await list_disks(session) if d.name == "vda"]
        async with PointInTimeView(session, [(disks[0], None)], token="bench") as view:
            socket_path = view.endpoint.path
            uri = f"nbd+unix:///vda?socket={socket_path}"
            args = ["qemu-img", "convert", "-t", cache, "-f", "raw", "-O", "qcow2", uri, str(dest)]
            elapsed, rss, _ = await asyncio.to_thread(child_peak_rss, args)
    dest.unlink()
    return elapsed, rss


def dirty_one_percent(vm: TestVM, size: int, seed: int) -> int:
    clusters = size // CLUSTER
    chosen = random.Random(seed).sample(range(clusters), max(clusters // 100, 1))
    for i, cluster in enumerate(chosen):
        vm.qemu_io("vda", f"write -P {i % 250 + 1} {cluster * CLUSTER} {CLUSTER}")
    return len(chosen) * CLUSTER


def measure(vm: TestVM, store: Path, folder: Path, size: int, rounds: int) -> None:
    """Best of `rounds` for each side, interleaved (the machine may be shared and noisy).

    lbrestore's restore point is durable when the backup ends (fsync before commit), so
    qemu-img is timed with `-t writeback` (its output flushed at the end) as the fair match;
    its convert default (`unsafe`, never flushed) is shown too."""
    durable, unsafe, ours, incs = [], [], [], []
    our_rss = their_rss = 0
    for n in range(rounds):
        elapsed, rss = asyncio.run(qemu_img_from_view(vm, folder / "theirs.qcow2", "writeback"))
        durable.append(elapsed)
        their_rss = max(their_rss, rss)
        unsafe.append(asyncio.run(qemu_img_from_view(vm, folder / "theirs.qcow2", "unsafe"))[0])
        full, rss = lbrestore_backup(store, vm, *(["--full"] if n else []))
        ours.append(float(full["duration"]))  # type: ignore[arg-type]
        our_rss = max(our_rss, rss)
    dirty = 0
    for n in range(rounds):
        dirty = dirty_one_percent(vm, size, seed=n)
        incremental, _ = lbrestore_backup(store, vm)
        assert incremental["kind"] == "incremental", incremental
        incs.append(float(incremental["duration"]))  # type: ignore[arg-type]
    mib = size / 2 / MiB
    best, theirs, loose, inc = min(ours), min(durable), min(unsafe), min(incs)
    print(f"full (best of {rounds}): lbrestore {best:.2f} s ({mib / best:.0f} MiB/s), "
          f"qemu-img convert -t writeback {theirs:.2f} s ({mib / theirs:.0f} MiB/s), "
          f"-t unsafe {loose:.2f} s ({mib / loose:.0f} MiB/s)")  # fmt: skip
    print(f"ratio (ours/theirs) full backup throughput: {theirs / best:.2f}  (target >= 0.9; "
          f"vs qemu-img's unflushed default: {loose / best:.2f})")  # fmt: skip
    print(f"peak RSS: lbrestore backup {our_rss / 1024:.0f} MiB (target < 200 MiB), "
          f"qemu-img convert {their_rss / 1024:.0f} MiB")  # fmt: skip
    print(f"incremental (best of {rounds}): {dirty // 1024} KiB dirty (1% of clusters), "
          f"{inc:.2f} s, kind=incremental")  # fmt: skip
    print(f"ratio (incremental/full) time: {inc / best:.3f}  (target <= 0.05)")


def main() -> None:
    size = int(os.environ.get("LBR_BENCH_MIB", "2048")) * MiB
    rounds = int(os.environ.get("LBR_BENCH_ROUNDS", "3"))
    with tempfile.TemporaryDirectory(prefix="lbr-bench-") as tmp:
        folder = Path(tmp)
        vm = TestVM(workdir=folder, name="bench")
        vm.disks["vda"] = Disk("vda", make_disk(folder, size), size)
        store = folder / "store"
        subprocess.run([sys.executable, "-m", "lbrestore", "--store", str(store), "init"],
                       check=True, capture_output=True)  # fmt: skip
        vm.start()
        try:
            print(f"disk: {size // MiB} MiB, {size // 2 // MiB} MiB random data, accel={vm.accel}")
            measure(vm, store, folder, size, rounds)
        finally:
            vm.quit()


if __name__ == "__main__":
    main()
