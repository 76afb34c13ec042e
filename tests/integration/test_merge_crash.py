"""SIGKILL during `lbrestore merge` at every durable step of merges in each direction: the next
merge of the point finishes the interrupted one, every other point reads exactly as before,
the point is gone, and nothing leaks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from merge_chain import assert_store_reads, build_chain

from lbstore.merge import STOP_AFTER_ENV
from lbstore.store import Store


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[str, Path]]]:
    """A 6-point chain, built once and copied for every kill."""
    folder = tmp_path_factory.mktemp("merge-crash")
    store = folder / "store"
    Store.init(store)
    return store, build_chain(store, folder / "images", 6, seed=5)


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


@pytest.mark.parametrize("victim_index", [0, 2, 5], ids=["oldest-down", "middle-up", "newest"])
def test_sigkill_at_every_step_then_a_second_merge_finishes(
    template: tuple[Path, dict[int, dict[str, Path]]], tmp_path: Path, victim_index: int
) -> None:
    source, expected = template
    victim = sorted(expected)[victim_index]
    kept = {k: v for k, v in expected.items() if k != victim}
    killed = 0
    for step in range(1, 40):
        store = tmp_path / f"store-{step}"
        shutil.copytree(source, store)
        first = merge(store, f"vm1@#{victim}", stop_after=step)
        if first.returncode == 0:
            break  # the merge has fewer steps than this: every instant was covered
        assert first.returncode == -signal.SIGKILL, first.stderr
        killed += 1
        again = merge(store, f"vm1@#{victim}", stop_after=None)
        assert again.returncode == 0, again.stderr
        assert_store_reads(store, kept)
        with Store.open(store) as opened:
            assert not opened.index.merges()
        shutil.rmtree(store)
    assert killed >= (2 if victim_index == 5 else 7)
    assert_store_reads(store, kept)
