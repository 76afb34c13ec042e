"""The story lbrestore is built for, with a real Linux guest (Debian kernel, ext4, busybox).

A VM runs and writes files, each synced and then listed with its checksum in a manifest; the
guest prints `LBR-SYNCED N` only after both reached the disk. It is backed up while it writes:
full, then incrementals (the last one quiesced with --qga when the guest's agent runs). A file is
read from an older point through the mount; then the host dies (QEMU killed), the newest point
is restored into a new folder with its VM definition, and the restored VM boots by itself from the
restored disk (its generated start script, ACCEL=tcg) and checks the manifest.

Crash consistency is decidable because the test notes the newest `LBR-SYNCED` number before it
starts each backup: every file up to that number must pass in the restored VM. Files written
after the backup's instant may be missing.

A second story kills QEMU between two backups and starts it again: the next backup resyncs (the
dirty bitmap cannot be trusted after a crash), the chain goes on, and the restored VM has its files.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fixtures.linux_guest import (
    BOOT_MARKER,
    QGA_STARTED,
    CheckReport,
    LinuxGuestImage,
    boot_restored,
    check_report,
    copy_image,
    parse_manifest,
    running_guest,
)
from restore_store import lbrestore

FILES_BEFORE_FULL = 12
FILES_BETWEEN_BACKUPS = 12


@dataclass
class Story:
    """The store after the story, and per restore point the newest file synced before it."""

    root: Path
    store: Path
    synced_before: dict[int, int] = field(default_factory=dict)
    quiesced: int | None = None
    """The point backed up with --qga (None: the agent did not run in the guest)."""
    no_qga_reason: str = ""


def backup(store: Path, qmp: str, *extra: str) -> dict[str, Any]:
    done = lbrestore(store, "backup", "lg", "--qmp", qmp, "--json", *extra)
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(json.loads(done.stdout))


def listed(store: Path) -> list[dict[str, Any]]:
    done = lbrestore(store, "list", "lg", "--json")
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


def restore_and_boot(story_root: Path, store: Path, address: str, name: str) -> CheckReport:
    """Restore `address` into a new folder; boot it from there in check mode; the report."""
    folder = story_root / f"restored-{name}"
    done = lbrestore(store, "restore", address, "--to", str(folder), "--name", name)
    assert done.returncode == 0, done.stdout + done.stderr
    console = boot_restored(folder / f"start-{name}.sh")
    assert BOOT_MARKER in console, console[-3000:]
    report = check_report(console)
    assert report.done is not None, console[-3000:]
    return report


def assert_synced_files_pass(report: CheckReport, synced: int) -> None:
    """Every file the guest had synced before the backup started passes its manifest line."""
    assert synced > 0
    missing = [seq for seq in range(1, synced + 1) if report.results.get(seq) != "OK"]
    assert not missing, f"files synced before the backup that fail: {missing[:20]}"


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory, linux_guest: LinuxGuestImage) -> Story:
    root = tmp_path_factory.mktemp("story")
    story = Story(root, root / "store")
    assert lbrestore(story.store, "init").returncode == 0
    disk = copy_image(linux_guest, root / "vda.qcow2")
    with running_guest(disk, root / "vm") as guest:
        guest.wait_for(BOOT_MARKER)
        seen = guest.wait_synced(FILES_BEFORE_FULL)
        for extra in ((), (), ("--qga",)):
            if extra and QGA_STARTED not in guest.console():
                story.no_qga_reason = "qemu-ga did not start in the guest: " + guest.console()
                extra = ()
            elif extra:
                extra = ("--qga", guest.qga_address)
            summary = backup(story.store, guest.qmp_address, *extra)
            story.synced_before[summary["point_id"]] = seen
            if extra:
                story.quiesced = summary["point_id"]
                assert summary["guest_freeze"], summary
            seen = guest.wait_synced(seen + FILES_BETWEEN_BACKUPS)
        guest.kill()  # the host dies
    return story


@pytest.fixture(scope="module")
def restored_latest(story: Story) -> CheckReport:
    return restore_and_boot(story.root, story.store, "lg@latest", "lg-new")


def test_backups_while_the_guest_writes_are_full_then_incremental(story: Story) -> None:
    points = listed(story.store)
    assert [p["kind"] for p in points] == ["full", "incremental", "incremental"]
    full, *incrementals = (p["disks"][0]["stored_bytes"] for p in points)
    assert all(stored < full for stored in incrementals)


def test_restored_latest_boots_by_itself_with_every_synced_file(
    story: Story, restored_latest: CheckReport
) -> None:
    latest = max(story.synced_before)
    assert_synced_files_pass(restored_latest, story.synced_before[latest])


def test_crash_consistent_point_has_every_file_synced_before_its_instant(story: Story) -> None:
    """The middle point was taken without the agent: a crash-consistent ext4, journal and all."""
    middle = sorted(story.synced_before)[1]
    report = restore_and_boot(story.root, story.store, f"lg@#{middle}", "lg-middle")
    assert_synced_files_pass(report, story.synced_before[middle])


def test_quiesced_point_passes_its_manifest_completely(
    story: Story, restored_latest: CheckReport
) -> None:
    if story.quiesced is None:
        pytest.skip(story.no_qga_reason)
    assert restored_latest.done is not None
    ok, bad, missing = restored_latest.done
    assert bad == 0 and missing == 0 and ok == len(restored_latest.results)


def test_only_the_quiesced_point_s_ext4_is_clean(story: Story, tmp_path: Path) -> None:
    """A crash-consistent ext4 needs its journal replayed (README: noload, or replay a copy);
    one frozen by the guest's agent does not."""
    if story.quiesced is None:
        pytest.skip(story.no_qga_reason)
    middle = sorted(story.synced_before)[1]
    crashed = data_partition_through_mount(story.store, f"lg@#{middle}", tmp_path / "m")
    assert needs_journal_replay(crashed)
    quiesced = data_partition_through_mount(story.store, f"lg@#{story.quiesced}", tmp_path / "q")
    assert not needs_journal_replay(quiesced)


