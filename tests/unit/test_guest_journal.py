"""ext3/ext4 journals are replayed in memory as the kernel and e2fsck replay them.

Journals are written by debugfs (journal_open/journal_write: committed and uncommitted
transactions, revoke records, csum v3) and, as root, by the kernel itself (a loop-mounted ext4
copied while mounted after `sync`). The oracle is the same image replayed by `e2fsck -fy` (or
by the kernel's own mount): every file's bytes must be equal, and the image is never written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lbguest.files import GuestFiles
from lbguest.model import EntryKind, GuestFilesystem

BLOCK = 4096
ORIGINAL = b"original content\n"
REPLAYED = b"replayed content!".ljust(BLOCK, b"\n")
LATER = b"written after the revoke".ljust(BLOCK, b"\n")


class RawFile:
    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)


def _run(*args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, input=stdin)


def _ext4(tmp_path: Path, kind: str = "ext4") -> tuple[Path, int]:
    """An image holding a.txt and b.txt, and the block number of a.txt's data."""
    source = tmp_path / "src"
    source.mkdir(parents=True)
    (source / "a.txt").write_bytes(ORIGINAL)
    (source / "b.txt").write_bytes(b"x" * 5000)
    image = tmp_path / "fs.img"
    with image.open("wb") as out:
        out.truncate(32 << 20)
    assert _run(f"mkfs.{kind}", "-q", "-F", "-b", "4096", "-d", source, image).returncode == 0
    block = int(_run("debugfs", "-R", "bmap /a.txt 0", image).stdout.split()[-1])
    return image, block


def _journal(image: Path, *commands: str) -> None:
    script = "\n".join(commands) + "\n"
    done = _run("debugfs", "-w", "-f", "-", image, stdin=script)
    assert done.returncode == 0, done.stderr


