"""Shared by bench_restore.py and bench_verify.py: a store holding a deep chain of one disk.

The chain is written through the Store API (the ingest that backups use): a full restore point
with FULL_SHARE of the disk as data (random bytes), then DEPTH-1 incrementals that each rewrite
a random INCREMENT_SHARE of the clusters and zero a few. Guest content is generated from a seed,
so a run is reproducible.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
CLUSTER = 65536
FULL_SHARE = 0.6
INCREMENT_SHARE = 0.02
VM = "benchvm"
DISK = "vda"


def settings() -> tuple[int, int, int]:
    """(disk bytes, chain depth, rounds) from LBR_BENCH_MIB, LBR_BENCH_DEPTH, LBR_BENCH_ROUNDS."""
    size = int(os.environ.get("LBR_BENCH_MIB", "1024")) * MIB
    depth = int(os.environ.get("LBR_BENCH_DEPTH", "10"))
    rounds = int(os.environ.get("LBR_BENCH_ROUNDS", "3"))
    return size, depth, rounds


def build_chain(
    store_path: Path, size: int, depth: int, seed: int = 25, full_share: float = FULL_SHARE
) -> Path:
    """Create the store and its chain (`full_share` of the base's clusters hold random data);
    return the path of the chain's top file."""
    from lbstore.store import Store

    rng = random.Random(seed)
    clusters = size // CLUSTER
    Store.init(store_path)
    with Store.open(store_path, write=True) as store:
        for index in range(depth):
            with store.begin(VM) as ingest:
                disk = ingest.add_disk(DISK, size, cluster_size=CLUSTER)
                share = full_share if index == 0 else INCREMENT_SHARE
                chosen = sorted(rng.sample(range(clusters), max(1, int(clusters * share))))
                _write_clusters(disk, chosen, rng)
                if index:
                    for cluster in rng.sample(range(clusters), 4):
                        if cluster not in chosen:
                            disk.zero(cluster * CLUSTER, CLUSTER)
                point = ingest.commit()
        return store.file_path(point, DISK)


@contextlib.contextmanager
def chain_in_temp_store(
    size: int, depth: int, full_share: float = FULL_SHARE
) -> Iterator[tuple[Path, Path, Path]]:
    """A temporary work folder (under LBR_BENCH_DIR, if set) holding `store` with the chain.

    Yields (work folder, store path, the chain's top file); everything is removed afterwards.
    """
    with tempfile.TemporaryDirectory(dir=os.environ.get("LBR_BENCH_DIR")) as work_dir:
        work = Path(work_dir)
        store = work / "store"
        print(f"building a depth-{depth} chain of a {size // MIB} MiB disk ...", flush=True)
        top = build_chain(store, size, depth, full_share=full_share)
        yield work, store, top


def _write_clusters(disk: object, chosen: list[int], rng: random.Random) -> None:
    """Write the chosen clusters, neighbours together (up to 4 MiB per call)."""
    run: list[int] = []
    for cluster in [*chosen, -1]:
        if run and (cluster != run[-1] + 1 or len(run) == 64):
            data = rng.randbytes(len(run) * CLUSTER)
            disk.write(run[0] * CLUSTER, data)  # type: ignore[attr-defined]
            run = []
        if cluster >= 0:
            run.append(cluster)


def timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall time of a whole command and its peak RSS in KiB (after flushing dirty pages, so no
    run pays for another's writeback)."""
    sample = run_timed(command, env)
    return sample.elapsed, sample.rss_kib


@dataclass(frozen=True, slots=True)
class Sample:
    """One timed run of a command."""

    elapsed: float
    """Wall time of the command."""
    durable: float
    """Wall time until its writes are on disk: a `sync` follows the command, so a tool that
    leaves dirty pages behind (qemu-img's default cache mode never flushes) pays for them."""
    rss_kib: int
    """Peak RSS of the command's largest process."""
    cpu: float
    """User + system CPU seconds of the command and the processes it waited for: steadier
    than wall time on a shared, busy host (it does not grow while others hold the CPU)."""


def run_timed(command: list[str], env: dict[str, str] | None = None) -> Sample:
    """Run `command` after flushing dirty pages (no run pays for another's writeback)."""
    os.sync()
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    stderr = process.stderr.read().decode() if process.stderr else ""
    if process.stderr:
        process.stderr.close()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}): {stderr}")
    os.sync()
    durable = time.perf_counter() - start
    return Sample(elapsed, durable, usage.ru_maxrss, usage.ru_utime + usage.ru_stime)


def drop_from_page_cache(paths: list[Path]) -> None:
    """Evict these files (only these) from the page cache, for cold-cache runs."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
