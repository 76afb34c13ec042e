"""Per-disk sidecar files: a restore point's metadata and checksums, kept beside its data.

The index is a cache of what the sidecars say. Each committed file `data/<vm>/<disk>/<id>.qcow2`
has a sidecar `data/<vm>/<disk>/<id>.point`, written and fsynced before the index commit and
never changed afterwards except by a merge (through `rewrite_sidecar`, atomically). When the
index is lost, emptied or damaged, `lbstore.rebuild` builds it again from the sidecars.

Format (all integers little-endian):

    magic            8 bytes   b"LBPOINT1"
    meta_length      u64       length of the JSON metadata
    meta             JSON      UTF-8, see below
    row_count        u64
    row_count x      u64 chunk, u64 algorithm length, u64 runs length, u64 digests length,
                     algorithm (ASCII), runs, digests
    digest           32 bytes  BLAKE3 of every byte above (the sidecar's own integrity)

The JSON metadata holds `format` (1), `store_id`, `point` (`id`, `vm`, `created` as ISO-8601
UTC, `kind`, `definition`, `disks`: every disk name of the point, so a lost sidecar is noticed)
and `disk` (`name`, `file` relative to data/, `backing_point_id`, `mode`, `virtual_size`,
`cluster_size`, `stored_bytes`, and `zero_runs`: the file's own zero clusters as
lbstore.checksums encodes them, in base64; absent in sidecars written before they were recorded)
and `checksums` (`chunk_clusters`). Each row is the index's
checksum row for that chunk exactly as lbstore.checksums encodes it (algorithm name, runs blob,
digests blob), so a rebuild inserts them as they are; reading checks each row with that
module's decoder, the one place that knows the row layout.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import blake3

from lbstore.checksums import CHUNK_CLUSTERS, ChecksumRow, decode_row, decode_zero_runs
from lbstore.errors import ChecksumRowError, StoreError
from lbstore.fsutil import replace_durably, write_new_durably
from lbstore.index import CommitDisk
from lbstore.model import parse_utc, utc_iso
from lbstore.private import COMMITTED_FILE_MODE

SIDECAR_SUFFIX = ".point"
MAGIC = b"LBPOINT1"
FORMAT_VERSION = 1
_U64 = struct.Struct("<Q")
_ROW = struct.Struct("<QQQQ")
_DIGEST_SIZE = 32


class SidecarError(StoreError):
    """A sidecar file is missing, unreadable, truncated or fails its own integrity digest."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


@dataclass(frozen=True)
class Sidecar:
    """What one sidecar records: its point, the point's disk names, and this disk in full."""

    store_id: str | None
    point_id: int
    vm: str
    created: datetime
    kind: str
    definition: dict[str, Any] | None
    point_disks: tuple[str, ...]
    disk: CommitDisk


def sidecar_path(data_dir: Path, vm: str, disk: str, point_id: int) -> Path:
    """data/<vm>/<disk>/<point id>.point"""
    return data_dir / vm / disk / f"{point_id}{SIDECAR_SUFFIX}"


def sidecar_path_of_file(data_dir: Path, file: str) -> Path:
    """The sidecar beside a data file named relative to data/ (`vm/disk/7.qcow2`)."""
    return (data_dir / file).with_suffix(SIDECAR_SUFFIX)


def encode_sidecar(sidecar: Sidecar) -> bytes:
    """The sidecar's bytes, integrity digest included."""
    disk = sidecar.disk
    meta = {
        "format": FORMAT_VERSION,
        "store_id": sidecar.store_id,
        "point": {
            "id": sidecar.point_id,
            "vm": sidecar.vm,
            "created": utc_iso(sidecar.created),
            "kind": sidecar.kind,
            "definition": sidecar.definition,
            "disks": list(sidecar.point_disks),
        },
        "disk": {
            "name": disk.name,
            "file": disk.file,
            "backing_point_id": disk.backing_point_id,
            "mode": disk.mode,
            "virtual_size": disk.virtual_size,
            "cluster_size": disk.cluster_size,
            "stored_bytes": disk.stored_bytes,
            **(
                {"zero_runs": base64.b64encode(disk.zero_runs).decode("ascii")}
                if disk.zero_runs is not None
                else {}
            ),
        },
        "checksums": {"chunk_clusters": CHUNK_CLUSTERS},
    }
    meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    parts = [MAGIC, _U64.pack(len(meta_bytes)), meta_bytes, _U64.pack(len(disk.checksums))]
    for row in disk.checksums:
        algorithm = row.algorithm.encode("ascii")
        runs, digests = bytes(row.cluster_runs), bytes(row.digests)
        parts += [_ROW.pack(row.chunk, len(algorithm), len(runs), len(digests))]
        parts += [algorithm, runs, digests]
    body = b"".join(parts)
    return body + blake3.blake3(body).digest()


