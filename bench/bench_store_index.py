"""Benchmark: what the SQLite index costs per stored cluster and per restore point.

One full restore point of LBR_BENCH_MIB (default 1024) of random data, then LBR_BENCH_POINTS
(default 20) incrementals each rewriting 1% of the clusters, all through the ingest. Prints the
index's bytes per stored cluster (checksums are 32-byte BLAKE3 digests plus run-encoded cluster
indexes, in rows of up to 65536 clusters), rows per restore point (target: O(disks), not
O(clusters)), and, as QEMU's own measure on the same files, the qcow2 metadata (header, L1, L2,
refcounts) per stored cluster reported by `qemu-img check`, with `ratio (ours/theirs)`.
Work folder: LBR_BENCH_DIR, else the system temp folder. Not a test: never fails on time.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import tempfile
from pathlib import Path

from lbstore.store import Store

MIB = 1 << 20
CS = 65536


def build(store_path: Path, size: int, points: int, rng: random.Random) -> None:
    with Store.open(store_path, write=True) as store:
        with store.begin("vm1") as ingest:
            disk = ingest.add_disk("vda", size)
            for offset in range(0, size, 4 * MIB):
                disk.write(offset, os.urandom(min(4 * MIB, size - offset)))
            ingest.commit()
        clusters = size // CS
        for _ in range(points):
            with store.begin("vm1") as ingest:
                disk = ingest.add_disk("vda", size)
                for cluster in rng.sample(range(clusters), max(1, clusters // 100)):
                    disk.write(cluster * CS, os.urandom(CS))
                ingest.commit()


def index_bytes(path: Path) -> int:
    """The index's size once its WAL is checkpointed into the main file."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    return int(pages * page_size)


def qcow2_metadata_bytes(path: Path) -> tuple[int, int]:
    """(metadata bytes, allocated clusters) of one qcow2 file, as qemu-img check counts them."""
    out = subprocess.run(
        ["qemu-img", "check", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    info = json.loads(out)
    clusters = int(info.get("allocated-clusters", 0))
    return path.stat().st_size - clusters * CS, clusters


def main() -> None:
    size = int(os.environ.get("LBR_BENCH_MIB", "1024")) * MIB
    points = int(os.environ.get("LBR_BENCH_POINTS", "20"))
    base = os.environ.get("LBR_BENCH_DIR") or tempfile.gettempdir()
    work = Path(tempfile.mkdtemp(prefix="bench-store-index-", dir=base))
    try:
        store_path = work / "store"
        Store.init(store_path)
        build(store_path, size, points, random.Random(1))
        with Store.open(store_path) as store:
            all_points = store.restore_points()
            rows = store.index_rows()
            stored_clusters = sum(
                store.checksum_state(p, d.name)["clusters"] for p in all_points for d in p.disks
            )
            files = [store.file_path(p, "vda") for p in all_points]
        total_index = index_bytes(store_path / "index.sqlite")
        metadata = [qcow2_metadata_bytes(f) for f in files]
        qemu_meta = sum(m for m, _ in metadata)
        qemu_clusters = sum(c for _, c in metadata)
        per_point_rows = {t: rows[t] / len(all_points) for t in rows}
        ours_per_cluster = total_index / stored_clusters
        theirs_per_cluster = qemu_meta / qemu_clusters
        print(
            f"{len(all_points)} restore points (1 full of {size // MIB} MiB + {points} x 1%), "
            f"{stored_clusters} stored clusters"
        )
        print(f"index: {total_index} bytes, {ours_per_cluster:.1f} bytes per stored cluster")
        print(
            "rows per restore point: "
            + ", ".join(f"{t} {n:.2f}" for t, n in per_point_rows.items())
            + f"  (total {sum(per_point_rows.values()):.2f})"
        )
        print(f"qcow2 metadata (qemu-img check): {theirs_per_cluster:.1f} bytes per cluster")
        ratio = ours_per_cluster / theirs_per_cluster
        print(f"ratio (ours/theirs, bytes per stored cluster): {ratio:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
