"""SIGKILL during `lbrestore merge` at every durable step of merges in each direction: the next
merge of the point finishes the interrupted one, every other point reads exactly as before,
the point is gone, and nothing leaks."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from merge_chain import MiB, assert_store_reads, build_chain

from lbstore.merge import STOP_AFTER_ENV
from lbstore.store import Store


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[str, Path]]]:
    """A 5-point chain of a 2 MiB disk, built once and copied for every kill."""
    folder = tmp_path_factory.mktemp("merge-crash")
    store = folder / "store"
    Store.init(store)
    return store, build_chain(store, folder / "images", 5, size=2 * MiB, seed=5)


def merge(store: Path, address: str, stop_after: int | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != STOP_AFTER_ENV}
    if stop_after is not None:
        env[STOP_AFTER_ENV] = str(stop_after)
    return subprocess.run(
        [sys.executable, "-m", "lbrestore", "--store", str(store), "merge", address, "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


@pytest.mark.parametrize(
    ("victim_index", "direction", "instants"),
    [(0, "down", 3), (2, "down", 8), (None, "up", 8), (4, "drop", 2)],
    ids=["down-in-place", "down-zeroes", "up", "drop"],
)
def test_sigkill_at_every_step_then_a_second_merge_finishes(
    template: tuple[Path, dict[int, dict[str, Path]]],
    tmp_path: Path,
    victim_index: int | None,
    direction: str,
    instants: int,
) -> None:
    """`instants`: durable steps the merge has at least (24 kills over the four merges)."""
    source, expected = template
    ids = sorted(expected)
    victim = ids[victim_index or 0]
    if victim_index is None:  # a middle point whose successor stores at least as much as it
        with Store.open(source) as store:
            stored = {p.id: p.stored_bytes for p in store.restore_points("vm1")}
        middle = itertools.pairwise(ids[1:])
        victim = next(i for i, j in middle if stored[j] >= stored[i])
    kept = {k: v for k, v in expected.items() if k != victim}
    killed = 0
    for step in range(1, 40):
        store = tmp_path / f"store-{step}"
        shutil.copytree(source, store)
        first = merge(store, f"vm1@#{victim}", stop_after=step)
        if first.returncode == 0:  # the merge has fewer steps: every instant was covered
            assert json.loads(first.stdout)["disks"][0]["direction"] == direction
            break
        assert first.returncode == -signal.SIGKILL, first.stderr
        killed += 1
        again = merge(store, f"vm1@#{victim}", stop_after=None)
        assert again.returncode == 0, again.stderr
        assert_store_reads(store, kept)
        with Store.open(store) as opened:
            assert not opened.index.merges()
        shutil.rmtree(store)
    assert killed >= instants
    assert_store_reads(store, kept)
