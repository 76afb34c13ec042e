"""The in-place qcow2 editor: edits read back through QEMU and libqcow, structure stays clean,
and a SIGKILL at any instant leaves every cluster old or new with at worst leaked clusters."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyqcow
import pytest
from qcow2_writer_oracles import qemu_img_check, qemu_img_compare, qemu_img_info

from lbstore.errors import Qcow2Error, UnsupportedFeatureError
from lbstore.qcow2.editor import ClusterEdit, Qcow2Editor
from lbstore.qcow2.reader import Qcow2Image, RunKind
from lbstore.qcow2.writer import Qcow2Writer

KIB = 1024
MIB = 1024 * KIB


def build_chain(
    folder: Path, size: int, cluster: int, seed: int, base_fill: float = 0.5
) -> tuple[Path, Path, bytearray]:
    """base.qcow2 (full) and top.qcow2 (overlay on it), by lbstore's writer; returns their
    paths and the top's expected guest bytes."""
    rng = random.Random(seed)
    clusters = size // cluster
    content = bytearray(size)
    base = folder / "base.qcow2"
    with Qcow2Writer(base, size, cluster_size=cluster) as writer:
        for c in range(clusters):
            if rng.random() < base_fill:
                data = rng.randbytes(cluster)
                writer.write(c * cluster, data)
                content[c * cluster : (c + 1) * cluster] = data
    top = folder / "top.qcow2"
    with Qcow2Writer(
        top, size, cluster_size=cluster, backing_file="base.qcow2", backing_format="qcow2"
    ) as writer:
        for c in range(clusters):
            roll = rng.random()
            if roll < 0.1:
                data = rng.randbytes(cluster)
                writer.write(c * cluster, data)
                content[c * cluster : (c + 1) * cluster] = data
            elif roll < 0.15:
                writer.write_zeroes(c * cluster, cluster)
                content[c * cluster : (c + 1) * cluster] = bytes(cluster)
    return base, top, content


