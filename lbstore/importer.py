"""Turn existing raw or qcow2 disk images into a restore point (`lbrestore import`).

The first import of a VM stores full files; later ones compare: every cluster is read and only
clusters whose BLAKE3 differs from the VM's newest point are stored, so a series of images of a
stopped VM becomes a real incremental chain (points of kind incremental).
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

from lbstore.checksums import cluster_digests
from lbstore.errors import Qcow2Error, StoreError
from lbstore.ingest import DiskIngest
from lbstore.model import RestorePoint
from lbstore.names import check_disk_name
from lbstore.qcow2.reader import Qcow2Image, RawImage, RunKind, open_image
from lbstore.store import Store

CHUNK = 16 << 20
"""Bytes read from an image and handed to the ingest at a time (a multiple of every cluster)."""

READ_AHEAD = 2
"""Chunks read (and hashed) ahead of the one being written."""

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
    full: bool = False,
) -> RestorePoint:
    """Store `images` (disk name -> image path) as one restore point of `vm`.

    Everything is checked (names, images) before the store is touched, so bad input leaves the
    store as it was. Each disk is compared with the VM's newest point (only differing clusters
    are stored, on top of that point's chain) unless `full`; a previous chain that reads
    damaged is never built on (lbstore.ingest: refused unless `full`).
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
                mode = "full" if full else "compare"
                disk = ingest.add_disk(name, image.virtual_size, mode=mode)
                _copy(image, disk, progress)
            return ingest.commit()
    raise AssertionError("unreachable")  # pragma: no cover - the with-block returns


def _copy(
    image: Qcow2Image | RawImage,
    disk: DiskIngest,
    progress: Progress | None,
) -> None:
    """Feed every byte of `image` to `disk`, CHUNK bytes at a time.

    Chunks the image itself maps as zeros (holes of a sparse raw file, zero or unallocated
    clusters of a qcow2 without backing file) are passed on as zeros without being read.
    A helper thread reads chunks ahead into page-aligned buffers (the store writes them with
    O_DIRECT) and hashes their clusters while the current chunk is written (the write releases
    the GIL), as qemu-img overlaps I/O. READ_AHEAD chunks may be ready or in progress, so
    an uneven write time does not leave the reader idle.
    """
    size = image.virtual_size
    zeros = _zero_ranges(image)
    chunks = [(offset, min(CHUNK, size - offset)) for offset in range(0, size, CHUNK)]
    to_read = [c[0] for c in chunks if not _covered(zeros, c[0], c[0] + c[1])]
    buffers = [mmap.mmap(-1, CHUNK) for _ in range(min(READ_AHEAD + 1, len(to_read)))]
    cluster_size = disk.cluster_size
    try:
        with ThreadPoolExecutor(1) as reader:
            # Buffer k % len(buffers) is refilled only once chunk k - len(buffers) is written.
            ahead: deque[Future[tuple[memoryview, list[bytes]]]] = deque(
                reader.submit(_read_chunk, image, to_read[k], buffers[k], cluster_size)
                for k in range(len(buffers))
            )
            k = len(buffers)
            for offset, length in chunks:
                if not ahead or to_read[k - len(ahead)] != offset:
                    disk.zero(offset, length)
                else:
                    view, digests = ahead.popleft().result()
                    disk.write(offset, view, digests=digests)
                    view.release()
                    if k < len(to_read):
                        buffer = buffers[k % len(buffers)]
                        ahead.append(
                            reader.submit(_read_chunk, image, to_read[k], buffer, cluster_size)
                        )
                        k += 1
                if progress is not None:
                    progress(length)
    finally:
        for buffer in buffers:
            with contextlib.suppress(BufferError):
                buffer.close()


def _zero_ranges(image: Qcow2Image | RawImage) -> list[tuple[int, int]]:
    """Guest ranges the image's own mapping says read as zeros, sorted and merged."""
    ranges: list[tuple[int, int]] = []
    for run in image.runs():
        if run.kind is RunKind.ZERO or (run.kind is RunKind.BACKING and image.backing is None):
            end = run.guest_offset + run.length
            if ranges and ranges[-1][1] == run.guest_offset:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((run.guest_offset, end))
    return ranges


def _covered(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    """True when [start, end) lies inside one of the sorted, merged `ranges`."""
    i = bisect.bisect_right(ranges, (start, float("inf"))) - 1
    return i >= 0 and ranges[i][0] <= start and end <= ranges[i][1]


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
