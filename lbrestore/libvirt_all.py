"""`lbrestore backup --all --libvirt URI`: every domain of a libvirt connection, a few at a time.

Each domain's backup runs on its own worker thread with its own event loop, libvirt connection
and store handle (opened as that VM's writer, as `lbrestore backup VM` does), so backups of
different VMs go on together and one domain's failure stops nobody else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lbqemu import libvirt as lv
from lbrestore.backup import BackupSummary
from lbrestore.errors import KNOWN_ERRORS
from lbrestore.libvirt_backup import LibvirtBackupOptions, run_libvirt_backup
from lbstore.names import check_vm_name
from lbstore.store import Store


@dataclass
class DomainResult:
    """One domain's outcome: its summary, or the one-line error that stopped it."""

    vm: str
    summary: BackupSummary | None = None
    error: str | None = None

    def line(self) -> str:
        if self.summary is None:
            return f"{self.vm}: FAILED: {self.error}"
        s = self.summary
        return (
            f"{self.vm}: ok: restore point #{s.point_id} ({s.kind}), "
            f"{s.bytes_read} bytes read, {s.bytes_stored} stored in {s.duration:.1f} s"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "ok": self.error is None,
            "error": self.error,
            "backup": self.summary.to_json() if self.summary is not None else None,
        }


def backup_domains(
    store_path: Path,
    options: LibvirtBackupOptions,
    jobs: int,
    include_inactive: bool,
    lock_timeout: float,
    *,
    match: str | None = None,
) -> list[DomainResult]:
    """Back up every (running) domain at `options.uri` (whose name matches the shell pattern
    `match`, when given); results in domain name order."""
    with lv.connection(options.uri) as conn:
        names = lv.domain_names(conn, include_inactive)
    if match is not None:
        names = [n for n in names if fnmatch.fnmatchcase(n, match)]
    with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="lbrestore-domain") as pool:
        futures = [
            pool.submit(_backup_domain, store_path, options, name, lock_timeout) for name in names
        ]
        return [f.result() for f in futures]


def _backup_domain(
    store_path: Path, options: LibvirtBackupOptions, name: str, lock_timeout: float
) -> DomainResult:
    result = DomainResult(name)
    try:
        vm = check_vm_name(name)
        mine = dataclasses.replace(options, vm=vm)
        with Store.open(
            store_path, write=True, lock_timeout=lock_timeout, purpose="lbrestore backup", vm=vm
        ) as store:
            result.summary = asyncio.run(run_libvirt_backup(store, mine))
    except KNOWN_ERRORS as exc:
        result.error = str(exc)
    except Exception as exc:  # a bug: reported with its traceback, the other domains go on
        traceback.print_exception(exc)
        result.error = f"internal error: {type(exc).__name__}: {exc}"
    return result
