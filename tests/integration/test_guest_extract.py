"""`lbrestore ls` and `extract` on real guest filesystems in a real store, through the CLI.

The fixture disks (tests/fixtures/guest_disks.py) are imported as two points of vm1; extracted
trees are compared with the source trees the filesystems were built from. A crafted ext4 (names
'..', '.', 'a/b', with NUL, duplicates, links out) and a damaged store file show that extraction
writes nothing outside its folder and never writes wrong bytes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from fixtures.guest_disks import GuestDiskPoint, GuestFs, expected_tree
from guest_cli import debugfs, everything_under, one_line_error, rename_dirent
from guest_store import ImportedPoints, import_fixture_points, import_point, lbrestore

MiB = 1 << 20


@pytest.fixture(scope="module")
def imported(
    tmp_path_factory: pytest.TempPathFactory,
    guest_disk_points: tuple[GuestDiskPoint, GuestDiskPoint],
) -> ImportedPoints:
    store = tmp_path_factory.mktemp("guest-extract-store") / "store"
    return import_fixture_points(store, guest_disk_points)


# --- extract -----------------------------------------------------------------------------------


def assert_tree_matches(root: Path, case: GuestFs, source: Path) -> None:
    """The extracted folder holds exactly the source tree as the filesystem can keep it."""
    expected = expected_tree(source, case)
    got = {"": root.lstat()}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            got[path.relative_to(root).as_posix()] = path.lstat()
    assert sorted(got) == sorted(expected), case.folder
    kinds = {"file": stat.S_ISREG, "folder": stat.S_ISDIR, "symlink": stat.S_ISLNK}
    for rel, want in expected.items():
        info, path = got[rel], root / rel
        assert kinds[want.kind](info.st_mode), (case.folder, rel)
        if want.kind == "file":
            assert path.read_bytes() == want.data, (case.folder, rel)
        if want.kind == "symlink":
            assert os.readlink(path) == want.target, (case.folder, rel)
        if case.modes and rel:
            assert stat.S_IMODE(info.st_mode) == want.mode, (case.folder, rel)  # setuid: root
        if case.owners and (source / rel).exists() and rel:
            src = (source / rel).lstat()
            assert (info.st_uid, info.st_gid) == (src.st_uid, src.st_gid), (case.folder, rel)
    if case.holes:
        sparse = got["sparse.img"]
        assert sparse.st_blocks * 512 < sparse.st_size // 2, case.folder  # holes stayed holes


def guest_times(store: Path, point_id: int, folder: str) -> dict[str, int]:
    done = lbrestore(store, "ls", f"vm1@#{point_id}", folder, "--json")
    assert done.returncode == 0, done.stderr
    return {entry["name"]: entry["mtime_ns"] for entry in json.loads(done.stdout)}


def test_extract_of_every_filesystem_matches_its_source_tree(
    imported: ImportedPoints, tmp_path: Path
) -> None:
    for point_id, point in imported.points:
        out = tmp_path / f"point{point_id}"
        folders = [case.folder for case in point.filesystems]
        done = lbrestore(imported.store, "extract", f"vm1@#{point_id}", *folders, "--to", out)
        assert done.returncode == 0, done.stderr
        assert f"into {out}" in done.stdout
        for case in point.filesystems:
            assert_tree_matches(out / case.folder, case, point.source)
            times = guest_times(imported.store, point_id, f"{case.folder}/etc")
            for name, mtime_ns in times.items():
                assert (out / case.folder / "etc" / name).lstat().st_mtime_ns == mtime_ns
        assert stat.S_IMODE(out.stat().st_mode) == 0o700  # created private


def test_extract_single_files_and_symlinks(imported: ImportedPoints, tmp_path: Path) -> None:
    point_id, point = imported.points[1]
    out = tmp_path / "out"
    wanted = ["vda-part1/etc/hostname", "vda-part1/links/absolute", "vda-part1/bin/suid"]
    done = lbrestore(imported.store, "extract", f"vm1@#{point_id}", *wanted, "--to", out)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(out)) == ["absolute", "hostname", "suid"]
    assert (out / "hostname").read_bytes() == (point.source / "etc/hostname").read_bytes()
    assert os.readlink(out / "absolute") == "/etc/hostname"  # kept as stored, never followed
    assert stat.S_IMODE((out / "suid").stat().st_mode) == (0o4755 if os.geteuid() == 0 else 0o755)


def test_extract_refuses_to_replace_unless_forced_and_never_follows_a_planted_link(
    imported: ImportedPoints, tmp_path: Path
) -> None:
    point_id, point = imported.points[0]
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    os.symlink(elsewhere, out / "etc")  # planted where the guest's folder will go
    (out / "hostname").write_text("mine\n")
    spec = f"vm1@#{point_id}"
    done = lbrestore(imported.store, "extract", spec, "vda-part1/etc", "--to", out)
    assert done.returncode == 1
    assert "vda-part1/etc: exists in the target (use --force)" in done.stderr
    done = lbrestore(imported.store, "extract", spec, "vda-part1/etc/hostname", "--to", out)
    assert done.returncode == 1 and (out / "hostname").read_text() == "mine\n"
    done = lbrestore(
        imported.store, "extract", spec, "vda-part1/etc", "vda-part1/etc/hostname",
        "--to", out, "--force",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert os.listdir(elsewhere) == []  # nothing went through the planted link
    assert not (out / "etc").is_symlink() and (out / "etc/fstab").is_file()
    assert (out / "hostname").read_bytes() == (point.source / "etc/hostname").read_bytes()


def craft_ext4(tmp_path: Path, outside: Path) -> Path:
    """An ext4 image whose names and links try every way out of an extraction folder: entries
    named '..' (a folder holding a file) and '.', 'a/b' and 'n<NUL>l' (dirent bytes edited after
    mkfs), a symlink and a folder both named 'dupe', symlinks to an absolute path outside and
    up through '..', and a symlink whose name a later entry's path goes through."""
    tree = tmp_path / "crafted"
    (tree / "dupe").mkdir(parents=True)
    (tree / "dupe/inside.txt").write_text("inside\n")
    (tree / "dd").mkdir()
    (tree / "dd/escaped.txt").write_text("escaped?\n")
    (tree / "d").write_text("a file named '.'\n")
    (tree / "aQb").write_text("a name that becomes a/b\n")
    (tree / "nQl").write_text("a name with a NUL\n")
    (tree / "okay.txt").write_text("fine\n")
    os.symlink(f"../../../../../../{outside.name}/up", tree / "up")
    os.symlink(str(outside / "abs"), tree / "abs")
    os.symlink(str(outside), tree / "dupf")  # renamed below to "dupe", beside the folder
    image = tmp_path / "crafted.img"
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-O", "^metadata_csum,^dir_index", "-d", tree, image, "8M"],
        check=True,
    )
    for old, new in ((b"dd", b".."), (b"d", b"."), (b"aQb", b"a/b"), (b"nQl", b"n\0l")):
        rename_dirent(image, "/", old, new)
    rename_dirent(image, "/", b"dupf", b"dupe")
    debugfs(image, "ln /okay.txt /dupe/hardlink.txt")  # one inode under two names
    shutil.rmtree(tree)
    return image


