"""What changed between two versions of a guest's files: added, removed and changed entries.

`diff_paths` walks two trees of GuestFilesystem side by side. What counts as a change: content
(bytes of a file, target of a symlink), kind (a file that became a folder is removed, then
added), permission bits and owner. Times alone are not a change: reading a file moves its atime,
and a `touch` that keeps the bytes changes nothing a restore would bring back.

Fast where little changed: an entry whose `change_token` is equal in both trees is skipped
unread (the token is metadata that proves equal content, such as ext4's inode number,
generation, ctime and size); a file of another size is changed without reading it; only files
of equal size and no proof are compared byte for byte. Folders are always listed on both sides:
on ext4 a file rewritten in place leaves its folder's metadata alone, so no folder token can
prove its subtree unchanged.
"""

from __future__ import annotations

import dataclasses
import stat
from collections.abc import Iterator

from lbguest.errors import GuestPathError
from lbguest.model import EntryKind, GuestEntry, GuestFilesystem

COMPARE_CHUNK = 1 << 20

ADDED = "+"
REMOVED = "-"
CHANGED = "M"


@dataclasses.dataclass(frozen=True)
class Change:
    """One line of a diff: `sign` (+, -, M), the path below the compared roots, and the kind
    of the entry (the newer one's, for a change)."""

    sign: str
    path: str
    kind: EntryKind
    what: tuple[str, ...] = ()  # for M: what changed ("content", "mode", "owner", "target")

    def line(self) -> str:
        suffix = "/" if self.kind is EntryKind.FOLDER else ""
        return f"{self.sign} {self.path}{suffix}"

    def as_dict(self) -> dict[str, object]:
        value: dict[str, object] = {"change": self.sign, "path": self.path, "kind": self.kind.value}
        if self.what:
            value["what"] = list(self.what)
        return value


@dataclasses.dataclass
class DiffStats:
    """How much work a diff did: entries skipped by their token, files read to compare."""

    skipped_by_token: int = 0
    compared_bytes: int = 0
    files_read: int = 0


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def diff_paths(
    old: GuestFilesystem | None,
    new: GuestFilesystem | None,
    path: str = "",
    prefix: str = "",
    stats: DiffStats | None = None,
) -> Iterator[Change]:
    """Changes from `old` to `new` at and below `path`, named `prefix/...`, depth-first by
    name. A filesystem that is None (absent from that point) holds nothing; GuestPathError
    when neither side holds `path`."""
    stats = stats if stats is not None else DiffStats()
    a, b = _entry_or_none(old, path), _entry_or_none(new, path)
    if a is None and b is None:
        raise GuestPathError(prefix or path)
    yield from _compare_named(old, new, path, prefix, a, b, stats)


def _entry_or_none(fs: GuestFilesystem | None, path: str) -> GuestEntry | None:
    if fs is None:
        return None
    try:
        return fs.entry(path)
    except GuestPathError:
        return None


def whole_tree(fs: GuestFilesystem, path: str, prefix: str, sign: str) -> Iterator[Change]:
    """Every entry at and below `path` as added or removed (a folder before its contents)."""
    entry = fs.entry(path)
    yield Change(sign, prefix, entry.kind)
    if entry.kind is EntryKind.FOLDER:
        for child in fs.listdir(path):
            yield from whole_tree(fs, join(path, child.name), join(prefix, child.name), sign)


def _compare_folder(
    old: GuestFilesystem, new: GuestFilesystem, path: str, prefix: str, stats: DiffStats
) -> Iterator[Change]:
    prints = _fingerprints(old, new, path)
    if prints is not None:
        yield from _compare_by_fingerprints(old, new, path, prefix, stats, *prints)
        return
    before = {entry.name: entry for entry in old.listdir(path)}
    after = {entry.name: entry for entry in new.listdir(path)}
    for name in sorted(before.keys() | after.keys()):
        a, b = before.get(name), after.get(name)
        yield from _compare_named(old, new, join(path, name), join(prefix, name), a, b, stats)


