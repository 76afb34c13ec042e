"""`lbrestore merge`: a 50-point chain merged at its start, middle and end reads exactly as
before, every file stays clean, stored bytes never exceed what the kept points need."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from merge_chain import assert_store_reads, build_chain, stored_total

from lbstore.store import Store


def lbrestore(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbrestore", "--store", str(store), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_merges_at_start_middle_and_end_of_a_50_point_chain(
    store_path: Path, tmp_path: Path
) -> None:
    expected = build_chain(store_path, tmp_path / "images", 50)
    ids = sorted(expected)
    directions = set()
    for victim in (ids[0], ids[25], ids[-1], ids[24]):
        before = stored_total(store_path)
        done = lbrestore(store_path, "merge", f"vm1@#{victim}", "--json")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["point_id"] == victim
        directions.update(d["direction"] for d in report["disks"])
        del expected[victim]
        assert_store_reads(store_path, expected)
        assert stored_total(store_path) <= before
    assert directions == {"up", "down", "drop"}
    with Store.open(store_path) as store:
        points = store.restore_points("vm1")
        assert points[0].kind == "full" and points[0].disks[0].backing_point_id is None
    assert lbrestore(store_path, "verify", "vm1").returncode == 0


def test_bad_specs_are_one_line_with_the_contract_exit_code(
    store_path: Path, tmp_path: Path
) -> None:
    """Usage errors (bad name, malformed spec) exit 2; a spec matching nothing exits 1, as for
    info, restore and verify."""
    build_chain(store_path, tmp_path / "images", 2)
    cases = [("vm1@#999", 1), ("vm2@latest", 1), ("vm1@2020-01-01", 1), ("bad name@#1", 2)]
    cases += [("vm1@soon", 2), ("vm1@#\uff11", 2)]  # a fullwidth digit
    cases += [("vm1", 2), ("vm1@", 2)]  # no point named: never a silent vm1@latest
    for spec, code in cases:
        done = lbrestore(store_path, "merge", spec)
        assert done.returncode == code, (spec, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert len(json.loads(lbrestore(store_path, "list", "--json").stdout)) == 2  # none removed
    assert lbrestore(store_path, "merge", "--help").returncode == 0
