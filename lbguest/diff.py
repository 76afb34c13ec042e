"""What changed between two versions of a guest's files: added, removed and changed entries.

`diff_paths` walks two trees of GuestFilesystem side by side and returns the changes sorted by
path (component by component, so a folder comes right before what it holds).

What counts as a change: content (bytes of a file, target of a symlink), kind (a file that
became a folder is removed, then added: `-` and `+` of the same path), permission bits (setuid
included) and owner: these are `M`, with `what` saying which. Times alone are not a change:
reading a file moves its atime, and a `touch` that keeps the bytes changes nothing a restore
would bring back. A folder is `M` only for its own mode or owner; what it holds has lines of its
own. Devices, fifos and sockets are compared by their metadata only.

What may be skipped, and why:

- A file whose `change_token` is equal in both trees is not read (a symlink's target is in its
  entry: always compared). On ext4 the token
  is (inode, generation, ctime, mtime, size): every write, truncate, chmod, chown or rename of
  an inode sets its ctime to the clock's now, and no system call sets ctime back. The proof has
  one gap, the one git calls "racily clean": a write in the same clock tick as the older point
  (whole seconds on ext2/3 with 128-byte inodes and for inodes written by mke2fs -d or debugfs,
  a few milliseconds on ext4) and a second write of the same size in that same tick after it
  leave the token unchanged. Every timestamp in the older point is at or before its instant
  (unless the guest's clock was set back, which misleads make and rsync alike),
  so an entry whose ctime is older than the newest ctime seen in the older tree was not touched
  in that tick: only such tokens are trusted. The others (the newest few entries) are compared
  byte for byte at the end. A diff below a PATH sees fewer entries, so there the rule only gets
  stricter (more files compared), never looser.
- A file of another size is changed without reading it.
- Folders are always listed on both sides and descended into, whatever their tokens: a folder's
  ctime and mtime move when entries are added, removed or renamed in it, but not when a file
  inside is rewritten in place, and not for anything deeper down. An equal folder token proves
  only that its list of names is the same, never that what they name is.
- Where a filesystem offers `fingerprints(path)` (name -> kind, ctime and the entry's raw
  on-disk metadata, read without parsing), entries whose raw bytes are equal in both trees are
  not even parsed: a folder is descended into, a file is subject to the racy rule above.
- Filesystems without tokens (FAT, exFAT: 2-second times, no inode ctime) compare every file of
  equal size byte for byte.
"""

from __future__ import annotations

import dataclasses
import stat

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
    """How much work a diff did: entries skipped by their token, files read to compare, entries
    whose token was equal but too new to prove anything (compared at the end)."""

    skipped_by_token: int = 0
    compared_bytes: int = 0
    files_read: int = 0
    racy: int = 0


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def diff_paths(
    old: GuestFilesystem | None,
    new: GuestFilesystem | None,
    path: str = "",
    prefix: str = "",
    stats: DiffStats | None = None,
) -> list[Change]:
    """Changes from `old` to `new` at and below `path`, named `prefix/...`, sorted by path. A
    filesystem that is None (absent from that point) holds nothing; GuestPathError when neither
    side holds `path`."""
    walk = _Walk(old, new, stats if stats is not None else DiffStats())
    a, b = _entry_or_none(old, path), _entry_or_none(new, path)
    if a is None and b is None:
        raise GuestPathError(prefix or path)
    walk.named(path, prefix, a, b)
    walk.settle_racy()
    return sorted(walk.changes, key=lambda change: change.path.split("/"))


def _entry_or_none(fs: GuestFilesystem | None, path: str) -> GuestEntry | None:
    if fs is None:
        return None
    try:
        return fs.entry(path)
    except GuestPathError:
        return None


@dataclasses.dataclass
class _Racy:
    """A file whose token (or fingerprint) is equal on both sides, decided once the walk knows
    the newest ctime of the older tree; its entries are parsed then if not yet."""

    path: str
    shown: str
    ctime_ns: int
    what: tuple[str, ...] = ()
    a: GuestEntry | None = None
    b: GuestEntry | None = None


Fingerprint = tuple[EntryKind, int, bytes] | tuple[EntryKind, bytes]
Fingerprints = dict[str, Fingerprint]


