"""Files inside a restore point without a mount: `ls`, `extract` and `diff` read the guest's
filesystems (lbguest) through the store's checked views, in this process, with no FUSE and no root.

Extraction never writes outside its target folder, whatever names and links the guest's
filesystem holds: every file and folder is created relative to an open folder descriptor,
with O_NOFOLLOW and O_EXCL, so no symlink (from the guest or planted in the target meanwhile)
is ever followed; names that are empty, ".", "..", or hold "/" or NUL are not written at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

from lbguest.errors import DamagedFilesystemError, GuestPathError
from lbguest.files import GuestFiles
from lbguest.model import EntryKind, GuestEntry, GuestFilesystem
from lbrestore.errors import AppError, UsageError
from lbrestore.mount import ViewSource
from lbstore.integrity import damage_reporter, verified_views
from lbstore.model import RestorePoint
from lbstore.store import Store

COPY_CHUNK = 1 << 20
CACHE_CHUNK = 1 << 16
CACHE_CHUNKS = 512  # 32 MiB per disk
PRIVILEGE_BITS = stat.S_ISUID | stat.S_ISGID


class ChunkCache:
    """A source whose small reads (a filesystem's metadata: inodes, folders, tables) are served
    from recently read aligned chunks, each read and checked once; large reads pass through.
    A restore point's bytes never change while it is open, so nothing cached goes stale."""

    def __init__(self, source: ViewSource, chunk: int = CACHE_CHUNK, chunks: int = CACHE_CHUNKS):
        self._source = source
        self._chunk = chunk
        self._limit = chunks
        self._chunks: OrderedDict[int, bytes] = OrderedDict()
        self.size = source.size

    def read(self, offset: int, length: int) -> bytes:
        if length >= self._chunk:
            return self._source.read(offset, length)
        first, last = offset // self._chunk, (offset + length - 1) // self._chunk
        start = offset - first * self._chunk
        if first == last:
            return self._cached(first)[start : start + length]
        data = b"".join(self._cached(index) for index in range(first, last + 1))
        return data[start : start + length]

    def _cached(self, index: int) -> bytes:
        data = self._chunks.get(index)
        if data is not None:
            self._chunks.move_to_end(index)
            return data
        start = index * self._chunk
        data = self._source.read(start, min(self._chunk, self.size - start))
        self._chunks[index] = data
        if len(self._chunks) > self._limit:
            self._chunks.popitem(last=False)
        return data


def open_point_files(store: Store, point: RestorePoint, stack: ExitStack) -> GuestFiles:
    """The guest's filesystems of `point`, read through checked views (closed by `stack`):
    a damaged cluster is an error naming the damage, never wrong bytes."""
    report = damage_reporter(store, point.vm)
    sources = {}
    for disk in point.disks:
        (view,) = verified_views(store, point, disk.name, 1, report)
        stack.callback(view.close)
        sources[disk.name] = ChunkCache(ViewSource([view]))
    return GuestFiles.open(sources)


def guest_path(path: str) -> str:
    """A PATH as typed (`vda-part2/etc/fstab`, with or without slashes around it), checked:
    ".." and "." are refused (exit 2) rather than resolved."""
    parts = [part for part in path.strip("/").split("/") if part]
    if any(part in (".", "..") for part in parts) or "\0" in path:
        raise UsageError(f"{path!r}: a path inside the guest may not hold '.', '..' or NUL")
    return "/".join(parts)


def locate(files: GuestFiles, path: str) -> tuple[GuestFilesystem, str]:
    """The filesystem and the path inside it; one clear line when the filesystem is missing."""
    name = path.split("/", 1)[0]
    if name not in files.names():
        known = ", ".join(files.names()) or "none"
        raise AppError(f"{name}: no such filesystem in this restore point (found: {known})")
    return files.resolve(path)


@contextlib.contextmanager
def full_paths(fs: GuestFilesystem) -> Iterator[None]:
    """A path error inside `fs` names the path as the user typed it (with the folder name)."""
    try:
        yield
    except GuestPathError as exc:
        raise GuestPathError(f"{fs.name}/{exc.path}".rstrip("/"), exc.errno) from None


def safe_name(name: str) -> bool:
    """Whether a name from the guest can be created as one entry of a folder."""
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


# --- extract -------------------------------------------------------------------------------------


@dataclasses.dataclass
class ExtractReport:
    """What an extraction did, for the summary line and --json."""

    files: int = 0
    folders: int = 0
    symlinks: int = 0
    bytes: int = 0
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)
    damaged: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append({"path": path, "reason": reason})

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


