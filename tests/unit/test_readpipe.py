"""lbstore.readpipe: the read-and-verify pipeline (real files, real fork)."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import tracemalloc
from pathlib import Path

import blake3
import pytest

from lbstore.checksums import zero_digest
from lbstore.errors import DamagedClusterError, Qcow2Error, ReadWorkerError
from lbstore.readpipe import (
    BATCH_BYTES,
    RING_BUFFERS,
    FileRead,
    HashCheck,
    ReadHashWorker,
    Slots,
    StoredCluster,
    VerifiedSpan,
    check_clusters,
    read_verified,
)

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


# --- the pipeline's own API: read_verified (merge) and check_clusters (verify) ---------------


def stored(data: bytes, order: list[int]) -> list[StoredCluster]:
    """The file's clusters as stored clusters: guest cluster i+100 lives at host i."""
    return [
        StoredCluster(i + 100, i * CLUSTER, digest(data[i * CLUSTER : (i + 1) * CLUSTER]))
        for i in order
    ]


def collect(path: Path, clusters: list[StoredCluster], virtual: int) -> dict[int, bytes]:
    got: dict[int, bytes] = {}

    def consume(span: VerifiedSpan) -> None:
        for i, entry in enumerate(span.clusters):
            got[entry.cluster] = bytes(span.view[i * CLUSTER : (i + 1) * CLUSTER])

    handed = read_verified(
        path, clusters, cluster_size=CLUSTER, virtual_size=virtual, consume=consume
    )
    assert handed == len(got)
    return got


def test_read_verified_hands_over_exactly_the_checked_bytes(tmp_path: Path) -> None:
    count = 2 * (BATCH_BYTES // CLUSTER) + 3  # more than one batch, the last one partial
    path, data = make_file(tmp_path, count)
    order = list(range(count))
    random.Random(5).shuffle(order)
    got = collect(path, stored(data, order), 1 << 40)
    assert sorted(got) == [i + 100 for i in range(count)]
    assert all(got[i + 100] == data[i * CLUSTER : (i + 1) * CLUSTER] for i in range(count))


def test_read_verified_names_the_damaged_cluster(tmp_path: Path) -> None:
    path, data = make_file(tmp_path, 8)
    clusters = stored(data, list(range(8)))
    clusters[5] = clusters[5]._replace(expected=digest(b"not this"))
    seen: list[int] = []
    with pytest.raises(DamagedClusterError) as info:
        read_verified(
            path,
            clusters,
            cluster_size=CLUSTER,
            virtual_size=1 << 40,
            consume=lambda span: seen.extend(e.cluster for e in span.clusters),
            where="vm1@#3 disk vda",
        )
    assert info.value.cluster == 105
    assert "vm1@#3 disk vda: cluster 105 does not match its checksum" in str(info.value)
    assert seen == []  # nothing of the damaged batch was handed over


def test_zero_clusters_and_clusters_of_zeros(tmp_path: Path) -> None:
    path = tmp_path / "zeros.bin"
    path.write_bytes(bytes(3 * CLUSTER))
    assert collect(path, [], 1 << 40) == {}
    with path.open("rb") as f:
        assert list(check_clusters(f.fileno(), [], CLUSTER)) == []
    zeros = [StoredCluster(i, i * CLUSTER, zero_digest(CLUSTER)) for i in range(3)]
    assert collect(path, zeros, 1 << 40) == {i: bytes(CLUSTER) for i in range(3)}


def test_short_reads_are_damage(tmp_path: Path) -> None:
    path, data = make_file(tmp_path, 4)
    clusters = stored(data, [0, 1, 2, 3])
    with path.open("r+b") as f:
        f.truncate(2 * CLUSTER + 100)
    with path.open("rb") as f:
        verdicts = list(check_clusters(f.fileno(), clusters, CLUSTER))
    bad = [b for v in verdicts for b in v.bad]
    assert [c for c, _ in bad] == [102, 103] and all("truncated" in p for _, p in bad)
    assert sum(v.checked for v in verdicts) == 2
    with pytest.raises(Qcow2Error, match="past the end of the file"):
        collect(path, clusters, 1 << 40)


def test_a_partial_last_cluster_of_the_disk_is_read_and_checked(tmp_path: Path) -> None:
    path, data = make_file(tmp_path, 2)
    virtual = CLUSTER + 4096
    entry = StoredCluster(
        1, CLUSTER, digest(data[CLUSTER : CLUSTER + 4096] + bytes(CLUSTER - 4096))
    )
    assert collect(path, [entry], virtual)[1][:4096] == data[CLUSTER : CLUSTER + 4096]
    entry = entry._replace(expected=digest(data[CLUSTER : 2 * CLUSTER]))  # not zero-padded
    with pytest.raises(DamagedClusterError, match="cluster 1 does not match"):
        collect(path, [entry], virtual)


def test_a_killed_worker_is_a_clear_error(tmp_path: Path) -> None:
    count = (RING_BUFFERS + 1) * (BATCH_BYTES // CLUSTER)  # a batch is sent after the kill
    path, data = make_file(tmp_path, count)

    def kill_the_reader(span: VerifiedSpan) -> None:
        for child in multiprocessing.active_children():
            if child.name == "lbstore-read-hash":
                os.kill(child.pid or 0, signal.SIGKILL)
                child.join()

    clusters = stored(data, list(range(count)))
    with pytest.raises(ReadWorkerError, match="ended unexpectedly"):
        read_verified(
            path, clusters, cluster_size=CLUSTER, virtual_size=1 << 40, consume=kill_the_reader
        )
    assert not [c for c in multiprocessing.active_children() if c.name == "lbstore-read-hash"]


def test_memory_stays_bounded_by_the_batches(tmp_path: Path) -> None:
    count = 8 * (BATCH_BYTES // CLUSTER)  # 64 MiB
    path, data = make_file(tmp_path, count)
    clusters = stored(data, list(range(count)))
    tracemalloc.start()
    try:
        handed = read_verified(
            path, clusters, cluster_size=CLUSTER, virtual_size=1 << 40, consume=lambda span: None
        )
        with path.open("rb") as f:
            checked = sum(v.checked for v in check_clusters(f.fileno(), clusters, CLUSTER))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert handed == checked == count
    assert peak < BATCH_BYTES  # far less than the 64 MiB read (shared buffers are mapped)