class _Cursor:
    """Bounds-checked reads through a sidecar's bytes."""

    def __init__(self, data: bytes, path: object) -> None:
        self.data = data
        self.position = 0
        self.path = path

    def take(self, length: int, what: str) -> bytes:
        end = self.position + length
        if length < 0 or end > len(self.data):
            raise SidecarError(self.path, f"truncated ({what} runs past the end)")
        piece = self.data[self.position : end]
        self.position = end
        return piece

    def u64(self, what: str) -> int:
        return int(_U64.unpack(self.take(_U64.size, what))[0])


def decode_sidecar(data: bytes, path: object = "sidecar") -> Sidecar:
    """Parse and check a sidecar's bytes; SidecarError names what is wrong."""
    if len(data) < len(MAGIC) + _DIGEST_SIZE or not data.startswith(MAGIC):
        raise SidecarError(path, "not a restore point sidecar (bad magic)")
    body, digest = data[:-_DIGEST_SIZE], data[-_DIGEST_SIZE:]
    if blake3.blake3(body).digest() != digest:
        raise SidecarError(path, "integrity digest mismatch (the sidecar was changed or damaged)")
    cursor = _Cursor(body, path)
    cursor.take(len(MAGIC), "magic")
    try:
        meta = json.loads(cursor.take(cursor.u64("metadata length"), "metadata"))
        rows = []
        for _ in range(cursor.u64("row count")):
            chunk, algorithm_length, runs_length, digests_length = _ROW.unpack(
                cursor.take(_ROW.size, "checksum row")
            )
            algorithm = cursor.take(algorithm_length, "algorithm").decode("ascii")
            runs = cursor.take(runs_length, "runs")
            row = ChecksumRow(chunk, algorithm, runs, cursor.take(digests_length, "digests"))
            decode_row(row, str(path))  # the one row codec checks algorithm and shape
            rows.append(row)
        if cursor.position != len(body):
            raise SidecarError(path, "trailing bytes after the last checksum row")
        return _from_meta(meta, tuple(rows))
    except ChecksumRowError as exc:
        raise SidecarError(path, f"bad checksum row ({exc})") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise SidecarError(path, f"malformed metadata ({exc})") from exc


def _from_meta(meta: dict[str, Any], rows: tuple[ChecksumRow, ...]) -> Sidecar:
    if meta["format"] != FORMAT_VERSION:
        raise ValueError(f"unknown format {meta['format']!r}")
    if meta["checksums"]["chunk_clusters"] != CHUNK_CLUSTERS:
        raise ValueError(f"unsupported checksum chunking {meta['checksums']!r}")
    point, disk = meta["point"], meta["disk"]
    backing = disk["backing_point_id"]
    zero_runs = None
    if "zero_runs" in disk:
        zero_runs = base64.b64decode(disk["zero_runs"], validate=True)
        decode_zero_runs(zero_runs, "sidecar")  # raises ChecksumRowError when malformed
    return Sidecar(
        store_id=meta["store_id"],
        point_id=int(point["id"]),
        vm=str(point["vm"]),
        created=parse_utc(point["created"]),
        kind=str(point["kind"]),
        definition=point["definition"],
        point_disks=tuple(str(name) for name in point["disks"]),
        disk=CommitDisk(
            name=str(disk["name"]),
            file=str(disk["file"]),
            backing_point_id=None if backing is None else int(backing),
            mode=str(disk["mode"]),
            virtual_size=int(disk["virtual_size"]),
            cluster_size=int(disk["cluster_size"]),
            stored_bytes=int(disk["stored_bytes"]),
            checksums=rows,
            zero_runs=zero_runs,
        ),
    )


def read_sidecar(path: Path) -> Sidecar:
    """Read and check one sidecar file; SidecarError when missing, unreadable or damaged."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise SidecarError(path, "missing") from exc
    except OSError as exc:
        raise SidecarError(path, f"cannot read: {exc.strerror or exc}") from exc
    return decode_sidecar(data, path)


def write_sidecar(path: Path, sidecar: Sidecar) -> None:
    """Create a new sidecar at `path` (fsynced; an existing file is never replaced).

    The ingest writes it under tmp/ and moves it into data/ with a no-replace rename.
    """
    write_new_durably(path, encode_sidecar(sidecar))


def rewrite_sidecar(data_dir: Path, sidecar: Sidecar, mode: int = COMMITTED_FILE_MODE) -> Path:
    """Atomically replace the sidecar of `sidecar`'s point and disk (for merge only).

    A merge that changes a point's file (clusters folded in, backing re-pointed, kind) calls
    this before its index transaction; a crash leaves the old sidecar or the new one, whole.
    Returns the sidecar's path.
    """
    path = sidecar_path(data_dir, sidecar.vm, sidecar.disk.name, sidecar.point_id)
    replace_durably(path, encode_sidecar(sidecar), mode)
    return path
