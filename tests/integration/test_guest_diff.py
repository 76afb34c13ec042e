"""`lbrestore diff` on real guest filesystems in a real store, through the CLI: it names exactly
the changes of a known change set (added, removed, content of the same size, size, mode, symlink
target, file -> folder) and nothing else, on ext4 changed in place as a guest would (debugfs)
and on FAT, and on every fixture filesystem; and what metadata proves equal is not read.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from contextlib import ExitStack
from pathlib import Path

import pytest
from fixtures.guest_disks import GuestDiskPoint, GuestFs, expected_tree
from guest_cli import debugfs
from guest_store import ImportedPoints, import_fixture_points, import_point, lbrestore

from lbguest.diff import DiffStats, diff_paths
from lbrestore.guestfiles import open_point_files
from lbstore.store import Store

UNTOUCHED = 40
LATER = "20300101000000"  # the older point's instant (its newest ctime)
AFTER = "20300101000005"  # guest writes after that point


@pytest.fixture(scope="module")
def imported(
    tmp_path_factory: pytest.TempPathFactory,
    guest_disk_points: tuple[GuestDiskPoint, GuestDiskPoint],
) -> ImportedPoints:
    store = tmp_path_factory.mktemp("guest-diff-store") / "store"
    return import_fixture_points(store, guest_disk_points)


def expected_changes(old: Path, new: Path, case: GuestFs) -> set[tuple[str, str]]:
    """What `diff --json` must name for `case` between two source trees, and nothing else."""
    before, after = expected_tree(old, case), expected_tree(new, case)
    found: set[tuple[str, str]] = set()
    for rel in before.keys() | after.keys():
        a, b = before.get(rel), after.get(rel)
        shown = f"{case.folder}/{rel}".rstrip("/")
        if a is None or b is None or a.kind != b.kind:
            found |= {("-", shown)} if a else set()
            found |= {("+", shown)} if b else set()
        elif (a.data, a.target) != (b.data, b.target) or (case.modes and a.mode != b.mode):
            found.add(("M", shown))
    return found


def diff_set(store: Path, old: str, new: str, *path: str) -> set[tuple[str, str]]:
    done = lbrestore(store, "diff", old, new, *path, "--json")
    assert done.returncode == 0, done.stderr
    return {(change["change"], change["path"]) for change in json.loads(done.stdout)}


def test_diff_names_exactly_the_fixture_change_set(imported: ImportedPoints) -> None:
    (id1, point1), (id2, point2) = imported.points
    got = diff_set(imported.store, f"vm1@#{id1}", f"vm1@#{id2}")
    want: set[tuple[str, str]] = set()
    for case in point1.filesystems:
        want |= expected_changes(point1.source, point2.source, case)
    assert got == want
    etc = diff_set(imported.store, f"vm1@#{id1}", f"vm1@#{id2}", "vda-part1/etc")
    assert etc == {c for c in want if c[1].startswith("vda-part1/etc/")}
    assert diff_set(imported.store, f"vm1@#{id2}", f"vm1@#{id2}") == set()
    backwards = diff_set(imported.store, f"vm1@#{id2}", f"vm1@#{id1}")
    assert backwards == {({"+": "-", "-": "+"}.get(sign, sign), path) for sign, path in want}


def change_set_trees(tmp_path: Path) -> tuple[Path, Path]:
    """Two trees with one change of every kind between them, and files left alone."""
    old, new = tmp_path / "old", tmp_path / "new"
    for root in (old, new):
        for sub in ("same", "gone/deeper", "kind", "many"):
            (root / sub).mkdir(parents=True)
        (root / "same/untouched.txt").write_text("untouched\n")
        for index in range(UNTOUCHED):
            (root / f"many/f{index:02}.txt").write_text(f"file {index}\n" * (index + 1))
    (old / "gone/deeper/file.txt").write_text("deeper\n")
    (old / "same/size.txt").write_text("short\n")
    (new / "same/size.txt").write_text("longer than before\n")
    (old / "same/bytes.txt").write_text("AAAA\n")
    (new / "same/bytes.txt").write_text("AAAB\n")  # same size, other bytes
    (old / "racy.txt").write_text("RRRR\n")
    (new / "racy.txt").write_text("RRRS\n")  # rewritten in place within the point's tick
    for root in (old, new):
        (root / "same/mode.sh").write_text("#!/bin/sh\n")
        (root / "same/mode.sh").chmod(0o644)
    (new / "same/mode.sh").chmod(0o755)
    (old / "kind/was-file").write_text("file\n")
    (new / "kind/was-file").mkdir()
    (new / "kind/was-file/now.txt").write_text("in a folder\n")
    os.symlink("same/untouched.txt", old / "link")
    os.symlink("same/size.txt", new / "link")
    (new / "added/nested").mkdir(parents=True)
    (new / "added/nested/new.txt").write_text("new\n")
    shutil.rmtree(new / "gone")
    for path in [old, new, *old.rglob("*"), *new.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    return old, new


def ext4_points(tmp_path: Path, old: Path, new: Path) -> list[Path]:
    """`old` as mkfs.ext4 -d makes it, then changed in place into `new` as a guest's kernel would:
    new inodes and metadata changes get a ctime after the first point's instant; racy.txt, the
    newest inode of the first point, is rewritten in its block with its inode untouched (a
    second write in the same clock tick: the token cannot tell)."""
    first, second = tmp_path / "first.img", tmp_path / "second.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", old, first, "16M"], check=True)
    debugfs(first, f"sif /racy.txt ctime {LATER}", f"sif /racy.txt mtime {LATER}")
    shutil.copyfile(first, second)
    debugfs(
        second,
        "cd /same",
        "rm size.txt",
        f"write {new}/same/size.txt size.txt",
        "rm bytes.txt",
        f"write {new}/same/bytes.txt bytes.txt",
        "sif mode.sh mode 0100755",
        "cd /",
        "rm link",
        "symlink link same/size.txt",
        "rm kind/was-file",
        "mkdir kind/was-file",
        "cd /kind/was-file",
        f"write {new}/kind/was-file/now.txt now.txt",
        "cd /",
        "rm gone/deeper/file.txt",
        "rmdir gone/deeper",
        "rmdir gone",
        "mkdir added",
        "mkdir added/nested",
        "cd /added/nested",
        f"write {new}/added/nested/new.txt new.txt",
        *(f"sif /{p} ctime {AFTER}" for p in ("same/size.txt", "same/bytes.txt", "same/mode.sh")),
        f"sif /link ctime {AFTER}",
    )
    block_size = 1024 << struct.unpack_from("<I", second.read_bytes(), 1024 + 24)[0]
    blocks = subprocess.run(
        ["debugfs", "-R", "blocks /racy.txt", str(second)], capture_output=True, text=True
    ).stdout.split()
    with second.open("r+b") as disk:
        disk.seek(int(blocks[0]) * block_size)
        disk.write((new / "racy.txt").read_bytes())
    return [first, second]


def fat_points(tmp_path: Path, old: Path, new: Path) -> list[Path]:
    """Each tree (without its symlink) on a FAT image of its own."""
    images = []
    for tree in (old, new):
        image = tmp_path / f"{tree.name}.img"
        subprocess.run(["mkfs.fat", "-C", image, str(8 * 1024)], check=True, capture_output=True)
        copy = tmp_path / f"{tree.name}-nolinks"
        shutil.copytree(tree, copy, symlinks=True)
        (copy / "link").unlink()
        env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
        items = [str(p) for p in copy.iterdir()]
        subprocess.run(["mcopy", "-s", "-i", image, *items, "::/"], check=True, env=env)
        images.append(image)
    return images


KNOWN_SET = {
    ("M", "same/size.txt"),
    ("M", "same/bytes.txt"),
    ("M", "racy.txt"),
    ("M", "same/mode.sh"),
    ("M", "link"),
    ("-", "kind/was-file"),
    ("+", "kind/was-file"),
    ("+", "kind/was-file/now.txt"),
    ("-", "gone"),
    ("-", "gone/deeper"),
    ("-", "gone/deeper/file.txt"),
    ("+", "added"),
    ("+", "added/nested"),
    ("+", "added/nested/new.txt"),
}


@pytest.mark.parametrize("fs_type", ["ext4", "fat"])
def test_diff_names_a_known_change_set_and_nothing_else(
    imported: ImportedPoints, tmp_path: Path, fs_type: str
) -> None:
    old, new = change_set_trees(tmp_path)
    images = (ext4_points if fs_type == "ext4" else fat_points)(tmp_path, old, new)
    vm = f"changes-{fs_type}"
    first = import_point(imported.store, vm, {"vda": images[0]}, 1)
    second = import_point(imported.store, vm, {"vda": images[1]}, 2)
    got = diff_set(imported.store, f"{vm}@#{first}", f"{vm}@#{second}")
    want = {(sign, f"vda/{path}") for sign, path in KNOWN_SET}
    if fs_type == "fat":  # no symlinks, no modes
        want -= {("M", "vda/link"), ("M", "vda/same/mode.sh")}
    assert got == want
    case = GuestFs("vda", fs_type, fs_type == "ext4", fs_type == "ext4", False, False)
    assert got == expected_changes(old, new, case)  # the same, from the trees themselves
    human = lbrestore(imported.store, "diff", f"{vm}@#{first}", f"{vm}@#{second}").stdout
    lines = human.splitlines()
    assert "+ vda/added/" in lines and "M vda/same/bytes.txt" in lines
    assert lines.index("- vda/kind/was-file") + 1 == lines.index("+ vda/kind/was-file/")
    assert lines == sorted(lines, key=lambda line: line[2:].rstrip("/").split("/"))
    below = diff_set(imported.store, f"{vm}@#{first}", f"{vm}@#{second}", "vda/same")
    assert below == {c for c in want if c[1].startswith("vda/same/")}


def test_diff_reads_only_what_metadata_cannot_prove_equal(
    imported: ImportedPoints, tmp_path: Path
) -> None:
    """ext4 changed in place: untouched files are skipped by their change tokens, unread; the
    first point's newest inode (racy.txt) is compared byte for byte, and so is found changed."""
    old, new = change_set_trees(tmp_path)
    images = ext4_points(tmp_path, old, new)
    first = import_point(imported.store, "tokens", {"vda": images[0]}, 1)
    second = import_point(imported.store, "tokens", {"vda": images[1]}, 2)
    with Store.open(imported.store) as store, ExitStack() as stack:
        before = open_point_files(store, store.resolve(f"tokens@#{first}"), stack).get("vda")
        after = open_point_files(store, store.resolve(f"tokens@#{second}"), stack).get("vda")
        stats = DiffStats()
        changes = diff_paths(before, after, "", "vda", stats)
    assert ("M", "vda/racy.txt") in {(c.sign, c.path) for c in changes}
    assert next(c for c in changes if c.path == "vda/racy.txt").what == ("content",)
    assert next(c for c in changes if c.path == "vda/same/mode.sh").what == ("mode",)
    assert stats.skipped_by_token >= UNTOUCHED + 1  # many/*, same/untouched.txt
    assert stats.racy == 1
    assert stats.files_read == 3  # racy.txt, same/bytes.txt, same/mode.sh: nothing else
