"""Views against a model: random chains (writes, zeros, grown and shrunk disks, small and large
clusters) read back exactly what a plain bytearray model holds, and what qemu-img reads."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from lbstore.store import Store
from lbstore.view import ViewKind


def apply_random_point(store: Store, model: bytearray, rng: random.Random, cs: int) -> object:
    """One incremental (or resync) point of random writes and zeros; the model follows."""
    if rng.random() < 0.25:  # resize by whole clusters, up or down
        new_size = max(cs, len(model) + rng.choice([-2, -1, 1, 3]) * cs)
        del model[new_size:]
        model.extend(bytes(new_size - len(model)))
    size = len(model)
    clusters = size // cs
    mode = rng.choice(["incremental", "incremental", "resync"])
    with store.begin("vm1") as ingest:
        disk = ingest.add_disk("vda", size, cluster_size=cs, mode=mode)
        if mode == "resync":
            for c in rng.sample(range(clusters), max(1, clusters // 4)):
                model[c * cs : (c + 1) * cs] = (
                    rng.randbytes(cs) if rng.random() < 0.7 else bytes(cs)
                )
            disk.write(0, bytes(model))
        else:
            touched = rng.sample(range(clusters), max(1, clusters // 3))
            for c in touched:
                if rng.random() < 0.7:
                    data = rng.randbytes(cs)
                    disk.write(c * cs, data)
                else:
                    data = bytes(cs)
                    disk.zero(c * cs, cs)
                model[c * cs : (c + 1) * cs] = data
        return ingest.commit()


@pytest.mark.parametrize(("seed", "cs"), [(1, 4096), (2, 4096), (3, 65536), (4, 512)])
def test_random_chains_read_like_the_model(tmp_path: Path, seed: int, cs: int) -> None:
    rng = random.Random(seed)
    Store.init(tmp_path / "store")
    size = (rng.randint(8, 40) * cs) if cs >= 65536 else rng.randint(64, 256) * cs
    model = bytearray(rng.randbytes(size))
    snapshots = []
    with Store.open(tmp_path / "store", write=True) as store:
        with store.begin("vm1") as ingest:
            ingest.add_disk("vda", size, cluster_size=cs, mode="full").write(0, bytes(model))
            snapshots.append((ingest.commit(), bytes(model)))
        for _ in range(7):
            snapshots.append((apply_random_point(store, model, rng, cs), bytes(model)))
        for point, expected in snapshots:
            with store.view(point, "vda") as view:
                assert view.virtual_size == len(expected)
                assert view.read(0, len(expected) + cs) == expected
                runs = list(view.runs())
                assert sum(r.length for r in runs) == len(expected)
                for run in runs:
                    if run.kind is ViewKind.ZERO:
                        assert expected[run.guest_offset : run.guest_offset + run.length] == bytes(
                            run.length
                        )
                for _ in range(20):
                    offset = rng.randrange(len(expected))
                    length = rng.randint(1, 3 * cs)
                    assert view.read(offset, length) == expected[offset : offset + length]
        top, expected = snapshots[-1]
        flat = tmp_path / "top.raw"
        subprocess.run(
            ["qemu-img", "convert", "-O", "raw", str(store.file_path(top, "vda")), str(flat)],
            check=True,
        )
        assert flat.read_bytes() == expected
