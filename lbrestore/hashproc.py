"""Reading and checksum checks in a second process, into buffers shared with it (restore).

BLAKE3 (the `blake3` package) holds Python's GIL while it hashes, and a reader thread competes
with the writing thread for it too. Restore therefore hands both jobs to a forked child: the
parent (which decides what to read and writes the result) sends, per buffer of a ring in shared
memory (an anonymous `mmap`), the file ranges to read into it and the clusters to check; the
child reads them with preadv, hashes, and answers. The parent writes a buffer only after its
answer, so the bytes written are exactly the bytes checked, without a copy, while the child
already reads and checks the next buffers.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection

from lbstore.checksums import cluster_digest

Problem = tuple[str | int, ...]
"""What went wrong with a buffer: ("mismatch", check index), ("short", path, file offset) for
a read past the end of a file, or ("error", path, message) for a failed read."""


@dataclass(frozen=True, slots=True)
class HashCheck:
    """One cluster to check: where it lies in its buffer, and what its digest must be."""

    at: int
    length: int
    expected: bytes
    point_id: int
    cluster: int


@dataclass(frozen=True, slots=True)
class FileRead:
    """Bytes [host, host + length) of `path`, to be read to offset `at` of a buffer."""

    at: int
    path: str
    host: int
    length: int


@dataclass(frozen=True, slots=True)
class Answer:
    """The child's answer for one buffer: `problem` is None when every read and check passed."""

    slot: int
    problem: Problem | None


class Slots:
    """A fixed ring of equal buffers in shared memory (a forked child sees the same pages)."""

    def __init__(self, count: int, size: int) -> None:
        self.count = count
        self.size = size
        self.memory = mmap.mmap(-1, count * size)  # MAP_SHARED | MAP_ANONYMOUS

    def view(self, slot: int) -> memoryview:
        """The whole buffer of `slot` (release it before `close`)."""
        return memoryview(self.memory)[slot * self.size : (slot + 1) * self.size]

    def close(self) -> None:
        """Unmap the buffers."""
        with contextlib.suppress(BufferError):
            self.memory.close()


class ReadHashWorker:
    """A forked process that fills buffers of `slots` from files and checks their clusters.

    Requests are answered in the order they were submitted. Fork it before starting threads.
    """

    def __init__(self, slots: Slots, cluster_size: int) -> None:
        context = multiprocessing.get_context("fork")
        child_requests, self._requests = context.Pipe(duplex=False)  # (receive, send) ends
        self._answers, child_answers = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_serve,
            args=(
                child_requests,
                child_answers,
                (self._requests, self._answers),
                slots.memory,
                slots.size,
                cluster_size,
            ),
            name="lbrestore-read-hash",
            daemon=True,
        )
        self._process.start()
        child_requests.close()
        child_answers.close()  # the child's end: EOF here once the child is gone

    def submit(self, slot: int, reads: Sequence[FileRead], checks: Sequence[HashCheck]) -> None:
        """Fill `slot` with `reads`, then check `checks` (offsets within the slot)."""
        self._requests.send(
            (
                slot,
                [(r.at, r.path, r.host, r.length) for r in reads],
                [(c.at, c.length, c.expected) for c in checks],
            )
        )

    def answer(self) -> Answer:
        """The answer to the oldest request not yet answered (waits for it)."""
        try:
            slot, problem = self._answers.recv()
        except EOFError:
            raise RuntimeError(
                f"the restore's read process ended unexpectedly ({self._process.exitcode})"
            ) from None
        return Answer(slot, problem)

    def close(self) -> None:
        """Let the child finish (every request must have been answered) and reap it."""
        with contextlib.suppress(OSError):
            self._requests.send(None)
        self._process.join()
        self._requests.close()
        self._answers.close()

    def kill(self) -> None:
        """End the child at once (on failure elsewhere) and reap it."""
        if self._process.is_alive():
            self._process.kill()
        self._process.join()
        self._requests.close()
        self._answers.close()


def _serve(
    requests: Connection,
    answers: Connection,
    parent_ends: tuple[Connection, Connection],
    memory: mmap.mmap,
    slot_size: int,
    cluster: int,
) -> None:
    """In the child: answer each (slot, reads, checks) with (slot, problem or None)."""
    for end in parent_ends:  # inherited copies: without them, a dead parent means EOF here
        end.close()
    view = memoryview(memory)
    files: dict[str, int] = {}
    while True:
        try:
            message = requests.recv()
        except EOFError:
            return
        if message is None:
            return
        slot, reads, checks = message
        base = slot * slot_size
        problem = _read_all(view, base, reads, files)
        if problem is None:
            problem = _check_all(view, base, checks, cluster)
        answers.send((slot, problem))


def _read_all(
    view: memoryview, base: int, reads: list[tuple[int, str, int, int]], files: dict[str, int]
) -> Problem | None:
    for at, path, host, length in reads:
        try:
            fd = files.get(path)
            if fd is None:
                fd = files[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            dest = view[base + at : base + at + length]
            done = 0
            while done < length:
                got = os.preadv(fd, [dest[done:]], host + done)
                if got == 0:
                    return ("short", path, host + done)
                done += got
        except OSError as exc:
            return ("error", path, exc.strerror or str(exc))
    return None


def _check_all(
    view: memoryview, base: int, checks: list[tuple[int, int, bytes]], cluster: int
) -> Problem | None:
    for index, (at, length, expected) in enumerate(checks):
        if cluster_digest(view[base + at : base + at + length], cluster) != expected:
            return ("mismatch", index)
    return None
