"""Where a restore goes: an NBD URI or a folder, checked, and a folder switched in whole.

A folder restore writes its whole set (every disk, the start script, the libvirt XML) into a
private stage folder beside the target, `.<name>.lbrestore-<pid>-<random>`, and switches it in
at the end with one `renameat2(RENAME_EXCHANGE)`: at every instant the target's name holds either
the old set or the new one, never a mix, whatever kills the restore. The exchange (rather than
renaming the old folder aside and the new one in) never leaves the name missing, and needs no
second step to be undone. The old set (every disk image, start script and XML in the folder)
is replaced whole; other files of the folder (a user's notes) are hard-linked into the stage
first, so they survive the switch. After it, the old set (now under the stage's name) is
removed.

Each stage is flock'ed by the restore writing it, so two restores into one folder each build
their own set and the last switch wins whole; a stage whose restore died is removed by the next
restore into that folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from lbrestore.errors import AppError, UsageError
from lbstore.fsutil import RENAME_EXCHANGE, RENAME_NOREPLACE, fsync_dir, renameat2

NBD_SCHEMES = ("nbd", "nbd+unix", "nbds", "nbds+unix")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):", re.ASCII)
STAGE_MARK = ".lbrestore-"
RESTORE_OUTPUT = re.compile(r"(start-.*\.sh|.*\.(qcow2|raw|xml))(\.lbrestore-partial)?", re.ASCII)
"""Names of the files a restore writes (disks, start script, XML), final or temporary."""


class RestoreError(AppError):
    """A restore cannot be done or failed; nothing partial is left behind."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


class RestoreTargetError(RestoreError):
    """The target (folder or NBD server) cannot take the restore."""

    def __init__(self, target: str, problem: str) -> None:
        super().__init__(f"restore target {target}: {problem}")
        self.target = target


# --- NBD or folder -----------------------------------------------------------------------------


def is_nbd_uri(target: str) -> bool:
    """True when `target` is a valid NBD URI; UsageError when it looks like a URL but is not one
    (`NBD://host/x`, `nbd:/x`, a bare `nbd://`), so it never becomes a local folder of that name.
    A folder whose name has a colon can always be written `./name`."""
    match = _SCHEME.match(target)
    if match is None:
        return False
    scheme = match.group(1)
    if "://" not in target and not scheme.lower().startswith("nbd"):
        return False  # `backup:2026`: a folder name, not a URL
    if scheme not in NBD_SCHEMES or not target.startswith(f"{scheme}://"):
        raise UsageError(
            f"--to {target!r} looks like a URL but is not an NBD URI: use "
            "nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH (./NAME for a folder)"
        )
    _check_nbd_uri(target, scheme)
    return True


def _check_nbd_uri(target: str, scheme: str) -> None:
    """A host for TCP schemes (no silent localhost), a socket for unix ones, a valid port."""
    parts = urlsplit(target)
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise UsageError(f"--to {target!r}: the port is not a number from 1 to 65535") from None
    if scheme.endswith("+unix"):
        sockets = parse_qs(parts.query).get("socket")
        if parts.netloc or not sockets or not sockets[0]:
            raise UsageError(f"--to {target!r}: expected {scheme}:///EXPORT?socket=PATH")
    elif not parts.hostname:
        raise UsageError(f"--to {target!r}: name the NBD server, e.g. {scheme}://HOST:10809/EXPORT")


# --- folder checks -----------------------------------------------------------------------------


