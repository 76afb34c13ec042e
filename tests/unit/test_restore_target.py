"""Restore targets: NBD URI or folder, and the clean-up of stages left by killed restores."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lbrestore.errors import UsageError
from lbrestore.restore_target import StagedFolder, is_nbd_uri, remove_stale_stages


@pytest.mark.parametrize(
    "target",
    [
        "nbd://host/x",
        "nbd://host:10809/x",
        "nbd://[::1]:10809/x",
        "nbds://host/x",
        "nbd+unix:///x?socket=/run/nbd.sock",
        "nbds+unix:///?socket=/s",
    ],
)
def test_valid_nbd_uris(target: str) -> None:
    assert is_nbd_uri(target)


@pytest.mark.parametrize("target", ["out", "./nbd:x", "backup:2026", "/srv/vm", "a/nbd://x"])
def test_folders(target: str) -> None:
    assert not is_nbd_uri(target)


@pytest.mark.parametrize(
    "target",
    [
        "NBD://host/x",
        "Nbd://host/x",
        "nbd:/x",
        "nbd:x",
        "nbd://",
        "nbd:///x",
        "nbd://:10809/x",
        "nbd://host:0x1/x",
        "nbd://host:70000/x",
        "nbd+unix:///x",
        "nbd+unix://host/x?socket=/s",
        "http://host/x",
        "file:///tmp/x",
    ],
)
def test_url_like_but_not_nbd_is_a_usage_error(target: str) -> None:
    with pytest.raises(UsageError) as refused:
        is_nbd_uri(target)
    assert refused.value.exit_code == 2


def dead_pid() -> int:
    done = subprocess.run(["true"], check=True)
    assert done.returncode == 0
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_stale_stages_are_removed_only_when_dead_and_disposable(tmp_path: Path) -> None:
    dead = dead_pid()
    kept_file = tmp_path / "user.txt"
    kept_file.write_text("mine")
    stages = {
        "restore-output": (dead, ["vda.qcow2", "start-vm.sh", "vm.xml"]),
        "user-file": (dead, ["notes.txt"]),
        "alive": (os.getpid(), ["vda.qcow2"]),
    }
    for label, (pid, files) in stages.items():
        folder = tmp_path / f".vm.lbrestore-{pid}-{label.encode().hex()}"
        folder.mkdir()
        for name in files:
            (folder / name).write_text(label)
    linked = tmp_path / f".vm.lbrestore-{dead}-abc123"
    linked.mkdir()
    os.link(kept_file, linked / "user.txt")  # a carried-over hard link: safe to drop
    aside = tmp_path / f".vm.lbrestore-{dead}-abc123-old"
    aside.mkdir()
    (aside / "vda.qcow2").write_text("the only old set")
    remove_stale_stages(tmp_path, "vm")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert f".vm.lbrestore-{dead}-{b'restore-output'.hex()}" not in left
    assert f".vm.lbrestore-{dead}-{b'user-file'.hex()}" in left
    assert f".vm.lbrestore-{os.getpid()}-{b'alive'.hex()}" in left
    assert linked.name not in left and kept_file.read_text() == "mine"
    assert aside.name in left


def test_an_aborted_stage_leaves_nothing_and_a_commit_replaces_whole(tmp_path: Path) -> None:
    target = tmp_path / "vm"
    target.mkdir(mode=0o750)
    (target / "vda.qcow2").write_text("old")
    (target / "vdb.qcow2").write_text("old")
    (target / "keep.txt").write_text("mine")
    aborted = StagedFolder(target)
    aborted.create()
    (aborted.path / "vda.qcow2").write_text("new")
    aborted.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm"]
    stage = StagedFolder(target)
    stage.create()
    (stage.path / "vda.qcow2").write_text("new")
    stage.commit({"vda.qcow2"}, force=True)
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt", "vda.qcow2"]
    assert (target / "vda.qcow2").read_text() == "new"
    assert (target / "keep.txt").read_text() == "mine"
    assert target.stat().st_mode & 0o777 == 0o750  # the folder's own mode is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm"]
