"""Checksum checks in a second process, on buffers shared with it (restore's verification).

BLAKE3 (the `blake3` package) holds Python's GIL while it hashes, so a thread cannot hash while
another writes. Restore therefore reads into a ring of buffers in shared memory (an anonymous
`mmap`, shared with a forked child), hands each buffer's cluster list to a hashing process
and writes the same buffer meanwhile. A buffer goes back to the reader only when both the
writer and the hasher are done with it (`Slots.release` twice), so the bytes checked are
exactly the bytes written, without a copy.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection

import blake3


@dataclass(frozen=True, slots=True)
class HashCheck:
    """One cluster to check: where it lies in its buffer, and what its digest must be."""

    at: int
    length: int
    expected: bytes
    point_id: int
    cluster: int


class Slots:
    """A fixed ring of equal buffers in shared memory, with per-buffer holder counts."""

    def __init__(self, count: int, size: int) -> None:
        self.size = size
        self.memory = mmap.mmap(-1, count * size)  # MAP_SHARED: a forked child sees it
        self.free: queue.Queue[int] = queue.Queue()
        self._holders = [0] * count
        self._lock = threading.Lock()
        for slot in range(count):
            self.free.put(slot)

    def view(self, slot: int) -> memoryview:
        """The whole buffer of `slot`."""
        return memoryview(self.memory)[slot * self.size : (slot + 1) * self.size]

    def hold(self, slot: int, holders: int) -> None:
        """`slot` is now used by `holders` parties; each calls `release` once."""
        with self._lock:
            self._holders[slot] = holders

    def release(self, slot: int) -> None:
        """One party is done with `slot`; the last one returns it to the free ring."""
        with self._lock:
            self._holders[slot] -= 1
            done = self._holders[slot] <= 0
        if done:
            self.free.put(slot)

    def close(self) -> None:
        """Unmap the buffers (every view of them must be released first)."""
        with contextlib.suppress(BufferError):
            self.memory.close()


class HashWorker:
    """A forked process that checks clusters in `slots`, and a thread collecting its answers.

    `submit` sends one buffer's checks; when the child answers, the buffer is released and the
    first mismatch, if any, is kept in `mismatch` as a HashCheck.
    """

    def __init__(self, slots: Slots, cluster_size: int) -> None:
        self.slots = slots
        self.mismatch: HashCheck | None = None
        self.failure: BaseException | None = None
        context = multiprocessing.get_context("fork")
        child_requests, self._requests = context.Pipe(duplex=False)  # (receive, send) ends
        self._answers, child_replies = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_hash_loop,
            args=(child_requests, child_replies, slots.memory, slots.size, cluster_size),
            name="lbrestore-hash",
            daemon=True,
        )
        self._process.start()
        child_requests.close()
        child_replies.close()  # the child's end: EOF here once the child is gone
        self._pending: dict[int, Sequence[HashCheck]] = {}
        self._pending_lock = threading.Lock()
        self._collector = threading.Thread(target=self._collect, name="restore-hash", daemon=True)
        self._collector.start()

    def submit(self, slot: int, checks: Sequence[HashCheck]) -> None:
        """Check `checks` (offsets within `slot`); the slot is released when they are done."""
        with self._pending_lock:
            self._pending[slot] = checks
        self._requests.send((slot, [(c.at, c.length, c.expected) for c in checks]))

    def finish(self) -> None:
        """Wait for every submitted check (then read `mismatch` and `failure`)."""
        with contextlib.suppress(OSError):
            self._requests.send(None)
        self._collector.join()
        self._process.join()
        self._requests.close()
        if self.failure is None and self._process.exitcode != 0:
            self.failure = RuntimeError(f"hash process exited with {self._process.exitcode}")

    def kill(self) -> None:
        """Stop at once (on failure elsewhere): the child is ended, the collector finishes."""
        if self._process.is_alive():
            self._process.kill()
        self._process.join()
        with contextlib.suppress(OSError):
            self._requests.close()
        self._collector.join()

    def _collect(self) -> None:
        try:
            while True:
                try:
                    slot, bad = self._answers.recv()
                except EOFError:
                    return
                with self._pending_lock:
                    checks = self._pending.pop(slot)
                if bad >= 0 and self.mismatch is None:
                    self.mismatch = checks[bad]
                self.slots.release(slot)
        except BaseException as exc:  # handed to the restore, which raises it
            self.failure = exc
        finally:
            self._answers.close()


def _hash_loop(
    requests: Connection, replies: Connection, memory: mmap.mmap, slot_size: int, cluster: int
) -> None:
    """In the child: answer each (slot, checks) with the index of the first mismatch or -1."""
    view = memoryview(memory)
    while True:
        try:
            message = requests.recv()
        except EOFError:
            return
        if message is None:
            return
        slot, checks = message
        base = slot * slot_size
        bad = -1
        for index, (at, length, expected) in enumerate(checks):
            content: memoryview | bytes = view[base + at : base + at + length]
            if length < cluster:  # the disk's last, partial cluster: digested zero-padded
                content = bytes(content) + bytes(cluster - length)
            if blake3.blake3(content).digest() != expected:
                bad = index
                break
        replies.send((slot, bad))
