"""The store commands end to end: init, import, list (human and --json), info."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import blake3

MIB = 1 << 20


def lbrestore(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbrestore", "--store", str(store), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def test_import_list_info(tmp_path: Path) -> None:
    store = tmp_path / "store"
    image = tmp_path / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"], check=True)
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x5a 0 1M", str(image)], check=True, capture_output=True
    )
    raw = tmp_path / "vdb.raw"
    raw.write_bytes(blake3.blake3(b"x").digest(length=2 * MIB))
    assert "store ready" in ok(lbrestore(store, "init"))
    out = ok(
        lbrestore(
            store,
            "import",
            "vm1",
            "--disk",
            f"vda={image}",
            "--disk",
            f"vdb={raw}",
            "--at",
            "2026-11-27T08:00",
        )
    )
    assert out.startswith("imported vm1@#1 (full)")  # one line, no progress bar off a tty
    assert out.count("\n") == 1
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x11 64k 64k", str(image)], check=True, capture_output=True
    )
    out = ok(lbrestore(store, "import", "vm1", "--disk", f"vda={image}", "--disk", f"vdb={raw}"))
    assert "vm1@#2 (incremental)" in out and "stored 64.0 KiB" in out and "stored 0 B" in out
    ok(lbrestore(store, "import", "vm2", "--disk", f"vda={raw}"))

    listed = json.loads(ok(lbrestore(store, "list", "--json")))
    assert [p["id"] for p in listed] == [1, 2, 3]
    first = listed[0]
    assert set(first) == {"id", "vm", "created", "kind", "disks"}
    assert first["created"] == "2026-11-27T08:00:00+00:00"
    assert first["kind"] == "full"
    assert first["disks"] == [
        {"name": "vda", "virtual_size": 4 * MIB, "stored_bytes": MIB},
        {"name": "vdb", "virtual_size": 2 * MIB, "stored_bytes": 2 * MIB},
    ]
    assert [p["id"] for p in json.loads(ok(lbrestore(store, "list", "vm2", "--json")))] == [3]
    assert json.loads(ok(lbrestore(store, "list", "nobody", "--json"))) == []

    two_hours_ago = (datetime.now(UTC) - timedelta(hours=2, minutes=5)).isoformat()
    ok(lbrestore(store, "import", "vm3", "--disk", f"vda={raw}", "--at", two_hours_ago))
    human = ok(lbrestore(store, "list")).splitlines()
    assert human[0].split() == ["ID", "VM", "CREATED", "(UTC)", "AGE", "KIND", "DISKS", "STORED"]
    assert human[1].split()[:4] == ["#1", "vm1", "2026-11-27", "08:00:00"]
    assert "vda,vdb" in human[1] and "3.0 MiB" in human[1]
    rows = {line.split()[0]: line for line in human[1:]}
    assert [line.split()[0] for line in human[1:]] == ["#1", "#4", "#2", "#3"]  # oldest first
    assert "2h ago" in rows["#4"] and "just now" in rows["#3"]

    info = json.loads(ok(lbrestore(store, "info", "vm1@latest", "--json")))
    assert info["id"] == 2 and info["kind"] == "incremental"
    vda = info["disks"][0]
    assert vda["chain_depth"] == 2
    assert [f["point_id"] for f in vda["chain"]] == [2, 1]
    assert [f["checksum_state"] for f in vda["chain"]] == ["complete", "complete"]
    assert vda["chain"][0]["file"] == "data/vm1/vda/2.qcow2"
    assert info["store_problems"] == []
    text = ok(lbrestore(store, "info", "vm1@#1"))
    assert "vm1@#1  full" in text and "data/vm1/vdb/1.qcow2" in text


def test_info_of_nothing_is_one_line(tmp_path: Path) -> None:
    store = tmp_path / "store"
    ok(lbrestore(store, "init"))
    result = lbrestore(store, "info", "vm1@latest")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "lbrestore: 'vm1@latest': no VM named 'vm1' has restore points; the store is empty"
    )
    assert lbrestore(store, "list").returncode == 0
    result = lbrestore(store, "info", "vm1@soon")
    assert result.returncode == 2 and "unknown restore point spec" in result.stderr  # usage


def test_info_reports_a_missing_file_and_import_needs_full_for_a_new_chain(
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    raw = tmp_path / "vda.raw"
    raw.write_bytes(blake3.blake3(b"y").digest(length=MIB))
    ok(lbrestore(store, "init"))
    ok(lbrestore(store, "import", "vm1", "--disk", f"vda={raw}"))
    (store / "data" / "vm1" / "vda" / "1.qcow2").unlink()
    info = json.loads(ok(lbrestore(store, "info", "vm1@#1", "--json")))
    (entry,) = info["disks"][0]["chain"]
    assert entry["exists"] is False and entry["checksum_state"] == "file missing"
    assert info["store_problems"] == ["missing file data/vm1/vda/1.qcow2"]
    refused = lbrestore(store, "import", "vm1", "--disk", f"vda={raw}")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "reads damaged" in refused.stderr and "--full" in refused.stderr
    out = ok(lbrestore(store, "import", "vm1", "--full", "--disk", f"vda={raw}"))
    assert "vm1@#3 (full)" in out  # the refused attempt's id 2 is never reused
    text = ok(lbrestore(store, "info", "vm1@latest"))
    assert "store problem: missing file data/vm1/vda/1.qcow2" in text
    assert "integrity: missing file data/vm1/vda/1.qcow2" in text  # logged by the import