def test_older_point_read_through_the_mount_matches_its_manifest(
    story: Story, tmp_path: Path
) -> None:
    """The first point's data partition, read through `lbrestore mount`: its manifest lists
    every file synced before that backup, and every listed file has its checksum."""
    first = min(story.synced_before)
    files = guest_files_through_mount(story.store, f"lg@#{first}", tmp_path)
    manifest = parse_manifest(files["MANIFEST"].decode())
    names = {f"f{seq:05d}.bin" for seq in range(1, story.synced_before[first] + 1)}
    assert names <= set(manifest)
    for name, digest in manifest.items():
        assert hashlib.sha256(files[f"files/{name}"]).hexdigest() == digest, name


def data_partition_through_mount(store: Path, address: str, work: Path) -> Path:
    """A copy of the point's vda-part2.raw, read through `lbrestore mount`."""
    mountpoint = work / "mnt"
    mountpoint.mkdir(parents=True)
    done = lbrestore(store, "mount", address, str(mountpoint))
    assert done.returncode == 0, done.stderr
    try:
        partition = work / "part2.raw"
        subprocess.run(
            ["cp", "--sparse=always", mountpoint / "vda-part2.raw", partition], check=True
        )
    finally:
        assert lbrestore(store, "umount", str(mountpoint)).returncode == 0
    return partition


def needs_journal_replay(partition: Path) -> bool:
    header = subprocess.run(["dumpe2fs", "-h", partition], capture_output=True, text=True)
    features = next(line for line in header.stdout.splitlines() if "features:" in line)
    return "needs_recovery" in features


def guest_files_through_mount(store: Path, address: str, work: Path) -> dict[str, bytes]:
    """The data partition's files, as a user gets them from a mount: copy vda-part2.raw out,
    replay its journal on the copy (a live backup's ext4 is crash-consistent), dump with
    debugfs. No root needed."""
    partition = data_partition_through_mount(store, address, work)
    replay = subprocess.run(
        ["e2fsck", "-p", "-E", "journal_only", partition], capture_output=True, text=True
    )
    assert replay.returncode in (0, 1), replay.stdout + replay.stderr
    dump = work / "dump"
    dump.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump / {dump}", partition], check=True, capture_output=True)
    return {
        str(path.relative_to(dump)): path.read_bytes() for path in dump.rglob("*") if path.is_file()
    }


def test_chain_continues_after_qemu_is_killed_between_backups(
    tmp_path: Path, linux_guest: LinuxGuestImage
) -> None:
    store = tmp_path / "store"
    assert lbrestore(store, "init").returncode == 0
    disk = copy_image(linux_guest, tmp_path / "vda.qcow2")
    with running_guest(disk, tmp_path / "vm", qga=False) as guest:
        guest.wait_for(BOOT_MARKER)
        seen = guest.wait_synced(FILES_BEFORE_FULL)
        backup(store, guest.qmp_address)
        seen = guest.wait_synced(seen + FILES_BETWEEN_BACKUPS)
        guest.kill()  # QEMU dies between two backups: its dirty bitmap is not saved
    with running_guest(disk, tmp_path / "vm", qga=False) as guest:
        guest.wait_for(BOOT_MARKER)
        seen = guest.wait_synced(seen + 1)  # the writer goes on after its manifest's last file
        resync = backup(store, guest.qmp_address)
        assert resync["kind"] == "resync", resync
        seen = guest.wait_synced(seen + FILES_BETWEEN_BACKUPS)
        last = backup(store, guest.qmp_address)
        assert last["kind"] == "incremental", last
        guest.kill()
    assert [p["kind"] for p in listed(store)] == ["full", "resync", "incremental"]
    report = restore_and_boot(tmp_path, store, "lg@latest", "lg-again")
    assert_synced_files_pass(report, seen)
