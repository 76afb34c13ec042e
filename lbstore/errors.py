"""Errors raised by lbstore. Every class carries a stable exit code for the CLI."""

from __future__ import annotations


class StoreError(Exception):
    """Root of every error that lbstore raises on purpose (exit code 1)."""

    exit_code = 1


class Qcow2Error(StoreError):
    """A qcow2 file is malformed, unsupported or cannot be read or written."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class UnsupportedFeatureError(Qcow2Error):
    """A qcow2 file uses a feature this reader does not implement; names the feature."""

    def __init__(self, path: object, feature: str) -> None:
        super().__init__(path, f"unsupported qcow2 feature: {feature}")
        self.feature = feature


# --- the store (index, lock, ingest, addresses) -------------------------------------------------


class StoreNotFoundError(StoreError):
    """The store folder does not exist or holds no index (run `lbrestore init` first)."""

    def __init__(self, path: object, problem: str = "no store here (run `lbrestore init`)") -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class StorePathError(StoreError):
    """The store path cannot be used as a store (a file, not writable, read-only filesystem)."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class StoreBusyError(StoreError):
    """Another process holds the store's write lock past the timeout (exit code 4)."""

    exit_code = 4

    def __init__(self, path: object, holder: str, timeout: float) -> None:
        super().__init__(f"store busy: locked by {holder} (waited {timeout:g}s for {path})")
        self.path = path
        self.holder = holder
        self.timeout = timeout


class ReadOnlyStoreError(StoreError):
    """A change was asked of a store opened for reading only (a programming error in callers)."""

    def __init__(self, operation: str) -> None:
        super().__init__(f"{operation} needs the store opened for writing")
        self.operation = operation


class InvalidNameError(StoreError):
    """A VM or disk name does not match [A-Za-z0-9][A-Za-z0-9._-]{0,63}; refused before any path
    (a usage error, exit code 2)."""

    exit_code = 2

    def __init__(self, what: str, name: str) -> None:
        shown = name if len(name) <= 70 else name[:67] + "..."
        super().__init__(
            f"invalid {what} name {shown!r}: use 1-64 characters A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
        self.what = what
        self.name = name


class AddressError(StoreError):
    """A VM@SPEC address is malformed or matches no restore point; says what exists."""

    def __init__(self, address: str, problem: str) -> None:
        super().__init__(f"{address!r}: {problem}")
        self.address = address
        self.problem = problem


class AddressSpecError(AddressError):
    """A VM@SPEC address is malformed (a usage error, exit code 2), not merely unmatched."""

    exit_code = 2


class IngestError(StoreError):
    """An ingest was fed something it cannot store (bad alignment, unknown disk, wrong order)."""

    def __init__(self, vm: str, problem: str) -> None:
        super().__init__(f"ingest of {vm}: {problem}")
        self.vm = vm
        self.problem = problem


class StoreSpaceError(StoreError):
    """The filesystem under the store is full; the restore point being written was discarded."""

    def __init__(self, path: object) -> None:
        super().__init__(f"no space left on the store's filesystem ({path}); nothing was committed")
        self.path = path


class StoreIntegrityError(StoreError):
    """The index and the files under data/ disagree (a committed file is missing or foreign)."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class ChecksumRowError(StoreIntegrityError):
    """A checksum row of the index cannot be used: unknown algorithm, or blobs that disagree."""

    def __init__(self, where: str, chunk: int, problem: str) -> None:
        row = f"checksum row of {where}, chunk {chunk}" if chunk >= 0 else f"zero runs of {where}"
        super().__init__("index", f"{row}: {problem}")
        self.where = where
        self.chunk = chunk


class DamagedClusterError(StoreIntegrityError):
    """A stored cluster read back does not match the index: its digest differs, the file maps
    it but the index lists no checksum for it, or the index lists it but the file no longer
    maps it (a damaged L2 table). Names the point, disk, guest cluster and file."""

    def __init__(self, where: str, cluster: int, path: object, problem: str) -> None:
        super().__init__(path, f"{where}: cluster {cluster} {problem}")
        self.where = where
        self.cluster = cluster


class ReadWorkerError(StoreError):
    """The process that reads and checks stored clusters ended unexpectedly (killed)."""

    def __init__(self, exitcode: int | None) -> None:
        how = f"exit status {exitcode}" if exitcode is not None else "no exit status"
        super().__init__(f"the process reading the store's clusters ended unexpectedly ({how})")
        self.exitcode = exitcode


class Qcow2WriteError(Qcow2Error):
    """Writing a qcow2 file failed in the operating system (disk full, I/O error, ...).

    ``errno`` is the OS error number (e.g. ``errno.ENOSPC``), or None if there was none.
    """

    def __init__(self, path: object, problem: str, errno: int | None = None) -> None:
        super().__init__(path, problem)
        self.errno = errno


class IndexDamagedError(StoreError):
    """index.sqlite is unreadable (a damaged page, not a database) or empty while data/ holds
    restore points; only `lbrestore check --repair` (which rebuilds it from the sidecars) helps."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}; run `lbrestore check --repair`")
        self.path = path
        self.problem = problem


class StoreNeedsRepairError(StoreError):
    """The index and data/ disagree (files or sidecars the index does not know): writes are
    refused until `lbrestore check --repair` has reconciled them, so nothing is overwritten."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(
            f"{path}: {problem}; writes are refused until `lbrestore check --repair` has run"
        )
        self.path = path
        self.problem = problem
