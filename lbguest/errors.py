"""Errors raised by lbguest. Every class carries a stable exit code for the CLI.

`GuestPathError` names a path that is not there (or is the wrong kind) and the errno a FUSE
adapter answers with; `DamagedFilesystemError` says that a filesystem's metadata or data could not
be read or makes no sense: the mount answers EIO for that file, the CLI prints one line.
"""

from __future__ import annotations

import errno as errno_codes


class GuestError(Exception):
    """Root of every error that lbguest raises on purpose (exit code 1)."""

    exit_code = 1


class GuestPathError(GuestError):
    """A path inside the guest's files does not exist, or is not the kind of entry asked for."""

    def __init__(self, path: str, errno: int = errno_codes.ENOENT) -> None:
        problem = {
            errno_codes.ENOENT: "no such file or folder",
            errno_codes.ENOTDIR: "not a folder",
            errno_codes.EISDIR: "is a folder",
            errno_codes.EINVAL: "not a symlink",
        }.get(errno, "cannot be used here")
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.errno = errno
        self.problem = problem


class DamagedFilesystemError(GuestError):
    """A filesystem's metadata or data is unreadable or inconsistent (exit code 3: damage)."""

    exit_code = 3

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem


class ReadBudgetError(DamagedFilesystemError):
    """One request read far more than its size can need: a loop in damaged metadata."""

    def __init__(self, source: str, budget: int) -> None:
        super().__init__(source, f"damaged metadata: more than {budget} bytes read for one request")
        self.budget = budget


class SourceUnreadableError(DamagedFilesystemError):
    """The bytes under a filesystem could not be read (for example a damaged stored cluster)."""

    def __init__(self, source: str, cause: BaseException) -> None:
        super().__init__(source, f"unreadable: {cause}")
        self.cause = cause
