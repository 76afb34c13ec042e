"""`lbrestore prune` for real: points merged away, every kept point exact, concurrent writers.

A chain of points spread over weeks is built the way `import --at` builds it (random writes,
zeroed ranges and punched holes in a raw image between points). After each prune: the points
left are exactly the plan's kept points, each reads back as the image it was imported from
(`qemu-img compare`), `qemu-img check` is clean on every file, and the bytes freed are reported.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from merge_chain import assert_store_reads
from prune_chain import allocated, assert_exact, build, change, files, lbrestore

from lbstore.store import Store


def prune(store: Path, *args: str) -> dict[str, object]:
    """Plan with --dry-run, prune, check the plan was carried out; the report of the prune."""
    planned = lbrestore(store, "prune", "vm1", *args, "--dry-run", "--json")
    assert planned.returncode == 0, planned.stderr
    decisions = json.loads(planned.stdout)["vms"][0]["points"]
    kept = sorted(d["id"] for d in decisions if d["rule"] != "remove")
    before = allocated(store)
    done = lbrestore(store, "prune", "vm1", *args, "--json")
    assert done.returncode == 0, done.stderr
    (report,) = json.loads(done.stdout)["vms"]
    assert sorted(files(store)) == kept
    assert report["removed"] == len(decisions) - len(kept)
    assert [d["rule"] for d in report["points"]] == [d["rule"] for d in decisions]
    assert report["freed_bytes"] == before - allocated(store)
    return report


def assert_stores_only_what_kept_points_need(store: Path, tmp_path: Path) -> None:
    """merge's checks (each file stores no more clusters than its point needs over the point
    below, the checksum rows list exactly those clusters, no leaks or corruptions), then
    `lbrestore check` finds nothing."""
    assert_store_reads(store, {p: {"vda": tmp_path / f"{p}.raw"} for p in files(store)})
    checked = lbrestore(store, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_merges_then_prunes_of_a_50_point_chain_keep_every_kept_point_exact(
    tmp_path: Path,
) -> None:
    """Issue 9's story on one chain: 50 points over weeks, merges at its start, middle and end,
    then prunes with several policies; after each step every point left reads exactly."""
    store = build(tmp_path, "vm1", 50, seed=1)
    assert_exact(store, tmp_path)
    for pick in (lambda ids: ids[0], lambda ids: ids[len(ids) // 2], lambda ids: ids[-1]):
        point_id = pick(sorted(files(store)))
        merged = lbrestore(store, "merge", f"vm1@#{point_id}")
        assert merged.returncode == 0, merged.stderr
        assert point_id not in files(store)
        assert_exact(store, tmp_path)
        assert_stores_only_what_kept_points_need(store, tmp_path)  # and `lbrestore check` is 0
    first = prune(store, "--keep-last", "3", "--keep-daily", "5", "--keep-weekly", "2")
    assert first["removed"] > 0 and first["freed_bytes"] > 0 and first["copied_bytes"] > 0
    assert_exact(store, tmp_path)
    assert_stores_only_what_kept_points_need(store, tmp_path)
    prune(store, "--keep-within", "4d", "--keep-weekly", "1")
    assert_exact(store, tmp_path)
    assert_stores_only_what_kept_points_need(store, tmp_path)
    last = prune(store, "--keep-last", "1")
    assert_exact(store, tmp_path)
    assert_stores_only_what_kept_points_need(store, tmp_path)
    assert len(files(store)) == 1 and last["kept"] == 1
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(next(iter(files(store).values())))],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "backing-filename" not in json.loads(info.stdout)  # the newest point is a full now


def test_human_summary_line(tmp_path: Path) -> None:
    store = build(tmp_path, "vm1", 6, seed=2)
    result = lbrestore(store, "prune", "vm1", "--keep-last", "2")
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith("vm1: kept 2, removed 4, freed ")
    assert line.endswith(" bytes)")
    assert_exact(store, tmp_path)


def test_prune_all_tries_every_vm_and_fails_when_one_failed(tmp_path: Path) -> None:
    store = build(tmp_path, "vm1", 5, seed=3)
    build(tmp_path, "vm2", 5, seed=4, store=store)
    build(tmp_path, "vm3", 5, seed=5, store=store)
    (store / "lbrestore.toml").write_text("[default]\nkeep_last = 2\n")
    middle = sorted(files(store, "vm2"))[2]
    files(store, "vm2")[middle].unlink()  # vm2's chain is broken: its prune must fail
    result = lbrestore(store, "prune", "--all")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("vm1: kept 2, removed 3, freed ")
    assert lines[1].startswith("vm2: ") and "FAILED" in lines[1]
    assert lines[2].startswith("vm3: kept 2, removed 3, freed ")
    assert "vm2" in result.stderr and "Traceback" not in result.stderr
    assert_exact(store, tmp_path, "vm1")
    assert_exact(store, tmp_path, "vm3")


@pytest.mark.parametrize("round_no", range(3))
def test_prune_and_import_of_one_vm_started_together_both_succeed(
    tmp_path: Path, round_no: int
) -> None:
    store = build(tmp_path, "vm1", 8, seed=10 + round_no)
    image = tmp_path / "vm1.raw"
    change(image, random.Random(round_no))
    env = {"PATH": "/usr/bin:/bin", "TZ": "UTC", "LBRESTORE_LOCK_TIMEOUT": "120"}
    command = [sys.executable, "-m", "lbrestore", "--store", str(store)]
    processes = [
        subprocess.Popen(
            [*command, "prune", "vm1", "--keep-last", "3"], env=env, stderr=subprocess.PIPE
        ),
        subprocess.Popen(
            [*command, "import", "vm1", "--disk", f"vda={image}"], env=env, stderr=subprocess.PIPE
        ),
    ]
    if round_no % 2:
        processes.reverse()
    for process in processes:
        _, stderr = process.communicate()
        assert process.returncode == 0, stderr
    with Store.open(store) as opened:
        points = opened.restore_points("vm1")
    newest = points[-1]
    (tmp_path / f"{newest.id}.raw").write_bytes(image.read_bytes())
    assert newest.created > datetime.now(UTC) - timedelta(minutes=10)  # the import is there
    assert len(points) in (3, 4)  # pruned before the import (3 + 1) or after it (3)
    assert_exact(store, tmp_path)