class _Walk:
    """One diff: the changes found, the newest ctime seen in the older tree, the racy entries."""

    def __init__(
        self, old: GuestFilesystem | None, new: GuestFilesystem | None, stats: DiffStats
    ) -> None:
        self.old, self.new, self.stats = old, new, stats
        self.changes: list[Change] = []
        self.newest_ctime = -1
        self.racy: list[_Racy] = []

    def named(self, path: str, shown: str, a: GuestEntry | None, b: GuestEntry | None) -> None:
        """One name on both sides: compared when of one kind, else removed and/or added."""
        if a is not None:
            self.newest_ctime = max(self.newest_ctime, a.ctime_ns)
        if a is not None and b is not None and a.kind is b.kind:
            self.entry(path, shown, a, b)
            return
        if a is not None and self.old is not None:
            self.whole_tree(self.old, path, shown, REMOVED, a)
        if b is not None and self.new is not None:
            self.whole_tree(self.new, path, shown, ADDED, b)

    def whole_tree(
        self, fs: GuestFilesystem, path: str, shown: str, sign: str, entry: GuestEntry
    ) -> None:
        """Every entry at and below `path` as added or removed."""
        self.changes.append(Change(sign, shown, entry.kind))
        if entry.kind is EntryKind.FOLDER:
            for child in fs.listdir(path):
                if sign == REMOVED:
                    self.newest_ctime = max(self.newest_ctime, child.ctime_ns)
                self.whole_tree(fs, join(path, child.name), join(shown, child.name), sign, child)

    def folder(self, path: str, shown: str) -> None:
        assert self.old is not None and self.new is not None
        prints = self.fingerprints(path)
        if prints is not None:
            self.folder_by_fingerprints(path, shown, *prints)
            return
        before = {entry.name: entry for entry in self.old.listdir(path)}
        after = {entry.name: entry for entry in self.new.listdir(path)}
        for name in sorted(before.keys() | after.keys()):
            self.named(join(path, name), join(shown, name), before.get(name), after.get(name))

    def fingerprints(self, path: str) -> tuple[Fingerprints, Fingerprints] | None:
        """Both folders' fingerprints, when both filesystems give them (an optional method of
        a GuestFilesystem: name -> (kind, ctime_ns, raw metadata bytes) or (kind, raw bytes),
        read without parsing the entries; equal bytes in two versions of one filesystem are an
        equal entry). Without the ctime, a file's entry is parsed for the racy rule."""
        get_old = getattr(self.old, "fingerprints", None)
        get_new = getattr(self.new, "fingerprints", None)
        if get_old is None or get_new is None or type(self.old) is not type(self.new):
            return None
        before, after = get_old(path), get_new(path)
        return None if before is None or after is None else (before, after)

    def folder_by_fingerprints(
        self, path: str, shown: str, before: Fingerprints, after: Fingerprints
    ) -> None:
        """Entries with equal fingerprints are not parsed: a folder is descended into, a file
        waits for the racy rule, anything else is equal; the others are compared as usual."""
        assert self.old is not None and self.new is not None
        for name in sorted(before.keys() | after.keys()):
            child, child_shown = join(path, name), join(shown, name)
            old_print = before.get(name)
            ctime = _print_ctime(old_print)
            if ctime is not None:
                self.newest_ctime = max(self.newest_ctime, ctime)
            if old_print is not None and old_print == after.get(name):
                if old_print[0] is EntryKind.FOLDER:
                    self.folder(child, child_shown)
                elif old_print[0] is EntryKind.FILE:
                    parsed = None
                    if ctime is None:
                        parsed = self.old.entry(child)
                        ctime = parsed.ctime_ns
                        self.newest_ctime = max(self.newest_ctime, ctime)
                    self.racy.append(_Racy(child, child_shown, ctime, a=parsed))
                else:
                    self.stats.skipped_by_token += 1
                continue
            a = self.old.entry(child) if old_print is not None else None
            b = self.new.entry(child) if name in after else None
            self.named(child, child_shown, a, b)

    def entry(self, path: str, shown: str, a: GuestEntry, b: GuestEntry) -> None:
        what = _metadata_changes(a, b)
        if a.kind is EntryKind.FOLDER:
            if what:
                self.changes.append(Change(CHANGED, shown, b.kind, what))
            self.folder(path, shown)
            return
        if (
            a.kind is EntryKind.FILE
            and a.change_token is not None
            and a.change_token == b.change_token
        ):
            self.racy.append(_Racy(path, shown, a.ctime_ns, what, a, b))  # decided at the end
            return
        self.compare(path, shown, a, b, what)

    def compare(
        self, path: str, shown: str, a: GuestEntry, b: GuestEntry, what: tuple[str, ...]
    ) -> None:
        if a.kind is EntryKind.SYMLINK and a.symlink_target != b.symlink_target:
            what += ("target",)
        elif a.kind is EntryKind.FILE and not self.same_content(path, a, b):
            what += ("content",)
        if what:
            self.changes.append(Change(CHANGED, shown, b.kind, what))

    def settle_racy(self) -> None:
        """Equal tokens older than the newest ctime of the older tree prove equal content; the
        others are compared as if they had no token (see the module docstring)."""
        for racy in self.racy:
            assert self.old is not None and self.new is not None  # racy: both sides hold it
            if racy.ctime_ns < self.newest_ctime:
                self.stats.skipped_by_token += 1
                if racy.what:
                    self.changes.append(Change(CHANGED, racy.shown, EntryKind.FILE, racy.what))
                continue
            self.stats.racy += 1
            a = racy.a or self.old.entry(racy.path)
            b = racy.b or self.new.entry(racy.path)
            self.compare(racy.path, racy.shown, a, b, _metadata_changes(a, b))

    def same_content(self, path: str, a: GuestEntry, b: GuestEntry) -> bool:
        assert self.old is not None and self.new is not None
        if a.size != b.size:
            return False
        self.stats.files_read += 1
        for offset in range(0, a.size, COMPARE_CHUNK):
            length = min(COMPARE_CHUNK, a.size - offset)
            self.stats.compared_bytes += length
            if self.old.read(path, offset, length) != self.new.read(path, offset, length):
                return False
        return True


def _print_ctime(found: Fingerprint | None) -> int | None:
    """The ctime in a fingerprint that has one."""
    return found[1] if found is not None and len(found) == 3 else None


def _metadata_changes(a: GuestEntry, b: GuestEntry) -> tuple[str, ...]:
    what: tuple[str, ...] = ()
    if stat.S_IMODE(a.mode) != stat.S_IMODE(b.mode):
        what += ("mode",)
    if (a.uid, a.gid) != (b.uid, b.gid):
        what += ("owner",)
    return what
