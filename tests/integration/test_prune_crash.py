"""SIGKILL during `lbrestore prune` at many instants spread over the whole series of merges.

merge's test seam ($LBRESTORE_TEST_MERGE_STOP_AFTER=K) makes each merge of a run kill the process
after its K-th durable step. Every prune run first finishes the merge the previous run left (a
writer opening the store does that), then goes on with the plan, so run after run the kills land
on later and later merges of the prune, at varying steps. After each kill the points the plan
keeps read exactly (even before anything is repaired); once `check --repair` ran (every third
kill) or a writer opened the store again, every point left reads exactly and passes `qemu-img
check`, and the journal is empty. In the end a plain prune finishes, exactly the plan's points
are left, and `lbrestore check` finds nothing.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
from pathlib import Path

from prune_chain import assert_exact, build, files, lbrestore

from lbstore.merge import STOP_AFTER_ENV
from lbstore.store import Store

POLICY = ("--keep-last", "2", "--keep-daily", "2")


def compare(path: Path, raw: Path) -> None:
    done = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(path), str(raw)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, f"{path.name}: {done.stdout}{done.stderr}"


def test_sigkill_at_many_instants_of_a_prune(tmp_path: Path) -> None:
    store = build(tmp_path, "vm1", 28, seed=20)
    planned = lbrestore(store, "prune", "vm1", *POLICY, "--dry-run", "--json")
    decisions = json.loads(planned.stdout)["vms"][0]["points"]
    kept = sorted(d["id"] for d in decisions if d["rule"] != "remove")
    doomed = sorted(d["id"] for d in decisions if d["rule"] == "remove")
    assert len(doomed) >= 21
    rng = random.Random(7)
    kills = 0
    removed_while_killing: set[int] = set()
    for _ in range(60):
        run = lbrestore(
            store, "prune", "vm1", *POLICY, **{STOP_AFTER_ENV: str(rng.randrange(1, 9))}
        )
        if run.returncode == 0:
            break
        assert run.returncode == -signal.SIGKILL, run.stderr
        kills += 1
        for point_id in kept:  # surviving points read the same at every instant
            compare(files(store)[point_id], tmp_path / f"{point_id}.raw")
        if kills % 3 == 0:  # `check --repair` finishes the cut merge ...
            repaired = lbrestore(store, "check", "--repair")
            assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        with Store.open(store, write=True, vm="vm1") as opened:  # ... or the next writer does
            assert not opened.index.merges()
        left = sorted(files(store))
        assert set(kept) <= set(left) and set(left) <= set(kept) | set(doomed)
        removed_while_killing |= set(doomed) - set(left)
        assert_exact(store, tmp_path)  # a doomed point is whole or gone, never half
    assert kills >= 20
    assert len(removed_while_killing) >= len(doomed) - 2  # the kills covered the whole prune
    final = lbrestore(store, "prune", "vm1", *POLICY)
    assert final.returncode == 0, final.stderr
    assert sorted(files(store)) == kept
    assert_exact(store, tmp_path)
    checked = lbrestore(store, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
