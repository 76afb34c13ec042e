"""The README's main job (`make demo`): the story lbrestore is built for, with a real Linux VM.

A tiny Linux guest (the Debian cloud kernel, a busybox initramfs, ext4; built from Debian packages
the first time, then reused from ~/.cache/lbrestore-tests) runs and writes files, each synced and
listed with its checksum in a manifest. lbrestore backs it up while it writes (full, then
incrementals), lists the restore points, mounts the one from a minute ago and shows a file of the
guest's data partition through the mount. Then the host "dies" (QEMU is killed): the newest point
is restored into a new folder with its VM definition, proven bootable with `verify --boot`, booted
from its own start script, and the guest checks every file against its manifest. Everything lives
in a temporary folder that is removed at the end.

The guest runs under TCG (no KVM needed): it boots in seconds, because it is tiny.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
INCREMENTAL_EVERY = float(os.environ.get("LBR_DEMO_EVERY", "20"))
"""Seconds between incremental backups (a shorter demo for its smoke test: LBR_DEMO_EVERY)."""
MOUNT_AGE_SECONDS = int(os.environ.get("LBR_DEMO_MOUNT_AGE", "60"))
"""The demo mounts the point of this many seconds ago (`@1m-ago` by default)."""
_started = time.monotonic()


def say(text: str) -> None:
    print(f"\n== [{time.monotonic() - _started:5.1f} s] {text}", flush=True)


def run(*args: str | Path, show: int | None = None, first: int | None = None) -> str:
    """Run a command, echoing it as a user would type it, and show (the end, or the `first`
    lines, of) its output."""
    print("$ " + " ".join(shlex.quote(str(a)) for a in args), flush=True)
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    output = (done.stdout + done.stderr).rstrip()
    lines = output.splitlines()
    if show is not None and len(lines) > show:
        print(f"  ... ({len(lines) - show} lines before)")
        lines = lines[-show:]
    if first is not None and len(lines) > first:
        lines = [*lines[:first], f"  ... ({len(lines) - first} more lines)"]
    if lines:
        print("\n".join(lines), flush=True)
    if done.returncode != 0:
        raise SystemExit(f"demo: {Path(str(args[0])).name} failed with exit code {done.returncode}")
    return done.stdout


def lbrestore(store: Path, *args: str | Path, show: int | None = None) -> str:
    return run(sys.executable, "-m", "lbrestore", "--store", store, *args, show=show)


def guest_module() -> ModuleType:
    """tests/fixtures/linux_guest.py: the guest's builder and runner (the demo runs from the
    source tree, as `make demo`)."""
    fixtures = ROOT / "tests" / "fixtures"
    if not (fixtures / "linux_guest.py").exists():
        raise SystemExit("demo: run it from the source tree (tests/fixtures/linux_guest.py)")
    sys.path.insert(0, str(fixtures))
    import linux_guest

    return linux_guest


def main() -> None:
    for tool in ("qemu-system-x86_64", "debugfs", "e2fsck"):
        if not shutil.which(tool):
            raise SystemExit(f"demo: {tool} is not installed (run `make setup`)")
    guest = guest_module()
    folder = Path(tempfile.mkdtemp(prefix="lbrestore-demo-"))
    try:
        story(guest, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    say("done; the VMs, the store and the restored copy were removed")


def story(guest: ModuleType, folder: Path) -> None:
    store = folder / "store"
    say("a tiny Linux guest: Debian cloud kernel, busybox, syslinux, an ext4 data partition")
    try:
        image = guest.linux_guest_image()
    except guest.GuestBuildError as exc:
        raise SystemExit(f"demo: cannot build the guest image: {exc}") from exc
    print(f"image {image.path} (kernel {image.kernel_release}), reused between runs")
    disk = guest.copy_image(image, folder / "vda.qcow2")
    with guest.running_guest(disk, folder / "vm") as vm:
        say("the VM starts (under TCG) and writes files, syncing each one")
        print("$ " + " ".join(shlex.quote(a) for a in guest.guest_command(disk, vm.workdir)))
        print(vm.wait_for(guest.BOOT_MARKER + ".*")[0])
        seen = vm.wait_synced(10)
        print(f"the guest has synced {seen} files (data/files/f00001.bin ...) and its MANIFEST")
        say("a new store, and the first backup of the running VM: every allocated cluster")
        lbrestore(store, "init")
        lbrestore(store, "backup", "lg", "--qmp", vm.qmp_address)
        first_backup = time.monotonic()
        say(f"incremental backups every {INCREMENTAL_EVERY:g} s while the guest keeps writing")
        while time.monotonic() - first_backup < MOUNT_AGE_SECONDS + 2:
            time.sleep(INCREMENTAL_EVERY)
            seen = guest.synced_sequence(vm.console())
            print(f"the guest has synced {seen} files")
            lbrestore(store, "backup", "lg", "--qmp", vm.qmp_address)
        say("the restore points")
        lbrestore(store, "list", "lg")
        show_file_from_mount(store, folder)
        say("the host dies: QEMU is killed, mid-write")
        vm.kill()
        print(f"the guest had synced {guest.synced_sequence(vm.console())} files")
    restore_and_boot(guest, store, folder)


def show_file_from_mount(store: Path, folder: Path) -> None:
    """Mount the point of a minute ago; read a file of the guest's ext4 partition through it."""
    age = f"{MOUNT_AGE_SECONDS // 60}m" if MOUNT_AGE_SECONDS % 60 == 0 else f"{MOUNT_AGE_SECONDS}s"
    address = f"lg@{age}-ago"
    mountpoint = folder / "mnt"
    mountpoint.mkdir()
    say(f"a file from {age} ago: mount {address} (read-only, FUSE)")
    lbrestore(store, "mount", address, mountpoint)
    try:
        run("ls", "-l", mountpoint)
        print("a live backup's ext4 is crash-consistent: its journal needs replaying, so copy the")
        print("partition out and replay the journal on the copy (no root needed; as root,")
        print("`mount -o ro,noload` shows the partition as it was before the journal)")
        partition = folder / "part2.raw"
        run("cp", "--sparse=always", mountpoint / "vda-part2.raw", partition)
    finally:
        lbrestore(store, "umount", mountpoint)
    print(f"$ e2fsck -p -E journal_only {partition}", flush=True)
    replay = subprocess.run(["e2fsck", "-p", "-E", "journal_only", str(partition)], check=False)
    if replay.returncode not in (0, 1):  # 1: the journal was replayed
        raise SystemExit(f"demo: e2fsck failed with exit code {replay.returncode}")
    run("debugfs", "-R", "cat /MANIFEST", partition, show=3)
    run("debugfs", "-R", "cat /files/f00002.bin", partition, first=3)


