"""Errors raised by lbfuse. Every class carries a stable exit code for the CLI.

Two families: `VfsError` subclasses are what the pure filesystem model raises for a request it
refuses; each names the errno the FUSE adapter answers with. `MountError` subclasses are raised
while setting up or tearing down a mount and reach the user as one line.
"""

from __future__ import annotations

import errno as errno_codes


class FuseError(Exception):
    """Root of every error that lbfuse raises on purpose (exit code 1)."""

    exit_code = 1


# --- the filesystem model: one errno per class ----------------------------------------------


class VfsError(FuseError):
    """A filesystem request the read-only model refuses; `errno` is the answer to the kernel."""

    errno = errno_codes.EIO

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class EntryNotFoundError(VfsError):
    """No file or folder of that name exists in the mounted restore point."""

    errno = errno_codes.ENOENT

    def __init__(self, path: str) -> None:
        super().__init__(path, "no such file or folder")


class NotAFolderError(VfsError):
    """A path goes through, or lists, something that is a file."""

    errno = errno_codes.ENOTDIR

    def __init__(self, path: str) -> None:
        super().__init__(path, "not a folder")


class IsAFolderError(VfsError):
    """A file operation (read) was asked of a folder."""

    errno = errno_codes.EISDIR

    def __init__(self, path: str) -> None:
        super().__init__(path, "is a folder")


class ReadOnlyError(VfsError):
    """Any change to a mounted restore point: it is read-only for good."""

    errno = errno_codes.EROFS

    def __init__(self, path: str, operation: str) -> None:
        super().__init__(path, f"{operation}: read-only restore point")
        self.operation = operation


class BadHandleError(VfsError):
    """A read named a file handle that is not open (a kernel/adapter mismatch)."""

    errno = errno_codes.EBADF

    def __init__(self, handle: int) -> None:
        super().__init__(f"#{handle}", "file handle not open")
        self.handle = handle


class SourceReadError(VfsError):
    """The disk behind a file could not be read (for example its store files were damaged)."""

    errno = errno_codes.EIO

    def __init__(self, path: str, cause: BaseException) -> None:
        super().__init__(path, f"read failed: {cause}")
        self.cause = cause


# --- mounting and unmounting ----------------------------------------------------------------


class MountError(FuseError):
    """A mount or unmount could not be done; `mountpoint` is the folder concerned."""

    def __init__(self, mountpoint: object, problem: str) -> None:
        super().__init__(f"{mountpoint}: {problem}")
        self.mountpoint = mountpoint
        self.problem = problem


class MountpointError(MountError):
    """The mountpoint is unusable: missing, not a folder, not empty, or already a mount."""


class MountFailedError(MountError):
    """The serving process did not bring the mount up; carries its exit code and output."""

    def __init__(
        self, mountpoint: object, problem: str, *, returncode: int | None = None, output: str = ""
    ) -> None:
        super().__init__(mountpoint, problem)
        self.returncode = returncode
        self.output = output


class NotMountedError(MountError):
    """`umount` was asked for a folder that is not a lbrestore mount."""


class UnmountError(MountError):
    """The kernel refused to unmount (busy), or the serving process did not exit."""
