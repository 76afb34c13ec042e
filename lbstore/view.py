"""Chain views: where each guest byte of (restore point, disk) lives, and reading it.

A view resolves one L2-table range (cluster_size / 8 clusters) at a time across the whole chain:
the top file's runs are taken as they are, its BACKING runs are asked of the next file, and so on
down to the base; what is still unresolved reads as zeros, and so does anything past a backing
file's end (QEMU's rule for a grown disk). The resolved segments of a range are cached, so once a
range is known a read costs a bisect and one pread per segment whatever the chain's depth.
"""

from __future__ import annotations

import bisect
import enum
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lbstore.closing import Closing
from lbstore.errors import Qcow2Error, StoreIntegrityError
from lbstore.qcow2.reader import Qcow2Image, Run, RunKind

CACHED_RANGES = 64


class ViewKind(enum.Enum):
    """How a guest range of a view is stored."""

    DATA = "data"  # uncompressed in `path` at `host_offset`
    COMPRESSED = "compressed"  # compressed in `path`
    ZERO = "zero"  # reads as zeros (zero cluster, unallocated everywhere, or past a file's end)


@dataclass(frozen=True, slots=True)
class ViewRun:
    """A guest range of a view and the file (restore point) that holds it."""

    kind: ViewKind
    guest_offset: int
    length: int
    point_id: int | None
    path: Path | None
    host_offset: int | None


@dataclass(slots=True)
class _Segment:
    start: int
    end: int
    kind: ViewKind
    layer: int  # index into the chain, -1 for ZERO
    host: int  # file offset of `start` for DATA, else 0


def check_backing_name(image: Qcow2Image, expected: Path | None) -> None:
    """Refuse `image` unless its header names `expected` (the index's next file) as its backing
    file, relative to its own folder, in qcow2 format; or names none when `expected` is None.

    Only strings are compared: nothing the header names is opened or stat'ed.
    """
    name = image.backing_file
    if expected is None:
        if name is not None:
            raise StoreIntegrityError(
                image.path, f"the header names backing file {name!r}; the index names none"
            )
        return
    wanted = os.path.relpath(expected, image.path.parent)
    if name != wanted:
        raise StoreIntegrityError(
            image.path,
            f"the header names backing file {name!r}, not {wanted!r} as the index says "
            "(refused without opening it)",
        )
    if image.backing_format not in (None, "qcow2"):
        raise StoreIntegrityError(
            image.path, f"backing format {image.backing_format!r} (store files are qcow2)"
        )


