"""lbguest reads every fixture filesystem exactly: bytes, symlinks, modes, holes, two versions.

The fixture disks (tests/fixtures/guest_disks.py) are read as raw files; no store, no FUSE.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from fixtures.guest_disks import (
    GuestDiskPoint,
    GuestFs,
    expected_tree,
)

from lbguest.errors import DamagedFilesystemError, GuestPathError
from lbguest.files import GuestFiles
from lbguest.model import EntryKind, GuestFilesystem


class RawFile:
    """A ByteSource over an image file."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)


def open_point(point: GuestDiskPoint) -> GuestFiles:
    return GuestFiles.open({name: RawFile(path) for name, path in point.disks.items()})


def walk(fs: GuestFilesystem, path: str = "") -> dict[str, object]:
    """Every entry under `path`: relative path -> GuestEntry."""
    found: dict[str, object] = {path: fs.entry(path)}
    for entry in fs.listdir(path):
        child = f"{path}/{entry.name}" if path else entry.name
        if entry.kind is EntryKind.FOLDER:
            found.update(walk(fs, child))
        else:
            found[child] = entry
    return found


def assert_matches_source(fs: GuestFilesystem, case: GuestFs, source: Path) -> None:
    expected = expected_tree(source, case)
    got = walk(fs)
    assert sorted(got) == sorted(expected), case.folder
    for path, want in expected.items():
        entry = got[path]
        assert entry.kind.value == want.kind, path  # type: ignore[attr-defined]
        if want.kind == "file":
            assert fs.read(path, 0, len(want.data or b"") + 10) == want.data, path
        if want.kind == "symlink":
            assert entry.symlink_target == want.target, path  # type: ignore[attr-defined]
        if case.modes and path != "":
            assert stat.S_IMODE(entry.mode) == want.mode, path  # type: ignore[attr-defined]


@pytest.mark.parametrize("version", [1, 2])
def test_every_filesystem_matches_its_source_tree(
    guest_disk_points: tuple[GuestDiskPoint, GuestDiskPoint], version: int
) -> None:
    point = guest_disk_points[version - 1]
    files = open_point(point)
    assert sorted(files.filesystems) == sorted(case.folder for case in point.filesystems)
    for case in point.filesystems:
        fs = files.filesystems[case.folder]
        assert fs.fs_type == case.fs_type
        assert_matches_source(fs, case, point.source)
    blank_notes = {note["source"] for note in files.notes}
    assert blank_notes == set(point.blank)


def test_holes_owners_and_reads_at_offsets(
    guest_disk_points: tuple[GuestDiskPoint, GuestDiskPoint],
) -> None:
    point = guest_disk_points[0]
    files = open_point(point)
    sparse = (point.source / "sparse.img").read_bytes()
    for case in point.filesystems:
        fs = files.filesystems[case.folder]
        assert (
            fs.read("sparse.img", 2 * 1024 * 1024 - 100, 300)
            == sparse[2 * 1024 * 1024 - 100 :][:300]
        )
        assert (
            fs.read("big.bin", 3 * 1024 * 1024 - 5, 100)
            == (point.source / "big.bin").read_bytes()[-5:]
        )
        holes = fs.holes("sparse.img")
        if case.holes:
            assert (8192, 2 * 1024 * 1024 - 8192) in holes, case.folder
            assert holes[-1][0] + holes[-1][1] == len(sparse)
            assert len(fs.holes("fragmented.bin")) >= 47
        if case.owners:
            info = (point.source / "bin/suid").stat()
            entry = fs.entry("bin/suid")
            assert (entry.uid, entry.gid) == (info.st_uid, info.st_gid)
        assert fs.holes("big.bin") == []


def test_paths_that_do_not_fit(guest_disk_points: tuple[GuestDiskPoint, GuestDiskPoint]) -> None:
    files = open_point(guest_disk_points[0])
    fs, rel = files.resolve("vda-part1/etc/fstab")
    assert rel == "etc/fstab"
    with pytest.raises(GuestPathError) as missing:
        fs.entry("etc/nothing")
    assert missing.value.errno == 2
    with pytest.raises(GuestPathError) as not_folder:
        fs.listdir("etc/fstab")
    assert not_folder.value.errno == 20
    with pytest.raises(GuestPathError) as folder:
        fs.read("etc", 0, 10)
    assert folder.value.errno == 21
    with pytest.raises(GuestPathError):
        fs.entry("etc/../etc")
    with pytest.raises(GuestPathError):
        files.resolve("vdz-part9/x")


def test_change_tokens_prove_equal_content_between_points(
    guest_disk_points: tuple[GuestDiskPoint, GuestDiskPoint],
) -> None:
    one, two = (open_point(point) for point in guest_disk_points)
    fs1, fs2 = one.get("vda-part1"), two.get("vda-part1")
    assert fs1.entry("etc/fstab").change_token == fs2.entry("etc/fstab").change_token
    assert fs1.entry("etc/hostname").change_token != fs2.entry("etc/hostname").change_token


def test_opening_is_lazy_and_damage_is_a_note(tmp_path: Path) -> None:
    """A disk with a broken ext superblock behind a valid magic: found at once, noted when
    opened, never an exception other than DamagedFilesystemError."""
    image = tmp_path / "disk.raw"
    with image.open("wb") as out:
        out.truncate(8 << 20)
        out.seek(1024 + 0x38)
        out.write(b"\x53\xef")
    files = GuestFiles.open({"vdc": RawFile(image)})
    assert files.names() == ["vdc"]
    with pytest.raises(DamagedFilesystemError):
        files.get("vdc")
    assert files.filesystems == {}
    assert files.notes[0]["source"] == "vdc"
    assert "damaged ext" in files.notes[0]["note"]


