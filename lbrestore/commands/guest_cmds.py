"""`lbrestore ls`, `extract` and `diff`: the guest's own files in restore points, without a
mount and without root (lbguest reads the filesystems in user space, through checked views)."""

from __future__ import annotations

import stat
import sys
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import click

from lbguest.diff import Change, DiffStats, diff_paths
from lbguest.files import GuestFiles
from lbguest.model import EntryKind, GuestEntry
from lbrestore.commands._common import echo_json, format_size, json_option, with_store
from lbrestore.errors import AppError, UsageError
from lbrestore.guestfiles import (
    Extractor,
    ExtractReport,
    Progress,
    entry_dict,
    full_paths,
    guest_path,
    locate,
    open_point_files,
)
from lbrestore.restore_target import refuse_store_place
from lbstore.store import Store

EXIT_DAMAGE = 3


def printable(text: str) -> str:
    """A guest's name made safe for a terminal: control characters and undecodable bytes as
    escapes (a crafted name cannot move the cursor or hide a line)."""
    if text.isprintable():
        return text
    return (
        text.encode("utf-8", "surrogateescape")
        .decode("ascii", "backslashreplace")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
        .replace("\x1b", "\\x1b")
    )


def iso_time(time_ns: int) -> str:
    """A guest's time (ns since the epoch) as ISO-8601 UTC to the second."""
    moment = datetime.fromtimestamp(time_ns // 1_000_000_000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _entry_line(entry: GuestEntry) -> str:
    moment = iso_time(entry.mtime_ns)
    name = printable(entry.name) + ("/" if entry.kind is EntryKind.FOLDER else "")
    line = f"{stat.filemode(entry.mode)} {entry.nlink:>3} {entry.uid:>5} {entry.gid:>5} "
    line += f"{entry.size:>12} {moment} {name}"
    if entry.symlink_target is not None:
        line += f" -> {printable(entry.symlink_target)}"
    return line


@click.command("ls")
@click.argument("address", metavar="VM@SPEC")
@click.argument("path", required=False, default="")
@json_option
@with_store()
def ls_command(store: Store, address: str, path: str, as_json: bool) -> None:
    """List the guest's files in a restore point, without mounting.

    Without PATH: the filesystems found on the point's disks (type, journal) and what was left
    out and why. With PATH: that folder's entries (or that one entry), as `ls -l` shows them
    (mode, links, uid, gid, size, mtime, name, -> target); owners are the guest's numeric ids,
    times ISO-8601 UTC. --json: an array of objects (filesystems: name, type, journal; volumes
    left out: name, note; entries: name, path, kind, mode, uid, gid, size, times in ns, inode,
    nlink, target).

    \b
    lbrestore ls vm1@latest
    lbrestore ls vm1@2h-ago vda-part2/etc
    """
    point = store.resolve(address)
    inner_path = guest_path(path)
    with ExitStack() as stack:
        files = open_point_files(store, point, stack)
        if not inner_path:
            _list_filesystems(files, as_json)
            return
        fs, inside = locate(files, inner_path)
        with full_paths(fs):
            entry = fs.entry(inside)
            entries = fs.listdir(inside) if entry.kind is EntryKind.FOLDER else [entry]
        if as_json:
            folder = inner_path if entry.kind is EntryKind.FOLDER else inner_path.rpartition("/")[0]
            echo_json([entry_dict(e, f"{folder}/{e.name}") for e in entries])
            return
        for listed in entries:
            click.echo(_entry_line(listed))


def _list_filesystems(files: GuestFiles, as_json: bool) -> None:
    found = [
        {"name": name, "type": fs.fs_type, "journal": fs.journal}
        for name, fs in files.filesystems.items()
    ]
    left_out = [{"name": note["source"], "note": note["note"]} for note in files.notes]
    if as_json:
        echo_json(found + left_out)
        return
    for fs in found:
        click.echo(f"{fs['name']}/  {fs['type']}  ({fs['journal']})")
    for note in left_out:
        click.echo(f"{note['name']}: not shown: {note['note']}")


@click.command("extract")
@click.argument("address", metavar="VM@SPEC")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option(
    "--to",
    "target",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="The folder to copy into (created, private, if missing).",
)
@click.option("--force", is_flag=True, help="Replace entries that exist in the target folder.")
@json_option
@with_store()
def extract_command(
    store: Store, address: str, paths: tuple[str, ...], target: Path, force: bool, as_json: bool
) -> None:
    """Copy files and folders out of a restore point's guest filesystems into a folder.

    Each PATH lands in the target folder under its own name, folders with everything below
    them: contents byte for byte (holes kept), modes, times and symlinks as the guest stores
    them; owners and setuid/setgid bits only when run as root. No mount and no root needed.

    Nothing is ever written outside the target folder: names the guest may hold such as '..'
    or 'a/b' are not written, and no symlink is followed. An entry that already exists in the
    target is left alone unless --force. Exit 0 when all was copied, 1 when an entry was left
    out (each one named), 3 when a file read damaged (it is not written).

    \b
    lbrestore extract vm1@2h-ago vda-part2/etc/fstab vda-part2/home --to ./restored
    """
    point = store.resolve(address)
    wanted = [guest_path(path) for path in paths]
    refuse_store_place(target, store.path)
    show = _progress_printer() if sys.stderr.isatty() and not as_json else None
    with ExitStack() as stack:
        files = open_point_files(store, point, stack)
        if not all(wanted):
            raise UsageError("PATH may not be empty: name a filesystem folder, e.g. vda-part2")
        located = []
        for path in wanted:  # every PATH is found before anything is written
            fs, inside = locate(files, path)
            with full_paths(fs):
                located.append((path, fs, inside, fs.entry(inside)))
        extractor = Extractor(target, force=force, progress=show)
        stack.callback(extractor.close)
        for shown, fs, inside, entry in located:
            extractor.extract(fs, inside, shown, entry)
    _extract_summary(extractor.report, target, as_json)


def _progress_printer() -> Progress:
    last = [0.0]

    def show(report: ExtractReport, path: str) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.5:
            last[0] = now
            done = f"{report.files} files, {format_size(report.bytes)}"
            click.echo(f"\r{done}: {printable(path)[-60:]:<60}", err=True, nl=False)

    return show


def _extract_summary(report: ExtractReport, target: Path, as_json: bool) -> None:
    if as_json:
        echo_json({"target": str(target), **report.as_dict()})
    else:
        if sys.stderr.isatty():
            click.echo("\r" + " " * 80 + "\r", err=True, nl=False)
        for skipped in report.skipped:
            click.echo(
                f"lbrestore: not extracted: {printable(skipped['path'])}: {skipped['reason']}",
                err=True,
            )
        for damaged in report.damaged:
            click.echo(
                f"lbrestore: damaged, not extracted: {printable(damaged['problem'])}", err=True
            )
        click.echo(
            f"extracted {report.files} files, {report.folders} folders, {report.symlinks} "
            f"symlinks ({format_size(report.bytes)}) into {target}"
        )
    if report.damaged:
        raise SystemExit(EXIT_DAMAGE)
    if report.skipped:
        raise SystemExit(1)


@click.command("diff")
@click.argument("old_address", metavar="VM@A")
@click.argument("new_address", metavar="VM@B")
@click.argument("path", required=False, default="")
@json_option
@with_store()
def diff_command(
    store: Store, old_address: str, new_address: str, path: str, as_json: bool
) -> None:
    """Which guest files were added (+), removed (-) or changed (M) from point A to point B.

    One line each, sorted, folders with a trailing '/'; a file that became a folder is removed
    and added. A change is different content, symlink target, mode or owner; times alone are
    not. Entries whose metadata proves them unchanged (ext4 and XFS: same inode, generation,
    change time and size) are skipped without reading; files are compared byte for byte only
    when nothing else tells. PATH limits the diff to a filesystem or a folder in it.

    \b
    lbrestore diff vm1@1d-ago vm1@latest vda-part2/etc
    """
    old_point, new_point = store.resolve(old_address), store.resolve(new_address)
    inner_path = guest_path(path)
    stats = DiffStats()
    with ExitStack() as stack:
        old_files = open_point_files(store, old_point, stack)
        new_files = open_point_files(store, new_point, stack)
        changes = list(_changes(old_files, new_files, inner_path, stats))
    if as_json:
        echo_json([change.as_dict() for change in changes])
        return
    for change in changes:
        click.echo(printable(change.line()))


def _changes(old: GuestFiles, new: GuestFiles, path: str, stats: DiffStats) -> list[Change]:
    """The changes of every filesystem (or of the one PATH names, below PATH)."""
    names = [path.split("/", 1)[0]] if path else sorted(set(old.names()) | set(new.names()))
    inside = path.split("/", 1)[1] if "/" in path else ""
    found: list[Change] = []
    for name in names:
        old_fs = old.get(name) if name in old.names() else None
        new_fs = new.get(name) if name in new.names() else None
        if old_fs is None and new_fs is None:
            raise AppError(f"{name}: no such filesystem in either restore point")
        found += diff_paths(old_fs, new_fs, inside, path or name, stats)
    return found


COMMANDS = [ls_command, extract_command, diff_command]