def restore_and_boot(guest: ModuleType, store: Path, folder: Path) -> None:
    """On the "new host": restore the newest point, prove it boots, start it, check its files."""
    target = folder / "new-host"
    say("lbrestore proves the newest point boots (throwaway QEMU, disks read-only)")
    lbrestore(store, "verify", "lg@latest", "--boot", "--boot-pattern", guest.BOOT_MARKER)
    say("restore the newest point into a new folder, with its VM definition")
    lbrestore(store, "restore", "lg@latest", "--to", target, "--name", "lg-restored")
    run("ls", "-l", target)
    script = target / "start-lg-restored.sh"
    say("boot the restored VM from its own start script; the guest checks its manifest")
    print(f"$ ACCEL=tcg NET=none {script} -display none -fw_cfg name={guest.MODE_FW_CFG},"
          "string=check")  # fmt: skip
    console = guest.boot_restored(script)
    shown = [line for line in console.splitlines() if "LBR-" in line and "LBR-CHECK " not in line]
    print("\n".join(shown))
    report = guest.check_report(console)
    if guest.BOOT_MARKER not in console or report.done is None:
        raise SystemExit("demo: the restored VM did not boot and check its files:\n" + console)
    ok, bad, missing = report.done
    print(f"the restored VM booted and checked {ok + bad + missing} files: {ok} match")
    if bad or missing:
        print(f"({bad + missing} written after the backup's instant are incomplete, as expected)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
