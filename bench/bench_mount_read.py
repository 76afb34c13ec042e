#!/usr/bin/env python3
"""Benchmark: sequential read of <disk>.raw through `lbrestore mount` of a depth-25 chain,
vs qemu-img reading the same chain.

Builds a store with one VM and 25 restore points of a LBR_BENCH_MIB MiB disk (default 1024):
a full point of random data, then 24 incremental points that each rewrite ~4% of the disk in
256 KiB extents at random places (seeded), so the top view draws from every layer. Then times,
warm host page cache, best of LBR_BENCH_REPEAT (default 5) runs of each, alternating:

    ours:   `lbrestore mount vm@latest` (default: streamed, direct_io), read MOUNT/vda.raw
            front to back in 1 MiB reads
    cached: the same through a second mount with `--kernel-cache` (page cache, readahead
            raised as root), for comparison (its cached pages are dropped before each run,
            untimed, so every byte is served by the mount)
    theirs: qemu-img convert -n TOP.qcow2 --target-image-opts driver=null-co
            (QEMU's /dev/null: `-O raw TOP /dev/null` is refused, "Cannot grow device files")

and prints the throughputs, `ratio (ours/theirs)` (target >= 0.5), the cached mode's ratio and
the serving process's peak RSS.

Checked vs unchecked (issue 8): a mount checks every cluster it serves against the index (its
digest, once per cluster and mount). Each round mounts afresh with and without `--no-verify`
(untimed) and times a whole `dd if=MOUNT/vda.raw of=/dev/null bs=1M` on each, so every cluster
is hashed in the timed read; prints `ratio (checked/unchecked)` (target >= 0.8). The long-lived
mounts above re-read clusters they already checked.

Not a test: it never fails on time. LBR_BENCH_DIR: where the store goes (else /tmp).
"""

from __future__ import annotations

import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lbstore.store import Store

MiB = 1 << 20
DEPTH = 25
EXTENT = 256 * 1024
READ_SIZE = MiB
CHUNK = 8 * MiB


