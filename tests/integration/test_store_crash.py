"""Crash safety: SIGKILL a real `lbrestore import` at many instants during ingest and commit.

Triggers are spread over the whole import: fixed delays across a measured run time, the size of
the file growing under tmp/, the second disk's file appearing, and the committed file appearing
in data/ (between the rename and the index transaction, when the kill is quick enough). After
each kill the store holds only committed points, every one reads back exactly, recovery leaves
no leftovers, and the next import succeeds.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import blake3

from lbstore.store import Store

SIZE = 16 << 20
POOL = 4


def make_pool(folder: Path) -> list[dict[str, tuple[Path, bytes]]]:
    """POOL pairs of (vda, vdb) images that differ a lot, so every import writes MiBs."""
    rng = random.Random(7)
    pool = []
    for i in range(POOL):
        pair = {}
        for disk in ("vda", "vdb"):
            data = bytearray(SIZE)
            start = rng.randrange(0, 4 << 20, 65536)
            data[start : start + (8 << 20)] = rng.randbytes(8 << 20)
            path = folder / f"{disk}-{i}.raw"
            path.write_bytes(data)
            pair[disk] = (path, blake3.blake3(data).digest())
        pool.append(pair)
    return pool


def start_import(store: Path, pair: dict[str, tuple[Path, bytes]]) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "lbrestore", "--store", str(store), "import", "vm1"]
    for disk, (path, _) in pair.items():
        args += ["--disk", f"{disk}={path}"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for(process: subprocess.Popen[bytes], condition: Callable[[], bool]) -> None:
    """Busy-poll `condition` until true or the process ends (no sleep: commit windows are short)."""
    while process.poll() is None and not condition():
        pass


def tmp_file_at_least(store: Path, disk: str, size: int) -> Callable[[], bool]:
    def check() -> bool:
        for path in (store / "tmp").glob(f"*/{disk}.qcow2"):
            try:
                if path.stat().st_size >= size:
                    return True
            except FileNotFoundError:
                pass
        return False

    return check


def new_data_file(store: Path, known: int) -> Callable[[], bool]:
    def check() -> bool:
        folder = store / "data" / "vm1" / "vdb"
        try:
            return len(os.listdir(folder)) > known
        except FileNotFoundError:
            return False

    return check


def digest_of(store: Store, point_id: int, disk: str) -> bytes:
    point = store.point(point_id)
    with store.view(point, disk) as view:
        return blake3.blake3(view.read(0, view.virtual_size)).digest()


def check_store(store_path: Path, expected: dict[int, int], pool: list, rng: random.Random) -> None:
    """Recover, then: no leftovers, only committed points, newest + one older read back exactly."""
    with Store.open(store_path, write=True) as store:
        assert list((store_path / "tmp").iterdir()) == []
        assert store.index.pending_points() == []
        assert store.problems == []
        ids = [p.id for p in store.restore_points("vm1")]
        assert ids == sorted(expected)
        for point_id in {ids[-1], rng.choice(ids)}:
            for disk in ("vda", "vdb"):
                assert digest_of(store, point_id, disk) == pool[expected[point_id]][disk][1]


def test_sigkill_during_import_never_leaves_a_half_point(tmp_path: Path) -> None:
    pool = make_pool(tmp_path)
    store_path = tmp_path / "store"
    Store.init(store_path)
    expected: dict[int, int] = {}  # committed point id -> pool index it came from
    rng = random.Random(3)

    began = time.monotonic()
    first = start_import(store_path, pool[0])
    assert first.wait() == 0, first.stderr.read() if first.stderr else ""
    duration = time.monotonic() - began
    expected[1] = 0

    triggers: list[tuple[str, object]] = [("delay", duration * (0.3 + 0.06 * k)) for k in range(14)]
    triggers += [("tmp", ("vda", mib << 20)) for mib in (1, 3, 6)]
    triggers += [("tmp", ("vdb", mib << 20)) for mib in (0, 2, 5)]
    triggers += [("data", None)] * 4

    outcomes = {"committed": 0, "discarded": 0}
    for attempt, (kind, arg) in enumerate(triggers, start=1):
        source = attempt % POOL
        with Store.open(store_path) as reader:
            before = [p.id for p in reader.restore_points()]
        known = len(os.listdir(store_path / "data" / "vm1" / "vdb"))
        process = start_import(store_path, pool[source])
        if kind == "delay":
            assert isinstance(arg, float)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=arg)
        elif kind == "tmp":
            disk, size = arg  # type: ignore[misc]
            wait_for(process, tmp_file_at_least(store_path, disk, size))
        else:
            wait_for(process, new_data_file(store_path, known))
        process.send_signal(signal.SIGKILL)
        process.wait()
        # The next writer's recovery decides: a point whose files and sidecars all reached
        # data/ is committed from its sidecars, anything less is discarded.
        with Store.open(store_path, write=True) as recovered:
            after = [p.id for p in recovered.restore_points()]
        if len(after) == len(before) + 1:
            expected[after[-1]] = source
            outcomes["committed"] += 1
        else:
            assert after == before, f"attempt {attempt} ({kind} {arg}): {before} -> {after}"
            outcomes["discarded"] += 1
        check_store(store_path, expected, pool, rng)

    with Store.open(store_path) as store:
        recovered = store.events("vm1", kind="recovered")
        outcomes["renamed_then_killed"] = sum(1 for e in recovered if e["details"]["removed_files"])
    print("outcomes", outcomes)  # shown with -s: how the kills spread over ingest and commit
    assert len(triggers) >= 20
    assert outcomes["discarded"] >= 1, outcomes
    final = start_import(store_path, pool[0])
    assert final.wait() == 0, final.stderr.read() if final.stderr else ""
    with Store.open(store_path) as store:
        points = store.restore_points("vm1")
        expected[points[-1].id] = 0
        assert [p.id for p in points] == sorted(expected)
        for point in points:
            for disk in ("vda", "vdb"):
                assert digest_of(store, point.id, disk) == pool[expected[point.id]][disk][1]
        qemu = subprocess.run(
            ["qemu-img", "check", "-q", str(store.file_path(points[-1], "vdb"))], check=False
        )
        assert qemu.returncode == 0
