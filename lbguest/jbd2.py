"""Replay an ext3/ext4 jbd2 journal in memory, as the kernel does when it mounts.

A live backup is crash-consistent: the journal may hold committed transactions whose blocks are
not yet written home. `replay_journal` reads the journal like fs/jbd2/recovery.c and returns an
overlay {filesystem block: bytes} of what the kernel would write home; nothing is ever written.

- The log runs from s_start with sequence s_sequence; it ends at the first block that is not a
  journal block of the expected sequence, and at a descriptor, revoke or commit block whose
  checksum (csum v2/v3) fails: that transaction is not committed, as the kernel's scan decides.
- Revoke records of committed transactions cancel earlier copies of a block: a block is not
  replayed from a transaction older than or as old as its newest revoke.
- Data blocks whose tag checksum (csum v2/v3) fails are skipped, as the kernel skips them.
- Escaped blocks get the journal magic back in their first four bytes.

Not done: v1 commit-block CRC32 checksums (COMPAT_CHECKSUM) are not verified, and fast-commit
blocks are not replayed (the full commits before them are).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from dissect.util.hash import crc32c as crc32c_impl  # dissect's native build, else pure Python

from lbguest.errors import DamagedFilesystemError

JBD2_MAGIC = 0xC03B3998
DESCRIPTOR_BLOCK = 1
COMMIT_BLOCK = 2
SUPERBLOCK_V1 = 3
SUPERBLOCK_V2 = 4
REVOKE_BLOCK = 5
INCOMPAT_REVOKE = 0x1
INCOMPAT_64BIT = 0x2
INCOMPAT_ASYNC_COMMIT = 0x4
INCOMPAT_CSUM_V2 = 0x8
INCOMPAT_CSUM_V3 = 0x10
INCOMPAT_FAST_COMMIT = 0x20
FLAG_ESCAPE = 0x1
FLAG_SAME_UUID = 0x2
FLAG_LAST_TAG = 0x8
DEFAULT_FC_BLOCKS = 256
HEADER = struct.Struct(">III")
SUPERBLOCK = struct.Struct(">III IIIII I III 16s")
SUPERBLOCK_CHECKSUM_OFFSET = 0xFC
SUPERBLOCK_SIZE = 1024
FC_BLOCKS_OFFSET = 0x54
MAX_TRANSACTIONS = 1 << 20


def linux_crc32c(seed: int, data: bytes) -> int:
    """The kernel's crc32c(seed, data): no inversion before or after."""
    return int(crc32c_impl.crc32c(data, seed ^ 0xFFFFFFFF)) ^ 0xFFFFFFFF


@dataclass
class _Transaction:
    sequence: int
    tags: list[tuple[int, int, int, int]] = field(default_factory=list)
    """(filesystem block, journal block, flags, checksum) of each logged block."""
    revoked: list[int] = field(default_factory=list)


