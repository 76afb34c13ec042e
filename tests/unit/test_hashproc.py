"""lbrestore.hashproc: the forked read-and-check worker restore uses (real files, real fork)."""

from __future__ import annotations

import os
from pathlib import Path

import blake3

from lbrestore.hashproc import FileRead, HashCheck, ReadHashWorker, Slots

CLUSTER = 65536


def make_file(tmp_path: Path, clusters: int) -> tuple[Path, bytes]:
    data = os.urandom(clusters * CLUSTER)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


def digest(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def test_reads_land_in_the_shared_buffer_and_checks_pass(tmp_path: Path) -> None:
    path, data = make_file(tmp_path, 4)
    slots = Slots(2, 4 * CLUSTER)
    worker = ReadHashWorker(slots, CLUSTER)
    try:
        # clusters 2, 3 of the file to the start of slot 1, cluster 0 after them
        reads = [
            FileRead(0, str(path), 2 * CLUSTER, 2 * CLUSTER),
            FileRead(2 * CLUSTER, str(path), 0, CLUSTER),
        ]
        expected = data[2 * CLUSTER :] + data[:CLUSTER]
        checks = [
            HashCheck(i * CLUSTER, CLUSTER, digest(expected[i * CLUSTER : (i + 1) * CLUSTER]), 7, i)
            for i in range(3)
        ]
        worker.submit(1, reads, checks)
        worker.submit(0, [], [])
        first, second = worker.answer(), worker.answer()
        assert (first.slot, first.problem) == (1, None)
        assert (second.slot, second.problem) == (0, None)
        view = slots.view(1)
        assert bytes(view[: 3 * CLUSTER]) == expected  # the parent sees what the child read
        view.release()
    finally:
        worker.close()
        slots.close()


def test_mismatch_short_read_and_missing_file_are_answers(tmp_path: Path) -> None:
    path, data = make_file(tmp_path, 2)
    slots = Slots(1, 2 * CLUSTER)
    worker = ReadHashWorker(slots, CLUSTER)
    try:
        good = HashCheck(0, CLUSTER, digest(data[:CLUSTER]), 1, 0)
        bad = HashCheck(CLUSTER, CLUSTER, digest(b"other" * 100), 1, 1)
        worker.submit(0, [FileRead(0, str(path), 0, 2 * CLUSTER)], [good, bad])
        assert worker.answer().problem == ("mismatch", 1)
        worker.submit(0, [FileRead(0, str(path), CLUSTER, 2 * CLUSTER)], [])
        assert worker.answer().problem == ("short", str(path), 2 * CLUSTER)
        missing = str(tmp_path / "gone.bin")
        worker.submit(0, [FileRead(0, missing, 0, CLUSTER)], [])
        kind, where, _message = worker.answer().problem  # type: ignore[misc]
        assert (kind, where) == ("error", missing)
    finally:
        worker.close()
        slots.close()


def test_partial_last_cluster_is_checked_zero_padded(tmp_path: Path) -> None:
    path, data = make_file(tmp_path, 1)
    slots = Slots(1, CLUSTER)
    worker = ReadHashWorker(slots, CLUSTER)
    try:
        head = data[:4096]
        padded = digest(head + bytes(CLUSTER - 4096))
        worker.submit(0, [FileRead(0, str(path), 0, 4096)], [HashCheck(0, 4096, padded, 1, 0)])
        assert worker.answer().problem is None
    finally:
        worker.close()
        slots.close()


def test_kill_ends_the_child(tmp_path: Path) -> None:
    slots = Slots(1, CLUSTER)
    worker = ReadHashWorker(slots, CLUSTER)
    pid = worker._process.pid
    assert pid is not None
    worker.kill()
    assert not worker._process.is_alive()
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    slots.close()
