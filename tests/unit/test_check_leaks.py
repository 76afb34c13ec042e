"""`check` finds leaked clusters in a committed file (lbstore.qcow2.consistency) and `--repair`
fixes them without changing a byte that any read returns; qemu-img check is the oracle."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from test_qcow2_consistency import leak_clusters

from lbstore.check import check_store, repair_store
from lbstore.store import Store

MIB = 1 << 20


def qemu_img(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", *map(str, args)], capture_output=True, text=True, check=False
    )


def test_leaks_are_found_then_repaired_and_reads_are_unchanged(tmp_path: Path) -> None:
    root = tmp_path / "store"
    Store.init(root)
    with Store.open(root, write=True) as store:
        with store.begin("vm1") as ingest:
            ingest.add_disk("vda", MIB, mode="full").write(0, bytes(range(256)) * 4096)
            point = ingest.commit()
        path = store.file_path(point, "vda")
    mode = path.stat().st_mode & 0o777
    os.chmod(path, 0o600)
    leak_clusters(path, 3)
    os.chmod(path, mode)
    before = tmp_path / "before.qcow2"
    shutil.copyfile(path, before)
    assert qemu_img("check", path).returncode == 3  # leaks only

    report = check_store(root)
    assert report.exit_code == 3
    (leak,) = report.problems
    assert (leak.kind, leak.points, leak.repairable) == ("leak", ["vm1@#1"], True)
    assert "3 leaked cluster(s)" in leak.message

    repaired = repair_store(root)
    assert repaired.ok, [p.line() for p in repaired.problems]
    assert repaired.repaired == ["repaired 3 leaked cluster(s) of data/vm1/vda/1.qcow2"]
    assert qemu_img("check", path).returncode == 0
    assert qemu_img("compare", "-f", "qcow2", "-F", "qcow2", path, before).returncode == 0
    assert path.stat().st_mode & 0o777 == mode  # read-only again
