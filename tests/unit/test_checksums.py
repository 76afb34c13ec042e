"""lbstore.checksums: the digest rule, the row codec (round trip, algorithm checked), lookups."""

from __future__ import annotations

import random
import re
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import blake3
import pytest

from lbstore.checksums import (
    ALGORITHM,
    CHUNK_CLUSTERS,
    DIGEST_SIZE,
    ChecksumChunk,
    ChecksumRow,
    DigestCollector,
    DigestLookup,
    cluster_digest,
    cluster_digests,
    decode_row,
    decode_runs,
    decode_zero_runs,
    encode_runs,
    encode_zero_runs,
    zero_digest,
)
from lbstore.errors import ChecksumRowError
from lbstore.store import Store

CS = 65536


def test_digest_is_blake3_of_the_zero_padded_cluster() -> None:
    data = random.Random(1).randbytes(CS + 100)
    first, last = cluster_digests(data, CS)
    assert first == blake3.blake3(data[:CS]).digest()
    assert last == blake3.blake3(data[CS:] + bytes(CS - 100)).digest()
    assert cluster_digest(memoryview(data)[CS:], CS) == last
    assert zero_digest(CS) == blake3.blake3(bytes(CS)).digest()
    assert cluster_digests(b"", CS) == []


def test_run_encoding_round_trips() -> None:
    runs = ((0, 1), (5, 100), (65535, 1))
    assert decode_runs(encode_runs(runs)) == runs
    assert len(encode_runs(runs)) == 8 * len(runs)


def test_collector_sorts_and_the_row_round_trips() -> None:
    collector = DigestCollector()
    clusters = [7, 3, 4, CHUNK_CLUSTERS + 2, 5]
    for cluster in clusters:
        collector.add(cluster, bytes([cluster % 256]) * DIGEST_SIZE)
    chunks = collector.finish()
    assert [c.chunk for c in chunks] == [0, 1]
    assert chunks[0].runs == ((3, 3), (7, 1)) and chunks[1].runs == ((2, 1),)
    row = chunks[0].encode()
    assert row.algorithm == ALGORITHM and len(row.cluster_runs) == 16
    decoded = decode_row(row, "vm1@#1 disk vda")
    assert decoded == chunks[0]
    assert [c for c, _ in decoded.clusters()] == [3, 4, 5, 7]
    assert dict(chunks[1].clusters())[CHUNK_CLUSTERS + 2] == bytes([2]) * DIGEST_SIZE


def test_unknown_algorithm_is_an_error_not_blake3() -> None:
    row = ChecksumChunk(0, ((0, 1),), b"x" * DIGEST_SIZE).encode()._replace(algorithm="sha256")
    with pytest.raises(ChecksumRowError, match="unknown checksum algorithm 'sha256'") as info:
        decode_row(row, "vm1@#4 disk vda")
    assert "vm1@#4 disk vda" in str(info.value) and info.value.chunk == 0


@pytest.mark.parametrize(
    ("runs", "digests", "problem"),
    [
        (b"\x01\x00\x00", b"", "cluster runs of 3 bytes"),
        (encode_runs(((0, 2),)), b"x" * DIGEST_SIZE, "32 bytes of digests for 2 clusters"),
        (encode_runs(((5, 1), (2, 1))), b"x" * 64, "out of order"),
        (encode_runs(((CHUNK_CLUSTERS - 1, 2),)), b"x" * 64, "out of order"),
    ],
)
def test_damaged_rows_are_errors(runs: bytes, digests: bytes, problem: str) -> None:
    with pytest.raises(ChecksumRowError, match=problem):
        decode_row(ChecksumRow(3, ALGORITHM, runs, digests), "vm1@#1 disk vda")


def test_lookup_finds_each_cluster_and_caches_rows() -> None:
    loads: list[tuple[int, int]] = []
    chunk = ChecksumChunk(0, ((2, 2), (10, 1)), b"a" * 32 + b"b" * 32 + b"c" * 32)

    def load(point_id: int, index: int) -> ChecksumChunk | None:
        loads.append((point_id, index))
        return chunk if (point_id, index) == (1, 0) else None

    lookup = DigestLookup(load)
    assert [lookup.digest(1, c) for c in (1, 2, 3, 4, 10, 11)] == [
        None, b"a" * 32, b"b" * 32, None, b"c" * 32, None,
    ]  # fmt: skip
    assert lookup.digest(2, 2) is None and lookup.digest(1, CHUNK_CLUSTERS + 2) is None
    assert loads == [(1, 0), (2, 0), (1, 1)]


def test_the_store_checks_the_algorithm_of_rows_read_back(tmp_path: Path) -> None:
    Store.init(tmp_path / "s")
    data = random.Random(2).randbytes(3 * CS)
    with Store.open(tmp_path / "s", write=True) as store, store.begin("vm1") as ingest:
        ingest.add_disk("vda", len(data), mode="full").write(0, data)
        point = ingest.commit()
    with Store.open(tmp_path / "s") as store:
        assert list(store.stored_clusters(point, "vda")) == list(
            enumerate(cluster_digests(data, CS))
        )
        assert list(store.stored_clusters(point, "vda", 1, 2)) == [
            (1, cluster_digest(data[CS : 2 * CS], CS))
        ]
        assert store.digest_lookup("vda").digest(point.id, 2) == cluster_digest(data[2 * CS :], CS)
    with sqlite3.connect(tmp_path / "s" / "index.sqlite") as db:
        db.execute("UPDATE checksums SET algorithm = 'md5'")
    with Store.open(tmp_path / "s") as store:
        with pytest.raises(ChecksumRowError, match="'md5'"):
            list(store.stored_clusters(point, "vda"))
        with pytest.raises(ChecksumRowError, match="'md5'"):
            store.digest_lookup("vda").digest(point.id, 0)


def test_rows_are_read_from_any_thread_of_one_store(tmp_path: Path) -> None:
    import threading

    Store.init(tmp_path / "s")
    data = random.Random(3).randbytes(2 * CS)
    with (
        Store.open(tmp_path / "s", write=True) as store,
        store.begin("vm1", created=datetime(2026, 1, 1, tzinfo=UTC)) as ingest,
    ):
        ingest.add_disk("vda", len(data), mode="full").write(0, data)
        point = ingest.commit()
    found: list[bytes | None] = []
    with Store.open(tmp_path / "s") as store:
        worker = threading.Thread(
            target=lambda: found.append(store.digest_lookup("vda").digest(point.id, 1))
        )
        worker.start()
        worker.join()
    assert found == [cluster_digest(data[CS:], CS)]


def test_zero_runs_round_trip_past_32_bits() -> None:
    runs = ((0, 1), (5, 3), (1 << 40, 7))
    assert decode_zero_runs(encode_zero_runs(runs), "vm1@#2 disk vda") == runs
    assert decode_zero_runs(b"", "x") == ()


@pytest.mark.parametrize(
    ("blob", "problem"),
    [
        (b"\0" * 15, "zero runs of 15 bytes"),
        (encode_zero_runs([(4, 2), (5, 1)]), "zero run (5, 1) out of order"),
        (encode_zero_runs([(4, 0)]), "zero run (4, 0) out of order"),
    ],
)
def test_damaged_zero_runs_are_errors(blob: bytes, problem: str) -> None:
    with pytest.raises(ChecksumRowError, match=re.escape(problem)) as caught:
        decode_zero_runs(blob, "vm1@#2 disk vda")
    assert "zero runs of vm1@#2 disk vda" in str(caught.value)
