"""A private store (issue 8 item 4): folders 0700, files 0600, whatever the umask.

Reproduces the "Why" cases: under umask 022 the store was 0755 with 0444 qcow2 files and a 0644
index (any local user restored another VM's disk); under umask 000 the folders were 0777 and
`lock` 0666 (another user moved a backup file away and held `flock` on `lock`). As root, the
other user is `nobody`, refused by the kernel.
"""

from __future__ import annotations

import fcntl
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
from safety_helpers import (
    NOBODY,
    as_nobody,
    assert_one_line,
    cli,
    modes,
    needs_root,
    run,
    shared_folder,
)

from lbstore.store import Store

MIB = 1 << 20
UMASKS = [0o022, 0o000]


def image(path: Path, seed: int, size: int = MIB) -> Path:
    path.write_bytes(blake3.blake3(str(seed).encode()).digest(length=size))
    return path


def make_store(base: Path, umask: int) -> Path:
    """A store with two points of vm1 (vda, vdb), made by the CLI under `umask`."""
    store = base / "store"
    images = base / "images"
    images.mkdir(exist_ok=True)
    assert cli(store, "init", umask=umask).returncode == 0
    for seed in (1, 2):
        disks = [f"--disk=vda={image(images / f'a{seed}.raw', seed)}"]
        disks.append(f"--disk=vdb={image(images / f'b{seed}.raw', seed + 10)}")
        done = cli(store, "import", "vm1", *disks, umask=umask)
        assert done.returncode == 0, done.stderr
    return store


def assert_private(store: Path) -> None:
    for name, mode in modes(store).items():
        path = store / name
        if path.is_dir():
            assert mode == 0o700, f"{name}: {mode:o}"
        elif name.endswith((".qcow2", ".point")):  # committed files and their sidecars
            assert mode in (0o400, 0o600), f"{name}: {mode:o}"
        else:
            assert mode == 0o600, f"{name}: {mode:o}"


@pytest.mark.parametrize("umask", UMASKS, ids=["umask022", "umask000"])
def test_store_and_restore_are_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    store = make_store(tmp_path, umask)
    out = tmp_path / "out"
    restored = cli(store, "restore", "vm1@latest", "--to", str(out), umask=umask)
    assert restored.returncode == 0, restored.stderr
    assert cli(store, "verify", umask=umask).returncode == 0
    found = modes(store)
    assert {"index.sqlite", "lock", "data", "tmp", "data/vm1/vda/1.qcow2"} <= found.keys()
    assert_private(store)
    assert modes(out) == {".": 0o700, "vda.qcow2": 0o600, "vdb.qcow2": 0o600, "start-vm1.sh": 0o700}

    # The index's -wal and -shm files (they exist while a connection is open) take its mode.
    old = os.umask(umask)
    try:
        with Store.open(store, write=True) as opened:
            opened.record_event(None, "test", "keep the WAL open")
            wal = store / "index.sqlite-wal"
            shm = store / "index.sqlite-shm"
            assert stat.S_IMODE(wal.stat().st_mode) == 0o600
            assert stat.S_IMODE(shm.stat().st_mode) == 0o600
    finally:
        os.umask(old)


