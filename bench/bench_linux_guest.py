"""Benchmark: the story's figures with the real Linux guest (tests/fixtures/linux_guest.py).

The guest (Debian cloud kernel, busybox, ext4; 80 MiB disk) runs under TCG and writes files,
each synced and listed in its manifest. Measured in one run, every time a whole command:

1. Full backup of the running guest: `lbrestore backup` versus `qemu-img convert -U -O qcow2` of
   the same live disk image followed by `sync` (a copy of the same bytes with QEMU's own tool;
   not a consistent point in time, so it is the cheaper of the two jobs).
2. LBR_BENCH_INCREMENTALS incremental backups (default 3), LBR_BENCH_GAP seconds apart (default
   10) while the guest writes: throughput, and stored bytes per point against the bytes of the
   files the guest synced in between (ext4 adds metadata and its journal; the store keeps
   whole 64 KiB clusters).
3. Restore of the newest point (`lbrestore restore`, every cluster checked) versus
   `qemu-img convert -O qcow2` of the same chain (no checks) followed by `sync`.
4. Boot to the guest's marker: the original VM versus the restored one started by its generated
   start script (both TCG).

Prints `ratio` lines. Not a test: never fails on time.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))

from linux_guest import (  # noqa: E402
    BOOT_MARKER,
    MODE_FW_CFG,
    copy_image,
    linux_guest_image,
    running_guest,
)

MiB = 1 << 20


def lbrestore(store: Path, *args: str | Path) -> tuple[float, str]:
    """Run the CLI as a user does; (seconds, stdout)."""
    command = [sys.executable, "-m", "lbrestore", "--store", str(store), *map(str, args)]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"bench: lbrestore {args[0]} failed: {done.stderr.strip()}")
    return seconds, done.stdout


def timed(*command: str | Path) -> float:
    """Seconds of a command plus the `sync` that makes its output durable."""
    started = time.monotonic()
    subprocess.run([str(c) for c in command], check=True, capture_output=True)
    subprocess.run(["sync"], check=True)
    return time.monotonic() - started


def written_between(first: int, last: int) -> int:
    """Bytes of the files first+1..last (the guest's size rule: (seq % 8 + 1) * 16 KiB)."""
    return sum((seq % 8 + 1) * 16384 for seq in range(first + 1, last + 1))


def boot_to_marker(command: list[str], env: dict[str, str]) -> float:
    """Seconds from starting QEMU to the marker on its stdout (the console); QEMU is killed."""
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert process.stdout is not None
    console = b""
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while BOOT_MARKER.encode() not in console:
                if not selector.select(timeout=300):
                    raise SystemExit("bench: the restored VM printed no marker in 300 s")
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    raise SystemExit(f"bench: the restored VM exited: {console[-500:]!r}")
                console += chunk
        return time.monotonic() - started
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


def backups(store: Path, folder: Path, disk: Path) -> dict[str, Any]:
    """Boot the guest, back it up (full, incrementals) while it writes; the figures."""
    incrementals = int(os.environ.get("LBR_BENCH_INCREMENTALS", "3"))
    gap = float(os.environ.get("LBR_BENCH_GAP", "10"))
    figures: dict[str, Any] = {"incrementals": []}
    started = time.monotonic()
    with running_guest(disk, folder / "vm", qga=False) as guest:
        guest.wait_for(BOOT_MARKER)
        figures["original_boot"] = time.monotonic() - started
        seen = guest.wait_synced(10)
        seconds, out = lbrestore(store, "backup", "lg", "--qmp", guest.qmp_address, "--json")
        figures["full"] = (seconds, json.loads(out))
        figures["qemu_img_full"] = timed(
            "qemu-img", "convert", "-U", "-O", "qcow2", disk, folder / "copy.qcow2"
        )
        for _ in range(incrementals):
            time.sleep(gap)
            now = guest.wait_synced(seen + 1)  # something to back up, even on a busy host
            seconds, out = lbrestore(store, "backup", "lg", "--qmp", guest.qmp_address, "--json")
            figures["incrementals"].append((seconds, json.loads(out), written_between(seen, now)))
            seen = now
    return figures


def report(figures: dict[str, Any], restore: float, qemu_restore: float, boot: float) -> None:
    seconds, full = figures["full"]
    qemu_full = figures["qemu_img_full"]
    size = full["disks"][0]["virtual_size"]
    print(
        f"guest disk: {size // MiB} MiB, {full['bytes_read'] / MiB:.1f} MiB allocated (TCG guest)"
    )
    print(f"full backup (whole command): lbrestore {seconds:.2f} s "
          f"({full['bytes_read'] / MiB / seconds:.1f} MiB/s read), "
          f"qemu-img convert -U + sync {qemu_full:.2f} s")  # fmt: skip
    print(f"ratio (ours/theirs) full backup throughput: {qemu_full / seconds:.2f}")
    for index, (inc_seconds, inc, written) in enumerate(figures["incrementals"], 1):
        stored = inc["bytes_stored"]
        print(f"incremental {index}: {inc_seconds:.2f} s, {inc['bytes_read'] / MiB:.1f} MiB read "
              f"({inc['bytes_read'] / MiB / inc_seconds:.1f} MiB/s), {stored / MiB:.1f} MiB stored "
              f"for {written / MiB:.1f} MiB of files the guest synced")  # fmt: skip
        if written:
            print(f"ratio (stored/written) incremental {index}: {stored / written:.2f}")
    print(f"restore of the newest point: lbrestore + sync {restore:.2f} s (checked), "
          f"qemu-img convert of the chain + sync {qemu_restore:.2f} s")  # fmt: skip
    print(f"ratio (ours/theirs) restore throughput: {qemu_restore / restore:.2f}")
    original = figures["original_boot"]
    print(f"boot to marker (TCG): original {original:.2f} s, restored {boot:.2f} s")
    print(f"ratio (restored/original) boot-to-marker time: {boot / original:.2f}")


def main() -> None:
    image = linux_guest_image()
    with tempfile.TemporaryDirectory(prefix="lbr-bench-guest-") as tmp:
        folder = Path(tmp)
        store = folder / "store"
        lbrestore(store, "init")
        disk = copy_image(image, folder / "vda.qcow2")
        figures = backups(store, folder, disk)
        target = folder / "restored"
        started = time.monotonic()
        lbrestore(store, "restore", "lg@latest", "--to", target, "--name", "lg2")
        subprocess.run(["sync"], check=True)
        restore = time.monotonic() - started
        _, listing = lbrestore(store, "list", "lg", "--json")
        newest = json.loads(listing)[-1]["id"]
        top = store / "data" / "lg" / "vda" / f"{newest}.qcow2"
        qemu_restore = timed("qemu-img", "convert", "-O", "qcow2", top, folder / "chain.qcow2")
        env = dict(os.environ, ACCEL="tcg", NET="none", CPU="max")
        script = [str(target / "start-lg2.sh"), "-display", "none", "-no-reboot",
                  "-fw_cfg", f"name={MODE_FW_CFG},string=idle"]  # fmt: skip
        boot = boot_to_marker(script, env)
        report(figures, restore, qemu_restore, boot)


if __name__ == "__main__":
    main()
