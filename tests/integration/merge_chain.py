"""A restore-point chain built the way `lbrestore import --at` builds one, with the expected raw
image of every point kept beside it, and the checks every merge test makes after a merge."""

from __future__ import annotations

import json
import random
import subprocess
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

from lbstore.importer import import_images
from lbstore.qcow2.reader import Qcow2Image, RunKind
from lbstore.store import Store

MiB = 1024 * 1024
CLUSTER = 65536
START = datetime(2026, 9, 1, tzinfo=UTC)


def mutate(data: bytearray, rng: random.Random) -> None:
    """One backup interval of guest writes: random clusters, zeroed and discarded ranges."""
    clusters = len(data) // CLUSTER
    for _ in range(rng.randrange(1, 6)):
        at = rng.randrange(clusters) * CLUSTER
        data[at : at + CLUSTER] = rng.randbytes(CLUSTER)
    if rng.random() < 0.4:  # a zeroed range, not cluster-aligned at its ends
        at = rng.randrange(len(data) - 3 * CLUSTER)
        length = rng.randrange(1, 3 * CLUSTER)
        data[at : at + length] = bytes(length)
    if rng.random() < 0.3:  # a discarded range: whole clusters read back as zeros
        at = rng.randrange(clusters - 2) * CLUSTER
        data[at : at + 2 * CLUSTER] = bytes(2 * CLUSTER)
    if rng.random() < 0.3:  # a partial write inside one cluster
        at = rng.randrange(len(data) - 4096)
        data[at : at + 4096] = rng.randbytes(4096)


def build_chain(
    store_path: Path,
    folder: Path,
    points: int,
    *,
    vm: str = "vm1",
    disks: tuple[str, ...] = ("vda",),
    size: int = 4 * MiB,
    seed: int = 1,
) -> dict[int, dict[str, Path]]:
    """Import `points` snapshots spread over weeks; returns point id -> disk -> expected raw."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    contents = {disk: bytearray(rng.randbytes(size)) for disk in disks}
    for disk in disks:  # a full with holes
        for c in rng.sample(range(size // CLUSTER), size // CLUSTER // 4):
            contents[disk][c * CLUSTER : (c + 1) * CLUSTER] = bytes(CLUSTER)
    expected: dict[int, dict[str, Path]] = {}
    moment = START
    with Store.open(store_path, write=True, vm=vm) as store:
        for number in range(points):
            images = {}
            for disk in disks:
                if number:
                    mutate(contents[disk], rng)
                raw = folder / f"{vm}-{number}-{disk}.raw"
                raw.write_bytes(contents[disk])
                images[disk] = raw
            point = import_images(store, vm, images, created=moment)
            expected[point.id] = images
            moment += timedelta(hours=rng.randrange(1, 24 * 3))
    return expected


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def assert_store_reads(store_path: Path, expected: dict[int, dict[str, Path]]) -> None:
    """Every point of the store reads exactly as its expected images (qemu-img compare through
    the chain), `qemu-img check` is clean on every file, and the index's checksum rows list
    exactly the clusters each file stores."""
    with Store.open(store_path) as store, ThreadPoolExecutor(4) as pool:
        points = {p.id: p for vm in store.vms() for p in store.restore_points(vm)}
        assert set(points) == set(expected), (sorted(points), sorted(expected))
        pairs = [(p, d, raw) for p, disks in expected.items() for d, raw in disks.items()]
        paths = [store.file_path(points[p], d) for p, d, _ in pairs]
        futures = [
            pool.submit(_check_file, point_id, disk, raw, path)  # qemu-img runs in parallel
            for (point_id, disk, raw), path in zip(pairs, paths, strict=True)
        ]
        for (point_id, disk, raw), path in zip(pairs, paths, strict=True):
            listed = sum(1 for _ in store.stored_clusters(points[point_id], disk))
            with Qcow2Image.open(path, backing=False) as image:
                own = sum(
                    -(-run.length // CLUSTER)
                    for run in image.runs()
                    if run.kind in (RunKind.DATA, RunKind.COMPRESSED)
                )
            assert listed == own, f"#{point_id} {disk}: {listed} digests, {own} clusters"
            record = points[point_id].disk(disk)
            assert record is not None and record.stored_bytes == own * CLUSTER
            below = record.backing_point_id
            needed = clusters_needed(raw, None if below is None else expected[below][disk])
            assert own <= needed, f"#{point_id} {disk} stores {own} clusters, needs {needed}"
        for future in futures:
            future.result()


def _check_file(point_id: int, disk: str, raw: Path, path: Path) -> None:
    done = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(path), str(raw))
    assert done.returncode == 0, f"#{point_id} {disk}: {done.stdout}{done.stderr}"
    check = qemu_img("check", "--output=json", str(path))
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads(check.stdout)
    assert report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0


def clusters_needed(raw: Path, below: Path | None) -> int:
    """Data clusters a point must store: those that are not zero and differ from the point
    below it (a zero cluster costs an L2 entry, no data)."""
    data = raw.read_bytes()
    base = below.read_bytes() if below is not None else bytes(len(data))
    zero = bytes(CLUSTER)
    return sum(
        1
        for at in range(0, len(data), CLUSTER)
        if data[at : at + CLUSTER] != zero and data[at : at + CLUSTER] != base[at : at + CLUSTER]
    )


def stored_total(store_path: Path) -> int:
    with Store.open(store_path) as store:
        return sum(p.stored_bytes for vm in store.vms() for p in store.restore_points(vm))
