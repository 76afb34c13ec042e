"""Writers of different VMs run at once, writers of one VM serialize (exit 4 naming the holder),
whole-store operations wait for every VM, and a reader of a point being merged away (also a
FUSE mount) keeps reading the same bytes throughout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from merge_chain import MiB, assert_store_reads, build_chain

from lbstore.errors import StoreBusyError
from lbstore.store import Store

HOLDER = """
import sys
from lbstore.store import Store
store = Store.open(sys.argv[1], write=True, vm=sys.argv[2], purpose="lbrestore backup")
print("held", flush=True)
sys.stdin.read()
store.close()
"""


def lbrestore(store: Path, *args: str, timeout: float = 10.0, **env: str):
    return subprocess.run(
        [sys.executable, "-m", "lbrestore", "--store", str(store), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "LBRESTORE_LOCK_TIMEOUT": str(timeout), **env},
        check=False,
    )


def test_writers_of_two_vms_overlap_and_of_one_vm_serialize(
    store_path: Path, tmp_path: Path
) -> None:
    build_chain(store_path, tmp_path / "a", 3, vm="vm1", size=MiB)
    images = build_chain(store_path, tmp_path / "b", 3, vm="vm2", size=MiB, seed=2)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(store_path), "vm1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert (store_path / "locks" / "vm-vm1.lock").stat().st_mode & 0o777 == 0o600
        # vm2's writers go on while vm1's writer holds its lock
        image = images[max(images)]["vda"]
        done = lbrestore(store_path, "import", "vm2", "--disk", f"vda={image}", timeout=0.2)
        assert done.returncode == 0, done.stderr
        done = lbrestore(store_path, "merge", "vm2@latest", timeout=0.2)
        assert done.returncode == 0, done.stderr
        # vm1's wait, then exit 4 naming the holder
        for args in (("merge", "vm1@latest"), ("import", "vm1", "--disk", f"vda={image}")):
            busy = lbrestore(store_path, *args, timeout=0.3)
            assert busy.returncode == 4, busy.stderr
            assert f"pid {holder.pid} (lbrestore backup" in busy.stderr
            assert len(busy.stderr.strip().splitlines()) == 1
        with pytest.raises(StoreBusyError, match=f"pid {holder.pid}.*for VM vm1"):
            Store.open(store_path, write=True, lock_timeout=0.3)  # a whole-store operation
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait()
    assert lbrestore(store_path, "merge", "vm1@latest").returncode == 0


def test_imports_of_two_vms_at_once_both_succeed(store_path: Path, tmp_path: Path) -> None:
    first = build_chain(store_path, tmp_path / "a", 1, vm="vm1", size=4 * MiB)
    second = build_chain(store_path, tmp_path / "b", 1, vm="vm2", size=4 * MiB, seed=3)
    for _ in range(3):
        processes = [
            subprocess.Popen(
                [sys.executable, "-m", "lbrestore", "--store", str(store_path), "import", vm,
                 "--disk", f"vda={images[min(images)]['vda']}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "LBRESTORE_LOCK_TIMEOUT": "0"},
            )
            for vm, images in (("vm1", first), ("vm2", second))
        ]  # fmt: skip
        for process in processes:
            _, stderr = process.communicate()
            assert process.returncode == 0, stderr
    with Store.open(store_path) as store:
        assert len(store.restore_points("vm1")) == len(store.restore_points("vm2")) == 4


def test_a_reader_of_a_point_merged_away_reads_the_same_bytes(
    store_path: Path, tmp_path: Path
) -> None:
    expected = build_chain(store_path, tmp_path / "images", 4)
    victim = min(expected)  # the oldest full: without a reader it would go "down"
    wanted = expected[victim]["vda"].read_bytes()
    with Store.open(store_path) as reader:
        view = reader.view(reader.point(victim), "vda")
        assert view.read(0, len(wanted)) == wanted
        done = lbrestore(store_path, "merge", f"vm1@#{victim}", "--json")
        assert done.returncode == 0, done.stderr
        assert [d["direction"] for d in json.loads(done.stdout)["disks"]] == ["up"]
        view._cache.clear()
        assert view.read(0, len(wanted)) == wanted
        view.close()
    del expected[victim]
    assert_store_reads(store_path, expected)
    busy = lbrestore(store_path, "info", f"vm1@#{victim}")
    assert busy.returncode != 0


def test_a_mount_opened_before_its_point_is_merged_away(store_path: Path, tmp_path: Path) -> None:
    expected = build_chain(store_path, tmp_path / "images", 4)
    victim = sorted(expected)[1]
    wanted = expected[victim]["vda"].read_bytes()
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    done = lbrestore(store_path, "mount", f"vm1@#{victim}", str(mountpoint), **env)
    assert done.returncode == 0, done.stderr
    try:
        raw = mountpoint / "vda.raw"
        assert read_uncached(raw) == wanted
        merged = lbrestore(store_path, "merge", f"vm1@#{victim}", "--json")
        assert merged.returncode == 0, merged.stderr
        for _ in range(3):
            assert read_uncached(raw) == wanted
    finally:
        subprocess.run(
            [sys.executable, "-m", "lbrestore", "umount", str(mountpoint)],
            env={**os.environ, **env},
            check=False,
        )
        if os.path.ismount(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
    del expected[victim]
    assert_store_reads(store_path, expected)


def read_uncached(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def test_a_checked_reader_of_a_removed_point_reads_chunks_it_had_not_touched(
    store_path: Path,
) -> None:
    """The set and digest checks of a reader that holds a point merged away still find the
    point's checksum rows (kept aside until no reader holds it): chunks it first reads after
    the merge read exactly, no false damage."""
    from lbstore.integrity import verified_views

    size, cluster = 33 * MiB, 512  # two checksum chunks of 65536 clusters
    contents = bytearray(size)
    with Store.open(store_path, write=True, vm="vm1") as store:
        for number, offsets in enumerate(([0, 32 * MiB + 4096], [8192, 32 * MiB], [16384])):
            with store.begin("vm1") as ingest:
                disk = ingest.add_disk("vda", size, cluster_size=cluster)
                for offset in offsets:
                    data = bytes([number + 1]) * (4 * cluster)
                    disk.write(offset, data)
                    if number < 2:
                        contents[offset : offset + len(data)] = data
                ingest.commit()
    wanted = bytes(contents)
    with Store.open(store_path) as reader:
        point = reader.point(2)
        (view,) = verified_views(reader, point, "vda", 1, None)
        assert view.read(0, MiB) == wanted[:MiB]  # the first chunk only
        done = lbrestore(store_path, "merge", "vm1@#2", "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["disks"][0]["direction"] == "up"
        assert view.read(32 * MiB, MiB) == wanted[32 * MiB :]  # the second chunk, first time
        assert view.read(0, size) == wanted
        view.close()
        assert reader.index.retired_points() == [2]
    with Store.open(store_path, write=True, vm="vm1") as writer:
        assert writer.index.retired_points() == []  # no reader holds #2 any more


def test_a_reader_of_a_newer_point_makes_the_merge_wait_then_refuse(
    store_path: Path, tmp_path: Path
) -> None:
    """A checked reader of a point above the removed one would see the successor change under
    it: the merge waits for it, then refuses in one line (exit 4); once it closes, it runs."""
    expected = build_chain(store_path, tmp_path / "images", 4)
    victim = sorted(expected)[1]
    newest = max(expected)
    with Store.open(store_path) as reader:
        view = reader.view(reader.point(newest), "vda")
        busy = lbrestore(store_path, "merge", f"vm1@#{victim}", LBRESTORE_LOCK_TIMEOUT="0.3")
        assert busy.returncode == 4, busy.stderr
        assert len(busy.stderr.strip().splitlines()) == 1
        assert f"a reader of vm1@#{newest}" in busy.stderr
        assert view.read(0, MiB) == expected[newest]["vda"].read_bytes()[:MiB]
        view.close()
    assert_store_reads(store_path, expected)  # nothing changed
    done = lbrestore(store_path, "merge", f"vm1@#{victim}")
    assert done.returncode == 0, done.stderr
    del expected[victim]
    assert_store_reads(store_path, expected)
