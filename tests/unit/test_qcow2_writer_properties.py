"""Property tests of the qcow2 writer, with QEMU's tools as the oracle.

Random disks (cluster sizes 512 B to 2 MiB, virtual sizes that need not be a multiple of the
cluster size), random data and zero runs written in random order, with or without a backing
file (qcow2 made by qemu-img, or raw), with zlib, zstd or no compression. Every image must pass
`qemu-img check` with no errors and no leaks, and `qemu-img compare` must find it identical to
the expected raw bytes: the backing content overlaid with the written data and zeros.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qcow2_writer_oracles import make_qcow2_backing, qemu_img_check, qemu_img_compare

from lbstore.qcow2.writer import Qcow2Writer

MAX_IMAGE_BYTES = 6 * 1024 * 1024  # keeps each example small and fast
RUN_KINDS = ("random", "pattern", "half", "zero", "skip")


@dataclass(frozen=True)
class Run:
    kind: str  # one of RUN_KINDS
    first_cluster: int
    clusters: int
    seed: int


@dataclass(frozen=True)
class Scenario:
    cluster_size: int
    virtual_size: int
    runs: list[Run]  # in the order they are written
    compression: str | None
    backing: str | None  # None, "qcow2" or "raw"
    backing_size: int
    backing_seed: int


def run_bytes(run: Run, cluster_size: int) -> bytes:
    """Deterministic content: incompressible, highly compressible, or half and half."""
    length = run.clusters * cluster_size
    rng = random.Random(run.seed)
    if run.kind == "random":
        return rng.randbytes(length)
    if run.kind == "pattern":
        return (rng.randbytes(7) * (length // 7 + 1))[:length]
    half = cluster_size // 2
    return b"".join(rng.randbytes(half) + bytes(half) for _ in range(run.clusters))


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    cluster_bits = draw(st.integers(min_value=9, max_value=21))
    cluster_size = 1 << cluster_bits
    max_clusters = max(1, min(300, MAX_IMAGE_BYTES // cluster_size))
    full = draw(st.integers(min_value=0, max_value=max_clusters))
    tail = draw(st.integers(min_value=0, max_value=cluster_size // 512 - 1)) * 512
    virtual_size = full * cluster_size + tail or 512
    guest_clusters = -(-virtual_size // cluster_size)
    pieces = draw(
        st.lists(
            st.tuples(st.sampled_from(RUN_KINDS), st.integers(min_value=1, max_value=40)),
            min_size=1,
            max_size=10,
        )
    )
    runs, cluster = [], 0
    for kind, length in pieces:
        length = min(length, guest_clusters - cluster)
        if length <= 0:
            break
        if kind != "skip":
            runs.append(Run(kind, cluster, length, draw(st.integers(0, 2**32))))
        cluster += length
    runs = draw(st.permutations(runs))
    backing = draw(st.sampled_from([None, "qcow2", "raw"]))
    backing_size = draw(
        st.sampled_from(
            [virtual_size, max(512, virtual_size // 2 // 512 * 512), virtual_size + 4096]
        )
    )
    return Scenario(
        cluster_size=cluster_size,
        virtual_size=virtual_size,
        runs=runs,
        compression=draw(st.sampled_from([None, "zlib", "zstd"])),
        backing=backing,
        backing_size=backing_size,
        backing_seed=draw(st.integers(0, 2**32)),
    )


def write_backing(scenario: Scenario, folder: Path) -> tuple[str | None, bytes]:
    """Create the backing image; returns its file name and its content (virtual_size bytes)."""
    if scenario.backing is None:
        return None, bytes(scenario.virtual_size)
    rng = random.Random(scenario.backing_seed)
    # Random content with a zero gap, so the qcow2 backing also has unallocated clusters.
    content = bytearray(rng.randbytes(scenario.backing_size))
    gap = scenario.backing_size // 3
    content[gap : 2 * gap] = bytes(gap)
    raw = folder / "backing.raw"
    raw.write_bytes(content)
    name = "backing.raw"
    if scenario.backing == "qcow2":
        name = "backing.qcow2"
        make_qcow2_backing(raw, folder / name)
    seen = bytes(content[: scenario.virtual_size])
    return name, seen + bytes(scenario.virtual_size - len(seen))


def write_image(scenario: Scenario, folder: Path) -> tuple[Path, Path]:
    """Write the scenario with Qcow2Writer; returns (image, expected raw file)."""
    backing_name, base = write_backing(scenario, folder)
    expected = bytearray(base)
    cluster_size = scenario.cluster_size
    image = folder / "out.qcow2"
    with Qcow2Writer(
        image,
        scenario.virtual_size,
        cluster_size=cluster_size,
        backing_file=backing_name,
        backing_format=None if scenario.backing is None else scenario.backing,
        compression=scenario.compression,  # type: ignore[arg-type]
    ) as writer:
        for run in scenario.runs:
            offset = run.first_cluster * cluster_size
            length = min(run.clusters * cluster_size, scenario.virtual_size - offset)
            if run.kind == "zero":
                writer.write_zeroes(offset, length)
                expected[offset : offset + length] = bytes(length)
            else:
                data = run_bytes(run, cluster_size)[:length]
                writer.write(offset, data)
                expected[offset : offset + length] = data
    expected_raw = folder / "expected.raw"
    expected_raw.write_bytes(expected)
    return image, expected_raw


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios())
def test_written_images_pass_qemu_check_and_compare(
    scenario: Scenario, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as name:
        image, expected_raw = write_image(scenario, Path(name))
        qemu_img_check(image)
        qemu_img_compare(expected_raw, image)
