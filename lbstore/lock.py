"""The store's locks: `fcntl.flock` on small files, polled until a timeout.

- STORE/lock: whole-store operations (init, check --repair) hold it exclusively; every writer
  of one VM holds it shared, so writers of different VMs run at the same time.
- STORE/locks/vm-<name>.lock: exclusive for the one writer (backup, import, merge, prune) of
  that VM; writers of one VM serialize.
- STORE/locks/point-<id>.lock: readers (mount, restore, verify) hold it shared while they read
  the point; a merge that would change the bytes of that point tries it exclusively and, when a
  reader holds it, takes a way that leaves the point's bytes as they are.

The holder of an exclusive lock writes its pid, command and start time into the lock file so a
waiting writer can say who holds it. The kernel drops a flock when its process dies, so a lock
file left behind by a dead process is not a lock at all: the next writer simply takes it (and
overwrites the stale holder text). Lock files are private (lbstore.private: 0600, no links).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

from lbstore.errors import StoreBusyError, StorePathError
from lbstore.private import make_private_dir, open_private_file

POLL_INTERVAL = 0.05
LOCKS_DIR = "locks"


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

    def acquire(
        self,
        timeout: float,
        purpose: str | None = None,
        *,
        deadline: float | None = None,
        holders: Callable[[], str] | None = None,
    ) -> None:
        """Take the lock, waiting up to `timeout` seconds; StoreBusyError names the holder.

        `deadline` (time.monotonic) overrides `timeout` when several locks share one wait;
        `holders` says who holds the lock when its own file cannot (shared holders)."""
        fd = open_lock_file(self.path)
        if deadline is None:
            deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = read_holder(fd)
                    if holders is not None and holder == UNKNOWN_HOLDER:
                        holder = holders()
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


UNKNOWN_HOLDER = "another process (holder unknown)"


def read_holder(fd: int) -> str:
    """The holder as text: `pid 123 (lbrestore backup, since 2026-11-27T10:00:00Z)`."""
    try:
        raw = os.pread(fd, 4096, 0).decode(errors="replace")
        info = json.loads(raw)
        return f"pid {info['pid']} ({info['command']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return UNKNOWN_HOLDER


def open_lock_file(path: Path) -> int:
    """Open (creating, owner only) a lock file; StorePathError says why it cannot be."""
    try:
        return open_private_file(path, os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        if exc.errno == errno.EROFS:
            raise StorePathError(path.parent, "the store is on a read-only filesystem") from exc
        if exc.errno == errno.ELOOP:
            raise StorePathError(path.parent, f"{path.name} is a symbolic link: refused") from exc
        raise StorePathError(path.parent, f"cannot open lock file: {exc.strerror}") from exc


def _locks_dir(root: Path) -> Path:
    folder = root / LOCKS_DIR
    try:
        make_private_dir(folder)
    except OSError as exc:
        raise StorePathError(root, f"cannot make {LOCKS_DIR}/: {exc.strerror}") from exc
    return folder


def vm_lock_holders(root: Path) -> str:
    """Who holds the writer locks of VMs (for a whole-store operation that must wait)."""
    found = []
    for path in sorted((root / LOCKS_DIR).glob("vm-*.lock")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if os.fstat(fd).st_size:
                found.append(f"{read_holder(fd)} for VM {path.stem[3:]}")
        finally:
            os.close(fd)
    return "; ".join(found) or "a writer of some VM"


class VmWriteLock:
    """One VM's writer lock: STORE/lock shared (no whole-store operation runs meanwhile) and
    STORE/locks/vm-<name>.lock exclusive, taken within one timeout."""

    def __init__(self, root: Path, vm: str) -> None:
        self.root = root
        self.vm = vm
        self._store_fd: int | None = None
        self._vm_lock = StoreLock(_locks_dir(root) / f"vm-{vm}.lock")

    @property
    def stale_holder(self) -> str | None:
        """Who held this VM's lock last without releasing it (a process that died)."""
        return self._vm_lock.stale_holder

    def acquire(self, timeout: float, purpose: str | None = None) -> None:
        """Take both locks or neither; StoreBusyError names the holder that made us wait."""
        deadline = time.monotonic() + timeout
        fd = open_lock_file(self.root / "lock")
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StoreBusyError(self.root, read_holder(fd), timeout) from None
                    time.sleep(POLL_INTERVAL)
            self._vm_lock.acquire(timeout, purpose, deadline=deadline)
        except BaseException:
            os.close(fd)
            raise
        self._store_fd = fd

    def release(self) -> None:
        """Drop the VM's lock, then the shared store lock."""
        self._vm_lock.release()
        if self._store_fd is not None:
            os.close(self._store_fd)
            self._store_fd = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._store_fd is not None


class PointLock:
    """A reader's shared lock on one restore point, or a merge's exclusive try of it."""

    def __init__(self, root: Path, point_id: int) -> None:
        self.path = root / LOCKS_DIR / f"point-{point_id}.lock"
        self._fd: int | None = None

    def acquire_shared(self, timeout: float) -> bool:
        """Hold the point for reading (waiting up to `timeout` while a merge edits it).

        Returns False when no lock can be made at all (a read-only store, where no merge can
        run either); StoreBusyError when a merge holds the point past the timeout."""
        try:
            make_private_dir(self.path.parent)
            fd = open_private_file(self.path, os.O_RDWR | os.O_CREAT)
        except OSError:
            return False
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                self._fd = fd
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise StoreBusyError(self.path, "a merge of this point", timeout) from None
                time.sleep(POLL_INTERVAL)

    def try_exclusive(self) -> bool:
        """Hold the point exclusively if no reader holds it; False at once otherwise."""
        fd = open_lock_file(_locks_dir(self.path.parent.parent) / self.path.name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race with a new reader)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def names_a_live_holder(lock_files: Iterable[Path]) -> bool:
    """True when one of these lock files names a live holder. A clean release empties the
    holder text, so text naming a dead pid is a crash's; a pid we may not signal is alive."""
    for path in lock_files:
        try:
            holder = json.loads(path.read_text() or "null")
            pid = int(holder["pid"]) if holder else 0
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if pid <= 0:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            return True
        return True
    return False
