"""Importing images: raw (sparse or not) and qcow2 (with zero clusters, with a backing file)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import blake3
import pytest

from lbstore import importer
from lbstore.importer import ImageError, import_images
from lbstore.store import Store

MIB = 1 << 20


def qemu_io(image: Path, fmt: str, *commands: str) -> None:
    args = [a for c in commands for a in ("-c", c)]
    subprocess.run(["qemu-io", "-f", fmt, *args, str(image)], check=True, capture_output=True)


def flat(image: Path, tmp_path: Path) -> bytes:
    out = tmp_path / "flat.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(out)], check=True)
    data = out.read_bytes()
    out.unlink()
    return data


def view_bytes(store: Store, address: str) -> bytes:
    with store.view(store.resolve(address), "vda") as view:
        return view.read(0, view.virtual_size)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    Store.init(tmp_path / "store")
    with Store.open(tmp_path / "store", write=True) as opened:
        yield opened


def test_sparse_raw_chunks_are_not_read(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "sparse.raw"
    with image.open("wb") as f:
        f.truncate(64 * MIB)
    qemu_io(image, "raw", "write -P 0x61 1M 64k", "write -P 0x62 40M 8M")
    reads: list[int] = []
    original = importer._read_chunk
    monkeypatch.setattr(
        importer, "_read_chunk", lambda img, off, *a: reads.append(off) or original(img, off, *a)
    )
    point = import_images(store, "vm1", {"vda": image})
    chunk = importer.CHUNK
    # the chunks holding data (1M + 64k, 40M + 8M); the holes are zeros unread
    assert reads == sorted({MIB // chunk * chunk, 40 * MIB // chunk * chunk})
    assert point.disks[0].stored_bytes == 64 * 1024 + 8 * MIB
    assert view_bytes(store, "vm1") == image.read_bytes()


def test_qcow2_images_with_zero_clusters_and_backing_files(store: Store, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "24M"], check=True)
    qemu_io(base, "qcow2", "write -P 0x11 0 20M")
    top = tmp_path / "top.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top)],
        check=True,
    )
    qemu_io(top, "qcow2", "write -z 0 16M", "write -P 0x22 17M 64k")
    first = import_images(store, "vm1", {"vda": base})
    second = import_images(store, "vm1", {"vda": top})
    assert view_bytes(store, "vm1@#1") == flat(base, tmp_path)
    assert view_bytes(store, "vm1@latest") == flat(top, tmp_path)
    assert second.kind == "incremental" and second.disks[0].stored_bytes == 64 * 1024
    assert first.disks[0].stored_bytes == 20 * MIB
    assert (
        blake3.blake3(view_bytes(store, "vm1")).digest()
        == blake3.blake3(flat(top, tmp_path)).digest()
    )


def test_a_resync_of_a_discarded_chunk_reads_zeros(store: Store, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\x33" * 16 * MIB)
    import_images(store, "vm1", {"vda": image})
    subprocess.run(
        ["fallocate", "-p", "-o", str(8 * MIB), "-l", str(8 * MIB), str(image)], check=True
    )
    point = import_images(store, "vm1", {"vda": image})
    assert point.disks[0].stored_bytes == 0  # zero clusters over the old data, no data
    assert view_bytes(store, "vm1") == b"\x33" * 8 * MIB + bytes(8 * MIB)


def test_images_are_checked_before_the_store_changes(store: Store, tmp_path: Path) -> None:
    good = tmp_path / "good.raw"
    good.write_bytes(bytes(MIB))
    odd = tmp_path / "odd.raw"
    odd.write_bytes(bytes(1000))
    with pytest.raises(ImageError, match="multiple of 512"):
        import_images(store, "vm1", {"vda": good, "vdb": odd})
    assert store.restore_points() == []
    assert store.index.pending_points() == []