class _Journal:
    """The journal file of one filesystem, read block by block through a parser's stream."""

    def __init__(self, stream: Any, size: int, source: str) -> None:
        self.stream = stream
        self.source = source
        self.size = size
        raw = self._read_at(0, SUPERBLOCK_SIZE)
        if len(raw) < SUPERBLOCK_SIZE:
            raise DamagedFilesystemError(source, "journal superblock unreadable")
        fields = SUPERBLOCK.unpack_from(raw)
        magic, blocktype, _seq, self.block_size, self.maxlen, self.first = fields[:6]
        self.sequence, self.start, self.incompat, self.uuid = (
            fields[6],
            fields[7],
            fields[10],
            fields[12],
        )
        if magic != JBD2_MAGIC or blocktype not in (SUPERBLOCK_V1, SUPERBLOCK_V2):
            raise DamagedFilesystemError(source, "journal superblock has no jbd2 magic")
        if blocktype == SUPERBLOCK_V1:
            self.incompat = 0
        if self.block_size < 1024 or self.block_size & (self.block_size - 1):
            raise DamagedFilesystemError(source, f"journal block size {self.block_size}")
        self.maxlen = min(self.maxlen, size // self.block_size)
        if not 0 < self.first < self.maxlen:
            raise DamagedFilesystemError(source, "journal bounds make no sense")
        self.csum = bool(self.incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3))
        self.seed = linux_crc32c(0xFFFFFFFF, self.uuid)
        if self.csum:
            stored = struct.unpack_from(">I", raw, SUPERBLOCK_CHECKSUM_OFFSET)[0]
            blanked = (
                raw[:SUPERBLOCK_CHECKSUM_OFFSET] + bytes(4) + raw[SUPERBLOCK_CHECKSUM_OFFSET + 4 :]
            )
            if linux_crc32c(0xFFFFFFFF, blanked) != stored:
                raise DamagedFilesystemError(source, "journal superblock checksum mismatch")
        self.last = self.maxlen
        if self.incompat & INCOMPAT_FAST_COMMIT:
            fc_blocks = struct.unpack_from(">I", raw, FC_BLOCKS_OFFSET)[0] or DEFAULT_FC_BLOCKS
            self.last = max(self.first + 1, self.maxlen - fc_blocks)
        if self.incompat & INCOMPAT_CSUM_V3:
            self.tag_size = 16
        else:
            self.tag_size = 12 + (2 if self.incompat & INCOMPAT_CSUM_V2 else 0)
            if not self.incompat & INCOMPAT_64BIT:
                self.tag_size -= 4

    def _read_at(self, offset: int, length: int) -> bytes:
        self.stream.seek(offset)
        return bytes(self.stream.read(length))

    def block(self, number: int) -> bytes:
        return self._read_at(number * self.block_size, self.block_size)

    def wrap(self, number: int) -> int:
        return number - (self.last - self.first) if number >= self.last else number

    def tail_ok(self, block: bytes) -> bool:
        """A descriptor or revoke block's tail checksum (csum v2/v3) holds."""
        if not self.csum:
            return True
        stored = struct.unpack_from(">I", block, len(block) - 4)[0]
        return linux_crc32c(self.seed, block[:-4] + bytes(4)) == stored

    def commit_ok(self, block: bytes) -> bool:
        """A commit block's checksum (csum v2/v3) holds."""
        if not self.csum:
            return True
        stored = struct.unpack_from(">I", block, 16)[0]
        return linux_crc32c(self.seed, block[:16] + bytes(4) + block[20:]) == stored

    def data_ok(self, sequence: int, data: bytes, checksum: int) -> bool:
        """A logged block's tag checksum holds (v3: 32 bits, v2: the low 16)."""
        if not self.csum:
            return True
        value = linux_crc32c(linux_crc32c(self.seed, struct.pack(">I", sequence)), data)
        if self.incompat & INCOMPAT_CSUM_V3:
            return value == checksum
        return value & 0xFFFF == checksum

    # -- the scan ------------------------------------------------------------------------------

    def committed(self) -> list[_Transaction]:
        """Every committed transaction from s_start on, in order."""
        done: list[_Transaction] = []
        if self.start == 0:
            return done
        number, sequence = self.start, self.sequence
        current = _Transaction(sequence)
        visited = 0
        while visited < self.maxlen and len(done) < MAX_TRANSACTIONS:
            number = self.wrap(number)
            if not self.first <= number < self.last:
                break
            block = self.block(number)
            visited += 1
            if len(block) < self.block_size:
                break
            magic, blocktype, block_sequence = HEADER.unpack_from(block)
            if magic != JBD2_MAGIC or block_sequence != sequence:
                break
            if blocktype == DESCRIPTOR_BLOCK:
                if not self.tail_ok(block):
                    break
                tags = self._tags(block, number)
                current.tags.extend(tags)
                visited += len(tags)
                number += 1 + len(tags)
            elif blocktype == REVOKE_BLOCK:
                if not self.tail_ok(block):
                    break
                current.revoked.extend(self._revoked(block))
                number += 1
            elif blocktype == COMMIT_BLOCK:
                if not self.commit_ok(block):
                    break
                done.append(current)
                sequence = (sequence + 1) & 0xFFFFFFFF
                current = _Transaction(sequence)
                number += 1
            else:
                break
        return done

    def _tags(self, block: bytes, number: int) -> list[tuple[int, int, int, int]]:
        tags = []
        offset = HEADER.size
        end = len(block) - (4 if self.csum else 0)
        journal_block = number
        while offset + self.tag_size <= end:
            if self.incompat & INCOMPAT_CSUM_V3:
                low, flags, high, checksum = struct.unpack_from(">IIII", block, offset)
            else:
                low, checksum, flags = struct.unpack_from(">IHH", block, offset)
                high = 0
                if self.incompat & INCOMPAT_64BIT:
                    high = struct.unpack_from(">I", block, offset + 8)[0]
            offset += self.tag_size
            journal_block = self.wrap(journal_block + 1)
            target = (high << 32) | low if self.incompat & INCOMPAT_64BIT else low
            tags.append((target, journal_block, flags, checksum))
            if not flags & FLAG_SAME_UUID:
                offset += 16
            if flags & FLAG_LAST_TAG:
                break
        return tags

    def _revoked(self, block: bytes) -> list[int]:
        count = struct.unpack_from(">I", block, HEADER.size)[0]
        count = min(count, len(block) - (4 if self.csum else 0))
        size = 8 if self.incompat & INCOMPAT_64BIT else 4
        fmt = ">Q" if size == 8 else ">I"
        return [struct.unpack_from(fmt, block, at)[0] for at in range(16, count - size + 1, size)]


def replay_journal(fs: Any, source: str) -> tuple[dict[int, bytes], int]:
    """The overlay {filesystem block: bytes} after replaying the committed transactions of an
    ext filesystem's internal journal (dissect ExtFS), and how many transactions there were."""
    inode = fs.get_inode(fs.sb.s_journal_inum)
    journal = _Journal(inode.open(), inode.size, source)
    transactions = journal.committed()
    newest_revoke: dict[int, int] = {}
    for index, transaction in enumerate(transactions):
        for block in transaction.revoked:
            newest_revoke[block] = index
    overlay: dict[int, bytes] = {}
    for index, transaction in enumerate(transactions):
        for target, journal_block, flags, checksum in transaction.tags:
            if newest_revoke.get(target, -1) >= index:
                continue
            data = journal.block(journal_block)
            if len(data) != journal.block_size:
                continue
            if not journal.data_ok(transaction.sequence, data, checksum):
                continue
            if flags & FLAG_ESCAPE:
                data = struct.pack(">I", JBD2_MAGIC) + data[4:]
            if target < fs.block_count and journal.block_size == fs.block_size:
                overlay[target] = data
    return overlay, len(transactions)
