"""A backup run as its own process, slowed down and chatty, so a test can SIGKILL it mid-pull.

Usage: python slow_backup.py STORE QMP_ADDRESS VM. Prints `PLAN <disk>` before each disk's pull
and `READ <disk> <offset>` after each run is handed to the store, then sleeps a little: the
parent reads these lines to kill the process at a known instant. Test-only: the shipped job
never sleeps.
"""

from __future__ import annotations

import asyncio
import sys
import time

from lbqemu.nbd import Run
from lbrestore.backup import BackupHooks, BackupOptions, run_backup
from lbstore.store import Store


def main() -> None:
    store_path, qmp, vm = sys.argv[1:4]

    def plan(disk: str, runs: list[Run]) -> None:
        print(f"PLAN {disk}", flush=True)

    def progress(disk: str, offset: int, length: int) -> None:
        print(f"READ {disk} {offset}", flush=True)
        time.sleep(0.01)

    options = BackupOptions(vm=vm, qmp=qmp, chunk=64 * 1024, depth=2)
    with Store.open(store_path, write=True) as store:
        summary = asyncio.run(run_backup(store, options, BackupHooks(plan=plan, progress=progress)))
    print(f"DONE {summary.point_id}", flush=True)


if __name__ == "__main__":
    main()
