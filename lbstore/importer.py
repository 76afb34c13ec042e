"""Turn existing raw or qcow2 disk images into a restore point (`lbrestore import`).

The first import of a VM stores full files; later ones are resyncs: every cluster is read and
only clusters whose BLAKE3 differs from the VM's newest point are stored, so a series of images
of a stopped VM becomes a real incremental chain.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

from lbstore.errors import Qcow2Error, StoreError
from lbstore.ingest import DiskIngest, cluster_digests
from lbstore.model import RestorePoint
from lbstore.names import check_disk_name
from lbstore.qcow2.reader import Qcow2Image, RawImage, open_image
from lbstore.store import Store

CHUNK = 8 << 20
"""Bytes read from an image and handed to the ingest at a time (a multiple of every cluster)."""

Progress = Callable[[int], None]


class ImageError(StoreError):
    """An image given to import cannot be used (missing, not a disk image, unreadable)."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def open_import_image(path: Path) -> Qcow2Image | RawImage:
    """Open an image for import, refusing what cannot be a disk (missing, empty, odd size)."""
    if not path.exists():
        raise ImageError(path, "no such file")
    if not path.is_file():
        raise ImageError(path, "not a regular file")
    try:
        image = open_image(path)
    except Qcow2Error as exc:
        raise ImageError(path, f"not a usable disk image: {exc.problem}") from exc
    except OSError as exc:
        raise ImageError(path, exc.strerror or str(exc)) from exc
    if image.virtual_size == 0 or image.virtual_size % 512:
        image.close()
        raise ImageError(
            path,
            f"not a disk image: its size ({image.virtual_size} bytes) is not a positive "
            "multiple of 512",
        )
    return image


def import_images(
    store: Store,
    vm: str,
    images: Mapping[str, Path],
    *,
    created: datetime | None = None,
    progress: Progress | None = None,
) -> RestorePoint:
    """Store `images` (disk name -> image path) as one restore point of `vm`.

    Everything is checked (names, images) before the store is touched, so bad input leaves the
    store as it was.
    """
    for name in images:
        check_disk_name(name)
    with ExitStack() as stack:
        opened = {}
        for name, path in images.items():
            image = open_import_image(Path(path))
            stack.callback(image.close)
            opened[name] = image
        with store.begin(vm, created=created) as ingest:
            for name, image in opened.items():
                disk = ingest.add_disk(name, image.virtual_size, mode="resync")
                _copy(image, disk, progress)
            return ingest.commit()
    raise AssertionError("unreachable")  # pragma: no cover - the with-block returns


def _copy(
    image: Qcow2Image | RawImage,
    disk: DiskIngest,
    progress: Progress | None,
) -> None:
    """Feed every byte of `image` to `disk`, CHUNK bytes at a time.

    A helper thread reads the next chunk into a page-aligned buffer and hashes its clusters
    while the current chunk is written (the write releases the GIL), as qemu-img overlaps I/O.
    """
    size = image.virtual_size
    offsets = list(range(0, size, CHUNK))
    buffers = [mmap.mmap(-1, CHUNK), mmap.mmap(-1, CHUNK)]
    cluster_size = disk.cluster_size
    try:
        with ThreadPoolExecutor(1) as reader:
            pending = reader.submit(_read_chunk, image, offsets[0], buffers[0], cluster_size)
            for i, offset in enumerate(offsets):
                view, digests = pending.result()
                if i + 1 < len(offsets):
                    pending = reader.submit(
                        _read_chunk, image, offsets[i + 1], buffers[(i + 1) % 2], cluster_size
                    )
                disk.write(offset, view, digests=digests)
                if progress is not None:
                    progress(len(view))
                view.release()
    finally:
        for buffer in buffers:
            with contextlib.suppress(BufferError):
                buffer.close()


def _read_chunk(
    image: Qcow2Image | RawImage, offset: int, buffer: mmap.mmap, cluster_size: int
) -> tuple[memoryview, list[bytes]]:
    """Read the chunk at `offset` into `buffer`: a view of exactly its bytes, and its digests."""
    length = min(CHUNK, image.virtual_size - offset)
    view = memoryview(buffer)[:length]
    try:
        got = image.readinto(offset, view)
    except OSError as exc:
        view.release()
        raise ImageError(image.path, f"read error: {os.strerror(exc.errno or 0)}") from exc
    if got != length:
        view.release()
        raise ImageError(image.path, f"short read at {offset}: the file shrank while read")
    return view, cluster_digests(view, cluster_size)
