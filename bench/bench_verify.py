"""Benchmark: checksum verification throughput, ours vs reading the files with `cat`.

Ours: `lbrestore verify VM` (the whole command: every stored cluster of every file of a
depth-10 chain re-read in host-offset order and checked against its BLAKE3 digest, plus the
structural checks). Theirs: `cat FILES > /dev/null` over the same files, the floor for any tool
that reads them. Best of LBR_BENCH_ROUNDS rounds (default 3), alternating who goes first, with
the files in the page cache (warm) and, separately, evicted first with POSIX_FADV_DONTNEED on
just these files (cold).

Prints `ratio (ours/theirs)` as throughput (cat's time / our time) for the cold case (issue
10's: caches dropped, target >= 0.9) and the warm one, and our peak RSS.

Size: LBR_BENCH_MIB (default 1024), chain depth LBR_BENCH_DEPTH (default 10). Work folder:
LBR_BENCH_DIR, else the system temp folder. Not a test: it never fails on time.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _restore_chain import (
    MIB,
    VM,
    chain_in_temp_store,
    drop_from_page_cache,
    run_timed,
    settings,
    timed,
)


def main() -> None:
    size, depth, rounds = settings()
    with chain_in_temp_store(size, depth) as (_work, store, _top):
        files = sorted((store / "data").glob("*/*/*.qcow2"))
        total = sum(f.stat().st_size for f in files)
        print(f"{len(files)} files, {total // MIB} MiB")
        ours = [sys.executable, "-m", "lbrestore", "--store", str(store), "verify", VM]
        theirs = ["sh", "-c", 'cat "$@" > /dev/null', "cat", *map(str, files)]
        rss = 0
        for cache in ("cold", "warm"):
            best: dict[str, float] = {}
            rounds_of: dict[str, list[float]] = {"ours": [], "cat": []}
            cpu: dict[str, float] = {}
            for round_index in range(rounds):
                order = [("ours", ours), ("cat", theirs)]
                if round_index % 2:
                    order.reverse()
                for name, command in order:
                    if cache == "cold":
                        drop_from_page_cache(files)
                    else:
                        timed(theirs)  # warm the cache
                    sample = run_timed(command)
                    elapsed = sample.elapsed
                    cpu[name] = min(cpu.get(name, sample.cpu), sample.cpu)
                    if name == "ours":
                        rss = max(rss, sample.rss_kib)
                    best[name] = min(best.get(name, elapsed), elapsed)
                    rounds_of[name].append(elapsed)
            for name, seconds in best.items():
                listed = " ".join(f"{t:.2f}" for t in rounds_of[name])
                print(
                    f"{cache} {name}: best {seconds:.3f} s ({total / MIB / seconds:.0f} MiB/s), "
                    f"CPU {cpu[name]:.2f} s; rounds: {listed}"
                )
            both = "in the page cache" if cache == "warm" else "evicted first, target >= 0.9"
            print(f"ratio (ours/theirs) {cache}: {best['cat'] / best['ours']:.2f}  (both {both})")
        print(f"peak RSS (ours): {rss // 1024} MiB")


if __name__ == "__main__":
    main()