def test_crafted_names_and_links_write_nothing_outside_the_folder(
    imported: ImportedPoints, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    image = craft_ext4(tmp_path, outside)
    store = imported.store
    point_id = import_point(store, "crafted", {"vda": image}, 3)
    listed = lbrestore(store, "ls", f"crafted@#{point_id}", "vda", "--json")
    names = {entry["name"] for entry in json.loads(listed.stdout)}
    assert names == {"lost+found", "abs", "dupe", "okay.txt", "up"}  # the rest is not usable
    work = tmp_path / "work"
    for force in ((), ("--force",)):
        before = everything_under(tmp_path, work)
        out = work / "out"
        done = lbrestore(store, "extract", f"crafted@#{point_id}", "vda", "--to", out, *force)
        assert done.returncode == 0, done.stderr
        assert everything_under(tmp_path, work) == before  # nothing written outside
        assert not outside.exists() and not (work / "escaped.txt").exists()
        assert sorted(p.name for p in work.iterdir()) == ["out"]
        assert (out / "vda/okay.txt").read_text() == "fine\n"
        assert not (out / "vda/a").exists() and not (out / "a").exists()
        assert os.readlink(out / "vda/abs") == str(outside / "abs")  # kept, never followed
        assert os.readlink(out / "vda/up").startswith("../../")
        dupe = out / "vda/dupe"
        assert dupe.is_symlink() or (dupe / "hardlink.txt").read_text() == "fine\n"
        for path in out.rglob("*"):  # every entry lies below the folder, none through a link
            assert path.is_symlink() or path.resolve().is_relative_to(out.resolve())
    # a planted link in the target where a guest folder goes: replaced, never followed
    planted = work / "planted"
    planted.mkdir()
    os.symlink(outside, planted / "dupe")
    before = everything_under(tmp_path, planted)
    wanted = ("vda/dupe", "vda/up")
    done = lbrestore(store, "extract", f"crafted@#{point_id}", *wanted, "--to", planted, "--force")
    assert done.returncode == 0, done.stderr
    assert everything_under(tmp_path, planted) == before and not outside.exists()


# --- ls ----------------------------------------------------------------------------------------


def test_ls_lists_filesystems_folders_and_files(imported: ImportedPoints) -> None:
    point_id, point = imported.points[1]
    spec = f"vm1@#{point_id}"
    listed = json.loads(lbrestore(imported.store, "ls", spec, "--json").stdout)
    assert {(fs["name"], fs["type"]) for fs in listed if "type" in fs} == {
        (case.folder, case.fs_type) for case in point.filesystems
    }
    assert {note["name"] for note in listed if "note" in note} == set(point.blank)
    human = lbrestore(imported.store, "ls", spec).stdout
    assert "vda-part1/  ext4" in human
    for case in point.filesystems:
        expected = expected_tree(point.source, case)
        done = lbrestore(imported.store, "ls", spec, f"{case.folder}/links", "--json")
        if not case.symlinks:
            assert done.returncode == 0 and json.loads(done.stdout) == []
            continue
        entries = {e["name"]: e for e in json.loads(done.stdout)}
        assert sorted(entries) == sorted(
            rel.split("/")[1] for rel in expected if rel.startswith("links/")
        )
        assert entries["relative"]["target"] == "../etc/fstab"
        assert entries["relative"]["path"] == f"{case.folder}/links/relative"
    one = lbrestore(imported.store, "ls", spec, "vda-part1/etc/hostname")
    assert one.returncode == 0 and one.stdout.count("\n") == 1 and "hostname" in one.stdout
    assert one.stdout.startswith("-rw-r--r--")
    assert re.search(r" \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ hostname$", one.stdout.strip())
    links = lbrestore(imported.store, "ls", spec, "vda-part1/links").stdout
    assert re.search(r"^lrwxrwxrwx .* relative -> \.\./etc/fstab$", links, re.M)


def test_bad_input_is_one_line_with_the_contract_exit_code(
    imported: ImportedPoints, tmp_path: Path
) -> None:
    store, spec = imported.store, f"vm1@#{imported.points[0][0]}"
    err = one_line_error(lbrestore(store, "ls", spec, "vda-part1/nope"), 1)
    assert "vda-part1/nope: no such file or folder" in err
    err = one_line_error(lbrestore(store, "ls", spec, "vdz-part9/etc"), 1)
    assert "vdz-part9: no such filesystem" in err and "vda-part1" in err
    one_line_error(lbrestore(store, "ls", spec, "vda-part1/../../etc"), 2)
    one_line_error(lbrestore(store, "ls", "vm1@nonsense"), 2)
    one_line_error(lbrestore(store, "extract", spec, "vda-part1/etc"), 2)  # no --to
    one_line_error(lbrestore(store, "extract", spec, "vda-part1/x", "--to", tmp_path / "o"), 1)
    assert not (tmp_path / "o").exists()  # nothing created for a PATH that is not there
    one_line_error(lbrestore(store, "extract", spec, "vda-part1/etc", "--to", store / "x"), 1)
    one_line_error(lbrestore(store, "diff", spec, spec, "vdz-part9"), 1)
    one_line_error(lbrestore(store, "diff", spec, "vm1@nonsense"), 2)
    one_line_error(lbrestore(store, "diff", spec, spec, "vda-part1/a/../b"), 2)
    one_line_error(
        lbrestore(store, "extract", "vm1@nonsense", "vda-part1", "--to", tmp_path / "o"), 2
    )
    one_line_error(lbrestore(store, "extract", spec, "", "--to", tmp_path / "o"), 2)
    assert not (tmp_path / "o").exists()
    one_line_error(lbrestore(store, "ls", "vm9@latest"), 1)


def test_a_damaged_file_is_named_and_not_written_the_rest_is_extracted(
    imported: ImportedPoints, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    shutil.copytree(imported.store, store, symlinks=True)
    point_id, point = imported.points[0]
    big = (point.source / "big.bin").read_bytes()
    pattern = big[MiB : MiB + 4096]  # inside big.bin on every filesystem of vda
    damaged = 0
    for stored in (store / "data/vm1/vda").glob("*.qcow2"):
        data = bytearray(stored.read_bytes())
        at = data.find(pattern)
        while at >= 0:
            data[at + 100] ^= 0xFF
            damaged += 1
            at = data.find(pattern, at + 1)
        stored.chmod(0o600)
        stored.write_bytes(data)
    assert damaged
    out = tmp_path / "out"
    wanted = ["vda-part1/big.bin", "vda-part1/etc"]
    done = lbrestore(store, "extract", f"vm1@#{point_id}", *wanted, "--to", out)
    assert done.returncode == 3, done.stderr
    assert "damaged, not extracted" in done.stderr and "Traceback" not in done.stderr
    assert not (out / "big.bin").exists()
    assert (out / "etc/fstab").read_bytes() == (point.source / "etc/fstab").read_bytes()
