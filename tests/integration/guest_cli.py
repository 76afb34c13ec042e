"""Helpers for the `ls`, `extract` and `diff` tests (besides guest_store's): one-line errors,
hand-edited ext4 images, what a folder holds."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

DIRENT = struct.Struct("<IHBB")


def one_line_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    """The command failed with `code` and said why in one line, without a traceback."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    return done.stderr


def debugfs(image: Path, *commands: str) -> None:
    """Run debugfs commands on an ext image, writable, failing loudly."""
    script = "\n".join(commands) + "\n"
    done = subprocess.run(
        ["debugfs", "-w", "-f", "-", str(image)], input=script, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "rror" not in done.stderr.replace("debugfs 1.", ""), done.stderr


def rename_dirent(image: Path, folder: str, old: bytes, new: bytes) -> None:
    """Give the entry `old` of `folder` the raw name `new` (same length) by editing the folder's
    blocks in the image: names no tool would write ('..', 'a/b', NUL). The image must have no
    metadata_csum and no dir_index (a linear folder, no checksums to fix)."""
    assert len(old) == len(new)
    block_size = 1024 << struct.unpack_from("<I", image.read_bytes(), 1024 + 24)[0]
    done = subprocess.run(
        ["debugfs", "-R", f"blocks {folder}", str(image)], capture_output=True, text=True
    )
    blocks = [int(word) for word in done.stdout.split()]
    with image.open("r+b") as disk:
        for block in blocks:
            disk.seek(block * block_size)
            data = bytearray(disk.read(block_size))
            offset = 0
            while offset + DIRENT.size <= len(data):
                _inode, rec_len, name_len, _kind = DIRENT.unpack_from(data, offset)
                start = offset + DIRENT.size
                if bytes(data[start : start + name_len]) == old:
                    data[start : start + name_len] = new
                    disk.seek(block * block_size)
                    disk.write(data)
                    return
                if rec_len < DIRENT.size:
                    break
                offset += rec_len
    raise AssertionError(f"{old!r} not found in {folder}")


def everything_under(root: Path, leave_out: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every path below `root` (but `leave_out` and what it holds) with its type, size, mtime and
    link target: what must not change when nothing is written outside `leave_out`."""
    found: dict[str, tuple[int, int, int, str]] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if path == leave_out or leave_out in path.parents:
                continue
            info = path.lstat()
            target = os.readlink(path) if path.is_symlink() else ""
            found[str(path)] = (info.st_mode, info.st_size, info.st_mtime_ns, target)
    return found
