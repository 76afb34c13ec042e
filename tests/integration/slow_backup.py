"""A backup run as its own process, slowed down and chatty, so a test can SIGKILL it mid-pull.

Usage: python slow_backup.py STORE QMP_ADDRESS VM [RESUME_FILE]. Prints `PLAN <disk>` before
each disk's pull and `READ <disk> <offset>` after each run is handed to the store, then sleeps a
little: the parent reads these lines to kill the process at a known instant. With RESUME_FILE,
the pull stops after its first run (`PAUSED`) until that file exists (at most a minute), so a
test can do something else while this backup is surely mid-pull. The store is opened for this
VM only, as `lbrestore backup` opens it. Test-only: the shipped job never sleeps.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from lbqemu.nbd import Run
from lbrestore.backup import BackupHooks, BackupOptions, run_backup
from lbstore.store import Store


def main() -> None:
    store_path, qmp, vm = sys.argv[1:4]
    resume = Path(sys.argv[4]) if len(sys.argv) > 4 else None

    def plan(disk: str, runs: list[Run]) -> None:
        print(f"PLAN {disk}", flush=True)

    def progress(disk: str, offset: int, length: int) -> None:
        nonlocal resume
        print(f"READ {disk} {offset}", flush=True)
        if resume is not None:
            print("PAUSED", flush=True)
            deadline = time.monotonic() + 60
            while not resume.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            resume = None
        time.sleep(0.01)

    options = BackupOptions(vm=vm, qmp=qmp, chunk=64 * 1024, depth=2)
    with Store.open(store_path, write=True, vm=vm) as store:
        summary = asyncio.run(run_backup(store, options, BackupHooks(plan=plan, progress=progress)))
    print(f"DONE {summary.point_id}", flush=True)


if __name__ == "__main__":
    main()
