"""Damaged filesystems never crash or hang lbguest: seeded mutations of the fixture images.

Each mutation overwrites a few bytes of one metadata structure (superblocks, group descriptors
and inode tables, FAT tables and root folders, the MFT, XFS allocation group headers and inodes)
of a pristine fixture filesystem, seen through a patching byte source (nothing is copied).
Opening the filesystem, walking every folder and reading every file must end, each step with
data or DamagedFilesystemError (or, for a volume no longer recognized, a note): never another
exception. Termination comes from lbguest's guard rails (loop-safe chains, read budgets), not
from a clock.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.guest_disks import GuestDiskPoint

from lbguest.errors import DamagedFilesystemError, GuestPathError
from lbguest.files import GuestFiles
from lbguest.model import EntryKind, GuestFilesystem

MUTATIONS_PER_FILESYSTEM = 16
READ_CAP = 4 << 20
CHUNK = 1 << 20


class PatchedImage:
    """A ByteSource over a byte range of a disk image with some bytes replaced."""

    def __init__(self, path: Path, start: int, size: int, patches: dict[int, int]) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._start = start
        self.size = size
        self._patches = patches

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, self._start + offset)
        hits = [at for at in self._patches if offset <= at < offset + len(data)]
        if not hits:
            return data
        patched = bytearray(data)
        for at in hits:
            patched[at - offset] = self._patches[at]
        return bytes(patched)

    def close(self) -> None:
        os.close(self._fd)


def _partition(point: GuestDiskPoint, folder: str) -> tuple[Path, int, int]:
    """(disk image, start, length) of a fixture partition "vda-part3"."""
    from lbguest.partitions import read_partitions

    disk_name, _, number = folder.partition("-part")
    path = point.disks[disk_name]
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        parts = read_partitions(lambda offset, length: os.pread(fd, length, offset), size)
    finally:
        os.close(fd)
    part = next(p for p in parts if p.number == int(number))
    return path, part.start, part.length


def _regions(fs_type: str, head: bytes, read: object) -> list[tuple[str, int, int]]:
    """(what, offset, length) of the metadata structures worth damaging in a volume."""
    pread = read  # type: ignore[assignment]
    if fs_type.startswith("ext"):
        block = 1024 << struct.unpack_from("<I", head, 1024 + 0x18)[0]
        inode_size = struct.unpack_from("<H", head, 1024 + 0x58)[0]
        gdt = block if block > 1024 else 2048
        table = struct.unpack_from("<I", pread(gdt + 8, 4), 0)[0] * block  # type: ignore[operator]
        return [
            ("superblock", 1024, 1024),
            ("group descriptors", gdt, 64 * 4),
            ("inode table", table, 64 * inode_size),
        ]
    if fs_type in ("fat16", "fat32"):
        reserved = struct.unpack_from("<H", head, 14)[0] * 512
        fat_sectors = struct.unpack_from("<H", head, 22)[0] or struct.unpack_from("<I", head, 36)[0]
        root_dir = reserved + 2 * fat_sectors * 512
        return [("boot sector", 0, 512), ("FAT", reserved, 2048), ("root folder", root_dir, 2048)]
    if fs_type == "exfat":
        fat = struct.unpack_from("<I", head, 80)[0] * 512
        heap = struct.unpack_from("<I", head, 88)[0] * 512
        root_cluster = struct.unpack_from("<I", head, 96)[0]
        cluster = 512 << head[109]
        return [
            ("boot sector", 0, 512),
            ("FAT", fat, 1024),
            ("root folder", heap + (root_cluster - 2) * cluster, 2048),
        ]
    if fs_type == "ntfs":
        cluster = struct.unpack_from("<H", head, 11)[0] * head[13]
        mft = struct.unpack_from("<Q", head, 48)[0] * cluster
        return [("boot sector", 0, 512), ("MFT", mft, 96 * 1024)]
    if fs_type == "xfs":
        block = struct.unpack_from(">I", head, 4)[0]
        agblocks = struct.unpack_from(">I", head, 84)[0]
        rootino = struct.unpack_from(">Q", head, 56)[0]
        inopblog = head[123]
        chunk = (rootino >> inopblog) * block
        return [
            ("AG 0 headers", 0, 2048),
            ("AG 1 headers", agblocks * block, 2048),
            ("root inode chunk", chunk, 64 * 512),
        ]
    raise AssertionError(fs_type)


def _mutations(
    seed: int, regions: list[tuple[str, int, int]]
) -> Iterator[tuple[str, dict[int, int]]]:
    rng = random.Random(seed)
    for index in range(MUTATIONS_PER_FILESYSTEM):
        what, start, length = regions[index % len(regions)]
        patches: dict[int, int] = {}
        style = rng.choice(["bytes", "word", "fill", "bits"])
        if style == "bytes":
            for _ in range(rng.randint(1, 8)):
                patches[start + rng.randrange(length)] = rng.randrange(256)
        elif style == "word":
            at = start + rng.randrange(0, length - 8, 4)
            for offset, byte in enumerate(rng.choice([b"\xff" * 4, b"\0\0\0\0", b"\x01\0\0\0"])):
                patches[at + offset] = byte
        elif style == "fill":
            at = start + rng.randrange(length)
            value = rng.choice([0, 0xFF])
            for offset in range(rng.randint(16, 256)):
                patches[at + offset] = value
        else:
            for _ in range(rng.randint(1, 4)):
                at = start + rng.randrange(length)
                patches[at] = -1  # marker: flip bits of the original byte
        yield f"{what}/{style}/{index}", patches


def _walk_and_read(fs: GuestFilesystem, path: str = "", depth: int = 0) -> None:
    """List every folder and read every file; damage may end any single step."""
    try:
        entries = fs.listdir(path)
    except DamagedFilesystemError:
        return
    for entry in entries:
        child = f"{path}/{entry.name}" if path else entry.name
        try:
            if entry.kind is EntryKind.FOLDER and depth < 32:
                _walk_and_read(fs, child, depth + 1)
            elif entry.kind is EntryKind.FILE:
                fs.holes(child)
                for offset in range(0, min(entry.size, READ_CAP), CHUNK):
                    data = fs.read(child, offset, CHUNK)
                    assert len(data) == min(CHUNK, entry.size - offset)
            fs.entry(child)
        except DamagedFilesystemError:
            continue
        except GuestPathError as exc:
            # a damaged folder may list a name twice or a name its lookup cannot find again
            assert exc.errno in (2, 20, 21, 22), exc


def _cases(point: GuestDiskPoint) -> list[str]:
    return [case.folder for case in point.filesystems if "-part" in case.folder]


def test_fuzzed_filesystems_end_with_data_or_damage(
    guest_disk_points: tuple[GuestDiskPoint, GuestDiskPoint],
) -> None:
    point = guest_disk_points[0]
    kinds = {case.folder: case.fs_type for case in point.filesystems}
    total = 0
    outcomes: dict[str, int] = {"opened": 0, "damaged": 0, "unrecognized": 0}
    for seed, folder in enumerate(_cases(point)):
        path, start, length = _partition(point, folder)
        pristine = PatchedImage(path, start, length, {})
        head = pristine.read(0, 8192)
        regions = _regions(kinds[folder], head, pristine.read)
        for label, patches in _mutations(seed, regions):
            for at, value in list(patches.items()):
                if value == -1:
                    patches[at] = pristine.read(at, 1)[0] ^ 0x5A
            source = PatchedImage(path, start, length, patches)
            try:
                files = GuestFiles.open({"disk": source})
                try:
                    fs = files.get("disk")
                except GuestPathError:
                    outcomes["unrecognized"] += 1
                    assert files.notes, label
                    continue
                except DamagedFilesystemError:
                    outcomes["damaged"] += 1
                    assert files.notes, label
                    continue
                outcomes["opened"] += 1
                _walk_and_read(fs, "")
            except Exception as exc:  # the assertion this test is about
                raise AssertionError(f"{folder} {kinds[folder]} {label}: {exc!r}") from exc
            finally:
                source.close()
            total += 1
        pristine.close()
    assert sum(outcomes.values()) >= 100, outcomes
    assert outcomes["opened"] and outcomes["damaged"], outcomes


@pytest.mark.parametrize("byte", [0x00, 0xFF])
def test_a_looping_cluster_chain_ends(tmp_path: Path, byte: int) -> None:
    """A FAT cluster chain that loops back (a classic damage) ends in DamagedFilesystemError."""
    import subprocess

    image = tmp_path / "fat.img"
    with image.open("wb") as out:
        out.truncate(40 << 20)
    subprocess.run(
        ["mkfs.fat", "-F", "32", "-S", "512", "-s", "1", str(image)],
        check=True,
        capture_output=True,
    )
    (tmp_path / "f.bin").write_bytes(os.urandom(5000))
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    subprocess.run(
        ["mcopy", "-i", str(image), str(tmp_path / "f.bin"), "::/f.bin"], check=True, env=env
    )
    head = image.read_bytes()[:512]
    reserved = struct.unpack_from("<H", head, 14)[0] * 512
    source = PatchedImage(image, 0, image.stat().st_size, {})
    files = GuestFiles.open({"disk": source})
    assert files.get("disk").read("f.bin", 0, 5000) == (tmp_path / "f.bin").read_bytes()
    # every used FAT entry after the root's points at itself, or back to the first file cluster
    fat = bytearray(source.read(reserved, 4096))
    patches = {}
    for cluster in range(3, 1024):
        value = struct.unpack_from("<I", fat, cluster * 4)[0] & 0x0FFFFFFF
        if value and value < 0x0FFFFFF8:
            loop = cluster if byte == 0x00 else 3
            for offset, b in enumerate(struct.pack("<I", loop)):
                patches[reserved + cluster * 4 + offset] = b
    damaged = PatchedImage(image, 0, image.stat().st_size, patches)
    fs2 = GuestFiles.open({"disk": damaged}).get("disk")
    with pytest.raises(DamagedFilesystemError):
        fs2.read("f.bin", 0, 5000)
