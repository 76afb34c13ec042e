"""Restore's target side (issue 8 items 4, 5): never into the store, never a mix of two sets,
backing names checked before any file outside the store is opened, Ctrl-C cleans up.

Reproduces the "Why" cases: `restore --to STORE/data/vm1/1 --force` overwrote a committed file;
`restore --force` killed mid-way left vda.qcow2 from the new point and vdb.qcow2 and the start
script from the old one; a tampered header naming a file outside the store got it opened and
fstat'ed before the refusal; Ctrl-C printed a KeyboardInterrupt traceback from the forked child.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import select
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.tmpfs import mounted_tmpfs
from restore_store import KnownStore, build_store, compare
from safety_helpers import NOBODY, OpenWatch, assert_one_line, cli, needs_root, shared_folder

IN_CREATE = 0x100
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_DELETE = 0x200
IN_CLOSE_WRITE = 0x008
CHANGES = IN_CREATE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE | IN_CLOSE_WRITE


@pytest.fixture(scope="module")
def known(tmp_path_factory: pytest.TempPathFactory) -> KnownStore:
    return build_store(tmp_path_factory.mktemp("known"), points=3)


def tree(root: Path) -> dict[str, str]:
    """Every file below `root` with the SHA-256 of its bytes."""
    found = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = Path(folder, name)
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


# --- restore --to inside the store ---------------------------------------------------------------


def test_restore_into_the_store_is_refused_before_anything_is_written(
    known: KnownStore, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    shutil.copytree(known.path, store)
    before = tree(store)
    (tmp_path / "link").symlink_to(store / "data")
    targets = [
        store / "data" / "vm1" / "1",  # the case as reported
        store / "data" / "vm1" / "vda",  # a folder of committed files
        store,
        store / "tmp",
        tmp_path / "link" / "vm1" / "vdb",  # through a symbolic link
        tmp_path / "elsewhere" / ".." / "store" / "data",  # through ..
        tmp_path,  # a folder holding the store
    ]
    (tmp_path / "elsewhere").mkdir()
    runs = [(target, ["--force"]) for target in targets]
    runs += [(targets[0], []), (targets[1], ["--force", "--format", "raw"])]
    for target, extra in runs:
        result = cli(store, "restore", "vm1@#1", "--to", str(target), *extra)
        line = assert_one_line(result, 1, "store")
        assert "refused" in line, line
    assert tree(store) == before
    assert not (store / "data" / "vm1" / "1").exists()
    assert cli(store, "verify").returncode == 0


# --- backing names checked before any open -----------------------------------------------------


def tamper_backing(path: Path, backing: str) -> None:
    """Point `path`'s header at `backing` (qemu-img rebase -u: header only, data untouched)."""
    path.chmod(0o600)
    done = subprocess.run(
        ["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", backing, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    path.chmod(0o400)


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_a_tampered_backing_name_is_refused_without_opening_the_file_it_names(
    known: KnownStore, tmp_path: Path, relative: bool
) -> None:
    store = tmp_path / "store"
    shutil.copytree(known.path, store)
    secret_dir = tmp_path / "etc"
    secret_dir.mkdir()
    secret = secret_dir / "shadow"
    secret.write_bytes(b"root:$y$secret-hash:19000:0:99999:7:::\n" * 100)
    top = store / "data" / "vm1" / "vda" / f"{known.point_ids[-1]}.qcow2"
    name = os.path.relpath(secret, top.parent) if relative else str(secret)
    tamper_backing(top, name)
    watch = OpenWatch(secret, secret_dir)
    try:
        image = tmp_path / "new.raw"
        image.write_bytes(bytes(16 << 20))  # vda's size: the import compares with the chain
        for args in (
            ["restore", "vm1@latest", "--to", str(tmp_path / "out")],
            ["restore", "vm1@latest", "--to", str(tmp_path / "out"), "--format", "raw"],
            ["info", "vm1@latest"],
            ["import", "vm1", f"--disk=vda={image}"],  # would build on the tampered chain
        ):
            result = cli(store, *args)
            if args[0] == "info":  # info reports what it can and marks the chain
                assert result.returncode == 0 and "chain unreadable" in result.stdout
                continue
            if args[0] == "import":  # a broken chain carries no resync: the import starts a full
                assert "Traceback" not in result.stderr
                continue
            assert_one_line(result, 1, "refused without opening it")
        assert watch.events() == []  # neither the file nor its folder was opened
    finally:
        watch.close()
    assert not (tmp_path / "out").exists()


# --- restore --force: all or nothing -----------------------------------------------------------


class ChangeWatch:
    """inotify IN_CREATE/MOVED/DELETE/CLOSE_WRITE in a folder (and in stage folders appearing)."""

    def __init__(self, folder: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        self.add(folder)

    def add(self, folder: Path) -> None:
        self.libc.inotify_add_watch(self.fd, os.fsencode(folder), CHANGES)

    def wait(self, process: subprocess.Popen[str]) -> list[str] | None:
        """Names of the next batch of events; None once `process` ended."""
        while process.poll() is None:
            ready, _, _ = select.select([self.fd], [], [], 0.02)
            if not ready:
                continue
            data = os.read(self.fd, 65536)
            names, at = [], 0
            while at < len(data):
                _wd, _mask, _cookie, length = struct.unpack_from("iIII", data, at)
                names.append(data[at + 16 : at + 16 + length].rstrip(b"\0").decode())
                at += 16 + length
            return names
        return None

    def close(self) -> None:
        os.close(self.fd)


def restore_process(store: Path, point: int, out: Path, **popen: object) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "lbrestore", "--store", str(store)]
    argv += ["restore", f"vm1@#{point}", "--to", str(out), "--force"]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )  # type: ignore[call-overload]


def whole_set(known: KnownStore, out: Path, old: dict[str, str]) -> str:
    """ "old" when `out` holds exactly the old set, "new" when exactly the new point's set."""
    now = tree(out)
    if now == old:
        return "old"
    new_point = known.point_ids[-1]
    assert sorted(now) == ["start-vm1.sh", "vda.qcow2", "vdb.qcow2", "vm1.xml"], sorted(now)
    for disk in ("vda", "vdb"):
        same = compare(out / f"{disk}.qcow2", known.expected[(new_point, disk)])
        assert same.returncode == 0, f"{disk} is not from the new point: a mix"
    assert now["start-vm1.sh"] != old["start-vm1.sh"], "the start script is the old one: a mix"
    return "new"


def test_restore_force_killed_at_any_instant_leaves_the_old_or_the_new_set(
    known: KnownStore, tmp_path: Path
) -> None:
    out = tmp_path / "parent" / "vm"
    first = cli(known.path, "restore", f"vm1@#{known.point_ids[0]}", "--to", str(out))
    assert first.returncode == 0, first.stderr
    old = tree(out)
    seen: set[str] = set()
    kill_at = 1
    while True:
        watch = ChangeWatch(out.parent)
        watch.add(out)
        process = restore_process(known.path, known.point_ids[-1], out)
        events = 0
        killed = False
        while (names := watch.wait(process)) is not None:
            for name in names:
                if ".lbrestore-" in name and (out.parent / name).is_dir():
                    watch.add(out.parent / name)
            events += 1
            if events >= kill_at:
                process.kill()
                killed = True
                break
        process.communicate()
        watch.close()
        state = whole_set(known, out, old)
        seen.add(state)
        if not killed:
            assert process.returncode == 0 and state == "new"
            break
        if state == "new":  # back to the old set for the next instant
            shutil.rmtree(out)
            assert (
                cli(
                    known.path, "restore", f"vm1@#{known.point_ids[0]}", "--to", str(out)
                ).returncode
                == 0
            )
            old = tree(out)
        kill_at += 1
    assert seen == {"old", "new"} and kill_at > 3
    # Stages of killed restores are gone after the next one; nothing else is left beside.
    assert sorted(p.name for p in out.parent.iterdir()) == ["vm"]


def test_two_restores_into_one_folder_leave_one_whole_set(
    known: KnownStore, tmp_path: Path
) -> None:
    out = tmp_path / "vm"
    assert (
        cli(known.path, "restore", f"vm1@#{known.point_ids[0]}", "--to", str(out)).returncode == 0
    )
    (out / "notes.txt").write_text("mine")
    old = tree(out)
    del old["notes.txt"]
    for _ in range(3):
        both = [restore_process(known.path, known.point_ids[-1], out) for _ in range(2)]
        results = [(*p.communicate(), p.returncode) for p in both]
        for _stdout, stderr, code in results:
            assert code == 0, stderr
        assert (out / "notes.txt").read_text() == "mine"  # kept by every switch
        (out / "notes.txt").unlink()
        assert whole_set(known, out, old) == "new"
        (out / "notes.txt").write_text("mine")
    assert sorted(p.name for p in tmp_path.iterdir() if ".lbrestore-" in p.name) == []


def test_force_keeps_other_files_and_replaces_a_smaller_older_set(
    known: KnownStore, tmp_path: Path
) -> None:
    out = tmp_path / "vm"
    done = cli(known.path, "restore", "vm1@#1", "--to", str(out), "--disk", "vdb")
    assert done.returncode == 0, done.stderr
    (out / "keep.txt").write_text("mine")
    again = cli(known.path, "restore", "vm1@latest", "--to", str(out), "--force")
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "keep.txt", "start-vm1.sh", "vda.qcow2", "vdb.qcow2", "vm1.xml"
    ]  # fmt: skip
    assert compare(out / "vdb.qcow2", known.expected[(known.point_ids[-1], "vdb")]).returncode == 0
    assert (out / "keep.txt").read_text() == "mine"
    one = cli(known.path, "restore", "vm1@#1", "--to", str(out), "--force", "--disk", "vda")
    assert one.returncode == 0, one.stderr  # the old set goes whole: no old vdb beside new vda
    assert sorted(p.name for p in out.iterdir()) == [
        "keep.txt", "start-vm1.sh", "vda.qcow2", "vm1.xml"
    ]  # fmt: skip
    (out / "sub").mkdir()
    refused = cli(known.path, "restore", "vm1@latest", "--to", str(out), "--force")
    assert_one_line(refused, 1, "folder 'sub'")


