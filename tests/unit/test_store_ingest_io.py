"""How the ingest writes a restore point's files: long runs bypass the page cache (O_DIRECT),
and each file is flushed once (it reaches data/ only by a rename after that flush)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from lbstore.importer import import_images
from lbstore.store import Store

MIB = 1 << 20


def _target(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def test_import_writes_data_direct_and_flushes_each_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(12 * MIB))
    Store.init(tmp_path / "store")
    direct_bytes = 0
    flushed: list[str] = []
    real_pwritev, real_fsync = os.pwritev, os.fsync

    def pwritev(fd: int, buffers: list[bytes], offset: int) -> int:
        nonlocal direct_bytes
        done = real_pwritev(fd, buffers, offset)
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT and _target(fd).endswith(".qcow2"):
            direct_bytes += done
        return done

    def fsync(fd: int) -> None:
        flushed.append(_target(fd))
        real_fsync(fd)

    with Store.open(tmp_path / "store", write=True) as store:
        monkeypatch.setattr(os, "pwritev", pwritev)
        monkeypatch.setattr(os, "fsync", fsync)
        point = import_images(store, "vm1", {"vda": raw})
        monkeypatch.undo()
        with store.view(point, "vda") as view:
            assert view.read(0, view.virtual_size) == raw.read_bytes()
    assert direct_bytes == 12 * MIB
    assert len([path for path in flushed if path.endswith(".qcow2")]) == 1
