"""Decompression of qcow2 compressed clusters ("Compressed Clusters Descriptor").

QEMU writes zlib clusters as raw deflate streams with a 4 KiB window (wbits -12) and zstd
clusters as one zstd frame; both may be followed by padding up to the next 512-byte sector.
Output is bounded by the cluster size whatever the input claims.
"""

from __future__ import annotations

import zlib

import zstandard

from lbstore.qcow2 import format as fmt


class DecompressionError(Exception):
    """The compressed data is damaged or does not fill exactly one cluster."""


def decompress_cluster(compression_type: int, data: bytes, cluster_size: int) -> bytes:
    """Decompress one cluster; raise DecompressionError unless it yields `cluster_size` bytes."""
    if compression_type == fmt.COMPRESSION_ZLIB:
        out = _inflate(data, cluster_size)
    elif compression_type == fmt.COMPRESSION_ZSTD:
        out = _unzstd(data, cluster_size)
    else:
        raise DecompressionError(f"unknown compression type {compression_type}")
    if len(out) != cluster_size:
        raise DecompressionError(f"decompresses to {len(out)} bytes, not {cluster_size}")
    return out


def _inflate(data: bytes, cluster_size: int) -> bytes:
    try:
        return zlib.decompressobj(-12).decompress(data, cluster_size)
    except zlib.error as exc:
        raise DecompressionError(f"zlib: {exc}") from exc


_ZSTD_MAX_WINDOW = 1 << 23  # QEMU compresses one cluster (<= 2 MiB) per frame


def _unzstd(data: bytes, cluster_size: int) -> bytes:
    dctx = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
    parts: list[bytes] = []
    got = 0
    try:
        with dctx.stream_reader(data, read_across_frames=False) as reader:
            while got < cluster_size:
                chunk = reader.read(cluster_size - got)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
    except zstandard.ZstdError as exc:
        raise DecompressionError(f"zstd: {exc}") from exc
    return b"".join(parts)
