"""`lbrestore ls`, `extract` and `diff` on real guest filesystems in a real store, through the CLI.

The fixture disks (tests/fixtures/guest_disks.py) are imported as two points of vm1; each test
compares what the commands give with the source trees the filesystems were built from. Crafted
filesystems (names holding '/', symlinks out of the target, duplicate names) and a damaged store
file show that extraction writes nothing outside its folder and never writes wrong bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from contextlib import ExitStack
from pathlib import Path

import pytest
from fixtures.guest_disks import GuestDiskPoint, GuestFs, expected_tree
from guest_store import ImportedPoints, import_fixture_points, import_point, lbrestore

from lbguest.diff import DiffStats, diff_paths
from lbrestore.guestfiles import open_point_files
from lbstore.store import Store

MiB = 1 << 20


@pytest.fixture(scope="module")
def imported(
    tmp_path_factory: pytest.TempPathFactory,
    guest_disk_points: tuple[GuestDiskPoint, GuestDiskPoint],
) -> ImportedPoints:
    store = tmp_path_factory.mktemp("guest-cmd-store") / "store"
    return import_fixture_points(store, guest_disk_points)


def one_line_error(done: subprocess.CompletedProcess[str], code: int) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    return done.stderr


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
    """An ext4 image whose names and links try every way out of an extraction folder."""
    tree = tmp_path / "crafted"
    (tree / "dupe").mkdir(parents=True)
    (tree / "dupe/inside.txt").write_text("inside\n")
    (tree / "aQb").write_text("a name that becomes a/b\n")
    (tree / "okay.txt").write_text("fine\n")
    os.symlink(f"../../../../../../{outside.name}/up", tree / "up")
    os.symlink(str(outside / "abs"), tree / "abs")
    os.symlink(str(outside), tree / "dupf")  # renamed below to "dupe", beside the folder
    image = tmp_path / "crafted.img"
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-O", "^metadata_csum,^dir_index", "-d", tree, image, "8M"],
        check=True,
    )
    data = image.read_bytes()
    for old, new in ((b"aQb", b"a/b"), (b"dupf", b"dupe")):
        assert data.count(old) == 1, old
        data = data.replace(old, new)
    image.write_bytes(data)
    disk = tmp_path / "crafted-disk.raw"
    disk.write_bytes(data)
    return disk


def test_crafted_names_and_links_write_nothing_outside_the_folder(
    imported: ImportedPoints, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    disk = craft_ext4(tmp_path, outside)
    store = imported.store
    point_id = import_point(store, "crafted", {"vda": disk}, 3)
    before = sorted(p.name for p in tmp_path.iterdir())
    for force in ((), ("--force",)):
        out = tmp_path / "work" / "out"
        done = lbrestore(store, "extract", f"crafted@#{point_id}", "vda", "--to", out, *force)
        assert done.returncode == 0, done.stderr  # lbguest does not list unusable names
        assert not outside.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted({*before, "work"})
        assert (out / "vda/okay.txt").read_text() == "fine\n"
        assert not (out / "vda/a").exists() and not (out / "a").exists()
        assert os.readlink(out / "vda/abs") == str(outside / "abs")
        assert os.readlink(out / "vda/up").startswith("../../")
        for path in out.rglob("*"):  # every entry lies below the folder, none through a link
            assert path.is_symlink() or path.resolve().is_relative_to(out.resolve())


# --- ls ----------------------------------------------------------------------------------------


def test_ls_lists_filesystems_folders_and_files(imported: ImportedPoints) -> None:
    point_id, point = imported.points[1]
    spec = f"vm1@#{point_id}"
    listed = json.loads(lbrestore(imported.store, "ls", spec, "--json").stdout)
    assert {(fs["name"], fs["type"]) for fs in listed["filesystems"]} == {
        (case.folder, case.fs_type) for case in point.filesystems
    }
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


# --- diff --------------------------------------------------------------------------------------


def expected_changes(old: Path, new: Path, case: GuestFs) -> set[tuple[str, str]]:
    """What `diff --json` must name for `case` between two source trees, and nothing else."""
    before, after = expected_tree(old, case), expected_tree(new, case)
    found: set[tuple[str, str]] = set()
    for rel in before.keys() | after.keys():
        a, b = before.get(rel), after.get(rel)
        shown = f"{case.folder}/{rel}"
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


def change_set_trees(tmp_path: Path) -> tuple[Path, Path]:
    """Two trees with one change of every kind between them."""
    old, new = tmp_path / "old", tmp_path / "new"
    for root in (old, new):
        for sub in ("same", "gone/deeper", "kind"):
            (root / sub).mkdir(parents=True)
        (root / "same/untouched.txt").write_text("untouched\n")
    (old / "gone/deeper/file.txt").write_text("deeper\n")
    (old / "same/size.txt").write_text("short\n")
    (new / "same/size.txt").write_text("longer than before\n")
    (old / "same/bytes.txt").write_text("AAAA\n")
    (new / "same/bytes.txt").write_text("AAAB\n")  # same size, other bytes
    (old / "same/mode.sh").write_text("#!/bin/sh\n")
    (new / "same/mode.sh").write_text("#!/bin/sh\n")
    (new / "same/mode.sh").chmod(0o755)
    (old / "kind/was-file").write_text("file\n")
    (new / "kind/was-file").mkdir()
    (new / "kind/was-file/now.txt").write_text("in a folder\n")
    os.symlink("same/untouched.txt", old / "link")
    os.symlink("same/size.txt", new / "link")
    (new / "added/nested").mkdir(parents=True)
    (new / "added/nested/new.txt").write_text("new\n")
    shutil.rmtree(new / "gone")
    return old, new


@pytest.mark.parametrize("fs_type", ["ext4", "fat"])
def test_diff_names_a_known_change_set_and_nothing_else(
    imported: ImportedPoints, tmp_path: Path, fs_type: str
) -> None:
    old, new = change_set_trees(tmp_path)
    disks = []
    for tree in (old, new):
        image = tmp_path / f"{tree.name}.img"
        if fs_type == "ext4":
            subprocess.run(["mkfs.ext4", "-q", "-F", "-d", tree, image, "8M"], check=True)
        else:
            subprocess.run(
                ["mkfs.fat", "-C", image, str(8 * 1024)], check=True, capture_output=True
            )
            copy = tmp_path / f"{tree.name}-nolinks"
            shutil.copytree(tree, copy, symlinks=True)
            (copy / "link").unlink()
            env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
            items = [str(p) for p in copy.iterdir()]
            subprocess.run(["mcopy", "-s", "-i", image, *items, "::/"], check=True, env=env)
        disks.append(image)
    vm = f"changes-{fs_type}"
    first = import_point(imported.store, vm, {"vda": disks[0]}, 1)
    second = import_point(imported.store, vm, {"vda": disks[1]}, 2)
    got = diff_set(imported.store, f"{vm}@#{first}", f"{vm}@#{second}")
    case = GuestFs("vda", fs_type, fs_type == "ext4", fs_type == "ext4", False, False)
    want = expected_changes(old, new, case)
    if fs_type == "fat":
        want = {c for c in want if not c[1].endswith("link")}
    assert got == want
    assert ("M", "vda/same/bytes.txt") in got and ("-", "vda/gone/deeper/file.txt") in got
    assert ("-", "vda/kind/was-file") in got and ("+", "vda/kind/was-file/now.txt") in got
    if fs_type == "ext4":
        assert ("M", "vda/same/mode.sh") in got and ("M", "vda/link") in got
    human = lbrestore(imported.store, "diff", f"{vm}@#{first}", f"{vm}@#{second}").stdout
    assert "+ vda/added/\n" in human and "M vda/same/bytes.txt\n" in human


def test_diff_reads_nothing_that_metadata_proves_equal(imported: ImportedPoints) -> None:
    """ext4 changed in place: unchanged entries are skipped by their raw inode bytes, unparsed
    and unread; only the changed ones are parsed, and no file's bytes are compared."""
    (id1, point1), (id2, point2) = imported.points
    with Store.open(imported.store) as store, ExitStack() as stack:
        old = open_point_files(store, store.resolve(f"vm1@#{id1}"), stack).get("vda-part1")
        new = open_point_files(store, store.resolve(f"vm1@#{id2}"), stack).get("vda-part1")
        stats = DiffStats()
        changes = {c.path for c in diff_paths(old, new, "", "vda-part1", stats)}
    case = next(c for c in point1.filesystems if c.folder == "vda-part1")
    assert changes == {path for _sign, path in expected_changes(point1.source, point2.source, case)}
    assert stats.files_read == 0 and stats.compared_bytes == 0
    unchanged = len(expected_tree(point1.source, case)) - len(changes)
    assert stats.skipped_by_token >= unchanged // 2
