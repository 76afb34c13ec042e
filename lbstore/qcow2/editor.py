"""In-place edits of an existing qcow2 v3 file: set guest clusters, switch the backing file.

A merge must cost what the clusters it moves cost (like `qemu-img commit`), so it edits files
where they lie instead of rewriting them. Every edit keeps the file valid at every instant, so
that a crash (or SIGKILL) at any point leaves each guest cluster reading either its old or its
new mapping, never garbage, and `qemu-img check` finds at worst leaked clusters:

1. new host clusters are taken at the end of the file, beyond everything referenced: the data,
   any new L2 tables and any new refcount blocks are written there and fsynced (nothing points
   at them yet: a crash leaves unused space);
2. the refcounts of the new clusters are raised (entries of existing refcount blocks, refcount
   table entries of new blocks) and fsynced (a crash leaves leaked clusters);
3. only then do L2 entries (and L1 entries of new L2 tables) point at them, fsynced;
4. host clusters no longer referenced get their refcount lowered (a crash before: a leak).

The backing file name is switched by writing the new name into unused space of the header
cluster (fsynced), then one sector-sized write of sector 0 that changes backing_file_offset
and backing_file_size together. Names and sections follow QEMU's docs/interop/qcow2.txt.

Only the layout lbstore writes (and `qemu-img create` makes by default) is edited: version 3,
standard L2 entries, 16-bit refcounts, no snapshots, no persistent bitmaps, no external data
file, clean (not dirty). Anything else is refused with an error naming it.
"""

from __future__ import annotations

import os
import sys
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lbstore.closing import Closing
from lbstore.errors import Qcow2Error, Qcow2WriteError, UnsupportedFeatureError
from lbstore.qcow2 import format as fmt
from lbstore.qcow2.header import Qcow2Header, parse_header

SECTOR_SIZE = 512
_BIG_ENDIAN_HOST = sys.byteorder == "big"
BACKING_FIELDS = slice(8, 20)  # backing_file_offset (8 bytes) and backing_file_size (4 bytes)
ALTERNATE_NAME_GAP = 1024  # a second name slot past the longest name (1023 bytes) in the first

PhaseHook = Callable[[str], None]
"""Called with the name of each durable step as it completes (tests kill the process there)."""


@dataclass(frozen=True, slots=True)
class ClusterEdit:
    """Guest cluster `cluster` becomes `data` (a whole cluster, or up to the disk's end), or
    a zero cluster when `data` is None."""

    cluster: int
    data: bytes | memoryview | None


def _entries(data: bytes, typecode: str) -> array:
    """Big-endian table entries as native integers."""
    table = array(typecode, data)
    if not _BIG_ENDIAN_HOST:
        table.byteswap()
    return table


def _to_bytes(table: array) -> bytes:
    """Native table entries as the big-endian bytes qcow2 stores."""
    if not _BIG_ENDIAN_HOST:
        table = array(table.typecode, table)
        table.byteswap()
    return table.tobytes()


