"""Benchmark: restore (flatten) a depth-10 chain to a standalone qcow2, ours vs qemu-img.

Ours: `lbrestore restore VM@latest --to DIR` (the whole command: reading through the chain
view, checking every cluster's BLAKE3 against the index, writing a thin qcow2, fsync, rename,
the VM definition). Theirs: `qemu-img convert -O qcow2 TOP.qcow2 OUT` on the chain's top file
(as is: its default cache mode "unsafe" never flushes), and `-t writeback` (flushes on close,
like ours). Best of LBR_BENCH_ROUNDS rounds (default 3), alternating who goes first; both read
the chain from the page cache (warm: it was just written, and every round reads it again).

Each command is timed twice in the same run: the command alone, and the command followed by
`sync` ("until durable": dirty pages a command leaves behind are paid for there).

Prints `ratio (ours/theirs)` as throughput (their time / our time; target >= 1.2) for the
commands followed by `sync` (issue 10: restore vs `qemu-img convert -O qcow2` + sync), then the
commands alone, the like-for-like ratio against `-t writeback`, the ratio of
`restore --no-verify` (no checksum or stored-set checks: what they cost), and our peak RSS.

The base point is the whole disk of random data (a "1 GiB random base" at the default size);
each of the other points rewrites 2% of the clusters and zeroes a few.

Size: LBR_BENCH_MIB (default 1024), chain depth LBR_BENCH_DEPTH (default 10). Work folder:
LBR_BENCH_DIR, else the system temp folder. Not a test: it never fails on time.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _restore_chain import MIB, VM, chain_in_temp_store, run_timed, settings


def main() -> None:
    size, depth, rounds = settings()
    with chain_in_temp_store(size, depth, full_share=1.0) as (work, store, top):
        ours_cmd = [
            sys.executable,
            "-m",
            "lbrestore",
            "--store",
            str(store),
            "restore",
            f"{VM}@latest",
            "--to",
        ]
        names = ["ours", "ours --no-verify", "qemu-img", "qemu-img -t writeback"]
        times: dict[str, list[float]] = {name: [] for name in names}
        durable: dict[str, list[float]] = {name: [] for name in names}
        cpu: dict[str, list[float]] = {name: [] for name in names}
        rss = 0
        for round_index in range(rounds):
            order = list(times)
            if round_index % 2:
                order.reverse()
            for name in order:
                out = work / f"out-{name.replace(' ', '_')}"
                shutil.rmtree(out, ignore_errors=True)
                if name.startswith("ours"):
                    extra = ["--no-verify"] if "no-verify" in name else []
                    sample = run_timed([*ours_cmd, str(out), *extra])
                    rss = max(rss, sample.rss_kib)
                else:
                    out.mkdir()
                    cache = ["-t", "writeback"] if "writeback" in name else []
                    sample = run_timed(
                        [
                            "qemu-img",
                            "convert",
                            *cache,
                            "-O",
                            "qcow2",
                            str(top),
                            str(out / "vda.qcow2"),
                        ]
                    )
                times[name].append(sample.elapsed)
                durable[name].append(sample.durable)
                cpu[name].append(sample.cpu)
        _check_same(work)
        _report(times, durable, cpu, size, rss)


def _check_same(work: Path) -> None:
    """Our restored disk must equal qemu-img's (a benchmark of a wrong result means nothing)."""
    ours = work / "out-ours" / "vda.qcow2"
    theirs = work / "out-qemu-img" / "vda.qcow2"
    result = subprocess.run(
        ["qemu-img", "compare", str(ours), str(theirs)], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"restored disk differs from qemu-img's: {result.stdout}")
    for name, path in (("ours", ours), ("qemu-img", theirs)):
        print(
            f"{name}: file size {path.stat().st_size // MIB} MiB, "
            f"allocated {path.stat().st_blocks * 512 // MIB} MiB"
        )


def _report(
    times: dict[str, list[float]],
    durable: dict[str, list[float]],
    cpu: dict[str, list[float]],
    size: int,
    rss_kib: int,
) -> None:
    best = {name: min(values) for name, values in times.items()}
    synced = {name: min(values) for name, values in durable.items()}
    for name, seconds in best.items():
        rounds = " ".join(f"{t:.2f}" for t in times[name])
        print(
            f"{name}: best {seconds:.3f} s ({size / MIB / seconds:.0f} MiB/s of virtual disk), "
            f"until durable {synced[name]:.3f} s, CPU {min(cpu[name]):.2f} s; rounds: {rounds}"
        )
    print(
        f"ratio (ours/theirs): {synced['qemu-img'] / synced['ours']:.2f}  "
        "(restore vs `qemu-img convert -O qcow2 TOP OUT`, each followed by sync; "
        "target >= 1.2)"
    )
    print(
        f"ratio of the commands alone (no sync): {best['qemu-img'] / best['ours']:.2f}  "
        "(qemu-img's default cache mode leaves its writes dirty)"
    )
    print(
        f"ratio like-for-like (flush on close): "
        f"{best['qemu-img -t writeback'] / best['ours']:.2f}  (vs `-t writeback`)"
    )
    print(
        "ratio without checksum checks (--no-verify): "
        f"{best['qemu-img'] / best['ours --no-verify']:.2f}"
    )
    print(f"peak RSS (ours): {rss_kib // 1024} MiB")


if __name__ == "__main__":
    main()
