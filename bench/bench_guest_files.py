#!/usr/bin/env python3
"""Benchmark: reading a file of the guest's own filesystem, through `files/` of a mounted
restore point (lbguest parsing ext4 in user space) vs the kernel's ext4 on a loop mount.

Builds a disk (GPT, one ext4 partition made with `mkfs.ext4 -d`) holding one file of
LBR_BENCH_MIB MiB (default 1024) of random data, imports it with `lbrestore import`, then, warm
host page cache, best of LBR_BENCH_REPEAT (default 5) runs of each, alternating:

    ours:   `lbrestore mount vm@latest`, read MOUNT/files/vda-part1/big.bin front to back in
            1 MiB reads (lbguest through the checked chain view; streamed, direct_io)
    theirs: `lbrestore restore --format raw`, the restored partition on a read-only loop device,
            `mount -o ro,noload`, the same file read the same way (its cached pages are dropped
            before each run, untimed, so every byte goes through ext4 and the loop device;
            the restored image itself stays in the host page cache, as the store's files do)

and prints both throughputs and `ratio (ours/theirs)` (target >= 0.5). The kernel's side needs
root (loop devices, mount); without root it prints that and no ratio.

Not a test: it never fails on time. LBR_BENCH_DIR: where the work goes (else /tmp).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MiB = 1 << 20
PART_START = MiB
READ_SIZE = MiB


def run(*args: str | Path) -> str:
    """Run a command; its stdout."""
    done = subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True)
    return done.stdout


def lbrestore(store: Path, *args: str | Path) -> str:
    """Run the CLI; its stdout."""
    return run(sys.executable, "-m", "lbrestore", "--store", store, *args)


def build_disk(work: Path, mib: int) -> tuple[Path, int, bytes]:
    """A raw GPT disk with one ext4 partition holding big.bin; (disk, partition bytes, head)."""
    source = work / "src"
    source.mkdir()
    with (source / "big.bin").open("wb") as out:
        for _ in range(mib):
            out.write(os.urandom(MiB))
    head = (source / "big.bin").read_bytes()[:4096]
    part_bytes = (mib + mib // 8 + 64) * MiB
    disk = work / "vda.raw"
    with disk.open("wb") as out:
        out.truncate(PART_START + part_bytes + MiB)
    subprocess.run(
        ["sfdisk", "-q", str(disk)],
        input=f"label: gpt\nstart=2048, size={part_bytes // 512}\n",
        text=True,
        check=True,
        capture_output=True,
    )
    blocks = part_bytes // 4096
    run("mkfs.ext4", "-q", "-F", "-b", "4096", "-E", f"offset={PART_START}", "-d", source,
        disk, str(blocks))  # fmt: skip
    (source / "big.bin").unlink()
    return disk, part_bytes, head


def read_file(path: Path) -> int:
    """Read the file front to back in READ_SIZE reads; bytes read."""
    buf = bytearray(READ_SIZE)
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while got := os.readv(fd, [buf]):
            total += got
    finally:
        os.close(fd)
    return total


def drop_cached_pages(path: Path) -> None:
    """Make the kernel forget the file's cached pages, so the next read goes through ext4."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(func: object) -> float:
    start = time.perf_counter()
    func()  # type: ignore[operator]
    return time.perf_counter() - start


def main() -> int:
    mib = int(os.environ.get("LBR_BENCH_MIB", "1024"))
    repeat = int(os.environ.get("LBR_BENCH_REPEAT", "5"))
    root = os.geteuid() == 0
    with tempfile.TemporaryDirectory(dir=os.environ.get("LBR_BENCH_DIR")) as tmp:
        work = Path(tmp)
        store = work / "store"
        disk, part_bytes, head = build_disk(work, mib)
        lbrestore(store, "init")
        lbrestore(store, "import", "bench", "--disk", f"vda={disk}")
        disk.unlink()
        ours_mount, theirs_mount = work / "mnt", work / "kernel"
        ours_mount.mkdir()
        theirs_mount.mkdir()
        device = ""
        lbrestore(store, "mount", "bench@latest", ours_mount)
        try:
            ours_file = ours_mount / "files" / "vda-part1" / "big.bin"
            assert ours_file.read_bytes()[:4096] == head
            meta = json.loads((ours_mount / "vm.json").read_text())
            journal = meta["guest_files"]["filesystems"][0]["journal"]
            runs: dict[str, list[float]] = {"ours": [], "theirs": []}
            if root:
                restored = work / "restored"
                lbrestore(store, "restore", "bench@latest", "--to", restored, "--format", "raw")
                image = restored / "vda.raw"
                window = ["--offset", str(PART_START), "--sizelimit", str(part_bytes)]
                device = run("losetup", "--find", "--show", "--read-only", *window, image).strip()
                run("mount", "-o", "ro,noload", device, theirs_mount)
                theirs_file = theirs_mount / "big.bin"
                read_file(image)  # warm the host page cache for the restored image
            for _ in range(repeat):  # alternate, so the machine's load hits both alike
                runs["ours"].append(timed(lambda: read_file(ours_file)))
                if root:
                    drop_cached_pages(theirs_file)
                    runs["theirs"].append(timed(lambda: read_file(theirs_file)))
            assert read_file(ours_file) == mib * MiB
        finally:
            lbrestore(store, "umount", ours_mount)
            if os.path.ismount(theirs_mount):
                run("umount", theirs_mount)
            if device:
                run("losetup", "-d", device)
    ours = min(runs["ours"])
    print(f"guest file of {mib} MiB on ext4 ({journal}), best of {repeat}")
    print(f"ours   (files/ of lbrestore mount): {mib / ours:8.1f} MiB/s  ({ours:.3f} s)")
    if not root:
        print("theirs (kernel loop mount): needs root; ratio (ours/theirs): n/a")
        return 0
    theirs = min(runs["theirs"])
    print(f"theirs (kernel ext4, loop mount ro): {mib / theirs:8.1f} MiB/s  ({theirs:.3f} s)")
    print(f"ratio (ours/theirs): {theirs / ours:.2f}  (target >= 0.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