def _spans(indexes: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted indexes as (first, end) spans of consecutive values."""
    out: list[list[int]] = []
    for index in sorted(set(indexes)):
        if out and out[-1][1] == index:
            out[-1][1] = index + 1
        else:
            out.append([index, index + 1])
    return [(a, b) for a, b in out]


class Qcow2Editor(Closing):
    """An existing qcow2 file opened for in-place edits (see the module docstring)."""

    def __init__(self, path: Path, fd: int, header: Qcow2Header, file_size: int) -> None:
        self.path = path
        self._fd = fd
        self.header = header
        self.cluster_size = header.cluster_size
        self.virtual_size = header.virtual_size
        self._l2_entries = self.cluster_size // fmt.L2_ENTRY_SIZE
        self._per_block = self.cluster_size * 8 // 16
        self._end = -(-file_size // self.cluster_size) * self.cluster_size
        self._l1 = _entries(
            self._pread(header.l1_table_offset, header.l1_size * fmt.L1_ENTRY_SIZE), "Q"
        )
        reftable_bytes = header.refcount_table_clusters * self.cluster_size
        self._reftable = _entries(self._pread(header.refcount_table_offset, reftable_bytes), "Q")
        self._l2: dict[int, array] = {}
        self._blocks: dict[int, array] = {}
        self.on_phase: PhaseHook | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Qcow2Editor:
        """Open `path` read-write and check that its layout is one this editor can change."""
        target = Path(path)
        try:
            fd = os.open(target, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise Qcow2WriteError(
                target, f"cannot open for editing: {exc.strerror}", exc.errno
            ) from exc
        try:
            size = os.fstat(fd).st_size
            header = parse_header(target, lambda o, n: os.pread(fd, n, o), size)
            check_editable(target, header)
            return cls(target, fd, header, size)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        """fsync what is pending (lowered refcounts) and close the file."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.fsync(fd)
            except OSError as exc:
                raise Qcow2WriteError(self.path, f"fsync: {exc.strerror}", exc.errno) from exc
            finally:
                os.close(fd)

    # --- low-level I/O --------------------------------------------------------------------------

    def _pread(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise Qcow2Error(self.path, f"read error at {offset:#x}: {exc.strerror}") from exc
        if len(data) < length:
            data += bytes(length - len(data))  # past the end of the file reads as zeros
        return data

    def _pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        try:
            while view:
                done = os.pwrite(self._fd, view, offset)
                view, offset = view[done:], offset + done
        except OSError as exc:
            raise Qcow2WriteError(
                self.path, f"write at {offset:#x}: {exc.strerror}", exc.errno
            ) from exc

    def _sync(self, phase: str) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise Qcow2WriteError(self.path, f"fsync: {exc.strerror}", exc.errno) from exc
        if self.on_phase is not None:
            self.on_phase(phase)

    # --- mapping --------------------------------------------------------------------------------

    def _table(self, l1_index: int) -> array | None:
        """The L2 table of one L1 entry (cached), or None when the entry has none."""
        table = self._l2.get(l1_index)
        if table is None:
            offset = self._l1[l1_index] & fmt.L1E_OFFSET_MASK
            if not offset:
                return None
            table = self._l2[l1_index] = _entries(self._pread(offset, self.cluster_size), "Q")
        return table

    def entry(self, cluster: int) -> int:
        """The raw L2 entry of guest cluster `cluster` (0 when no L2 table maps it)."""
        l1_index, index = divmod(cluster, self._l2_entries)
        table = self._table(l1_index)
        return 0 if table is None else table[index]

    def is_unallocated(self, cluster: int) -> bool:
        """True when the cluster reads from the backing file (no data, zero or compressed)."""
        entry = self.entry(cluster)
        return entry & (fmt.QCOW_OFLAG_COMPRESSED | fmt.QCOW_OFLAG_ZERO | fmt.L2E_OFFSET_MASK) == 0

    # --- refcounts ------------------------------------------------------------------------------

    def _block(self, block_index: int) -> array | None:
        block = self._blocks.get(block_index)
        if block is None:
            if block_index >= len(self._reftable):
                return None
            offset = self._reftable[block_index] & fmt.REFCOUNT_TABLE_OFFSET_MASK
            if not offset:
                return None
            block = self._blocks[block_index] = _entries(
                self._pread(offset, self.cluster_size), "H"
            )
        return block

    def _new_blocks(self, first: int, count: int) -> list[int]:
        """Block indexes that must be created so clusters [first, first+count) plus the new
        blocks themselves (appended after them) all have a refcount block."""
        missing: list[int] = []
        while True:
            last = first + count + len(missing) - 1
            wanted = [
                b
                for b in range(first // self._per_block, last // self._per_block + 1)
                if b not in missing and self._block(b) is None
            ]
            if not wanted:
                break
            missing.extend(wanted)
        if missing and max(missing) >= len(self._reftable):
            raise Qcow2Error(
                self.path,
                "the refcount table is full: this edit would need a larger refcount table, "
                "which the editor does not make",
            )
        return sorted(missing)

    def _change_refcounts(self, clusters: Iterable[int], delta: int) -> None:
        """Raise or lower the refcount of existing host clusters, writing each changed span."""
        touched: dict[int, list[int]] = {}
        for cluster in clusters:
            block_index, index = divmod(cluster, self._per_block)
            block = self._block(block_index)
            if block is None:
                raise Qcow2Error(self.path, f"host cluster {cluster} has no refcount block")
            value = block[index] + delta
            if not 0 <= value <= 0xFFFF:
                raise Qcow2Error(self.path, f"refcount of host cluster {cluster} out of range")
            block[index] = value
            touched.setdefault(block_index, []).append(index)
        for block_index, indexes in touched.items():
            block = self._blocks[block_index]
            base = self._reftable[block_index] & fmt.REFCOUNT_TABLE_OFFSET_MASK
            for lo, hi in _spans(indexes):
                self._pwrite(base + 2 * lo, _to_bytes(block[lo:hi]))

    # --- editing clusters -----------------------------------------------------------------------

    def write_clusters(self, edits: Sequence[ClusterEdit], *, in_place: bool = False) -> None:
        """Apply `edits` crash-safely (see the module docstring); one batch, four fsyncs (none
        when every edit is an overwrite in place: `close` makes those durable).

        `in_place`: where a cluster already owns a data cluster (refcount 1, COPIED) overwrite
        it there instead of allocating. Its old bytes are gone at once, so only a caller that
        owns every reader of this file (a point being removed) may ask for it.
        """
        if not edits:
            return
        overwrite, allocate = self._plan(edits, in_place)
        if len(overwrite) == len(edits):
            # Only overwrites in place: no metadata changes, hence no order to keep and no
            # fsync here; close() makes them durable (the caller owns every reader).
            for edit in overwrite:
                self._write_data(self.entry(edit.cluster) & fmt.L2E_OFFSET_MASK, edit.data)
            if self.on_phase is not None:
                self.on_phase("overwritten")
            return
        new_tables = sorted(
            {e.cluster // self._l2_entries for e in allocate}
            | {e.cluster // self._l2_entries for e in edits if e.data is None}
        )
        new_tables = [t for t in new_tables if self._table(t) is None]
        data_count = sum(1 for e in allocate if e.data is not None)
        first = self._end // self.cluster_size
        blocks = self._new_blocks(first, data_count + len(new_tables))
        hosts, table_hosts, block_hosts = self._layout(first, data_count, new_tables, blocks)
        for edit in overwrite:
            self._write_data(self.entry(edit.cluster) & fmt.L2E_OFFSET_MASK, edit.data)
        self._write_new_clusters(allocate, hosts, table_hosts, block_hosts, first)
        self._sync("data")
        self._raise_refcounts(first, data_count + len(new_tables), block_hosts)
        self._sync("refcounts")
        freed = self._map(edits, hosts, table_hosts, overwrite)
        self._sync("mapping")
        self._change_refcounts(freed, -1)
        if self.on_phase is not None:
            self.on_phase("freed")

    def _plan(
        self, edits: Sequence[ClusterEdit], in_place: bool
    ) -> tuple[list[ClusterEdit], list[ClusterEdit]]:
        """Split data edits into overwrites in place and edits that need a new host cluster."""
        overwrite, allocate = [], []
        seen: set[int] = set()
        clusters = -(-self.virtual_size // self.cluster_size)
        for edit in edits:
            if not 0 <= edit.cluster < clusters:
                raise Qcow2Error(self.path, f"guest cluster {edit.cluster} is outside the disk")
            if edit.cluster in seen:
                raise Qcow2Error(self.path, f"guest cluster {edit.cluster} edited twice")
            seen.add(edit.cluster)
            if edit.data is None:
                continue
            if len(edit.data) > self.cluster_size:
                raise Qcow2Error(self.path, f"more than one cluster for {edit.cluster}")
            entry = self.entry(edit.cluster)
            owned = entry & fmt.QCOW_OFLAG_COPIED and not entry & fmt.QCOW_OFLAG_COMPRESSED
            if in_place and owned and entry & fmt.L2E_OFFSET_MASK:
                overwrite.append(edit)
            else:
                allocate.append(edit)
        return overwrite, allocate

    def _layout(
        self, first: int, data_count: int, new_tables: list[int], blocks: list[int]
    ) -> tuple[list[int], dict[int, int], dict[int, int]]:
        """Host offsets at the end of the file: data clusters, then L2 tables, then blocks."""
        size = self.cluster_size
        hosts = [(first + i) * size for i in range(data_count)]
        base = first + data_count
        table_hosts = {t: (base + i) * size for i, t in enumerate(new_tables)}
        base += len(new_tables)
        block_hosts = {b: (base + i) * size for i, b in enumerate(blocks)}
        return hosts, table_hosts, block_hosts

    def _write_data(self, host: int, data: bytes | memoryview | None) -> None:
        assert data is not None
        self._pwrite(host, data)
        if len(data) < self.cluster_size:
            self._pwrite(host + len(data), bytes(self.cluster_size - len(data)))

    def _write_new_clusters(
        self,
        allocate: list[ClusterEdit],
        hosts: list[int],
        table_hosts: dict[int, int],
        block_hosts: dict[int, int],
        first: int,
    ) -> None:
        """Step 1: data, empty L2 tables and new refcount blocks, all past the old end."""
        datas = [e.data for e in allocate if e.data is not None]
        for host, data in zip(hosts, datas, strict=True):
            self._write_data(host, data)
        empty = bytes(self.cluster_size)
        for host in table_hosts.values():
            self._pwrite(host, empty)
        total = len(hosts) + len(table_hosts) + len(block_hosts)
        for block_index, host in block_hosts.items():
            block = array("H", bytes(self.cluster_size))
            lo = max(first, block_index * self._per_block)
            hi = min(first + total, (block_index + 1) * self._per_block)
            for cluster in range(lo, hi):
                block[cluster - block_index * self._per_block] = 1
            self._pwrite(host, _to_bytes(block))
        self._end = (first + total) * self.cluster_size

    def _raise_refcounts(self, first: int, count: int, block_hosts: dict[int, int]) -> None:
        """Step 2: refcount 1 for the new clusters in existing blocks; hook up new blocks."""
        self._change_refcounts(
            (c for c in range(first, first + count) if c // self._per_block not in block_hosts),
            +1,
        )
        for block_index, host in sorted(block_hosts.items()):
            self._reftable[block_index] = host
            offset = self.header.refcount_table_offset + 8 * block_index
            self._pwrite(offset, _to_bytes(self._reftable[block_index : block_index + 1]))
            self._blocks.pop(block_index, None)

    def _map(
        self,
        edits: Sequence[ClusterEdit],
        hosts: list[int],
        table_hosts: dict[int, int],
        overwrite: list[ClusterEdit],
    ) -> list[int]:
        """Step 3: point L2 entries (and L1 entries of new tables) at the new clusters.

        Returns the host clusters that lost their reference (to be freed in step 4)."""
        for l1_index in table_hosts:
            self._l2[l1_index] = array("Q", bytes(self.cluster_size))
        in_place = {e.cluster for e in overwrite}
        host_iter = iter(hosts)
        changed: dict[int, list[int]] = {}
        freed: list[int] = []
        for edit in edits:
            if edit.cluster in in_place:
                continue
            l1_index, index = divmod(edit.cluster, self._l2_entries)
            table = self._l2[l1_index] if l1_index in self._l2 else self._table(l1_index)
            assert table is not None
            freed.extend(self._host_clusters(table[index]))
            if edit.data is None:
                table[index] = fmt.QCOW_OFLAG_ZERO
            else:
                table[index] = next(host_iter) | fmt.QCOW_OFLAG_COPIED
            changed.setdefault(l1_index, []).append(index)
        for l1_index, indexes in changed.items():
            if l1_index in table_hosts:
                self._pwrite(table_hosts[l1_index], _to_bytes(self._l2[l1_index]))
                continue
            base = self._l1[l1_index] & fmt.L1E_OFFSET_MASK
            for lo, hi in _spans(indexes):
                self._pwrite(base + 8 * lo, _to_bytes(self._l2[l1_index][lo:hi]))
        self._sync("tables")
        for l1_index, host in table_hosts.items():
            self._l1[l1_index] = host | fmt.QCOW_OFLAG_COPIED
            entry = _to_bytes(self._l1[l1_index : l1_index + 1])
            self._pwrite(self.header.l1_table_offset + 8 * l1_index, entry)
        return freed

    def _host_clusters(self, entry: int) -> list[int]:
        """The host clusters an L2 entry references (what replacing it frees)."""
        bits = self.header.cluster_bits
        if entry & fmt.QCOW_OFLAG_COMPRESSED:
            x = fmt.compressed_offset_bits(bits)
            host = entry & ((1 << x) - 1)
            sectors = ((entry >> x) & ((1 << (bits - 8)) - 1)) + 1
            last = (host // SECTOR_SIZE + sectors) * SECTOR_SIZE - 1
            return list(range(host >> bits, (last >> bits) + 1))
        host = entry & fmt.L2E_OFFSET_MASK
        return [host >> bits] if host else []

    # --- leaks --------------------------------------------------------------------------------

    def release_leaks(self) -> int:
        """Set the refcount of every host cluster nothing references back to 0; returns how
        many there were. A crash between steps 2 and 3 of `write_clusters` leaves such leaks
        (harmless, but `qemu-img check` reports them). Costs one walk of the metadata."""
        referenced = self._referenced_clusters()
        leaked: dict[int, list[int]] = {}
        for block_index in range(len(self._reftable)):
            block = self._block(block_index)
            if block is None:
                continue
            base = block_index * self._per_block
            for index, value in enumerate(block):
                if value and base + index not in referenced:
                    leaked.setdefault(block_index, []).append(index)
        for block_index, indexes in leaked.items():
            block = self._blocks[block_index]
            offset = self._reftable[block_index] & fmt.REFCOUNT_TABLE_OFFSET_MASK
            for index in indexes:
                block[index] = 0
            for lo, hi in _spans(indexes):
                self._pwrite(offset + 2 * lo, _to_bytes(block[lo:hi]))
        count = sum(len(indexes) for indexes in leaked.values())
        if count:
            self._sync("leaks")
        return count

    def _referenced_clusters(self) -> set[int]:
        """Every host cluster the header, tables and mappings reference."""
        bits = self.header.cluster_bits
        h = self.header
        found = {0}
        for offset, length in (
            (h.l1_table_offset, h.l1_size * fmt.L1_ENTRY_SIZE),
            (h.refcount_table_offset, h.refcount_table_clusters * self.cluster_size),
        ):
            found.update(range(offset >> bits, ((offset + max(length, 1) - 1) >> bits) + 1))
        for entry in self._reftable:
            if entry & fmt.REFCOUNT_TABLE_OFFSET_MASK:
                found.add((entry & fmt.REFCOUNT_TABLE_OFFSET_MASK) >> bits)
        for l1_index, entry in enumerate(self._l1):
            if not entry & fmt.L1E_OFFSET_MASK:
                continue
            found.add((entry & fmt.L1E_OFFSET_MASK) >> bits)
            table = self._table(l1_index)
            assert table is not None
            for l2_entry in table:
                if l2_entry:
                    found.update(self._host_clusters(l2_entry))
        return found

    # --- backing file ---------------------------------------------------------------------------

    def set_backing(self, name: str | None) -> None:
        """Make the file's backing file `name` (relative to the file), or none at all.

        The new name goes into unused space of the header cluster first (fsynced); then one
        write of sector 0 switches backing_file_offset and backing_file_size together. A name
        that fits in no free slot of the header cluster is refused (Qcow2Error says so).
        """
        if name is None:
            self._write_backing_fields(0, 0)
            return
        raw = name.encode()
        if not 0 < len(raw) <= fmt.MAX_BACKING_FILE_NAME or b"\0" in raw:
            raise Qcow2Error(self.path, f"backing file name {name!r}: 1-1023 bytes, no NUL")
        if self.header.backing_file == name:
            return
        slot = self._name_slot(len(raw))
        self._pwrite(slot, raw)
        self._sync("backing-name")
        self._write_backing_fields(slot, len(raw))

    def _name_slot(self, length: int) -> int:
        """Where a new backing name of `length` bytes can go without touching the current one:
        right after the header extensions, or past the longest name that could sit there."""
        home = self._extensions_end()
        current = self._current_name_range()
        for slot in (home, home + ALTERNATE_NAME_GAP, (current[1] + 7) & ~7):
            clear = slot >= current[1] or slot + length <= current[0]
            if slot >= home and clear and slot + length <= self.cluster_size:
                return slot
        raise Qcow2Error(
            self.path,
            f"a backing file name of {length} bytes does not fit in the header cluster "
            f"({self.cluster_size} bytes) beside the current one",
        )

    def _current_name_range(self) -> tuple[int, int]:
        header = self._pread(0, SECTOR_SIZE)
        offset = int.from_bytes(header[8:16], "big")
        size = int.from_bytes(header[16:20], "big")
        return (offset, offset + size) if offset and size else (0, 0)

    def _extensions_end(self) -> int:
        """The offset just past the header extensions' end marker (8-byte aligned)."""
        first = self._pread(0, self.cluster_size)
        offset = self.header.header_length
        while offset + 8 <= len(first):
            kind = int.from_bytes(first[offset : offset + 4], "big")
            length = int.from_bytes(first[offset + 4 : offset + 8], "big")
            offset += 8
            if kind == fmt.HEADER_EXTENSION_END:
                return offset
            offset += (length + 7) & ~7
        raise Qcow2Error(self.path, "header extensions have no end marker")

    def _write_backing_fields(self, offset: int, size: int) -> None:
        sector = bytearray(self._pread(0, SECTOR_SIZE))
        sector[BACKING_FIELDS] = offset.to_bytes(8, "big") + size.to_bytes(4, "big")
        self._pwrite(0, sector)
        self._sync("backing-switch")
        self.header = parse_header(
            self.path, lambda o, n: self._pread(o, n), os.fstat(self._fd).st_size
        )


def check_editable(path: Path, header: Qcow2Header) -> None:
    """UnsupportedFeatureError for a layout whose invariants the editor does not keep."""
    if header.version != 3:
        raise UnsupportedFeatureError(path, f"editing a version {header.version} image")
    if header.extended_l2:
        raise UnsupportedFeatureError(path, "editing an image with extended L2 entries")
    if header.refcount_order != fmt.DEFAULT_REFCOUNT_ORDER:
        raise UnsupportedFeatureError(path, f"editing {1 << header.refcount_order}-bit refcounts")
    if header.nb_snapshots:
        raise UnsupportedFeatureError(path, "editing an image with internal snapshots")
    if header.bitmaps is not None or header.autoclear_features & fmt.AUTOCLEAR_BITMAPS:
        raise UnsupportedFeatureError(path, "editing an image with persistent bitmaps")
    if header.dirty or header.compatible_features & fmt.COMPAT_LAZY_REFCOUNTS:
        raise UnsupportedFeatureError(path, "editing a dirty image or one with lazy refcounts")
