"""The SQLite index: schema by Migrations, WAL, foreign keys, compact checksums, atomic units."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lbstore.checksums import CHUNK_CLUSTERS, ChecksumChunk, decode_row
from lbstore.index import CommitDisk, CommitRecord, Index, migrations

NOW = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)


@pytest.fixture
def index(tmp_path: Path) -> Index:
    created = Index.create(tmp_path / "index.sqlite")
    yield created
    created.close()


def disk(name: str, point_id: int, *, backing: int | None = None, chunks=()) -> CommitDisk:
    return CommitDisk(
        name=name,
        file=f"vm1/{name}/{point_id}.qcow2",
        backing_point_id=backing,
        mode="full" if backing is None else "incremental",
        virtual_size=1 << 20,
        cluster_size=65536,
        stored_bytes=65536,
        checksums=tuple(chunk.encode() for chunk in chunks),
    )


def commit(index: Index, point_id: int, *disks: CommitDisk, kind: str = "full") -> None:
    index.commit_point(CommitRecord(point_id, "vm1", kind, {"name": "vm1"}, tuple(disks)))


def test_schema_by_migrations_wal_and_foreign_keys(index: Index) -> None:
    assert index.schema_is_current()
    applied = [m.name for m in migrations.applied(index.db)]
    assert applied[0] == "0001_initial" and "0002_merge_journal" in applied
    assert "0003_retired_checksums" in applied
    assert index.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert index.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert set(index.identity()) == {"id", "created"}


def test_create_twice_keeps_the_identity(tmp_path: Path) -> None:
    first = Index.create(tmp_path / "i.sqlite")
    identity = first.identity()
    first.close()
    again = Index.create(tmp_path / "i.sqlite")
    assert again.identity() == identity
    again.close()


def test_pending_then_committed_point(index: Index) -> None:
    point_id = index.begin_point("vm1", NOW)
    assert index.committed_points() == []
    assert [p["id"] for p in index.pending_points()] == [point_id]
    chunk = ChecksumChunk(0, ((3, 2),), b"a" * 32 + b"b" * 32)
    commit(index, point_id, disk("vda", point_id, chunks=[chunk]))
    assert index.pending_points() == []
    assert [p["id"] for p in index.committed_points("vm1")] == [point_id]
    stored = index.checksum_row(point_id, "vda", 0)
    assert stored is not None and stored.algorithm == "blake3"
    assert list(decode_row(stored, "vm1").clusters()) == [(3, b"a" * 32), (4, b"b" * 32)]
    assert index.checksum_state(point_id, "vda")["clusters"] == 2


def test_a_failing_commit_changes_nothing(index: Index) -> None:
    first = index.begin_point("vm1", NOW)
    commit(index, first, disk("vda", first))
    second = index.begin_point("vm1", NOW)
    # Same file name as the first point's disk: the UNIQUE constraint fails mid-transaction.
    clash = CommitDisk("vdb", "vm1/vda/1.qcow2", None, "full", 1 << 20, 65536, 0, ())
    with pytest.raises(sqlite3.IntegrityError):
        commit(index, second, disk("vda", second, backing=first), clash)
    assert [p["id"] for p in index.committed_points()] == [first]
    assert [p["id"] for p in index.pending_points()] == [second]
    assert [d["point_id"] for d in index.point_disks()] == [first]


def test_backing_must_be_a_known_file(index: Index) -> None:
    point_id = index.begin_point("vm1", NOW)
    with pytest.raises(sqlite3.IntegrityError):
        commit(index, point_id, disk("vda", point_id, backing=999), kind="incremental")
    assert index.committed_points() == []


def test_a_backing_file_cannot_be_deleted_from_under_its_overlay(index: Index) -> None:
    base = index.begin_point("vm1", NOW)
    commit(index, base, disk("vda", base))
    top = index.begin_point("vm1", NOW)
    commit(index, top, disk("vda", top, backing=base), kind="incremental")
    with pytest.raises(sqlite3.IntegrityError):
        index.db.execute("DELETE FROM point_disks WHERE point_id = ?", [base])


def test_forget_pending_only_touches_pending_points(index: Index) -> None:
    done = index.begin_point("vm1", NOW)
    commit(index, done, disk("vda", done))
    index.forget_pending(done)
    assert [p["id"] for p in index.committed_points()] == [done]


def test_ids_are_never_reused_after_a_forgotten_point(index: Index) -> None:
    first = index.begin_point("vm1", NOW)
    index.forget_pending(first)
    assert index.begin_point("vm1", NOW) == first + 1


def test_rows_per_point_do_not_grow_with_clusters(index: Index) -> None:
    # A 1 TiB full disk at 64 KiB clusters: 16 Mi clusters in 256 chunk rows, not 16 Mi rows.
    clusters = 1 << 24
    chunks = [ChecksumChunk(c, ((0, CHUNK_CLUSTERS),), b"") for c in range(clusters // (1 << 16))]
    point_id = index.begin_point("vm1", NOW)
    commit(index, point_id, disk("vda", point_id, chunks=chunks))
    counts = index.row_counts()
    assert counts["checksums"] == 256
    assert counts["point_disks"] == 1 and counts["restore_points"] == 1


def test_events_keep_details(index: Index) -> None:
    index.record_event("vm1", "resync", "bitmap missing", details={"disk": "vda"})
    (event,) = index.events(vm="vm1")
    assert event["kind"] == "resync" and event["details"] == {"disk": "vda"}
    assert index.events(kind="other") == []


def test_the_definition_is_kept_with_its_point_and_only_there(index: Index) -> None:
    point_id = index.begin_point("vm1", NOW)
    definition = {"name": "vm1", "uuid": "u-1", "cpus": 2, "memory_mib": 512, "extra": [1]}
    index.commit_point(CommitRecord(point_id, "vm1", "full", definition, (disk("vda", point_id),)))
    row = index.committed_point(point_id)
    assert row is not None and json.loads(row["definition"]) == definition
    # Written-but-never-read copies are not made (the columns stay in the schema, empty).
    vm = index.db.execute("SELECT uuid, cpus, definition FROM vms WHERE name = 'vm1'").fetchone()
    assert tuple(vm) == (None, None, None)
    assert index.row_counts()["disks"] == 0


def test_atomic_units_commit_or_roll_back_whole_and_nest(index: Index) -> None:
    db = index.db
    with pytest.raises(RuntimeError), db.atomic():
        db.execute("INSERT INTO store (key, value) VALUES ('a', '1')")
        raise RuntimeError("undo")
    with db.atomic():
        db.execute("INSERT INTO store (key, value) VALUES ('b', '2')")
        with pytest.raises(RuntimeError), db.atomic():
            db.execute("INSERT INTO store (key, value) VALUES ('c', '3')")
            raise RuntimeError("undo the inner unit only")
    rows = list(db.query("SELECT key, value FROM store WHERE key IN ('a', 'b', 'c')"))
    assert rows == [{"key": "b", "value": "2"}]
    assert not db.conn.in_transaction


def test_a_new_migration_is_pending_for_readers_and_applied_by_the_writer(
    tmp_path: Path,
) -> None:
    path = tmp_path / "index.sqlite"
    Index.create(path).close()

    @migrations(name="9999_test_only")
    def _add_table(db) -> None:  # type: ignore[no-untyped-def]
        db.execute("CREATE TABLE test_only (x INTEGER)")

    try:
        reader = Index.open(path, readonly=True)
        assert not reader.schema_is_current()
        reader.close()
        writer = Index.open(path, readonly=False)
        assert writer.schema_is_current()
        assert [m.name for m in migrations.applied(writer.db)][-1] == "9999_test_only"
        assert writer.db.execute("SELECT COUNT(*) FROM test_only").fetchone()[0] == 0
        writer.close()
    finally:
        migrations.steps.pop()