# --- Ctrl-C ------------------------------------------------------------------------------------


def test_ctrl_c_during_restore_exits_130_with_one_line_and_cleans_up(
    known: KnownStore, tmp_path: Path
) -> None:
    interrupted_runs = 0
    for instant in (1, 2, 3):
        out = tmp_path / f"out{instant}"
        watch = ChangeWatch(tmp_path)
        process = restore_process(known.path, known.point_ids[-1], out, start_new_session=True)
        events = 0
        interrupted = False
        while (names := watch.wait(process)) is not None:
            for name in names:
                if ".lbrestore-" in name and (tmp_path / name).is_dir():
                    watch.add(tmp_path / name)
            events += 1
            if events >= instant:
                os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
                interrupted = True
                break
        _stdout, stderr = process.communicate()
        watch.close()
        if process.returncode == 0:
            continue  # finished before the signal arrived: nothing to check at this instant
        assert interrupted
        assert process.returncode == 130, stderr
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
        assert stderr == "lbrestore: interrupted\n", stderr  # one line, no blank one before it
        assert not out.exists()
        assert [p.name for p in tmp_path.iterdir() if ".lbrestore-" in p.name] == []
        interrupted_runs += 1
    assert interrupted_runs >= 1


@needs_root
def test_restore_into_an_empty_mount_point_writes_on_that_file_system(
    known: KnownStore, tmp_path: Path
) -> None:
    """A mount point cannot be renamed: the set is staged inside it (on its own file system,
    not the parent's) and moved into place; one holding files is refused with --force."""
    with mounted_tmpfs(tmp_path / "disk", "64m") as mountpoint:
        (mountpoint / "lost+found").mkdir()
        done = cli(known.path, "restore", "vm1@latest", "--to", str(mountpoint))
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in mountpoint.iterdir()) == [
            "lost+found", "start-vm1.sh", "vda.qcow2", "vdb.qcow2", "vm1.xml"
        ]  # fmt: skip
        point = known.point_ids[-1]
        assert compare(mountpoint / "vda.qcow2", known.expected[(point, "vda")]).returncode == 0
        assert (mountpoint / "vda.qcow2").stat().st_dev == mountpoint.stat().st_dev
        again = cli(known.path, "restore", "vm1@latest", "--to", str(mountpoint), "--force")
        assert_one_line(again, 1, "mount point")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["disk"]  # no stage beside it


