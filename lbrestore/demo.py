"""The README's main job (`make demo`): live backups of a throwaway VM, shown step by step.

It starts a QEMU VM with two small disks in a temporary folder (no guest OS is needed: writes
go through the virtio devices with QEMU's own qemu-io), creates a temporary store, backs the
running VM up, writes more, backs it up again (only the changed clusters travel), lists the
restore points, checks them with `qemu-img compare`, and removes everything.
"""

from __future__ import annotations

import asyncio
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lbqemu.qmp import QmpSession
from lbstore.store import Store

MiB = 1 << 20
DISKS = {"vda": 64 * MiB, "vdb": 32 * MiB}


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(*args: str) -> str:
    """Run a command, echoing it as a user would type it, and show its output."""
    print("$ " + " ".join(shlex.quote(a) for a in args), flush=True)
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    output = (done.stdout + done.stderr).rstrip()
    if output:
        print(output, flush=True)
    if done.returncode != 0:
        raise SystemExit(f"demo: {args[0]} failed with exit code {done.returncode}")
    return done.stdout


def lbrestore(store: Path, *args: str) -> str:
    return run(sys.executable, "-m", "lbrestore", "--store", str(store), *args)


@contextmanager
def throwaway_vm(folder: Path) -> Iterator[tuple[str, str]]:
    """A QEMU process with DISKS; yields (QMP address for lbrestore, QMP address for writes)."""
    command = [
        "qemu-system-x86_64", "-machine", "q35,accel=kvm:tcg", "-name", "demo",
        "-m", "64", "-nodefaults", "-display", "none",
        "-qmp", f"unix:{folder}/qmp.sock,server=on,wait=off",
        "-qmp", f"unix:{folder}/ctl.sock,server=on,wait=off",
    ]  # fmt: skip
    for name, size in DISKS.items():
        image = folder / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)],
                       check=True)  # fmt: skip
        command += [
            "-blockdev", f"driver=file,filename={image},node-name=file-{name}",
            "-blockdev", f"driver=qcow2,file=file-{name},node-name=fmt-{name}",
            "-device", f"virtio-blk-pci,drive=fmt-{name},id={name}",
        ]  # fmt: skip
    print("$ " + " ".join(shlex.quote(a) for a in command), flush=True)
    log = open(folder / "qemu.log", "wb")  # noqa: SIM115 - closed below
    qemu = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"unix:{folder}/qmp.sock", f"unix:{folder}/ctl.sock"
    finally:
        qemu.kill()
        qemu.wait()
        log.close()


def guest_writes(ctl: str, *writes: tuple[str, str]) -> None:
    """Writes through the VM's devices, as a guest would make them."""

    async def write() -> None:
        async with QmpSession(ctl) as qmp:
            for disk, io in writes:
                print(f"   guest writes to {disk}: qemu-io {io!r}", flush=True)
                line = f'qemu-io -d /machine/peripheral/{disk}/virtio-backend "{io}"'
                await qmp.execute("human-monitor-command", {"command-line": line})

    asyncio.run(write())


def snapshot(ctl: str, folder: Path, tag: str) -> dict[str, Path]:
    """Raw copies of the disks taken while the VM is paused (to check the restore points)."""

    async def pause(command: str) -> None:
        async with QmpSession(ctl) as qmp:
            await qmp.execute(command)

    asyncio.run(pause("stop"))
    try:
        copies = {}
        for name in DISKS:
            copies[name] = folder / f"{tag}-{name}.raw"
            image = str(folder / f"{name}.qcow2")
            convert = ["qemu-img", "convert", "-U", "-O", "raw", image, str(copies[name])]
            subprocess.run(convert, check=True)
        return copies
    finally:
        asyncio.run(pause("cont"))


def compare(store: Path, which: int, copies: dict[str, Path]) -> None:
    """`qemu-img compare` of the which-th restore point's files against the paused copies."""
    with Store.open(store) as opened:
        point = opened.restore_points("demo")[which]
        files = {name: opened.file_path(point, name) for name in copies}
    for name, raw in copies.items():
        run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(files[name]), str(raw))


def main() -> None:
    if not shutil.which("qemu-system-x86_64"):
        raise SystemExit("demo: qemu-system-x86_64 is not installed (run `make setup`)")
    folder = Path(tempfile.mkdtemp(prefix="lbrestore-demo-"))
    store = folder / "store"
    started = time.monotonic()
    try:
        say("a throwaway VM with two disks (vda 64 MiB, vdb 32 MiB), running")
        with throwaway_vm(folder) as (qmp, ctl):
            guest_writes(ctl, ("vda", "write -P 0x11 0 16M"), ("vdb", "write -P 0x22 4M 4M"))
            say("a new store")
            lbrestore(store, "init")
            say("first backup of the running VM: every allocated cluster is read")
            first = snapshot(ctl, folder, "first")
            lbrestore(store, "backup", "demo", "--qmp", qmp)
            say("the guest keeps writing (and trims a range)")
            guest_writes(
                ctl,
                ("vda", "write -P 0x33 1M 256k"),
                ("vda", "discard 8M 1M"),
                ("vdb", "write -P 0x44 30M 64k"),
            )
            second = snapshot(ctl, folder, "second")
            say("second backup: only the clusters changed since the first one travel")
            lbrestore(store, "backup", "demo", "--qmp", qmp)
        say("the restore points")
        lbrestore(store, "list")
        say("each restore point reads exactly like the disks at its instant")
        compare(store, 0, first)
        compare(store, 1, second)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    say(f"done in {time.monotonic() - started:.1f} s; the VM and the store were removed")


if __name__ == "__main__":
    main()