Prints = dict[str, tuple[EntryKind, bytes]]


def _fingerprints(
    old: GuestFilesystem, new: GuestFilesystem, path: str
) -> tuple[Prints, Prints] | None:
    """Both folders' raw entry fingerprints, when both filesystems give them (ext2/3/4)."""
    if type(old) is not type(new) or not hasattr(old, "fingerprints"):
        return None
    before, after = old.fingerprints(path), new.fingerprints(path)  # type: ignore[attr-defined]
    return None if before is None or after is None else (before, after)


def _compare_by_fingerprints(
    old: GuestFilesystem,
    new: GuestFilesystem,
    path: str,
    prefix: str,
    stats: DiffStats,
    before: Prints,
    after: Prints,
) -> Iterator[Change]:
    """An entry whose raw metadata is byte-identical in both is the same entry: a file or link
    is skipped unparsed, a folder only descended into; the others are parsed and compared."""
    for name in sorted(before.keys() | after.keys()):
        child, shown = join(path, name), join(prefix, name)
        if name in before and before.get(name) == after.get(name):
            stats.skipped_by_token += 1
            if before[name][0] is EntryKind.FOLDER:
                yield from _compare_folder(old, new, child, shown, stats)
            continue
        a = old.entry(child) if name in before else None
        b = new.entry(child) if name in after else None
        yield from _compare_named(old, new, child, shown, a, b, stats)


def _compare_named(
    old: GuestFilesystem | None,
    new: GuestFilesystem | None,
    path: str,
    shown: str,
    a: GuestEntry | None,
    b: GuestEntry | None,
    stats: DiffStats,
) -> Iterator[Change]:
    """One name on both sides: compared when of one kind, else removed and/or added."""
    if a is not None and b is not None and a.kind is b.kind:
        assert old is not None and new is not None  # each entry comes from its filesystem
        yield from _compare_entry(old, new, path, shown, a, b, stats)
        return
    if a is not None and old is not None:
        yield from whole_tree(old, path, shown, REMOVED)
    if b is not None and new is not None:
        yield from whole_tree(new, path, shown, ADDED)


def _compare_entry(
    old: GuestFilesystem,
    new: GuestFilesystem,
    path: str,
    shown: str,
    a: GuestEntry,
    b: GuestEntry,
    stats: DiffStats,
) -> Iterator[Change]:
    what = _metadata_changes(a, b)
    if a.kind is EntryKind.FOLDER:
        if what:
            yield Change(CHANGED, shown, b.kind, what)
        yield from _compare_folder(old, new, path, shown, stats)
        return
    if a.change_token is not None and a.change_token == b.change_token:
        stats.skipped_by_token += 1
        return
    if a.kind is EntryKind.SYMLINK and a.symlink_target != b.symlink_target:
        what += ("target",)
    elif a.kind is EntryKind.FILE and not _same_content(old, new, path, a, b, stats):
        what += ("content",)
    if what:
        yield Change(CHANGED, shown, b.kind, what)


def _metadata_changes(a: GuestEntry, b: GuestEntry) -> tuple[str, ...]:
    what: tuple[str, ...] = ()
    if stat.S_IMODE(a.mode) != stat.S_IMODE(b.mode):
        what += ("mode",)
    if (a.uid, a.gid) != (b.uid, b.gid):
        what += ("owner",)
    return what


def _same_content(
    old: GuestFilesystem,
    new: GuestFilesystem,
    path: str,
    a: GuestEntry,
    b: GuestEntry,
    stats: DiffStats,
) -> bool:
    if a.size != b.size:
        return False
    stats.files_read += 1
    for offset in range(0, a.size, COMPARE_CHUNK):
        length = min(COMPARE_CHUNK, a.size - offset)
        stats.compared_bytes += length
        if old.read(path, offset, length) != new.read(path, offset, length):
            return False
    return True
