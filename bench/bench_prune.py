"""Benchmark: prune a 200-point chain down to 10, vs the same consolidation with `qemu-img rebase`.

A store gets LBR_BENCH_POINTS (default 200) restore points of one small disk (LBR_BENCH_MIB,
default 16), made as `lbrestore import --at` makes them: one every 2 hours, each changing a few
random ranges (some written, some zeroed) of the previous image. Then `lbrestore prune vm1
--keep-daily 10` removes all but the newest point of each of the last 10 days, as a series of
merges.

Side by side, on a copy of the same chain files, QEMU's own tools do the same consolidation: for
each removed point, newest first, `qemu-img rebase -b BACKING SUCCESSOR` (safe mode: copies into
the successor what the removed point provided; `-b ""` for the oldest full), then the file is
deleted. That is what an operator would do by hand without lbrestore.

Prints the total wall time and the bytes each side wrote (the process's block writes, from
wait4's ru_oublock), the bytes the 10 kept points hold afterwards (their allocated files), and
the ratios: bytes written / bytes kept, and time theirs/ours. Every kept point is compared with
`qemu-img compare` against the image it was imported from (untimed). Not a test: it never fails
on time. Work folder: LBR_BENCH_DIR, else the system temp folder.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

MIB = 1 << 20
KEEP_DAYS = 10


@dataclass
class Sample:
    """Wall seconds and bytes written by one or more child processes."""

    wall: float = 0.0
    written: int = 0

    def add(self, other: Sample) -> None:
        self.wall += other.wall
        self.written += other.written


def timed(command: list[str], env: dict[str, str] | None = None) -> Sample:
    """Run one child; its wall time and the bytes it wrote to block devices."""
    began = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - began
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}")
    return Sample(elapsed, usage.ru_oublock * 512)


def lbrestore(store: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "lbrestore", "--store", str(store), *args]


def evolve(image: Path, rng: random.Random, size: int) -> None:
    """Change a few random ranges of the raw image: mostly writes, some zeroed ranges."""
    with image.open("r+b") as raw:
        for _ in range(rng.randrange(1, 6)):
            length = rng.choice((64 << 10, 256 << 10, 1 << 20))
            offset = rng.randrange(0, size - length) & ~0xFFFF
            raw.seek(offset)
            raw.write(bytes(length) if rng.random() < 0.2 else rng.randbytes(length))


def build_chain(work: Path, points: int, size: int) -> tuple[Path, dict[int, Path]]:
    """The store with `points` imports (every 2 hours), and a copy of each imported image.

    The imports run in this process through lbstore.importer, the code behind
    `lbrestore import --at` (a child process per point would only add Python's start-up).
    """
    from lbstore.importer import import_images
    from lbstore.store import Store

    store = work / "store"
    Store.init(store)
    rng = random.Random(200)
    image = work / "disk.raw"
    image.write_bytes(rng.randbytes(size))
    images = work / "images"
    images.mkdir()
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2 * points)
    copies: dict[int, Path] = {}
    with Store.open(store, write=True) as opened:
        for n in range(points):
            if n:
                evolve(image, rng, size)
            point = import_images(
                opened, "vm1", {"vda": image}, created=start + timedelta(hours=2 * n)
            )
            copies[point.id] = images / f"{point.id}.raw"
            shutil.copyfile(image, copies[point.id])
            if (n + 1) % 50 == 0:
                print(f"  {n + 1} points imported", file=sys.stderr)
    return store, copies


def plan(store: Path) -> list[dict[str, object]]:
    args = ("prune", "vm1", "--keep-daily", str(KEEP_DAYS), "--dry-run", "--json")
    done = subprocess.run(lbrestore(store, *args), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"prune --dry-run failed: {done.stderr}")
    decisions: list[dict[str, object]] = json.loads(done.stdout)["vms"][0]["points"]
    return decisions


def run_theirs(copy: Path, decisions: list[dict[str, object]]) -> Sample:
    """The same removals with qemu-img rebase on a copy of the chain's files."""
    chain = [int(str(d["id"])) for d in reversed(decisions)]  # oldest first
    removed = {int(str(d["id"])) for d in decisions if d["rule"] == "remove"}
    total = Sample()
    for point_id in sorted(removed, key=chain.index, reverse=True):
        position = chain.index(point_id)
        successor = chain[position + 1]
        target = str(copy / f"{successor}.qcow2")
        if position > 0:
            backing = f"{chain[position - 1]}.qcow2"
            command = ["qemu-img", "rebase", "-f", "qcow2", "-F", "qcow2", "-b", backing, target]
        else:
            command = ["qemu-img", "rebase", "-f", "qcow2", "-b", "", target]
        total.add(timed(command))
        (copy / f"{point_id}.qcow2").unlink()
        chain.remove(point_id)
    return total


def allocated(files: list[Path]) -> int:
    return sum(os.stat(f).st_blocks * 512 for f in files)


def compare(qcow2: Path, raw: Path) -> None:
    done = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(qcow2), str(raw)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{qcow2} differs from {raw}: {done.stdout}{done.stderr}")


def main() -> None:
    size = int(os.environ.get("LBR_BENCH_MIB", "16")) * MIB
    points = int(os.environ.get("LBR_BENCH_POINTS", "200"))
    base = os.environ.get("LBR_BENCH_DIR") or tempfile.gettempdir()
    work = Path(tempfile.mkdtemp(prefix="bench-prune-", dir=base))
    try:
        print(f"building {points} points of a {size // MIB} MiB disk ...", file=sys.stderr)
        store, images = build_chain(work, points, size)
        decisions = plan(store)
        kept = [int(str(d["id"])) for d in decisions if d["rule"] != "remove"]
        before = allocated(sorted((store / "data" / "vm1" / "vda").glob("*.qcow2")))
        theirs_dir = work / "theirs"
        shutil.copytree(store / "data" / "vm1" / "vda", theirs_dir)
        subprocess.run(["sync"], check=True)
        ours = timed(lbrestore(store, "prune", "vm1", "--keep-daily", str(KEEP_DAYS)))
        subprocess.run(["sync"], check=True)
        theirs = run_theirs(theirs_dir, decisions)
        left = sorted((store / "data" / "vm1" / "vda").glob("*.qcow2"))
        if sorted(int(f.stem) for f in left) != sorted(kept):
            raise SystemExit(f"prune left {[f.stem for f in left]}, the plan keeps {kept}")
        for point_id in kept:
            compare(store / "data" / "vm1" / "vda" / f"{point_id}.qcow2", images[point_id])
            compare(theirs_dir / f"{point_id}.qcow2", images[point_id])
        report(
            points,
            len(kept),
            before,
            allocated(left),
            ours,
            theirs,
            allocated(sorted(theirs_dir.glob("*.qcow2"))),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(
    points: int, kept: int, before: int, after: int, ours: Sample, theirs: Sample, theirs_after: int
) -> None:
    print(f"chain: {points} points, {before / MIB:.1f} MiB allocated; kept {kept} (--keep-daily)")
    print(
        f"lbrestore prune:          {ours.wall:8.2f} s, wrote {ours.written / MIB:8.1f} MiB, "
        f"kept points hold {after / MIB:.1f} MiB"
    )
    print(
        f"qemu-img rebase (each):   {theirs.wall:8.2f} s, wrote {theirs.written / MIB:8.1f} MiB, "
        f"kept points hold {theirs_after / MIB:.1f} MiB"
    )
    print(f"ratio (bytes written / bytes kept points hold, ours): {ours.written / after:.2f}")
    print(
        "ratio (bytes written / bytes kept points hold, theirs): "
        f"{theirs.written / theirs_after:.2f}"
    )
    print(f"ratio (ours/theirs, time theirs/ours): {theirs.wall / ours.wall:.2f}")
    print("every kept point reads back as imported (qemu-img compare), on both sides")


if __name__ == "__main__":
    main()
