"""The store: layout, ingest (full, incremental, resync), views, checksums, names, lock, recovery.

Real qcow2 files in tmp_path; qemu-img is the oracle for what the files mean.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import blake3
import pytest

from lbstore.checksums import zero_digest
from lbstore.errors import (
    IndexDamagedError,
    IngestError,
    InvalidNameError,
    ReadOnlyStoreError,
    StoreBusyError,
    StoreIntegrityError,
    StoreNeedsRepairError,
    StoreNotFoundError,
    StorePathError,
)
from lbstore.qcow2.reader import Qcow2Image
from lbstore.store import Store
from lbstore.view import ViewKind

CS = 65536
MIB = 1 << 20


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    Store.init(path)
    return path


def put(
    store: Store, vm: str, disks: dict[str, bytes], mode: str = "incremental", **kw: object
) -> object:
    """Write one restore point whose disks hold exactly `disks` (every cluster sent)."""
    with store.begin(vm, **kw) as ingest:  # type: ignore[arg-type]
        for name, data in disks.items():
            disk = ingest.add_disk(name, len(data), mode=mode)
            disk.write(0, data)
        return ingest.commit()


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def qemu_read_all(path: Path) -> bytes:
    """The guest bytes of a qcow2 chain as QEMU sees them."""
    out = path.with_suffix(".raw-oracle")
    result = qemu_img("convert", "-O", "raw", str(path), str(out))
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    out.unlink()
    return data


def random_disk(size: int, seed: int, zero_ranges: tuple[tuple[int, int], ...] = ()) -> bytearray:
    data = bytearray(random.Random(seed).randbytes(size))
    for start, length in zero_ranges:
        data[start : start + length] = bytes(length)
    return data


# --- layout ----------------------------------------------------------------------------------


def test_init_creates_the_layout(store_path: Path) -> None:
    for name in ("index.sqlite", "lock", "data", "tmp"):
        assert (store_path / name).exists()
    with pytest.raises(StorePathError, match="already holds a store"):
        Store.init(store_path)  # never over an existing store, not even an empty one
    with Store.open(store_path) as store:
        assert store.restore_points() == []


def test_init_refuses_a_file_and_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorePathError, match="not a folder"):
        Store.init(tmp_path / "file")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "other").write_text("x")
    with pytest.raises(StorePathError, match="not empty"):
        Store.init(tmp_path / "busy")


def test_open_refuses_missing_stores_and_files(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError):
        Store.open(tmp_path / "none")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorePathError):
        Store.open(tmp_path / "file", write=True)


# --- ingest and views ------------------------------------------------------------------------


def test_full_then_incremental_reads_back_and_qemu_agrees(store_path: Path) -> None:
    first = random_disk(2 * MIB, 1, zero_ranges=((MIB, CS * 3),))
    second = bytearray(first)
    second[CS * 5 : CS * 6] = os.urandom(CS)
    with Store.open(store_path, write=True) as store:
        p1 = put(store, "vm1", {"vda": bytes(first)}, mode="full")
        p2 = put(store, "vm1", {"vda": bytes(second)}, mode="resync")
        assert (p1.kind, p2.kind) == ("full", "resync")
        assert p1.disks[0].stored_bytes == 2 * MIB - 3 * CS  # zero clusters are not stored
        assert p2.disks[0].stored_bytes == CS
        assert p2.disks[0].backing_point_id == p1.id
        for point, expected in ((p1, first), (p2, second)):
            with store.view(point, "vda") as view:
                assert view.read(0, len(expected)) == expected
            top = store.file_path(point, "vda")
            assert qemu_read_all(top) == expected
            assert qemu_img("check", str(top)).returncode == 0
        assert store.file_path(p2, "vda").name == f"{p2.id}.qcow2"
        with Qcow2Image.open(store.file_path(p2, "vda")) as image:
            assert image.backing_file == f"{p1.id}.qcow2"  # relative


def test_incremental_stores_what_it_is_given(store_path: Path) -> None:
    base = random_disk(MIB, 2)
    with Store.open(store_path, write=True) as store:
        p1 = put(store, "vm1", {"vda": bytes(base)})
        assert p1.kind == "full"  # a disk seen for the first time gets a full file
        with store.begin("vm1") as ingest:
            disk = ingest.add_disk("vda", MIB)
            disk.write(3 * CS, b"\x11" * CS)
            disk.zero(5 * CS, 2 * CS)
            disk.write(0, b"\x22" * 2 * CS)
            p2 = ingest.commit()
        assert p2.kind == "incremental"
        assert p2.disks[0].stored_bytes == 3 * CS
        expected = bytearray(base)
        expected[3 * CS : 4 * CS] = b"\x11" * CS
        expected[5 * CS : 7 * CS] = bytes(2 * CS)
        expected[0 : 2 * CS] = b"\x22" * 2 * CS
        with store.view(p2, "vda") as view:
            assert view.read(0, MIB) == expected
            kinds = [(r.kind, r.point_id) for r in view.runs(0, 8 * CS)]
            assert kinds == [
                (ViewKind.DATA, p2.id),
                (ViewKind.DATA, p1.id),
                (ViewKind.DATA, p2.id),
                (ViewKind.DATA, p1.id),
                (ViewKind.ZERO, None),
                (ViewKind.DATA, p1.id),
            ]
            assert view.source_of(3 * CS + 7) == p2.id
        assert qemu_read_all(store.file_path(p2, "vda")) == expected


def test_resync_stores_only_changed_clusters_and_zeroes(store_path: Path) -> None:
    base = random_disk(MIB, 3, zero_ranges=((8 * CS, 2 * CS),))
    changed = bytearray(base)
    changed[2 * CS : 3 * CS] = bytes(CS)  # data -> zero: a zero cluster in the overlay
    changed[8 * CS : 9 * CS] = b"\x01" * CS  # zero -> data
    changed[12 * CS + 100] ^= 0xFF  # one byte
    with Store.open(store_path, write=True) as store:
        put(store, "vm1", {"vda": bytes(base)})
        p2 = put(store, "vm1", {"vda": bytes(changed)}, mode="resync")
        assert p2.disks[0].stored_bytes == 2 * CS
        with store.view(p2, "vda") as view:
            assert view.read(0, MIB) == changed
        own = dict(store.stored_clusters(p2, "vda"))
        assert sorted(own) == [8, 12]
        # the same image again: nothing changes, nothing is stored
        p3 = put(store, "vm1", {"vda": bytes(changed)}, mode="resync")
        assert p3.disks[0].stored_bytes == 0
        assert list(store.stored_clusters(p3, "vda")) == []


def test_resync_zero_runs_against_the_previous_view(store_path: Path) -> None:
    base = random_disk(MIB, 4, zero_ranges=((0, 4 * CS),))
    with Store.open(store_path, write=True) as store:
        p1 = put(store, "vm1", {"vda": bytes(base)})
        with store.begin("vm1") as ingest:
            disk = ingest.add_disk("vda", MIB, mode="resync")
            disk.zero(0, 8 * CS)  # clusters 0-3 are zero already, 4-7 were data
            disk.write(8 * CS, bytes(base[8 * CS :]))
            p2 = ingest.commit()
        with store.view(p2, "vda") as view:
            runs = list(view.runs(0, 8 * CS))
            assert [(r.kind, r.guest_offset, r.length) for r in runs] == [
                (ViewKind.ZERO, 0, 8 * CS)
            ]
            assert view.read(0, MIB) == bytes(8 * CS) + bytes(base[8 * CS :])
        with Qcow2Image.open(store.file_path(p2, "vda")) as image:
            backing_ranges = [r for r in image.runs(0, 4 * CS) if r.kind.name == "BACKING"]
            assert backing_ranges, "clusters already zero must not be rewritten"
        assert p1.id < p2.id


def test_checksums_are_blake3_of_whole_clusters(store_path: Path) -> None:
    size = MIB + 512  # a partial last cluster is hashed zero-padded
    data = random_disk(size, 5, zero_ranges=((CS, CS),))
    with Store.open(store_path, write=True) as store:
        point = put(store, "vm1", {"vda": bytes(data)})
        digests = dict(store.stored_clusters(point, "vda"))
        clusters = (size + CS - 1) // CS
        assert sorted(digests) == [c for c in range(clusters) if c != 1]
        padded = bytes(data) + bytes(clusters * CS - size)
        for cluster, digest in digests.items():
            assert digest == blake3.blake3(padded[cluster * CS : (cluster + 1) * CS]).digest()
        assert zero_digest(CS) == blake3.blake3(bytes(CS)).digest()
        state = store.checksum_state(point, "vda")
        assert state["clusters"] == clusters - 1


def test_a_grown_disk_reads_zeros_past_the_old_end(store_path: Path) -> None:
    old = random_disk(MIB, 6)
    with Store.open(store_path, write=True) as store:
        p1 = put(store, "vm1", {"vda": bytes(old)})
        with store.begin("vm1") as ingest:
            disk = ingest.add_disk("vda", 2 * MIB)
            disk.write(MIB + CS, b"\x33" * CS)
            p2 = ingest.commit()
        expected = bytes(old) + bytes(CS) + b"\x33" * CS + bytes(MIB - 2 * CS)
        with store.view(p2, "vda") as view:
            assert view.virtual_size == 2 * MIB
            assert view.read(0, 4 * MIB) == expected  # short at the end, like a file
        assert qemu_read_all(store.file_path(p2, "vda")) == expected
        # and a resync of the grown disk compares zeros past the old end
        p3 = put(store, "vm1", {"vda": expected}, mode="resync")
        assert p3.disks[0].stored_bytes == 0
        assert p1.disks[0].virtual_size == MIB


def test_a_shrunk_disk_reads_its_new_size(store_path: Path) -> None:
    old = random_disk(2 * MIB, 7)
    with Store.open(store_path, write=True) as store:
        put(store, "vm1", {"vda": bytes(old)})
        p2 = put(store, "vm1", {"vda": bytes(old[:MIB])}, mode="resync")
        assert p2.disks[0].stored_bytes == 0
        with store.view(p2, "vda") as view:
            assert view.read(0, 2 * MIB) == old[:MIB]


def test_several_disks_and_kinds(store_path: Path) -> None:
    a, b = random_disk(MIB, 8), random_disk(MIB, 9)
    with Store.open(store_path, write=True) as store:
        p1 = put(store, "vm1", {"vda": bytes(a)})
        p2 = put(store, "vm1", {"vda": bytes(a), "vdb": bytes(b)})  # vdb is new: full
        assert (p1.kind, p2.kind) == ("full", "incremental")
        assert [d.mode for d in p2.disks] == ["incremental", "full"]
        p3 = put(store, "vm1", {"vda": bytes(a), "vdb": bytes(b)}, mode="full")
        assert p3.kind == "full"
        assert [p.id for p in store.restore_points("vm1")] == [p1.id, p2.id, p3.id]
        assert [len(store.chain(p2, d)) for d in ("vda", "vdb")] == [2, 1]


def test_definition_is_kept_with_the_point(store_path: Path) -> None:
    definition = {"name": "vm1", "uuid": "1234", "disks": [{"name": "vda"}], "future": True}
    with Store.open(store_path, write=True) as store:
        point = put(store, "vm1", {"vda": bytes(CS)}, definition=definition)
    with Store.open(store_path) as store:
        assert store.resolve("vm1@latest").definition == definition
        assert point.definition == definition


def test_views_cache_one_resolution_per_range_whatever_the_depth(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    depth = 12
    with Store.open(store_path, write=True) as store:
        put(store, "vm1", {"vda": bytes(random_disk(MIB, 10))})
        for i in range(depth - 1):
            with store.begin("vm1") as ingest:
                ingest.add_disk("vda", MIB).write((i % 16) * CS, bytes([i + 1]) * CS)
                top = ingest.commit()
        calls = {"runs": 0}
        original = Qcow2Image.runs

        def counting(self: Qcow2Image, *args: object, **kwargs: object) -> object:
            calls["runs"] += 1
            return original(self, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(Qcow2Image, "runs", counting)
        with store.view(top, "vda") as view:
            assert view.depth == depth
            for cluster in range(MIB // CS):
                for _ in range(4):
                    view.read(cluster * CS + 4096, 4096)
        assert calls["runs"] <= depth  # one walk down the chain for the one range


def test_bad_runs_are_refused(store_path: Path) -> None:
    with Store.open(store_path, write=True) as store, store.begin("vm1") as ingest:
        disk = ingest.add_disk("vda", MIB)
        with pytest.raises(IngestError, match="aligned"):
            disk.write(512, bytes(CS))
        with pytest.raises(IngestError, match="aligned"):
            disk.write(0, bytes(CS - 1))
        with pytest.raises(IngestError, match="outside"):
            disk.write(MIB, bytes(CS))
        with pytest.raises(IngestError, match="outside"):
            disk.zero(-CS, CS)
        with pytest.raises(IngestError, match="one digest per cluster"):
            disk.write(0, bytes(2 * CS), digests=[zero_digest(CS)])
        with pytest.raises(IngestError, match="twice"):
            ingest.add_disk("vda", MIB)
        with pytest.raises(IngestError, match="mode"):
            ingest.add_disk("vdb", MIB, mode="sideways")


@pytest.mark.parametrize("bad", ["../x", "", "x" * 200, "a/b", ".hidden", "a b", "é"])
def test_invalid_names_are_refused_before_any_path(store_path: Path, bad: str) -> None:
    with Store.open(store_path, write=True) as store:
        with pytest.raises(InvalidNameError):
            store.begin(bad)
        with store.begin("vm1") as ingest, pytest.raises(InvalidNameError):
            ingest.add_disk(bad, MIB)
        with pytest.raises(InvalidNameError):
            store.restore_points(bad)
    assert sorted(p.name for p in (store_path / "data").iterdir()) == []


def test_an_exception_inside_the_ingest_aborts_it(store_path: Path) -> None:
    with Store.open(store_path, write=True) as store:
        put(store, "vm1", {"vda": bytes(random_disk(MIB, 11))})
        with pytest.raises(RuntimeError), store.begin("vm1") as ingest:
            ingest.add_disk("vda", MIB).write(0, b"\x01" * CS)
            raise RuntimeError("source failed")
        assert len(store.restore_points()) == 1
        assert list((store_path / "tmp").iterdir()) == []
        assert store.index.pending_points() == []
        put(store, "vm1", {"vda": bytes(MIB)})  # the next ingest works


def test_points_cannot_go_back_in_time(store_path: Path) -> None:
    now = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
    with Store.open(store_path, write=True) as store:
        put(store, "vm1", {"vda": bytes(CS)}, created=now)
        with pytest.raises(IngestError, match="older"):
            store.begin("vm1", created=now - timedelta(seconds=1))
        put(store, "vm1", {"vda": bytes(CS)}, created=now)  # a tie is allowed
        put(store, "vm2", {"vda": bytes(CS)}, created=now - timedelta(days=1))  # other VM
        with pytest.raises(IngestError, match="future"):
            store.begin("vm1", created=datetime.now(UTC) + timedelta(hours=1))
        soon = datetime.now(UTC) + timedelta(minutes=1)  # clock skew is tolerated
        put(store, "vm1", {"vda": bytes(CS)}, created=soon)
        # a backup at "now" behind the newest point (clock set back) still goes after it
        assert put(store, "vm1", {"vda": bytes(CS)}).created == soon


def test_readers_cannot_write(store_path: Path) -> None:
    with Store.open(store_path) as store:
        with pytest.raises(ReadOnlyStoreError):
            store.begin("vm1")
        store.record_event("vm1", "note", "readers may log events", disk="vda")
        assert store.events("vm1")[0]["details"] == {"disk": "vda"}


# --- lock ------------------------------------------------------------------------------------


def test_a_second_writer_is_told_who_holds_the_lock(store_path: Path) -> None:
    with Store.open(store_path, write=True, purpose="lbrestore backup"):
        with pytest.raises(StoreBusyError) as info:
            Store.open(store_path, write=True, lock_timeout=0.2)
        message = str(info.value)
        assert f"locked by pid {os.getpid()} (lbrestore backup, since " in message
        assert info.value.exit_code == 4
        with Store.open(store_path) as reader:  # readers never wait
            assert reader.restore_points() == []
    with Store.open(store_path, write=True, lock_timeout=0):
        pass


def test_a_stale_lock_file_is_simply_taken(store_path: Path) -> None:
    holder = {"pid": 999999, "command": "lbrestore backup", "since": "2026-01-01T00:00:00Z"}
    (store_path / "lock").write_text(json.dumps(holder))  # written by a process that died
    with Store.open(store_path, write=True, lock_timeout=0, purpose="test") as store:
        info = json.loads((store_path / "lock").read_text())
        assert info["pid"] == os.getpid() and info["command"] == "test"
        (event,) = store.events(kind="stale-lock")
        assert "pid 999999 (lbrestore backup, since 2026-01-01T00:00:00Z)" in event["message"]
    assert (store_path / "lock").read_text() == ""  # a clean release leaves no holder
    with Store.open(store_path, write=True, lock_timeout=0) as store:
        assert len(store.events(kind="stale-lock")) == 1


# --- recovery --------------------------------------------------------------------------------


def crash(store: Store) -> None:
    """Drop the store as a killed process would: no abort, no cleanup, lock released."""
    store._ingest = None
    store.close()


def test_recovery_removes_an_uncommitted_point(store_path: Path) -> None:
    data = bytes(random_disk(MIB, 12))
    with Store.open(store_path, write=True) as store:
        p1 = put(store, "vm1", {"vda": data})
    store = Store.open(store_path, write=True)
    ingest = store.begin("vm1")
    ingest.add_disk("vda", MIB).write(0, b"\x05" * MIB)
    crash(store)
    assert list((store_path / "tmp").iterdir())
    with Store.open(store_path) as reader:  # readers see only committed points meanwhile
        assert [p.id for p in reader.restore_points()] == [p1.id]
    with Store.open(store_path, write=True) as store:
        assert list((store_path / "tmp").iterdir()) == []
        assert store.index.pending_points() == []
        assert [e["kind"] for e in store.events("vm1")] == ["recovered"]
        with store.view(store.resolve("vm1@latest"), "vda") as view:
            assert view.read(0, MIB) == data
        assert put(store, "vm1", {"vda": data}, mode="resync").id > ingest.point_id


def test_recovery_commits_a_point_whose_files_and_sidecars_all_reached_data(
    store_path: Path,
) -> None:
    with Store.open(store_path, write=True) as store:
        put(store, "vm1", {"vda": bytes(random_disk(MIB, 13))})
    store = Store.open(store_path, write=True)
    ingest = store.begin("vm1")
    ingest.add_disk("vda", MIB).write(0, b"\x06" * MIB)
    ingest._publish_files([])  # files and sidecars renamed into data/, index not yet told
    renamed = store_path / "data" / "vm1" / "vda" / f"{ingest.point_id}.qcow2"
    assert renamed.exists() and renamed.with_suffix(".point").exists()
    crash(store)
    with Store.open(store_path, write=True) as store:
        assert renamed.exists()
        assert [p.id for p in store.restore_points()] == [1, ingest.point_id]
        assert store.problems == []
        event = store.events(kind="recovered")[0]
        assert "from its sidecars" in event["message"]
        with store.view(store.point(ingest.point_id), "vda") as view:
            assert view.read(0, MIB) == b"\x06" * MIB


def test_recovery_discards_a_point_whose_sidecar_never_reached_data(store_path: Path) -> None:
    with Store.open(store_path, write=True) as store:
        put(store, "vm1", {"vda": bytes(random_disk(MIB, 13))})
    store = Store.open(store_path, write=True)
    ingest = store.begin("vm1")
    ingest.add_disk("vda", MIB).write(0, b"\x06" * MIB)
    ingest._publish_files([])
    renamed = store_path / "data" / "vm1" / "vda" / f"{ingest.point_id}.qcow2"
    renamed.with_suffix(".point").unlink()  # the kill came between the two renames
    crash(store)
    with Store.open(store_path, write=True) as store:
        assert not renamed.exists()
        assert len(store.restore_points()) == 1
        assert store.problems == []
        event = store.events(kind="recovered")[0]
        assert event["details"]["removed_files"] == [f"vm1/vda/{ingest.point_id}.qcow2"]


def test_a_missing_committed_file_is_reported_not_hidden(store_path: Path) -> None:
    with Store.open(store_path, write=True) as store:
        p1 = put(store, "vm1", {"vda": bytes(random_disk(MIB, 14))})
        p2 = put(store, "vm1", {"vda": bytes(random_disk(MIB, 15))}, mode="resync")
    (store_path / "data" / p1.disks[0].file).unlink()
    with Store.open(store_path, write=True) as store:
        assert store.problems == [f"missing file data/{p1.disks[0].file}"]
        assert len(store.events(kind="integrity")) == 1
        assert [p.id for p in store.restore_points()] == [p1.id, p2.id]  # nothing forgotten
        with pytest.raises(StoreIntegrityError):
            store.view(p2, "vda")
    with Store.open(store_path, write=True) as store:  # reported once, not at every open
        assert len(store.events(kind="integrity")) == 1


def test_an_unknown_file_in_data_refuses_writes_and_is_left_alone(store_path: Path) -> None:
    with Store.open(store_path, write=True) as store:
        put(store, "vm1", {"vda": bytes(random_disk(MIB, 14))})
    stray = store_path / "data" / "vm1" / "vda" / "77.qcow2"
    stray.write_bytes(b"not ours")
    with pytest.raises(StoreNeedsRepairError, match=r"#77.*check --repair"):
        Store.open(store_path, write=True)
    with pytest.raises(IndexDamagedError, match=r"#77.*check --repair"):
        Store.open(store_path)  # a reader would answer without it
    with Store.open(store_path, readonly_index=True) as store:  # what `check` opens
        assert store.check_files() == [
            "unknown file data/vm1/vda/77.qcow2 (not in the index; left alone)"
        ]
    assert stray.read_bytes() == b"not ours"


def test_a_broken_chain_refuses_incrementals_and_resyncs_into_a_full(store_path: Path) -> None:
    data = bytes(random_disk(MIB, 16))
    with Store.open(store_path, write=True) as store:
        p1 = put(store, "vm1", {"vda": data})
    (store_path / "data" / p1.disks[0].file).unlink()
    with Store.open(store_path, write=True) as store:
        with store.begin("vm1") as ingest, pytest.raises(StoreIntegrityError, match="resync"):
            ingest.add_disk("vda", MIB, mode="incremental")
        p2 = put(store, "vm1", {"vda": data}, mode="resync")
        assert p2.kind == "full" and p2.disks[0].backing_point_id is None
        assert [e["kind"] for e in store.events("vm1", kind="chain-broken")] == ["chain-broken"]
        with store.view(p2, "vda") as view:
            assert view.read(0, MIB) == data


def test_runs_in_any_order_keep_their_checksums_in_guest_order(store_path: Path) -> None:
    clusters = [bytes([i + 1]) * CS for i in range(16)]
    with Store.open(store_path, write=True) as store:
        with store.begin("vm1") as ingest:
            disk = ingest.add_disk("vda", 16 * CS)
            for i in (9, 3, 15, 0, 4, 5, 12, 1, 2, 6, 7, 8, 10, 11, 13, 14):
                disk.write(i * CS, clusters[i])
            point = ingest.commit()
        digests = list(store.stored_clusters(point, "vda"))
        assert digests == [(i, blake3.blake3(clusters[i]).digest()) for i in range(16)]
        with store.view(point, "vda") as view:
            assert view.read(0, 16 * CS) == b"".join(clusters)


def test_readinto_fills_zero_ranges_of_a_reused_buffer(store_path: Path) -> None:
    data = bytes(CS) + b"\x44" * CS + bytes(2 * CS)
    with Store.open(store_path, write=True) as store:
        point = put(store, "vm1", {"vda": data})
        buffer = bytearray(b"\xff" * 8 * CS)
        with store.view(point, "vda") as view:
            assert view.readinto(0, memoryview(buffer)) == 4 * CS  # short at the end
        assert bytes(buffer[: 4 * CS]) == data