def test_an_index_naming_a_file_outside_the_store_is_refused(
    known: KnownStore, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    shutil.copytree(known.path, store)
    secret = tmp_path / "shadow"
    secret.write_bytes(b"secret")
    with sqlite3.connect(store / "index.sqlite") as db:
        db.execute(
            "UPDATE point_disks SET file = ? WHERE point_id = ? AND disk = 'vdb'",
            ["vm1/vdb/../../../../shadow", known.point_ids[-1]],
        )
    watch = OpenWatch(secret)
    try:
        for args in (["restore", "vm1@latest", "--to", str(tmp_path / "out")], ["verify"]):
            assert_one_line(cli(store, *args), 1, "outside data/vm1/vdb/")
        assert watch.events() == []
    finally:
        watch.close()


@needs_root
def test_a_folder_in_a_parent_the_user_cannot_write_is_filled_in_place(tmp_path: Path) -> None:
    """A user restoring into their own empty folder under a parent they cannot write (no stage
    beside it possible): staged inside, moved in; with files in it, --force is refused."""
    with shared_folder() as base:
        image = base / "vda.raw"
        image.write_bytes(bytes(range(256)) * 4096)
        store = base / "store"
        target = base / "vm"
        target.mkdir()
        os.chown(target, NOBODY, NOBODY)
        store.mkdir()
        os.chown(store, NOBODY, NOBODY)
        store = store / "s"
        assert cli(store, "init", user=NOBODY).returncode == 0
        assert cli(store, "import", "vm1", f"--disk=vda={image}", user=NOBODY).returncode == 0
        done = cli(store, "restore", "vm1@latest", "--to", str(target), user=NOBODY)
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in target.iterdir()) == ["start-vm1.sh", "vda.qcow2"]
        assert compare(target / "vda.qcow2", image).returncode == 0
        again = cli(store, "restore", "vm1@latest", "--to", str(target), "--force", user=NOBODY)
        assert_one_line(again, 1, "cannot write")
        assert sorted(p.name for p in base.iterdir()) == ["store", "vda.raw", "vm"]