Progress = Callable[[ExtractReport, str], None]


class Extractor:
    """Copies entries of guest filesystems into one target folder (see the module docstring).

    Modes as stored (setuid/setgid only when run as root), owners when run as root, access and
    modification times as stored; a folder's mode and times are set after its contents.
    Existing entries in the target are refused unless `force` (then replaced; a folder is
    merged into). Files keep their holes.
    """

    def __init__(self, target: Path, *, force: bool, progress: Progress | None = None) -> None:
        self.force = force
        self.report = ExtractReport()
        self.progress = progress
        self.as_root = os.geteuid() == 0
        try:
            target.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.root_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise AppError(f"cannot use {target} as the folder to extract into: {exc}") from exc

    def close(self) -> None:
        os.close(self.root_fd)

    def extract(self, fs: GuestFilesystem, path: str, shown: str, entry: GuestEntry) -> None:
        """Copy `entry`, at `path` of `fs`, and all below it into the target folder, under its
        own name (the filesystem's folder name for its root)."""
        name = path.rsplit("/", 1)[-1] if path else fs.name
        self._entry(fs, path, shown, entry, name, self.root_fd)

    def _entry(
        self, fs: GuestFilesystem, path: str, shown: str, entry: GuestEntry, name: str, at: int
    ) -> None:
        if not safe_name(name):
            self.report.skip(shown, f"unsafe name {name!r} not written")
            return
        try:
            if entry.kind is EntryKind.FOLDER:
                self._folder(fs, path, shown, entry, name, at)
            elif entry.kind is EntryKind.FILE:
                self._file(fs, path, shown, entry, name, at)
            elif entry.kind is EntryKind.SYMLINK:
                self._symlink(shown, entry, name, at)
            else:
                self.report.skip(shown, "device, fifo or socket: not extracted")
        except DamagedFilesystemError as exc:
            self.report.damaged.append({"path": shown, "problem": str(exc)})
        except OSError as exc:
            self.report.skip(shown, os.strerror(exc.errno) if exc.errno else str(exc))
        if self.progress is not None:
            self.progress(self.report, shown)

    def _folder(
        self, fs: GuestFilesystem, path: str, shown: str, entry: GuestEntry, name: str, at: int
    ) -> None:
        children = fs.listdir(path)  # damaged metadata: nothing of this folder is created
        try:
            os.mkdir(name, 0o700, dir_fd=at)
        except FileExistsError:
            if not self.force:
                self.report.skip(shown, "exists in the target (use --force)")
                return
            if not stat.S_ISDIR(os.stat(name, dir_fd=at, follow_symlinks=False).st_mode):
                os.unlink(name, dir_fd=at)
                os.mkdir(name, 0o700, dir_fd=at)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=at)
        try:
            self.report.folders += 1
            for child in children:
                child_path = f"{path}/{child.name}" if path else child.name
                self._entry(fs, child_path, f"{shown}/{child.name}", child, child.name, fd)
            self._finish(fd, entry)
        finally:
            os.close(fd)

    def _file(
        self, fs: GuestFilesystem, path: str, shown: str, entry: GuestEntry, name: str, at: int
    ) -> None:
        fd = self._create(name, at, shown)
        if fd is None:
            return
        try:
            try:
                self._copy(fs, path, entry, fd)
            except DamagedFilesystemError:
                os.unlink(name, dir_fd=at)  # never leave a file with wrong bytes
                raise
            self._finish(fd, entry)
        finally:
            os.close(fd)
        self.report.files += 1

    def _create(self, name: str, at: int, shown: str) -> int | None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        try:
            return os.open(name, flags, 0o600, dir_fd=at)
        except FileExistsError:
            if not self.force:
                self.report.skip(shown, "exists in the target (use --force)")
                return None
            if stat.S_ISDIR(os.stat(name, dir_fd=at, follow_symlinks=False).st_mode):
                self.report.skip(shown, "a folder of that name exists in the target")
                return None
            os.unlink(name, dir_fd=at)  # the link itself, never what it points to
            return os.open(name, flags, 0o600, dir_fd=at)

    def _copy(self, fs: GuestFilesystem, path: str, entry: GuestEntry, fd: int) -> None:
        for offset, length in _data_ranges(entry.size, fs.holes(path)):
            for start in range(offset, offset + length, COPY_CHUNK):
                piece = fs.read(path, start, min(COPY_CHUNK, offset + length - start))
                os.pwrite(fd, piece, start)
                self.report.bytes += len(piece)
        os.ftruncate(fd, entry.size)

    def _symlink(self, shown: str, entry: GuestEntry, name: str, at: int) -> None:
        target = entry.symlink_target or ""
        if "\0" in target or not target:
            self.report.skip(shown, "symlink with an empty or NUL target not written")
            return
        try:
            os.symlink(target, name, dir_fd=at)
        except FileExistsError:
            if not self.force:
                self.report.skip(shown, "exists in the target (use --force)")
                return
            if stat.S_ISDIR(os.stat(name, dir_fd=at, follow_symlinks=False).st_mode):
                self.report.skip(shown, "a folder of that name exists in the target")
                return
            os.unlink(name, dir_fd=at)
            os.symlink(target, name, dir_fd=at)
        if self.as_root:
            os.chown(name, entry.uid, entry.gid, dir_fd=at, follow_symlinks=False)
        times = (entry.atime_ns, entry.mtime_ns)
        os.utime(name, ns=times, dir_fd=at, follow_symlinks=False)
        self.report.symlinks += 1

    def _finish(self, fd: int, entry: GuestEntry) -> None:
        """Owner (as root), mode, then times: in this order, as chown clears setuid and any
        change to a folder's contents moves its times."""
        mode = stat.S_IMODE(entry.mode)
        if self.as_root:
            os.fchown(fd, entry.uid, entry.gid)
        else:
            mode &= ~PRIVILEGE_BITS
        os.fchmod(fd, mode)
        os.utime(fd, ns=(entry.atime_ns, entry.mtime_ns))


def _data_ranges(size: int, holes: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """(offset, length) of a file's data: everything but its holes."""
    position = 0
    for offset, length in sorted(holes):
        if offset > position:
            yield position, min(offset, size) - position
        position = max(position, offset + length)
    if position < size:
        yield position, size - position


# --- ls ------------------------------------------------------------------------------------------


def entry_dict(entry: GuestEntry, path: str) -> dict[str, object]:
    """An entry as `ls --json` shows it."""
    value: dict[str, object] = {
        "name": entry.name,
        "path": path,
        "kind": entry.kind.value,
        "mode": f"{stat.S_IMODE(entry.mode):04o}",
        "uid": entry.uid,
        "gid": entry.gid,
        "size": entry.size,
        "mtime_ns": entry.mtime_ns,
        "atime_ns": entry.atime_ns,
        "ctime_ns": entry.ctime_ns,
        "inode": entry.inode,
        "nlink": entry.nlink,
    }
    if entry.symlink_target is not None:
        value["target"] = entry.symlink_target
    return value
