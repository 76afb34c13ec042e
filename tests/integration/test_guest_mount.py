"""files/ of a mounted restore point: the guest's own files, byte-exact, for every filesystem.

Two points of one VM are imported with `lbrestore import` from the fixture disks
(tests/fixtures/guest_disks.py: ext2/3/4, XFS, FAT16/32, and as root NTFS, exFAT and an LVM2
volume; version 2 with changed, added and deleted files). Each is mounted through the CLI (real
FUSE); every file's bytes, every symlink's target and the modes must equal the source tree,
through the mount and through lbguest.GuestFiles over the store's views.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.guest_disks import GuestDiskPoint, GuestFs, expected_tree
from guest_store import ImportedPoints, import_fixture_points, lbrestore

from lbguest.files import GuestFiles
from lbguest.model import EntryKind, GuestFilesystem
from lbstore.store import Store


@pytest.fixture(scope="module")
def imported(
    tmp_path_factory: pytest.TempPathFactory,
    guest_disk_points: tuple[GuestDiskPoint, GuestDiskPoint],
) -> ImportedPoints:
    return import_fixture_points(
        tmp_path_factory.mktemp("guest-store") / "store", guest_disk_points
    )


@pytest.fixture
def mounted(imported: ImportedPoints, tmp_path: Path) -> Iterator[list[Path]]:
    mountpoints = []
    try:
        for point_id, _point in imported.points:
            mountpoint = tmp_path / f"mnt{point_id}"
            mountpoint.mkdir()
            done = lbrestore(imported.store, "mount", f"vm1@#{point_id}", mountpoint)
            assert done.returncode == 0, done.stderr
            mountpoints.append(mountpoint)
        yield mountpoints
    finally:
        for mountpoint in mountpoints:
            lbrestore(imported.store, "umount", mountpoint)


def _walk_mount(root: Path) -> dict[str, os.stat_result]:
    found = {"": root.lstat()}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            found[path.relative_to(root).as_posix()] = path.lstat()
    return found


def _assert_mount_matches(root: Path, case: GuestFs, source: Path, *, times: bool) -> None:
    expected = expected_tree(source, case)
    got = _walk_mount(root)
    assert sorted(got) == sorted(expected), case.folder
    for rel, want in expected.items():
        info = got[rel]
        path = root / rel
        kinds = {"file": stat.S_ISREG, "folder": stat.S_ISDIR, "symlink": stat.S_ISLNK}
        assert kinds[want.kind](info.st_mode), (case.folder, rel)
        if want.kind == "file":
            assert path.read_bytes() == want.data, (case.folder, rel)
            assert info.st_size == len(want.data or b"")
            if times and case.fs_type in ("ext2", "ext3") and rel in ("big.bin", "bin/suid"):
                stored = (source / rel).stat().st_mtime_ns // 10**9 * 10**9  # mkfs -d: seconds
                assert info.st_mtime_ns == stored, (case.folder, rel)
        if want.kind == "symlink":
            assert os.readlink(path) == want.target, (case.folder, rel)
        if case.modes and rel:
            assert stat.S_IMODE(info.st_mode) == want.mode, (case.folder, rel)
        if case.owners:
            src = (source / rel).lstat() if rel and (source / rel).exists() else None
            if src is not None:
                assert (info.st_uid, info.st_gid) == (src.st_uid, src.st_gid)


def test_files_of_both_points_equal_their_source_trees(
    imported: ImportedPoints, mounted: list[Path]
) -> None:
    for (point_id, point), mountpoint in zip(imported.points, mounted, strict=True):
        files = mountpoint / "files"
        assert sorted(os.listdir(files)) == sorted(case.folder for case in point.filesystems)
        for case in point.filesystems:
            _assert_mount_matches(files / case.folder, case, point.source, times=point.version == 1)
        meta = json.loads((mountpoint / "vm.json").read_text())
        assert meta["id"] == point_id
        summary = meta["guest_files"]
        assert {(fs["name"], fs["type"]) for fs in summary["filesystems"]} == {
            (case.folder, case.fs_type) for case in point.filesystems
        }
        assert {note["source"] for note in summary["notes"]} == set(point.blank)
        assert all(fs["journal"] for fs in summary["filesystems"])


def test_the_mount_is_read_only(mounted: list[Path]) -> None:
    target = mounted[0] / "files" / "vda-part1"
    for attempt in (
        lambda: (target / "new.txt").write_text("x"),
        lambda: (target / "etc/fstab").write_text("x"),
        lambda: (target / "etc/fstab").unlink(),
        lambda: (target / "newdir").mkdir(),
        lambda: os.symlink("x", target / "link"),
        lambda: os.chmod(target / "etc/fstab", 0o777),
    ):
        with pytest.raises(OSError) as refused:
            attempt()
        assert refused.value.errno in (30, 13)  # EROFS (EACCES where the kernel checks first)


class ViewSource:
    """A ByteSource over a store chain view."""

    def __init__(self, view: object) -> None:
        self._view = view
        self.size = view.virtual_size  # type: ignore[attr-defined]

    def read(self, offset: int, length: int) -> bytes:
        return self._view.read(offset, length)  # type: ignore[attr-defined, no-any-return]


def _walk_guest(fs: GuestFilesystem, path: str = "") -> Iterator[tuple[str, object]]:
    yield path, fs.entry(path)
    for entry in fs.listdir(path):
        child = f"{path}/{entry.name}" if path else entry.name
        if entry.kind is EntryKind.FOLDER:
            yield from _walk_guest(fs, child)
        else:
            yield child, entry


def test_guest_files_over_store_views(imported: ImportedPoints) -> None:
    with Store.open(imported.store) as store:
        for point_id, point in imported.points:
            stored = store.point(point_id)
            views = {disk.name: store.view(stored, disk.name) for disk in stored.disks}
            try:
                files = GuestFiles.open({name: ViewSource(v) for name, v in views.items()})
                for case in point.filesystems:
                    fs = files.filesystems[case.folder]
                    expected = expected_tree(point.source, case)
                    got = dict(_walk_guest(fs))
                    assert sorted(got) == sorted(expected)
                    for rel, want in expected.items():
                        if want.kind == "file":
                            assert fs.read(rel, 0, 1 << 30) == want.data, (case.folder, rel)
                        if want.kind == "symlink":
                            assert got[rel].symlink_target == want.target  # type: ignore[attr-defined]
            finally:
                for view in views.values():
                    view.close()


def _debugfs(image: Path, command: str, *, write: bool = False) -> str:
    args = ["debugfs", *(["-w"] if write else []), "-R", command, str(image)]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _partition_range(disk: Path, number: int) -> tuple[int, int]:
    table = json.loads(
        subprocess.run(["sfdisk", "-J", str(disk)], capture_output=True, text=True).stdout
    )
    part = table["partitiontable"]["partitions"][number - 1]
    return part["start"] * 512, part["size"] * 512


def _splice(disk: Path, offset: int, image: Path) -> None:
    with disk.open("r+b") as out:
        out.seek(offset)
        out.write(image.read_bytes())


def test_damage_answers_eio_and_leaves_the_mount_serving(
    guest_disk_points: tuple[GuestDiskPoint, GuestDiskPoint], tmp_path: Path
) -> None:
    """vdb-part1 (ext2) gets a broken superblock, vdb-part2 (ext3) a block pointer of big.bin
    outside the volume, and one stored cluster under vdb-part2's etc/fstab is corrupted in the
    store: the mount serves vdb.raw exactly, leaves part1 out with a note, answers EIO for
    exactly those two files and serves every other file."""
    disk = tmp_path / "vdb.raw"
    subprocess.run(
        ["cp", "--sparse=always", str(guest_disk_points[0].disks["vdb"]), str(disk)], check=True
    )
    start1, _ = _partition_range(disk, 1)
    with disk.open("r+b") as out:
        out.seek(start1 + 1024)  # s_inodes_count = 0
        out.write(bytes(4))
    start2, length2 = _partition_range(disk, 2)
    part2 = tmp_path / "part2.img"
    with disk.open("rb") as src:
        src.seek(start2)
        part2.write_bytes(src.read(length2))
    _debugfs(part2, "sif /big.bin block[0] 4000000000", write=True)
    fstab_block = int(_debugfs(part2, "bmap /etc/fstab 0").split()[-1])
    _splice(disk, start2, part2)

    store = tmp_path / "store"
    assert lbrestore(store, "init").returncode == 0
    done = lbrestore(store, "import", "vm2", "--disk", f"vdb={disk}")
    assert done.returncode == 0, done.stderr
    with Store.open(store) as opened:
        point = opened.resolve("vm2@latest")
        stored = opened.file_path(point, "vdb")
    mapping = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", str(stored)], capture_output=True, text=True
        ).stdout
    )
    guest_offset = start2 + fstab_block * 4096
    extent = next(e for e in mapping if e["start"] <= guest_offset < e["start"] + e["length"])
    assert extent["data"]
    with stored.open("r+b") as out:
        out.seek(extent["offset"] + guest_offset - extent["start"])
        out.write(b"DAMAGED!")

    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    done = lbrestore(store, "mount", "vm2@latest", mountpoint)
    assert done.returncode == 0, done.stderr
    try:
        names = sorted(os.listdir(mountpoint / "files"))
        assert "vdb-part1" not in names and {"vdb-part2", "vdb-part3"} <= set(names)
        part = mountpoint / "files" / "vdb-part2"
        for broken in ("big.bin", "etc/fstab"):
            with pytest.raises(OSError) as failed:
                (part / broken).read_bytes()
            assert failed.value.errno == 5, broken  # EIO
        source = guest_disk_points[0].source  # (small files next to fstab share its cluster)
        assert (part / "sparse.img").read_bytes() == (source / "sparse.img").read_bytes()
        assert {"big.bin", "etc", "sparse.img"} <= set(os.listdir(part))
        assert os.readlink(part / "links/relative") == "../etc/fstab"
        notes = json.loads((mountpoint / "vm.json").read_text())["guest_files"]["notes"]
        assert any(n["source"] == "vdb-part1" and "damaged ext" in n["note"] for n in notes)
        assert os.path.ismount(mountpoint)
        # the raw disk is served as stored, apart from the cluster damaged in the store
        with (mountpoint / "vdb.raw").open("rb") as raw:
            raw.seek(start1)
            assert raw.read(1 << 20) == disk.read_bytes()[start1 : start1 + (1 << 20)]
    finally:
        lbrestore(store, "umount", mountpoint)


def test_a_one_tib_disk_mounts_without_parsing_its_filesystems(tmp_path: Path) -> None:
    """Mounting reads partition tables and magics only: a 1 TiB disk (GPT: a small ext4 and a
    1 TiB blank partition) mounts, its files/ opens the ext4 on first use, and vm.json notes the
    blank partition."""
    disk = tmp_path / "big.raw"
    with disk.open("wb") as out:
        out.truncate(1 << 40)
    layout = "label: gpt\nstart=2048, size=1048576\nsize=+\n"
    subprocess.run(["sfdisk", "-q", str(disk)], input=layout, text=True, check=True)
    source = tmp_path / "src"
    source.mkdir()
    (source / "x.txt").write_text("hello\n")
    mkfs = ["mkfs.ext4", "-q", "-F", "-E", "offset=1048576", "-d", str(source), str(disk), "131072"]
    subprocess.run(mkfs, check=True, capture_output=True)
    store = tmp_path / "store"
    assert lbrestore(store, "init").returncode == 0
    assert lbrestore(store, "import", "big", "--disk", f"vda={disk}").returncode == 0
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    done = lbrestore(store, "mount", "big@latest", mountpoint)
    assert done.returncode == 0, done.stderr
    try:
        assert (mountpoint / "vda-part2.raw").stat().st_size > (1 << 40) - (1 << 30)
        assert (mountpoint / "files/vda-part1/x.txt").read_text() == "hello\n"
        assert os.listdir(mountpoint / "files") == ["vda-part1"]
        notes = json.loads((mountpoint / "vm.json").read_text())["guest_files"]["notes"]
        assert notes == [{"source": "vda-part2", "note": "unrecognized filesystem"}]
    finally:
        lbrestore(store, "umount", mountpoint)