def check_target_folder(target: Path, *, force: bool, store: Path | None = None) -> Path:
    """The target folder, symbolic links resolved, after refusing what must not be written:
    a place inside the store (or holding it), a non-folder, a folder with files unless
    `force`, and (with `force`) a folder holding sub-folders: a switch replaces files only."""
    resolved = Path(os.path.realpath(target))
    if store is not None:
        _refuse_store(target, resolved, Path(os.path.realpath(store)))
    try:
        if resolved.exists() and not resolved.is_dir():
            raise RestoreTargetError(str(target), "exists and is not a folder")
        entries = sorted(resolved.iterdir()) if resolved.is_dir() else []
        fixed = unswitchable(resolved)
    except OSError as exc:
        raise RestoreTargetError(str(target), exc.strerror or str(exc)) from exc
    if fixed is not None:  # a fresh ext4 file system holds lost+found: still an empty target
        entries = [e for e in entries if e.name != "lost+found"]
        if entries and force:
            raise RestoreTargetError(
                str(target),
                f"{fixed} and holds files: it cannot be switched whole; "
                "restore into a new folder inside it",
            )
    if entries and not force:
        shown = ", ".join(p.name for p in entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise RestoreTargetError(
            str(target), f"folder is not empty ({shown}); use --force to restore into it"
        )
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            raise RestoreTargetError(
                str(target),
                f"holds the folder {entry.name!r}: --force replaces a folder of files only",
            )
    return resolved


def unswitchable(folder: Path) -> str | None:
    """Why an existing `folder` cannot be switched by a rename in its parent (a mount point, or
    a parent this user cannot write), or None when it can (or does not exist yet)."""
    if not folder.is_dir():
        return None
    if os.path.ismount(folder):
        return "is a mount point"
    if not os.access(folder.parent, os.W_OK | os.X_OK):
        return f"lies in {folder.parent}, which this user cannot write"
    return None


def refuse_store_place(target: Path, store: Path) -> None:
    """Refuse `target` (existing or not) when it is, holds or lies inside the store."""
    _refuse_store(target, target.resolve(), store.resolve())


def _refuse_store(target: Path, resolved: Path, store: Path) -> None:
    if resolved == store or store in resolved.parents:
        raise RestoreTargetError(str(target), f"is inside the store {store}: refused")
    if resolved in store.parents:
        raise RestoreTargetError(str(target), f"holds the store {store}: refused")
    with contextlib.suppress(OSError):
        if os.path.samefile(resolved, store):
            raise RestoreTargetError(str(target), f"is the store {store}: refused")


# --- the stage and the switch ------------------------------------------------------------------


class StagedFolder:
    """A restore set being written beside `target`, switched in whole by `commit`."""

    def __init__(self, target: Path) -> None:
        """Name the stage of `target` (a resolved path); `create` makes it. Named first so
        that an interrupt at any instant of the creation finds it to remove (`abort`)."""
        self.target = target
        # A folder that cannot be renamed gets its (empty) stage inside it instead.
        self.inside = unswitchable(target) is not None
        self.parent = target if self.inside else target.parent
        self.path = self.parent / (_stage_prefix(target.name) + secrets.token_hex(6))
        self._fd: int | None = None
        self._switched = False

    def create(self) -> None:
        """Make the stage: private (0700), flock'ed, beside the target."""
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_stages(self.parent, self.target.name)
            os.mkdir(self.path, 0o700)
            self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError as exc:
            raise RestoreTargetError(str(self.target), exc.strerror or str(exc)) from exc

    def commit(self, names: set[str], *, force: bool) -> None:
        """Switch the stage (holding the files `names`) in as `target`, then drop the old set."""
        os.fsync(self._fd)  # type: ignore[arg-type]
        if self.inside:
            self._move_out(names)
            return
        if not os.path.lexists(self.target):
            try:
                renameat2(self.path, self.target, RENAME_NOREPLACE)
                self._done()
                return
            except FileExistsError:
                if not force:
                    raise RestoreTargetError(
                        str(self.target), "appeared while restoring; use --force to replace it"
                    ) from None
        carried = self._carry_over(names)
        old_set = {e.name for e in os.scandir(self.target) if RESTORE_OUTPUT.fullmatch(e.name)}
        self._exchange()
        self._switched = True  # from here on the stage's path holds the old set: never rmtree it
        with contextlib.suppress(OSError):  # the new set is in place; leftovers are harmless
            self._drop_old_set(names | carried | old_set)
        self._done()

    def _move_out(self, names: set[str]) -> None:
        """Into an empty, fixed folder: file by file, never replacing one, the start script last
        (so a killed restore that left no start script is recognisably incomplete)."""
        for name in sorted(names, key=lambda n: n.startswith("start-")):
            renameat2(self.path / name, self.target / name, RENAME_NOREPLACE)
        self._done()

    def _carry_over(self, names: set[str]) -> set[str]:
        """Hard-link the target's other files into the stage; the old set's files (disk
        images, start scripts, XML: RESTORE_OUTPUT) are not carried, so that restoring one disk
        over a two-disk restore leaves no old disk beside the new set."""
        kept: set[str] = set()
        for entry in os.scandir(self.target):
            if entry.name in names or RESTORE_OUTPUT.fullmatch(entry.name):
                continue
            if entry.is_dir(follow_symlinks=False):
                raise RestoreTargetError(
                    str(self.target),
                    f"holds the folder {entry.name!r}: --force replaces a folder of files only",
                )
            os.link(entry.path, self.path / entry.name, follow_symlinks=False)
            kept.add(entry.name)
        os.chmod(self.path, stat.S_IMODE(os.stat(self.target).st_mode))
        return kept

    def _exchange(self) -> None:
        """Swap stage and target in one step (two renames where the filesystem cannot)."""
        try:
            renameat2(self.path, self.target, RENAME_EXCHANGE)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
            # No RENAME_EXCHANGE here: the old set goes aside under a stage name first (the
            # target's name is missing for an instant, but never names a mix).
            aside = self.path.with_name(self.path.name + "-old")
            os.rename(self.target, aside)
            os.rename(self.path, self.target)
            os.rename(aside, self.path)

    def _drop_old_set(self, known: set[str]) -> None:
        """Remove the old set (now at the stage's path); entries that appeared in the target
        during the restore (not carried over, not replaced) are moved back, never deleted."""
        for entry in os.scandir(self.path):
            if entry.name in known:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            else:
                with contextlib.suppress(OSError):
                    renameat2(Path(entry.path), self.target / entry.name, RENAME_NOREPLACE)

    def _done(self) -> None:
        fsync_dir(self.parent)
        with contextlib.suppress(OSError):
            os.rmdir(self.path)
        self._close()

    def abort(self) -> None:
        """Remove the stage and everything written into it (the target is untouched). After
        the switch, the stage's path holds the old set: it is left to the next restore's
        careful clean-up (remove_stale_stages), never removed wholesale."""
        if not self._switched:
            shutil.rmtree(self.path, ignore_errors=True)
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _stage_prefix(name: str) -> str:
    return f".{name}{STAGE_MARK}{os.getpid()}-"


def remove_stale_stages(parent: Path, name: str) -> None:
    """Remove stages of `name` left by restores that died: their process is gone and their
    flock is free. Only restore output and hard links of carried-over files are deleted; a
    stage holding anything else is left alone."""
    # Only stage names proper: the "-old" of the two-rename fallback may hold the only old set.
    pattern = re.compile(re.escape(f".{name}{STAGE_MARK}") + r"(\d+)-[0-9a-f]+", re.ASCII)
    for entry in os.scandir(parent):
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        if _process_alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            _remove_stage_if_unused(Path(entry.path))


def _remove_stage_if_unused(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        entries = list(os.scandir(path))
        for entry in entries:
            info = entry.stat(follow_symlinks=False)
            disposable = stat.S_ISREG(info.st_mode) and (
                info.st_nlink > 1 or RESTORE_OUTPUT.fullmatch(entry.name)
            )
            if not disposable:
                return
        for entry in entries:
            os.unlink(entry.path)
        os.rmdir(path)
    finally:
        os.close(fd)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