def _blockfile(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _tree(fs: GuestFilesystem, path: str = "") -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for entry in fs.listdir(path):
        child = f"{path}/{entry.name}" if path else entry.name
        if entry.kind is EntryKind.FOLDER:
            found[child + "/"] = b""
            found.update(_tree(fs, child))
        elif entry.kind is EntryKind.FILE:
            found[child] = fs.read(child, 0, entry.size + 1)
        else:
            found[child] = (entry.symlink_target or "").encode()
    return found


def _open(image: Path) -> GuestFilesystem:
    return GuestFiles.open({"disk": RawFile(image)}).get("disk")


def _e2fsck_replayed(image: Path) -> Path:
    """A copy of `image` with its journal replayed (and checked) by e2fsck."""
    copy = image.with_suffix(".fsck")
    shutil.copyfile(image, copy)
    done = _run("e2fsck", "-fy", copy)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    assert _run("e2fsck", "-fn", copy).returncode == 0
    return copy


def _assert_like_e2fsck(image: Path) -> GuestFilesystem:
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    fs = _open(image)
    oracle = _open(_e2fsck_replayed(image))
    assert oracle.journal == "journal clean"
    assert _tree(fs) == _tree(oracle)
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest  # never written
    return fs


@pytest.mark.parametrize("checksums", [False, True], ids=["plain", "csum-v3"])
def test_a_committed_transaction_is_replayed(tmp_path: Path, checksums: bool) -> None:
    image, block = _ext4(tmp_path)
    data = _blockfile(tmp_path, "blk", REPLAYED)
    _journal(image, "jo -c" if checksums else "jo", f"jw -b {block} {data}", "jc")
    fs = _assert_like_e2fsck(image)
    assert fs.journal == "journal replayed in memory (1 transactions)"
    assert fs.read("a.txt", 0, 100) == REPLAYED[: len(ORIGINAL)]


def test_revoke_records_cancel_older_copies_only(tmp_path: Path) -> None:
    image, block = _ext4(tmp_path)
    first = _blockfile(tmp_path, "blk", REPLAYED)
    later = _blockfile(tmp_path, "later", LATER)
    _journal(image, "jo -c", f"jw -b {block} {first}", f"jw -r {block} /dev/null", "jc")
    fs = _assert_like_e2fsck(image)
    assert fs.read("a.txt", 0, 100) == ORIGINAL
    assert fs.journal == "journal replayed in memory (2 transactions)"

    image2, block2 = _ext4(tmp_path / "two")
    _journal(
        image2,
        "jo -c",
        f"jw -b {block2} {first}",
        f"jw -r {block2} /dev/null",
        f"jw -b {block2} {later}",
        "jc",
    )
    fs2 = _assert_like_e2fsck(image2)
    assert fs2.read("a.txt", 0, 100) == LATER[: len(ORIGINAL)]


def test_an_uncommitted_transaction_is_not_replayed(tmp_path: Path) -> None:
    image, block = _ext4(tmp_path)
    data = _blockfile(tmp_path, "blk", REPLAYED)
    _journal(image, "jo -c", f"jw -c -b {block} {data}", "jc")
    fs = _assert_like_e2fsck(image)
    assert fs.read("a.txt", 0, 100) == ORIGINAL


def _journal_block_offset(image: Path, journal_block: int) -> int:
    physical = int(_run("debugfs", "-R", f"bmap <8> {journal_block}", image).stdout.split()[-1])
    return physical * BLOCK


def _flip(image: Path, offset: int) -> None:
    with image.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("damaged", ["data", "commit"])
def test_checksums_decide_what_is_replayed(tmp_path: Path, damaged: str) -> None:
    """csum v3: a logged block with a bad tag checksum is skipped, a commit block with a bad
    checksum ends the log (its transaction is not replayed), as e2fsck decides."""
    image, block = _ext4(tmp_path)
    data = _blockfile(tmp_path, "blk", REPLAYED)
    _journal(image, "jo -c", f"jw -b {block} {data}", "jc")
    # journal block 1: descriptor, 2: the logged copy, 3: commit
    _flip(image, _journal_block_offset(image, 2 if damaged == "data" else 3) + 100)
    fs = _assert_like_e2fsck(image)
    assert fs.read("a.txt", 0, 100) == ORIGINAL


def test_ext3_journal_without_extents(tmp_path: Path) -> None:
    image, block = _ext4(tmp_path, "ext3")
    data = _blockfile(tmp_path, "blk", REPLAYED)
    _journal(image, "jo", f"jw -b {block} {data}", "jc")
    fs = _assert_like_e2fsck(image)
    assert fs.fs_type == "ext3"
    assert fs.read("a.txt", 0, 100) == REPLAYED[: len(ORIGINAL)]


@pytest.mark.skipif(os.geteuid() != 0, reason="the kernel's ext4 through a loop mount needs root")
def test_a_kernel_written_journal_reads_as_the_kernel_replays_it(tmp_path: Path) -> None:
    """A live ext4 copied while mounted (after sync): its newest metadata is only in the
    journal. The kernel's own mount of another copy is the oracle."""
    image = tmp_path / "live.img"
    with image.open("wb") as out:
        out.truncate(64 << 20)
    assert _run("mkfs.ext4", "-q", "-F", image).returncode == 0
    mnt = tmp_path / "live"
    mnt.mkdir()
    assert _run("mount", "-o", "loop", image, mnt).returncode == 0
    try:
        (mnt / "d").mkdir()
        for index in range(60):
            (mnt / "d" / f"f{index}").write_text(f"file {index}\n" * (index + 1))
        (mnt / "big").write_bytes(os.urandom(3 << 20))
        os.symlink("d/f1", mnt / "link")
        _run("sync")
        snapshot = tmp_path / "snapshot.img"
        shutil.copyfile(image, snapshot)
    finally:
        _run("umount", mnt)
    fs = _open(snapshot)
    assert fs.journal.startswith("journal replayed in memory")
    kernel_copy = tmp_path / "kernel.img"
    shutil.copyfile(snapshot, kernel_copy)
    oracle_mnt = tmp_path / "oracle"
    oracle_mnt.mkdir()
    # ro on a writable loop device: the kernel replays the journal into this copy, as it
    # would at boot (on a read-only device it refuses to mount instead)
    device = _run("losetup", "--find", "--show", kernel_copy).stdout.strip()
    mounted = _run("mount", "-o", "ro", device, oracle_mnt)
    if mounted.returncode != 0:
        _run("losetup", "-d", device)
    assert mounted.returncode == 0, mounted.stderr
    try:
        expected: dict[str, bytes] = {}
        for folder, dirs, files in os.walk(oracle_mnt):
            for name in dirs:
                rel = (Path(folder) / name).relative_to(oracle_mnt).as_posix()
                expected[rel + "/"] = b""
            for name in files:
                path = Path(folder) / name
                rel = path.relative_to(oracle_mnt).as_posix()
                expected[rel] = (
                    os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
                )
    finally:
        _run("umount", oracle_mnt)
        _run("losetup", "-d", device)
    got = _tree(fs)
    assert got == expected
    assert len([name for name in got if name.startswith("d/f")]) == 60