def build_chain(root: Path, size: int) -> Path:
    """A store whose VM `bench` has DEPTH points of disk `vda`; returns the top file's path."""
    Store.init(root)
    rng = random.Random(25)
    with Store.open(root, write=True) as store:
        with store.begin("bench") as ingest:
            disk = ingest.add_disk("vda", size, mode="full")
            for offset in range(0, size, CHUNK):
                disk.write(offset, os.urandom(min(CHUNK, size - offset)))
            ingest.commit()
        extents = max(1, size // 25 // EXTENT)
        for _ in range(DEPTH - 1):
            with store.begin("bench") as ingest:
                disk = ingest.add_disk("vda", size, mode="incremental")
                starts = {rng.randrange(size // EXTENT) * EXTENT for _ in range(extents)}
                for start in sorted(starts):
                    disk.write(start, os.urandom(min(EXTENT, size - start)))
                ingest.commit()
        top = store.resolve("bench@latest")
        assert len(store.chain(top, "vda")) == DEPTH
        return store.file_path(top, "vda")


def lbrestore(store: Path, *args: str) -> str:
    """Run the CLI; its stdout."""
    command = [sys.executable, "-m", "lbrestore", "--store", str(store), *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def drop_cached_pages(path: Path) -> None:
    """Make the kernel forget the file's cached pages, so the next read is served again."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_mounted(path: Path) -> int:
    """Read the file front to back in READ_SIZE reads."""
    buf = bytearray(READ_SIZE)
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while got := os.readv(fd, [buf]):
            total += got
    finally:
        os.close(fd)
    return total


def read_theirs(top: Path, size: int) -> None:
    """qemu-img reads the whole chain into QEMU's null-co driver."""
    target = f"driver=null-co,size={size}"
    subprocess.run(
        ["qemu-img", "convert", "-n", "-f", "qcow2", str(top), "--target-image-opts", target],
        check=True,
    )


def timed(
    func: Callable[[], object], before: Callable[[], object] = lambda: None, server: int = 0
) -> tuple[float, float]:
    """Wall and CPU seconds `func` takes (after an untimed `before`).

    CPU: this process, its finished children (qemu-img) and the serving process `server`:
    steadier than wall time on a shared host.
    """
    before()
    cpu_before = _cpu_seconds(server)
    start = time.perf_counter()
    func()
    wall = time.perf_counter() - start
    return wall, _cpu_seconds(server) - cpu_before


def _cpu_seconds(server: int) -> float:
    """User + system seconds of this process, its waited-for children and `server` (if any)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    if server:
        fields = Path(f"/proc/{server}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def best(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """The fastest wall time and the smallest CPU time of several runs."""
    return min(wall for wall, _ in runs), min(cpu for _, cpu in runs)


def fresh_read(store: Path, mountpoint: Path, *options: str) -> tuple[float, float]:
    """Mount afresh (untimed), time a whole `dd` of vda.raw through it, unmount."""
    lbrestore(store, "mount", *options, "bench@latest", str(mountpoint))
    try:
        pid = serving_pid(mountpoint)
        command = ["dd", f"if={mountpoint / 'vda.raw'}", "of=/dev/null", "bs=1M"]
        return timed(lambda: subprocess.run(command, check=True, capture_output=True), server=pid)
    finally:
        lbrestore(store, "umount", str(mountpoint))


def peak_rss_kib(pid: int) -> int:
    """VmHWM of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def serving_pid(mountpoint: Path) -> int:
    from lbfuse.mountpoints import mounts

    entry = next(e for e in mounts() if e.mountpoint == mountpoint)
    assert entry.pid is not None
    return entry.pid


def main() -> int:
    mib = int(os.environ.get("LBR_BENCH_MIB", "1024"))
    repeat = int(os.environ.get("LBR_BENCH_REPEAT", "5"))
    size = mib * MiB
    with tempfile.TemporaryDirectory(dir=os.environ.get("LBR_BENCH_DIR")) as tmp:
        store = Path(tmp) / "store"
        top = build_chain(store, size)
        read_theirs(top, size)  # warm the host page cache for both sides
        mountpoint, cached_mount = Path(tmp) / "mnt", Path(tmp) / "mnt-cached"
        mountpoint.mkdir()
        cached_mount.mkdir()
        lbrestore(store, "mount", "bench@latest", str(mountpoint))
        try:
            lbrestore(store, "mount", "bench@latest", str(cached_mount), "--kernel-cache")
            disk, cached_disk = mountpoint / "vda.raw", cached_mount / "vda.raw"
            assert read_mounted(disk) == size and read_mounted(cached_disk) == size
            pid, cached_pid = serving_pid(mountpoint), serving_pid(cached_mount)
            runs: dict[str, list[tuple[float, float]]] = {"ours": [], "cached": [], "theirs": []}
            for _ in range(repeat):  # alternate, so the machine's load hits all alike
                drop = lambda: drop_cached_pages(cached_disk)  # noqa: E731
                runs["ours"].append(timed(lambda: read_mounted(disk), server=pid))
                runs["cached"].append(timed(lambda: read_mounted(cached_disk), drop, cached_pid))
                runs["theirs"].append(timed(lambda: read_theirs(top, size)))
            rss = peak_rss_kib(pid)
            fresh = Path(tmp) / "mnt-fresh"
            fresh.mkdir()
            for _ in range(repeat):
                runs.setdefault("checked", []).append(fresh_read(store, fresh))
                runs.setdefault("unchecked", []).append(fresh_read(store, fresh, "--no-verify"))
        finally:
            for mounted in (mountpoint, cached_mount, Path(tmp) / "mnt-fresh"):
                if os.path.ismount(mounted):
                    lbrestore(store, "umount", str(mounted))
    (checked, checked_cpu), (unchecked, unchecked_cpu) = (
        best(runs.pop("checked")),
        best(runs.pop("unchecked")),
    )
    (ours, ours_cpu), (cached, cached_cpu), (theirs, theirs_cpu) = map(best, runs.values())
    print(f"chain depth {DEPTH}, {mib} MiB disk, best of {repeat}")
    for label, wall, cpu in (
        ("ours   (read through lbrestore mount)", ours, ours_cpu),
        ("cached (same, --kernel-cache)        ", cached, cached_cpu),
        ("theirs (qemu-img convert to null-co) ", theirs, theirs_cpu),
    ):
        print(f"{label}: {mib / wall:8.1f} MiB/s  ({wall:.3f} s, {cpu:.3f} CPU s)")
    for label, wall, cpu in (
        ("checked   (fresh mount, dd, every cluster hashed)", checked, checked_cpu),
        ("unchecked (fresh mount, dd, --no-verify)         ", unchecked, unchecked_cpu),
    ):
        print(f"{label}: {mib / wall:8.1f} MiB/s  ({wall:.3f} s, {cpu:.3f} CPU s)")
    print(f"ratio (ours/theirs): {theirs / ours:.2f}  (target >= 0.5)")
    print(f"ratio (checked/unchecked): {unchecked / checked:.2f}  (target >= 0.8)")
    print(f"ratio (cached/theirs): {theirs / cached:.2f}")
    ours_cpu, cached_cpu = max(ours_cpu, 0.01), max(cached_cpu, 0.01)  # clock ticks: 10 ms
    cpu_ratios = f"{theirs_cpu / ours_cpu:.2f}  (cached: {theirs_cpu / cached_cpu:.2f})"
    print(f"CPU ratio (theirs/ours): {cpu_ratios}")
    print(f"peak RSS of the serving process: {rss / 1024:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
