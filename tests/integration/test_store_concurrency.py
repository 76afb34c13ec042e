"""Concurrency: one writer at a time (the other waits or exits 4 naming the holder); readers
work while a write is in progress and see only committed points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import blake3

from lbstore.store import Store

MIB = 1 << 20

HOLDER = textwrap.dedent(
    """
    import sys
    from lbstore.store import Store
    store = Store.open(sys.argv[1], write=True, purpose="lbrestore backup")
    ingest = store.begin("vm1")
    ingest.add_disk("vda", 1 << 20).write(0, b"\\x07" * (1 << 20))
    print("ready", flush=True)
    sys.stdin.readline()
    ingest.commit()
    store.close()
    print("committed", flush=True)
    """
)


def cli_command(store: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "lbrestore", "--store", str(store), *args]


def cli_env(timeout: float | None) -> dict[str, str]:
    env = dict(os.environ)
    if timeout is not None:
        env["LBRESTORE_LOCK_TIMEOUT"] = str(timeout)
    return env


def lbrestore(
    store: Path, *args: str, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command(store, *args), env=cli_env(timeout), capture_output=True, text=True, check=False
    )


def spawn(store: Path, *args: str, timeout: float | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cli_command(store, *args),
        env=cli_env(timeout),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def make_store(tmp_path: Path) -> tuple[Path, Path]:
    store = tmp_path / "store"
    Store.init(store)
    image = tmp_path / "a.raw"
    image.write_bytes(blake3.blake3(b"a").digest(length=MIB))
    result = lbrestore(store, "import", "vm1", "--disk", f"vda={image}")
    assert result.returncode == 0, result.stderr
    return store, image


def test_a_second_writer_gets_store_busy_and_readers_keep_working(tmp_path: Path) -> None:
    store, image = make_store(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(store)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "ready"
        busy = lbrestore(store, "import", "vm1", "--disk", f"vda={image}", timeout=0.3)
        assert busy.returncode == 4
        line = busy.stderr.strip()
        assert f"store busy: locked by pid {holder.pid} (lbrestore backup, since " in line
        assert "\n" not in line and "Traceback" not in line

        listed = lbrestore(store, "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [p["id"] for p in json.loads(listed.stdout)] == [1]
        assert lbrestore(store, "info", "vm1@latest").returncode == 0
        with Store.open(store) as reader, reader.view(reader.resolve("vm1"), "vda") as view:
            assert view.read(0, MIB) == image.read_bytes()

        # a writer with a longer timeout waits for the holder and then succeeds
        waiting = spawn(store, "import", "vm1", "--disk", f"vda={image}", timeout=60)
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "committed"
        _, err = waiting.communicate()
        assert waiting.returncode == 0, err
    finally:
        holder.kill()
        holder.wait()
    with Store.open(store) as reader:
        points = reader.restore_points("vm1")
        assert [p.kind for p in points] == ["full", "incremental", "incremental"]
        with reader.view(points[-1], "vda") as view:
            assert view.read(0, MIB) == image.read_bytes()


def test_two_imports_at_once(tmp_path: Path) -> None:
    store, image = make_store(tmp_path)
    other = tmp_path / "b.raw"
    other.write_bytes(blake3.blake3(b"b").digest(length=MIB))
    processes = [spawn(store, "import", "vm1", "--disk", f"vda={path}") for path in (image, other)]
    codes = []
    for process in processes:
        _, err = process.communicate()
        codes.append(process.returncode)
        assert process.returncode in (0, 4), err
    assert 0 in codes
    with Store.open(store, write=True) as opened:
        points = opened.restore_points("vm1")
        assert len(points) == 1 + codes.count(0)
        assert opened.problems == []
