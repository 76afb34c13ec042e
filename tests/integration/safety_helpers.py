"""Helpers of the safety tests: the CLI under a umask or as another user, inotify, one-line checks.

As root, "another local user" is `nobody` (uid 65534): subprocess switches to it before exec, so
what it is refused is what the kernel refuses, not what the test code believes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

NOBODY = 65534
IN_ACCESS = 0x001
IN_OPEN = 0x020
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def cli(
    store: Path,
    *args: str,
    umask: int | None = None,
    user: int | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`lbrestore --store STORE ARGS`, optionally under `umask` and/or as uid `user`."""
    return run([sys.executable, "-m", "lbrestore", "--store", str(store), *args], umask, user, env)


def run(
    argv: list[str],
    umask: int | None = None,
    user: int | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` (as uid/gid `user` with no supplementary groups, under `umask`)."""
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    ids = {"user": user, "group": user, "extra_groups": []} if user is not None else {}
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=preexec,
        env=env,
        cwd="/",
        **ids,  # type: ignore[arg-type]
    )


def as_nobody(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run Python `code` (argv[1:] = `args`) as nobody."""
    return run([sys.executable, "-c", code, *args], user=NOBODY)


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, text: str = "") -> str:
    """The command failed with `code` and exactly one stderr line (containing `text`)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.returncode == code, (result.returncode, result.stderr)
    assert text in lines[0], lines[0]
    return lines[0]


@contextlib.contextmanager
def shared_folder() -> Iterator[Path]:
    """A fresh folder that every user may traverse (pytest's tmp_path lies under a 0700 folder
    of root's, which alone would keep other users out and prove nothing)."""
    path = Path(tempfile.mkdtemp(prefix="lbrestore-safety-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class OpenWatch:
    """inotify on files: did anything open or read them? (ctypes: no inotify-tools needed)."""

    def __init__(self, *paths: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        for path in paths:
            wd = self.libc.inotify_add_watch(self.fd, os.fsencode(path), IN_OPEN | IN_ACCESS)
            assert wd >= 0, os.strerror(ctypes.get_errno())

    def events(self) -> list[int]:
        """The masks of the events so far."""
        masks = []
        with contextlib.suppress(BlockingIOError):
            data = os.read(self.fd, 65536)
            at = 0
            while at < len(data):
                _wd, mask, _cookie, length = struct.unpack_from("iIII", data, at)
                masks.append(mask)
                at += 16 + length
        return masks

    def close(self) -> None:
        os.close(self.fd)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of `root` and of everything below it, by relative path ("." for root)."""
    found = {".": root.stat().st_mode & 0o7777}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            found[str(path.relative_to(root))] = path.lstat().st_mode & 0o7777
    return found