def random_edits(
    size: int, cluster: int, seed: int, count: int
) -> tuple[list[ClusterEdit], dict[int, bytes]]:
    rng = random.Random(seed)
    picked = rng.sample(range(size // cluster), count)
    edits, expected = [], {}
    for c in picked:
        if rng.random() < 0.25:
            edits.append(ClusterEdit(c, None))
            expected[c] = bytes(cluster)
        else:
            data = rng.randbytes(cluster)
            edits.append(ClusterEdit(c, data))
            expected[c] = data
    return edits, expected


def apply_expected(content: bytearray, cluster: int, expected: dict[int, bytes]) -> None:
    for c, data in expected.items():
        content[c * cluster : (c + 1) * cluster] = data


def write_raw(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def read_libqcow(image: Path, parent: Path | None) -> bytes:
    handle = pyqcow.file()
    handle.open(str(image))
    parent_handle = None
    if parent is not None:
        parent_handle = pyqcow.file()
        parent_handle.open(str(parent))
        handle.set_parent(parent_handle)
    try:
        return bytes(handle.read_buffer_at_offset(handle.get_media_size(), 0))
    finally:
        handle.close()
        if parent_handle is not None:
            parent_handle.close()


@pytest.mark.parametrize(("cluster", "size"), [(65536, 4 * MIB), (4096, 16 * MIB), (512, 2 * MIB)])
def test_edits_read_back_through_qemu_and_libqcow(tmp_path: Path, cluster: int, size: int) -> None:
    """Data and zero clusters set anywhere (new L2 tables and refcount blocks where needed)."""
    base, top, content = build_chain(tmp_path, size, cluster, seed=cluster)
    edits, expected = random_edits(size, cluster, seed=cluster + 1, count=size // cluster // 3)
    with Qcow2Editor.open(top) as editor:
        for start in range(0, len(edits), 97):
            editor.write_clusters(edits[start : start + 97])
    apply_expected(content, cluster, expected)
    raw = write_raw(tmp_path / "expected.raw", content)
    qemu_img_compare(raw, top)
    qemu_img_check(top)
    with Qcow2Image.open(top) as image:
        assert image.read(0, size) == bytes(content)
        zero_runs = [r for r in image.runs() if r.kind is RunKind.ZERO]
    # libqcow reads a zero cluster of an overlay from its parent: compare everything else
    got = bytearray(read_libqcow(top, base))
    for run in zero_runs:
        got[run.guest_offset : run.guest_offset + run.length] = bytes(run.length)
    assert got == content


def test_edits_that_need_new_l2_tables_and_refcount_blocks(tmp_path: Path) -> None:
    """An empty overlay of 512-byte clusters: every edit needs tables and blocks made."""
    size, cluster = 4 * MIB, 512
    top = tmp_path / "empty.qcow2"
    with Qcow2Writer(top, size, cluster_size=cluster):
        pass
    edits, expected = random_edits(size, cluster, seed=7, count=3000)
    with Qcow2Editor.open(top) as editor:
        editor.write_clusters(edits)
    content = bytearray(size)
    apply_expected(content, cluster, expected)
    qemu_img_compare(write_raw(tmp_path / "expected.raw", content), top)
    qemu_img_check(top)


def test_in_place_overwrites_reuse_owned_clusters_and_free_replaced_ones(tmp_path: Path) -> None:
    size, cluster = 4 * MIB, 65536
    base, _, _ = build_chain(tmp_path, size, cluster, seed=3, base_fill=1.0)
    before = base.stat().st_size
    edits, expected = random_edits(size, cluster, seed=4, count=40)
    with Qcow2Editor.open(base) as editor:
        editor.write_clusters(edits, in_place=True)
    base_content = bytearray(Qcow2Image.open(base).read(0, size))
    assert base.stat().st_size <= before + 2 * cluster  # overwrites took no new data clusters
    qemu_img_check(base)  # replaced-by-zero clusters were freed: no leaks
    for c, data in expected.items():
        assert base_content[c * cluster : (c + 1) * cluster] == data


def test_edits_on_an_image_made_by_qemu(tmp_path: Path) -> None:
    size, cluster = 8 * MIB, 65536
    image = tmp_path / "qemu.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)], check=True)
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x5a 1M 1M", "-c", "write -z 3M 64k", str(image)],
        check=True,
        capture_output=True,
    )
    edits, expected = random_edits(size, cluster, seed=9, count=30)
    with Qcow2Editor.open(image) as editor:
        editor.write_clusters(edits)
    content = bytearray(size)
    content[MIB : 2 * MIB] = b"\x5a" * MIB
    apply_expected(content, cluster, expected)
    qemu_img_compare(write_raw(tmp_path / "expected.raw", content), image)
    qemu_img_check(image)


def test_backing_switch_and_removal(tmp_path: Path) -> None:
    size, cluster = 2 * MIB, 65536
    base, top, content = build_chain(tmp_path, size, cluster, seed=11)
    twin = tmp_path / "twin.qcow2"
    twin.write_bytes(base.read_bytes())
    raw = write_raw(tmp_path / "expected.raw", content)
    with Qcow2Editor.open(top) as editor:
        long_name = "./" * 490 + "twin.qcow2"  # 990 bytes: near the longest name allowed
        for name in ("twin.qcow2", "base.qcow2", "twin.qcow2", long_name, "base.qcow2"):
            editor.set_backing(name)
            assert qemu_img_info(top)["backing-filename"] == name
            qemu_img_compare(raw, top)
            qemu_img_check(top)
        editor.set_backing(None)
    info = qemu_img_info(top)
    assert "backing-filename" not in info
    qemu_img_check(top)
    with Qcow2Image.open(top) as image:
        assert image.backing is None


def test_backing_name_that_cannot_fit_is_refused(tmp_path: Path) -> None:
    top = tmp_path / "small.qcow2"
    with Qcow2Writer(top, MIB, cluster_size=512, backing_file="b" * 300):
        pass
    with Qcow2Editor.open(top) as editor, pytest.raises(Qcow2Error, match="does not fit"):
        editor.set_backing("c" * 300)
    assert qemu_img_info(top)["backing-filename"] == "b" * 300


@pytest.mark.parametrize(
    ("options", "feature"),
    [
        ("compat=0.10", "version 2"),
        ("refcount_bits=8", "8-bit refcounts"),
        ("extended_l2=on,cluster_size=65536", "extended L2"),
        ("lazy_refcounts=on", "lazy refcounts"),
    ],
)
def test_unsupported_layouts_are_refused_by_name(
    tmp_path: Path, options: str, feature: str
) -> None:
    image = tmp_path / "odd.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, str(image), "1M"], check=True
    )
    with pytest.raises(UnsupportedFeatureError, match=feature):
        Qcow2Editor.open(image)


def test_snapshots_are_refused(tmp_path: Path) -> None:
    image = tmp_path / "snap.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(image)], check=True)
    with pytest.raises(UnsupportedFeatureError, match="snapshots"):
        Qcow2Editor.open(image)


# --- crashes ------------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    from lbstore.qcow2.editor import ClusterEdit, Qcow2Editor
    path, plan_file, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
    plan = json.load(open(plan_file))
    steps = 0
    def hook(name):
        global steps
        steps += 1
        if steps == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    with Qcow2Editor.open(path) as editor:
        editor.on_phase = hook
        print("ready", flush=True)
        for batch in plan["batches"]:
            editor.write_clusters(
                [ClusterEdit(c, None if s is None else bytes([s]) * plan["cluster"])
                 for c, s in batch],
                in_place=plan["in_place"],
            )
        editor.set_backing(plan["backing"])
    """
)


def check_allows_leaks_only(image: Path) -> None:
    done = subprocess.run(
        ["qemu-img", "check", "--output=json", str(image)], capture_output=True, text=True
    )
    assert done.returncode in (0, 3), done.stdout + done.stderr  # 3: leaks only
    report = json.loads(done.stdout)
    assert report["check-errors"] == 0 and report.get("corruptions", 0) == 0, report


@pytest.mark.parametrize(
    "kill", [*(f"step{n}" for n in range(1, 18)), *(f"timer{n}" for n in range(6)), None]
)
def test_sigkill_leaves_old_or_new_clusters(tmp_path: Path, kill: str | None) -> None:
    """A child edits in three batches (new tables, refcount blocks, zeroes, frees), then
    switches the backing file; it is killed after durable step N (17 steps in all), or at a
    random instant. Every cluster reads old or new; qemu-img check finds at worst leaks."""
    size, cluster = 2 * MIB, 512
    base, top, content = build_chain(tmp_path, size, cluster, seed=21)
    twin = tmp_path / "twin.qcow2"
    twin.write_bytes(base.read_bytes())
    rng = random.Random(22)
    chosen = rng.sample(range(size // cluster), 900)
    batches = [
        [(c, None if rng.random() < 0.2 else rng.randrange(1, 256)) for c in chosen[i : i + 300]]
        for i in range(0, 900, 300)
    ]
    plan = {"cluster": cluster, "batches": batches, "in_place": False, "backing": "twin.qcow2"}
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    kill_after = int(kill[4:]) if kill and kill.startswith("step") else 0
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(top), str(plan_file), str(kill_after)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    if kill and kill.startswith("timer"):
        time.sleep(random.Random(kill).uniform(0, 0.05))
        child.send_signal(signal.SIGKILL)
    _, stderr = child.communicate()
    if kill is None:
        assert child.returncode == 0, stderr
    elif kill.startswith("step"):
        assert child.returncode == -signal.SIGKILL, stderr
    check_allows_leaks_only(top)
    new = {c: bytes(cluster) if s is None else bytes([s]) * cluster for b in batches for c, s in b}
    with Qcow2Image.open(top) as image:
        got = image.read(0, size)
    for c in range(size // cluster):
        piece = got[c * cluster : (c + 1) * cluster]
        old = bytes(content[c * cluster : (c + 1) * cluster])
        assert piece == old or piece == new.get(c), f"cluster {c} reads neither old nor new"
    with Qcow2Editor.open(top) as editor:
        editor.release_leaks()
    qemu_img_check(top)  # strict: no leaks left
    with Qcow2Image.open(top) as image:
        assert image.read(0, size) == got
    if kill is None:
        assert all(got[c * cluster : (c + 1) * cluster] == d for c, d in new.items())
        assert qemu_img_info(top)["backing-filename"] == "twin.qcow2"