class CountingSource:
    """A 1 TiB disk: the bytes of a small image at its start, zeros after; counts reads."""

    def __init__(self, head: Path) -> None:
        self._head = RawFile(head)
        self.size = 1 << 40
        self.bytes_read = 0

    def read(self, offset: int, length: int) -> bytes:
        self.bytes_read += length
        data = self._head.read(offset, length) if offset < self._head.size else b""
        return data + bytes(length - len(data))


def test_finding_filesystems_reads_only_tables_and_magics(
    guest_disk_points: tuple[GuestDiskPoint, GuestDiskPoint],
) -> None:
    source = CountingSource(guest_disk_points[0].disks["vda"])
    files = GuestFiles.open({"vda": source})
    assert "vda-part1" in files.names()
    assert source.bytes_read < 256 * 1024
    files.get("vda-part1").listdir("")
    assert "vda-part2" not in [fs.name for fs in files._opened.values()]


def test_times_as_stored(guest_disk_points: tuple[GuestDiskPoint, GuestDiskPoint]) -> None:
    """mkfs.ext4 -d copies each file's mtime in whole seconds (what it stores is shown)."""
    point = guest_disk_points[0]
    fs = open_point(point).get("vdb-part1")
    for rel in ("big.bin", "etc/fstab", "bin/suid"):
        stored = (point.source / rel).stat().st_mtime_ns // 10**9 * 10**9
        assert fs.entry(rel).mtime_ns == stored


def test_fat12(tmp_path: Path) -> None:
    import subprocess

    image = tmp_path / "fat12.img"
    with image.open("wb") as out:
        out.truncate(2 << 20)
    subprocess.run(["mkfs.fat", "-F", "12", str(image)], check=True, capture_output=True)
    data = os.urandom(70_000)
    (tmp_path / "Data File.bin").write_bytes(data)
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    subprocess.run(
        ["mcopy", "-i", str(image), str(tmp_path / "Data File.bin"), "::/"], check=True, env=env
    )
    fs = GuestFiles.open({"fd0": RawFile(image)}).get("fd0")
    assert fs.fs_type == "fat12"
    assert [entry.name for entry in fs.listdir("")] == ["Data File.bin"]
    assert fs.read("Data File.bin", 0, 100_000) == data
    assert fs.entry("Data File.bin").mode == stat.S_IFREG | 0o644


def test_ext4_inline_data(tmp_path: Path) -> None:
    """Small files and folders kept inside their inodes (inline_data) read like any other."""
    import subprocess

    source = tmp_path / "src"
    (source / "dir" / "sub").mkdir(parents=True)
    files = {
        "tiny.txt": b"tiny\n",
        "dir/fifty.txt": b"5" * 50,
        "dir/hundred.txt": b"h" * 100,  # past i_block: the rest in system.data
        "dir/sub/big.bin": os.urandom(9000),  # too big to be inline
    }
    for rel, data in files.items():
        (source / rel).write_bytes(data)
    os.symlink("t" * 80, source / "dir" / "longlink")
    image = tmp_path / "inline.img"
    with image.open("wb") as out:
        out.truncate(16 << 20)
    mkfs = [
        "mkfs.ext4",
        "-q",
        "-F",
        "-O",
        "inline_data",
        "-I",
        "256",
        "-d",
        str(source),
        str(image),
    ]
    subprocess.run(mkfs, check=True, capture_output=True)
    flags = subprocess.run(
        ["debugfs", "-R", "stat /dir/hundred.txt", str(image)], capture_output=True, text=True
    ).stdout
    assert "Size of inline data" in flags  # the case under test really is inline
    fs = GuestFiles.open({"disk": RawFile(image)}).get("disk")
    for rel, data in files.items():
        assert fs.read(rel, 0, 1 << 20) == data, rel
    assert [e.name for e in fs.listdir("dir")] == ["fifty.txt", "hundred.txt", "longlink", "sub"]
    assert fs.entry("dir/longlink").symlink_target == "t" * 80


class AlignedSource:
    """Bytes in memory with a cluster alignment, recording each readinto."""

    alignment = 65536

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)
        self.calls: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    def readinto(self, offset: int, dest: memoryview) -> int:
        self.calls.append((offset, len(dest)))
        dest[:] = self.data[offset : offset + len(dest)]
        return len(dest)


def test_long_reads_are_split_at_cluster_boundaries() -> None:
    from lbguest.stream import ReadBudget, SourceStream, SubSource

    data = os.urandom(4 << 20)
    source = AlignedSource(data)
    part = SubSource(source, 1 << 20, 3 << 20)
    stream = SourceStream(part, ReadBudget("t"))
    dest = memoryview(bytearray(1 << 20))
    assert stream.preadinto(4096, dest) == 1 << 20
    assert bytes(dest) == data[(1 << 20) + 4096 : (2 << 20) + 4096]
    (head, head_len), (middle, middle_len), (tail, tail_len) = source.calls
    assert (head, head_len) == ((1 << 20) + 4096, 65536 - 4096)
    assert (tail, tail_len) == ((2 << 20), 4096)
    assert middle % 65536 == 0 and middle_len == 15 * 65536
    assert SubSource(source, 4096, 1 << 20).alignment == 0  # a misaligned partition: no split