@pytest.fixture(params=UMASKS, ids=["umask022", "umask000"])
def shared_store(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A store under a folder every user can traverse (only the store's own modes protect it)."""
    with shared_folder() as base:
        yield make_store(base, request.param)


@needs_root
def test_another_user_is_refused(shared_store: Path) -> None:
    store = shared_store
    qcow2 = store / "data" / "vm1" / "vda" / "1.qcow2"
    assert qcow2.is_file()
    attempts = {
        "read a qcow2": "open(sys.argv[1], 'rb').read(1)",
        "read the index": "open(sys.argv[2], 'rb').read(1)",
        "list data/": "os.listdir(sys.argv[3])",
        "flock the lock": "fcntl.flock(os.open(sys.argv[4], os.O_RDONLY), fcntl.LOCK_EX)",
        "move a backup away": "os.rename(sys.argv[1], '/tmp/lbrestore-stolen.qcow2')",
    }
    paths = [str(qcow2), str(store / "index.sqlite"), str(store / "data"), str(store / "lock")]
    for what, code in attempts.items():
        script = (
            f"import fcntl, os, sys\ntry:\n    {code}\nexcept PermissionError:\n    sys.exit(13)\n"
        )
        done = as_nobody(script, *paths)
        assert done.returncode == 13, f"{what}: {done.returncode} {done.stderr}"
    assert qcow2.is_file() and not Path("/tmp/lbrestore-stolen.qcow2").exists()

    # The lock is still ours to take (nobody could not hold it).
    fd = os.open(store / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)

    # Through the CLI: one line, exit 1, nothing shown of the store.
    out = store.parent / "restored"
    for args in (["list"], ["info", "vm1@latest"], ["restore", "vm1@latest", "--to", str(out)]):
        result = run([*cli_argv(store), *args], user=NOBODY)
        assert_one_line(result, 1, "ermission denied")
    assert not out.exists()


def cli_argv(store: Path) -> list[str]:
    return [sys.executable, "-m", "lbrestore", "--store", str(store)]


@needs_root
def test_store_under_root_only_folder_is_one_line_for_a_normal_user(tmp_path: Path) -> None:
    """`--store /root/x list` as a normal user: one line, exit 1 (was a PermissionError)."""
    secret = tmp_path / "private"
    secret.mkdir(mode=0o700)
    Store.init(secret / "x")
    for command in (["list"], ["init"], ["info", "vm1@latest"], ["verify"]):
        result = run([*cli_argv(secret / "x"), *command], user=NOBODY)
        assert_one_line(result, 1, "ermission denied")


def test_opening_for_write_tightens_an_old_store(tmp_path: Path) -> None:
    store = make_store(tmp_path, 0o022)
    for name in modes(store):  # what an older version under umask 000 left behind
        path = store / name
        path.chmod(0o777 if path.is_dir() else 0o666 if name != "data/vm1/vda/1.qcow2" else 0o444)
    read = cli(store, "list")
    assert read.returncode == 0 and modes(store)["."] == 0o777  # readers change nothing
    done = cli(store, "import", "vm1", f"--disk=vda={image(tmp_path / 'c.raw', 3)}", umask=0o000)
    assert done.returncode == 0, done.stderr
    assert_private(store)
    assert modes(store)["data/vm1/vda/1.qcow2"] == 0o400  # owner bits kept, never added
    with Store.open(store) as opened:
        assert [e["kind"] for e in opened.events(kind="private")] == ["private"]


def test_a_symlink_planted_as_lock_file_is_not_followed(tmp_path: Path) -> None:
    store = make_store(tmp_path, 0o022)
    outside = tmp_path / "victim"
    outside.write_text("untouched")
    outside.chmod(0o644)
    (store / "lock").unlink()
    (store / "lock").symlink_to(outside)
    result = cli(store, "import", "vm1", f"--disk=vda={image(tmp_path / 'c.raw', 3)}")
    assert_one_line(result, 1, "symbolic link")
    assert outside.read_text() == "untouched" and stat.S_IMODE(outside.stat().st_mode) == 0o644


@needs_root
def test_a_mount_is_readable_by_its_owner_only(shared_store: Path) -> None:
    mountpoint = shared_store.parent / "mnt"
    mountpoint.mkdir(mode=0o755)
    runtime = shared_store.parent / "runtime"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    mounted = cli(shared_store, "mount", "vm1@latest", str(mountpoint), env=env)
    assert mounted.returncode == 0, mounted.stderr
    try:
        assert (mountpoint / "vda.raw").stat().st_size == MIB  # the owner reads it
        with open(mountpoint / "vda.raw", "rb") as f:
            assert f.read(4096) == image_bytes(2)[:4096]
        script = (
            "import os, sys\n"
            "try:\n    open(sys.argv[1], 'rb').read(1)\nexcept PermissionError:\n    sys.exit(13)\n"
        )
        done = as_nobody(script, str(mountpoint / "vda.raw"))
        assert done.returncode == 13, done.stderr
        listing = as_nobody(
            "import os, sys\ntry:\n    os.listdir(sys.argv[1])\n"
            "except PermissionError:\n    sys.exit(13)\n",
            str(mountpoint),
        )
        assert listing.returncode == 13, listing.stderr
    finally:
        cli(shared_store, "umount", str(mountpoint), env=env)
        if os.path.ismount(mountpoint):
            run(["fusermount3", "-u", "-z", str(mountpoint)])


def image_bytes(seed: int, size: int = MIB) -> bytes:
    return blake3.blake3(str(seed).encode()).digest(length=size)


def test_lock_file_of_a_fresh_store_is_private_under_umask_000(tmp_path: Path) -> None:
    store = tmp_path / "fresh"
    assert cli(store, "init", umask=0o000).returncode == 0
    assert modes(store) == {
        ".": 0o700,
        "data": 0o700,
        "tmp": 0o700,
        "lock": 0o600,
        "index.sqlite": 0o600,
    }
