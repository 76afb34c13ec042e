"""Benchmark: `lbrestore diff` of two points vs a full walk comparing every file of both.

An ext4 filesystem of LBR_BENCH_FILES (default 10,000) files of 1-16 KiB in folders of 100
(`mkfs.ext4 -d`) plus a file written a second later (the guest's last activity before the
point: see lbguest/diff.py on racy tokens), imported as point 1; then 1% of the files rewritten
with debugfs (new content; the folder and every other inode untouched) and the disk imported as
point 2.
Each round opens both points afresh (no parser cache carried over) and times, in one process
over the same checked store views:

- ours:   lbguest.diff.diff_paths (skips entries whose change token proves them equal);
- theirs: a full tree walk of both points reading and comparing every file's bytes (what
          `diff -r` of two mounted points, or of two restored partitions, has to do).

Prints each one's best time, `ratio (diff/full walk)` (target <= 0.2), and the whole command
`lbrestore diff` once. Rounds: LBR_BENCH_ROUNDS (default 3). Work folder: LBR_BENCH_DIR, else
the system temp folder. Not a test: it never fails on time, but it checks that the diff named
exactly the rewritten files.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from lbguest.diff import DiffStats, diff_paths
from lbguest.model import EntryKind, GuestFilesystem
from lbrestore.guestfiles import open_point_files
from lbstore.store import Store

PER_FOLDER = 100
CHUNK = 1 << 20


def write_tree(root: Path, files: int, rng: random.Random) -> list[str]:
    names = []
    for index in range(files):
        rel = f"d{index // PER_FOLDER:04}/f{index:06}.bin"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randint(1024, 16384)))
        names.append(rel)
    return names


def lbrestore(store: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "lbrestore", "--store", str(store), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, check=True)


def build(work: Path, files: int) -> tuple[Path, set[str]]:
    rng = random.Random(12)
    tree = work / "tree"
    names = write_tree(tree, files, rng)
    image = work / "v1.img"
    size_mib = files * 24 // 1024 + 64
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-N", str(files + 1000), "-d", tree, image, f"{size_mib}M"],
        check=True,
    )
    # The guest's last activity before point 1 (a log line, say) comes after the files were
    # made: the newest ctime of point 1, which lets the diff trust the other files' tokens.
    time.sleep(1.1)
    stamp = work / "stamp"
    stamp.write_bytes(b"last activity before point 1\n")
    subprocess.run(
        ["debugfs", "-w", "-R", f"write {stamp} stamp", image], check=True, capture_output=True
    )
    changed = sorted(rng.sample(names, max(1, files // 100)))
    script = work / "changes.debugfs"
    lines = []
    for index, rel in enumerate(changed):
        new = work / f"new{index}"
        new.write_bytes(rng.randbytes(rng.randint(1024, 16384)))
        folder, name = rel.split("/")
        lines += [f"cd /{folder}", f"rm {name}", f"write {new} {name}"]
    script.write_text("\n".join(lines) + "\n")
    second = work / "v2.img"
    subprocess.run(["cp", "--sparse=always", image, second], check=True)
    subprocess.run(["debugfs", "-w", "-f", script, second], check=True, capture_output=True)
    store = work / "store"
    lbrestore(store, "init")
    lbrestore(store, "import", "bench", "--disk", f"vda={image}", "--at", "2026-01-01T01:00:00")
    lbrestore(store, "import", "bench", "--disk", f"vda={second}", "--at", "2026-01-01T02:00:00")
    return store, {f"vda/{rel}" for rel in changed}


def full_walk(old: GuestFilesystem, new: GuestFilesystem, path: str = "") -> int:
    """Read and compare every file of both trees (the work a diff without metadata does)."""
    differing = 0
    for entry in old.listdir(path):
        child = f"{path}/{entry.name}" if path else entry.name
        if entry.kind is EntryKind.FOLDER:
            differing += full_walk(old, new, child)
        elif entry.kind is EntryKind.FILE:
            size = max(entry.size, new.entry(child).size)
            same = all(
                old.read(child, at, CHUNK) == new.read(child, at, CHUNK)
                for at in range(0, max(size, 1), CHUNK)
            )
            differing += not same
    return differing


def timed_round(store_path: Path, ours: bool) -> tuple[float, object]:
    with Store.open(store_path) as store, ExitStack() as stack:
        old_point, new_point = store.resolve("bench@#1"), store.resolve("bench@#2")
        old = open_point_files(store, old_point, stack).get("vda")
        new = open_point_files(store, new_point, stack).get("vda")
        began = time.perf_counter()
        if ours:
            stats = DiffStats()
            result: object = {c.path for c in diff_paths(old, new, "", "vda", stats)}
        else:
            result = full_walk(old, new)
        return time.perf_counter() - began, result


def main() -> None:
    files = int(os.environ.get("LBR_BENCH_FILES", "10000"))
    rounds = int(os.environ.get("LBR_BENCH_ROUNDS", "3"))
    parent = os.environ.get("LBR_BENCH_DIR") or None
    with tempfile.TemporaryDirectory(prefix="lbr-bench-diff-", dir=parent) as tmp:
        store, changed = build(Path(tmp), files)
        print(f"ext4, {files} files in folders of {PER_FOLDER}, {len(changed)} rewritten (1%)")
        ours_times, theirs_times = [], []
        for index in range(rounds):
            for ours in (index % 2 == 0, index % 2 == 1):
                seconds, result = timed_round(store, ours)
                if ours:
                    assert result == changed, "the diff must name exactly the rewritten files"
                    ours_times.append(seconds)
                else:
                    assert result == len(changed)
                    theirs_times.append(seconds)
        began = time.perf_counter()
        lines = lbrestore(store, "diff", "bench@#1", "bench@#2").stdout.splitlines()
        command = time.perf_counter() - began
        assert len(lines) == len(changed)
        print(f"ours   (diff, change tokens):      best {min(ours_times):.3f} s")
        print(f"theirs (full walk, every byte):    best {min(theirs_times):.3f} s")
        print(f"whole command `lbrestore diff`:    {command:.3f} s")
        ratio = min(ours_times) / min(theirs_times)
        print(f"ratio (diff/full walk): {ratio:.2f}  (target <= 0.2)")


if __name__ == "__main__":
    main()
