"""The store's write lock: `fcntl.flock` on STORE/lock, polled until a timeout.

The holder writes its pid, command and start time into the lock file so a waiting writer can say
who holds the store. The kernel drops a flock when its process dies, so a lock file left behind by
a dead process is not a lock at all: the next writer simply takes it (and overwrites the stale
holder text). Readers never take the lock; SQLite's WAL lets them read during a write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from lbstore.errors import StoreBusyError, StorePathError
from lbstore.private import open_private_file

POLL_INTERVAL = 0.05


def default_purpose() -> str:
    """What this process is, for the lock file: `lbrestore backup`, `pytest`, ..."""
    argv = sys.argv or ["python"]
    program = Path(argv[0]).name
    if program in ("__main__.py", "-m", "-c") or program.startswith("python"):
        program = "lbrestore"
    words = [program, *[a for a in argv[1:] if not a.startswith("-")][:1]]
    return " ".join(words)[:200]


class StoreLock:
    """An exclusive flock on one file, held from acquire() until release()."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self.stale_holder: str | None = None
        """Who held the lock last without releasing it (a process that died), if anyone."""

    def acquire(self, timeout: float, purpose: str | None = None) -> None:
        """Take the lock, waiting up to `timeout` seconds; StoreBusyError names the holder."""
        try:
            fd = open_private_file(self.path, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            if exc.errno == errno.EROFS:
                raise StorePathError(
                    self.path.parent, "the store is on a read-only filesystem"
                ) from exc
            if exc.errno == errno.ELOOP:
                raise StorePathError(
                    self.path.parent, f"{self.path.name} is a symbolic link: refused"
                ) from exc
            raise StorePathError(
                self.path.parent, f"cannot open lock file: {exc.strerror}"
            ) from exc
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = read_holder(fd)
                    os.close(fd)
                    raise StoreBusyError(self.path.parent, holder, timeout) from None
                time.sleep(POLL_INTERVAL)
        self._fd = fd
        # A clean release empties the file; text left in it names a holder that died.
        self.stale_holder = read_holder(fd) if os.fstat(fd).st_size else None
        self._write_holder(purpose or default_purpose())

    def _write_holder(self, purpose: str) -> None:
        assert self._fd is not None
        since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        text = json.dumps({"pid": os.getpid(), "command": purpose, "since": since}) + "\n"
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, text.encode(), 0)
        except OSError:
            pass  # the holder text is a courtesy; a full disk must not stop the lock

    def release(self) -> None:
        """Empty the holder text and drop the lock (closing the descriptor releases the flock)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None


def read_holder(fd: int) -> str:
    """The holder as text: `pid 123 (lbrestore backup, since 2026-11-27T10:00:00Z)`."""
    try:
        raw = os.pread(fd, 4096, 0).decode(errors="replace")
        info = json.loads(raw)
        return f"pid {info['pid']} ({info['command']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (holder unknown)"
