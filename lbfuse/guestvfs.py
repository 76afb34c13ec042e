"""The mount's `files/` folder: the guest's own files, one folder per filesystem (lbguest).

`files/<name>/...` is served from `lbguest.GuestFiles`: folders, regular files, symlinks and
other entries with the modes, owners and times the guest filesystem stores. A filesystem is
parsed when first entered (listing `files/` itself opens them all, so that damaged ones are
left out of it), never at mount time. Errors keep to their rooms: a path that is not there is
ENOENT/ENOTDIR/EISDIR; damaged metadata or an unreadable stored cluster is EIO for that
request; the mount itself goes on.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import stat
from collections.abc import Iterator

from lbfuse.errors import SourceReadError, VfsError
from lbguest.errors import DamagedFilesystemError, GuestError, GuestPathError
from lbguest.files import GuestFiles
from lbguest.model import EntryKind, GuestEntry

FILES = "files"
FILES_PATH = "/" + FILES
FOLDER_MODE = stat.S_IFDIR | 0o500


class GuestPathVfsError(VfsError):
    """A guest path that is not there, or not of the kind asked for; `errno` as lbguest says."""

    def __init__(self, path: str, errno: int, problem: str) -> None:
        super().__init__(path, problem)
        self.errno = errno


def is_guest_path(path: str) -> bool:
    """Whether a mount path lies in files/ (or is it)."""
    return path == FILES_PATH or path.startswith(FILES_PATH + "/")


@contextlib.contextmanager
def vfs_errors(path: str) -> Iterator[None]:
    """lbguest's errors as the VfsError the adapter turns into an errno."""
    try:
        yield
    except GuestPathError as exc:
        raise GuestPathVfsError(path, exc.errno, exc.problem) from exc
    except DamagedFilesystemError as exc:
        raise SourceReadError(path, exc) from exc
    except GuestError as exc:
        raise SourceReadError(path, exc) from exc


class GuestView:
    """files/ and everything below it, read-only (see the module docstring)."""

    def __init__(self, files: GuestFiles, *, uid: int, gid: int, time_ns: int) -> None:
        self.files = files
        self._uid, self._gid, self._time_ns = uid, gid, time_ns

    @staticmethod
    def split(path: str) -> tuple[str, str]:
        """ "/files/vda-part1/etc/fstab" -> ("vda-part1", "etc/fstab"); "/files" -> ("", "")."""
        rest = path[len(FILES_PATH) :].strip("/")
        name, _, inner = rest.partition("/")
        return name, inner

    def entry(self, path: str) -> GuestEntry | None:
        """The guest entry at a mount path; None for files/ itself."""
        name, inner = self.split(path)
        if not name:
            return None
        with vfs_errors(path):
            return self.files.get(name).entry(inner)

    def folder_attributes(self) -> tuple[int, int, int, int, int]:
        """(mode, uid, gid, time_ns, nlink) of files/ itself."""
        return FOLDER_MODE, self._uid, self._gid, self._time_ns, 2

    def listdir(self, path: str) -> list[str]:
        """Names in a folder of files/ (files/ lists the filesystems that open)."""
        name, inner = self.split(path)
        with vfs_errors(path):
            if not name:
                return sorted(self.files.filesystems)
            return [entry.name for entry in self.files.get(name).listdir(inner)]

    def readlink(self, path: str) -> str:
        """A symlink's target exactly as stored."""
        entry = self.entry(path)
        if entry is None or entry.kind is not EntryKind.SYMLINK or entry.symlink_target is None:
            raise GuestPathVfsError(path, errno_codes.EINVAL, "not a symlink")
        return entry.symlink_target

    def file_entry(self, path: str) -> GuestEntry:
        """The entry of a regular file (for open); folders EISDIR, others EINVAL."""
        entry = self.entry(path)
        if entry is None or entry.kind is EntryKind.FOLDER:
            raise GuestPathVfsError(path, errno_codes.EISDIR, "is a folder")
        if entry.kind is not EntryKind.FILE:
            raise GuestPathVfsError(path, errno_codes.EINVAL, "not a regular file")
        return entry

    def read_into(self, path: str, offset: int, dest: memoryview) -> int:
        """Fill `dest` from a regular file (zero-copy where the filesystem can); bytes filled."""
        name, inner = self.split(path)
        with vfs_errors(path):
            fs = self.files.get(name)
            read_into = getattr(fs, "read_into", None)
            if read_into is not None:
                return int(read_into(inner, offset, dest))
            data = fs.read(inner, offset, len(dest))
        dest[: len(data)] = data
        return len(data)

    def read(self, path: str, offset: int, length: int) -> bytes:
        """Bytes of a regular file (short only at its end)."""
        name, inner = self.split(path)
        with vfs_errors(path):
            return self.files.get(name).read(inner, offset, length)