class ChainView(Closing):
    """A read-only view of one disk at one restore point, through its chain of files."""

    def __init__(self, layers: Sequence[tuple[int, Path]], images: list[Qcow2Image]) -> None:
        self._point_ids = [point_id for point_id, _ in layers]
        self._images = images
        top = images[0]
        self.virtual_size = top.virtual_size
        self.cluster_size = top.cluster_size
        self.range_size = top.cluster_size * (top.cluster_size // 8)
        self._cache: OrderedDict[int, tuple[list[int], list[_Segment]]] = OrderedDict()

    @classmethod
    def open(cls, layers: Sequence[tuple[int, Path]]) -> ChainView:
        """Open the chain given as (point id, path), top first, as the index describes it.

        Each file is opened alone; its header's backing name must name the next file of
        `layers`, relative to its own folder, before that file is opened. A tampered header
        (an absolute name, `..`, another file) is refused without opening or even looking at
        the file it names: only paths taken from the index are ever opened.
        """
        images: list[Qcow2Image] = []
        try:
            for position, (_, path) in enumerate(layers):
                image = Qcow2Image.open(path, backing=False)
                if images:
                    images[-1].backing = image
                images.append(image)
                following = layers[position + 1][1] if position + 1 < len(layers) else None
                check_backing_name(image, following)
        except BaseException:
            if images:
                images[0].close()
            raise
        return cls(layers, images)

    def close(self) -> None:
        """Close every file of the chain."""
        if self._images:
            self._images[0].close()
            self._images = []

    @property
    def depth(self) -> int:
        """Number of files in the chain."""
        return len(self._point_ids)

    def layers(self) -> list[tuple[int, Qcow2Image]]:
        """(point id, opened file) of every file of the chain, top first (lbstore-internal:
        integrity checks read each file's own mapping)."""
        return list(zip(self._point_ids, self._images, strict=True))

    @property
    def paths(self) -> list[Path]:
        """The chain's files, top first."""
        return [img.path for img in self._images]

    # --- resolution -----------------------------------------------------------------------------

    def _range(self, index: int) -> tuple[list[int], list[_Segment]]:
        cached = self._cache.get(index)
        if cached is not None:
            self._cache.move_to_end(index)
            return cached
        segments = self._resolve(index)
        entry = ([s.start for s in segments], segments)
        self._cache[index] = entry
        if len(self._cache) > CACHED_RANGES:
            self._cache.popitem(last=False)
        return entry

    def _resolve(self, index: int) -> list[_Segment]:
        """Where every byte of range `index` lives, as sorted, coalesced segments.

        Each file of the chain is asked once (one `runs()` walk) for what is still unresolved.
        """
        start = index * self.range_size
        end = min(start + self.range_size, self.virtual_size)
        found: list[_Segment] = []
        # Still unresolved: sorted, disjoint ranges kept as two parallel lists of bounds, so
        # the ranges an overlay leaves to its backing file pass through as list slices.
        starts, ends = [start], [end]
        for layer, image in enumerate(self._images):
            if not starts:
                break
            if ends[-1] > image.virtual_size:
                starts, ends = self._clip_to(image.virtual_size, starts, ends, found)
                if not starts:
                    break
            starts, ends = self._layer_runs(layer, image, starts, ends, found)
        found.extend(
            _Segment(s, e, ViewKind.ZERO, -1, 0) for s, e in zip(starts, ends, strict=True)
        )
        found.sort(key=lambda seg: seg.start)
        segments = _coalesce(found)
        position = start
        for segment in segments:  # every byte must be placed exactly once
            if segment.start != position:
                raise Qcow2Error(self.paths[0], f"chain mapping has a gap or overlap at {position}")
            position = segment.end
        if position != end:
            raise Qcow2Error(self.paths[0], f"chain mapping ends at {position}, not {end}")
        return segments

    @staticmethod
    def _clip_to(
        size: int, starts: list[int], ends: list[int], found: list[_Segment]
    ) -> tuple[list[int], list[int]]:
        """The ranges below `size`; what lies past a file's end reads as zeros (QEMU's rule)."""
        inside_starts, inside_ends = [], []
        for s, e in zip(starts, ends, strict=True):
            if s < size:
                inside_starts.append(s)
                inside_ends.append(min(e, size))
            if max(s, size) < e:
                found.append(_Segment(max(s, size), e, ViewKind.ZERO, -1, 0))
        return inside_starts, inside_ends

    @staticmethod
    def _layer_runs(
        layer: int, image: Qcow2Image, starts: list[int], ends: list[int], found: list[_Segment]
    ) -> tuple[list[int], list[int]]:
        """Add what `image` itself stores within the wanted ranges to `found`; return the
        ranges it leaves to its backing file.

        A BACKING run passes the wanted ranges inside it through as slices, so a mostly
        unallocated overlay costs O(its own runs), not O(fragments below it).
        """
        out_starts: list[int] = []
        out_ends: list[int] = []
        i = 0
        for run in image.runs(starts[0], ends[-1] - starts[0]):
            run_start, run_end = run.guest_offset, run.guest_offset + run.length
            i = bisect.bisect_right(ends, run_start, lo=i)
            j = bisect.bisect_left(starts, run_end, lo=i)
            if i >= j:
                continue
            if run.kind is RunKind.BACKING:
                part_starts, part_ends = starts[i:j], ends[i:j]
                part_starts[0] = max(part_starts[0], run_start)
                part_ends[-1] = min(part_ends[-1], run_end)
                out_starts.extend(part_starts)
                out_ends.extend(part_ends)
                continue
            for k in range(i, j):
                lo, hi = max(starts[k], run_start), min(ends[k], run_end)
                if lo < hi:
                    _add_piece(run, layer, lo, hi, found)
        return out_starts, out_ends

    def _segments(self, offset: int, end: int) -> Iterator[_Segment]:
        """The segments covering [offset, end), unclipped, in order."""
        pos = offset
        while pos < end:
            starts, segments = self._range(pos // self.range_size)
            i = bisect.bisect_right(starts, pos) - 1
            while i < len(segments) and pos < end:
                segment = segments[i]
                yield segment
                pos = segment.end
                i += 1

    # --- public mapping -------------------------------------------------------------------------

    def runs(self, offset: int = 0, length: int | None = None) -> Iterator[ViewRun]:
        """Where each guest range of [offset, offset + length) lives, coalesced, in order."""
        end = self.virtual_size if length is None else min(self.virtual_size, offset + length)
        pending: ViewRun | None = None
        for seg in self._segments(offset, end):
            lo, hi = max(seg.start, offset), min(seg.end, end)
            run = self._view_run(seg, lo, hi)
            if pending is not None and _joins(pending, run):
                pending = ViewRun(
                    run.kind,
                    pending.guest_offset,
                    pending.length + run.length,
                    run.point_id,
                    run.path,
                    pending.host_offset,
                )
                continue
            if pending is not None:
                yield pending
            pending = run
        if pending is not None:
            yield pending

    def _view_run(self, seg: _Segment, lo: int, hi: int) -> ViewRun:
        if seg.kind is ViewKind.ZERO:
            return ViewRun(ViewKind.ZERO, lo, hi - lo, None, None, None)
        host = seg.host + (lo - seg.start) if seg.kind is ViewKind.DATA else None
        return ViewRun(
            seg.kind, lo, hi - lo, self._point_ids[seg.layer], self._images[seg.layer].path, host
        )

    def own_cluster_counts(self) -> dict[int, int]:
        """Point id -> how many data (or compressed) clusters that file of the chain stores."""
        counts: dict[int, int] = {}
        size = self.cluster_size
        for point_id, image in zip(self._point_ids, self._images, strict=True):
            counts[point_id] = sum(
                (run.length + size - 1) // size
                for run in image.runs()
                if run.kind in (RunKind.DATA, RunKind.COMPRESSED)
            )
        return counts

    def source_of(self, offset: int) -> int | None:
        """The point id whose file stores the guest byte at `offset` (None: it reads as zero)."""
        starts, segments = self._range(offset // self.range_size)
        segment = segments[bisect.bisect_right(starts, offset) - 1]
        return None if segment.layer < 0 else self._point_ids[segment.layer]

    # --- reading --------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes; like a file, a read past the end returns fewer bytes."""
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length: {offset}, {length}")
        end = min(offset + length, self.virtual_size)
        if offset >= end:
            return b""
        out = bytearray(end - offset)
        self.readinto(offset, memoryview(out))
        return bytes(out)

    def readinto(self, offset: int, dest: memoryview) -> int:
        """Fill `dest` from `offset`; returns bytes filled (short past the end, like a file).

        Zero ranges are written too, so `dest` may be a reused buffer. Not thread-safe: one
        view per thread, or a lock around it.
        """
        end = min(offset + len(dest), self.virtual_size)
        for seg in self._segments(offset, end):
            lo, hi = max(seg.start, offset), min(seg.end, end)
            part = dest[lo - offset : hi - offset]
            if seg.kind is ViewKind.DATA:
                self._pread(seg.layer, part, seg.host + (lo - seg.start))
            elif seg.kind is ViewKind.COMPRESSED:
                part[:] = self._images[seg.layer].read(lo, hi - lo)
            else:
                _zero_fill(part)
        return max(0, end - offset)

    def _pread(self, layer: int, dest: memoryview, host: int) -> None:
        """Read stored bytes of one file of the chain straight into `dest`.

        Uses the descriptor the reader already holds (lbstore-internal), so a deep chain costs
        one descriptor per file, not two.
        """
        image = self._images[layer]
        got = image._file.readinto_at(dest, host)
        if got != len(dest):
            raise Qcow2Error(image.path, f"data cluster at {host + got:#x} is past end of file")


_ZEROS = bytes(1 << 20)


def _zero_fill(dest: memoryview) -> None:
    for start in range(0, len(dest), len(_ZEROS)):
        part = dest[start : start + len(_ZEROS)]
        part[:] = _ZEROS[: len(part)]


def _add_piece(run: Run, layer: int, lo: int, hi: int, found: list[_Segment]) -> None:
    """File `[lo, hi)` of a run this file stores itself (not BACKING) under found segments."""
    if run.kind is RunKind.ZERO:
        found.append(_Segment(lo, hi, ViewKind.ZERO, -1, 0))
    elif run.kind is RunKind.DATA:
        assert run.host_offset is not None
        found.append(
            _Segment(lo, hi, ViewKind.DATA, layer, run.host_offset + (lo - run.guest_offset))
        )
    else:
        found.append(_Segment(lo, hi, ViewKind.COMPRESSED, layer, 0))


def _joins(a: ViewRun, b: ViewRun) -> bool:
    """True when run `b` continues run `a` in the same place."""
    if a.kind is not b.kind or a.guest_offset + a.length != b.guest_offset:
        return False
    if a.kind is ViewKind.ZERO:
        return True
    if a.point_id != b.point_id:
        return False
    if a.kind is ViewKind.DATA:
        assert a.host_offset is not None
        return a.host_offset + a.length == b.host_offset
    return True


def _coalesce(segments: list[_Segment]) -> list[_Segment]:
    out: list[_Segment] = []
    for seg in segments:
        if out:
            last = out[-1]
            if (
                last.kind is seg.kind
                and last.end == seg.start
                and last.layer == seg.layer
                and (
                    seg.kind is not ViewKind.DATA or last.host + (last.end - last.start) == seg.host
                )
            ):
                last.end = seg.end
                continue
        out.append(seg)
    return out
