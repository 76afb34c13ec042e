"""A series of 30 images (each a random qemu-io modification of the previous) becomes a chain.

1 full + 29 incremental points (incremental overlays holding only what changed). For every point:
the view equals its image, `qemu-img compare` of the stored top against the image is identical,
`qemu-img check` is clean on every stored file, and the bytes stored are exactly the clusters
whose content changed to something non-zero (zeroed clusters are zero flags, not data).
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import blake3

from lbstore.importer import import_images
from lbstore.store import Store

CS = 65536
SIZE = 8 << 20
STEPS = 30


def run(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{args}: {result.stderr}{result.stdout}"
    return result


def modify(image: Path, rng: random.Random) -> None:
    """One to four random writes (data, zero writes, discards) through qemu-io."""
    commands = []
    for _ in range(rng.randint(1, 4)):
        offset = rng.randrange(0, SIZE // 512) * 512
        length = min(rng.randint(1, 512) * 512, SIZE - offset)
        what = rng.random()
        if what < 0.7:
            commands += ["-c", f"write -P {rng.randint(1, 255)} {offset} {length}"]
        elif what < 0.85:
            commands += ["-c", f"write -z {offset} {length}"]
        else:
            commands += ["-c", f"discard {offset} {length}"]
    run("qemu-io", "-f", "raw", *commands, str(image))


def changed_data_bytes(before: bytes, after: bytes) -> int:
    """Bytes of the clusters whose content changed to something that is not all zeros."""
    zero = bytes(CS)
    total = 0
    for start in range(0, SIZE, CS):
        new = after[start : start + CS]
        if new != before[start : start + CS] and new != zero:
            total += CS
    return total


def test_thirty_images_become_a_full_and_29_incrementals(tmp_path: Path) -> None:
    rng = random.Random(20261127)
    work = tmp_path / "work.raw"
    with work.open("wb") as f:
        f.write(rng.randbytes(3 << 20))
        f.truncate(SIZE)
    store_path = tmp_path / "store"
    Store.init(store_path)
    images: list[Path] = []
    expected_stored: list[int] = []
    previous = bytes(SIZE)
    with Store.open(store_path, write=True) as store:
        for step in range(STEPS):
            if step:
                modify(work, rng)
            image = tmp_path / f"step{step:02}.{'qcow2' if step % 2 else 'raw'}"
            if step % 2:  # every other image is a qcow2 file, the rest raw
                run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(work), str(image))
            else:
                shutil.copyfile(work, image)
            current = work.read_bytes()
            expected_stored.append(changed_data_bytes(previous, current))
            previous = current
            point = import_images(store, "vm1", {"vda": image})
            images.append(image)
            assert point.disks[0].stored_bytes == expected_stored[-1], f"step {step}"

    with Store.open(store_path) as store:
        points = store.restore_points("vm1")
        assert [p.kind for p in points] == ["full"] + ["incremental"] * (STEPS - 1)
        for depth, (point, image) in enumerate(zip(points, images, strict=True), start=1):
            top = store.file_path(point, "vda")
            assert len(store.chain(point, "vda")) == depth
            with store.view(point, "vda") as view:
                got = view.read(0, SIZE)
            assert blake3.blake3(got).digest() == blake3.blake3(image_bytes(image)).digest()
            result = run("qemu-img", "compare", "-q", str(top), str(image))
            assert result.returncode == 0, f"point #{point.id} differs from {image.name}"
            run("qemu-img", "check", "-q", str(top))
        # stored bytes track what changed, not the disk size
        incrementals = [p.disks[0].stored_bytes for p in points[1:]]
        assert sum(incrementals) == sum(expected_stored[1:])
        assert max(incrementals) <= 2 << 20 < SIZE


def image_bytes(image: Path) -> bytes:
    if image.suffix == ".raw":
        return image.read_bytes()
    out = image.with_suffix(".flat")
    run("qemu-img", "convert", "-O", "raw", str(image), str(out))
    data = out.read_bytes()
    out.unlink()
    return data
