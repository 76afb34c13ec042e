"""The Extractor's own guard rails, whatever a filesystem reader hands it.

lbguest already leaves out names it cannot use; the extractor must not rely on that. This tree
(a plain in-memory implementation of lbguest's GuestFilesystem interface) holds what a hostile
or damaged filesystem could: '..', '.', names with '/' or NUL, an empty name, a symlink and a
folder of the same name, and symlinks pointing out of the target.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lbguest.errors import DamagedFilesystemError, GuestPathError
from lbguest.model import EntryKind, GuestEntry
from lbrestore.errors import AppError
from lbrestore.guestfiles import Extractor

TIME_NS = 1_700_000_000_123_456_789


def entry(name: str, kind: EntryKind, size: int = 0, target: str | None = None) -> GuestEntry:
    modes = {
        EntryKind.FOLDER: stat.S_IFDIR | 0o755,
        EntryKind.FILE: stat.S_IFREG | 0o644,
        EntryKind.SYMLINK: stat.S_IFLNK | 0o777,
        EntryKind.OTHER: stat.S_IFIFO | 0o644,
    }
    return GuestEntry(
        name, kind, modes[kind], 0, 0, size, TIME_NS, TIME_NS, TIME_NS, 1, 1, target, None
    )


@dataclass
class HostileFs:
    """Folders as lists of (entry, content or children); paths joined with '/'."""

    outside: str
    name: str = "vda-part1"
    fs_type: str = "ext4"
    journal: str = "journal clean"
    damaged: set[str] = field(default_factory=set)

    def tree(self) -> dict[str, list[GuestEntry]]:
        folder = EntryKind.FOLDER
        return {
            "": [
                entry("..", folder),
                entry(".", folder),
                entry("a/b", EntryKind.FILE, 3),
                entry("x\0y", EntryKind.FILE, 3),
                entry("", EntryKind.FILE, 3),
                entry("dupe", EntryKind.SYMLINK, target=self.outside),
                entry("dupe", folder),
                entry("abs", EntryKind.SYMLINK, target=self.outside + "/abs"),
                entry("ok.txt", EntryKind.FILE, 3),
                entry("bad.txt", EntryKind.FILE, 3),
                entry("fifo", EntryKind.OTHER),
            ],
            "dupe": [entry("inside.txt", EntryKind.FILE, 3)],
            "..": [entry("escaped.txt", EntryKind.FILE, 3)],
            ".": [entry("dot.txt", EntryKind.FILE, 3)],
        }

    def entry(self, path: str) -> GuestEntry:
        return (
            entry(path.rsplit("/", 1)[-1], EntryKind.FOLDER)
            if path in self.tree()
            else (entry(path, EntryKind.FILE, 3))
        )

    def listdir(self, path: str) -> list[GuestEntry]:
        if path not in self.tree():
            raise GuestPathError(path)
        return self.tree()[path]

    def read(self, path: str, offset: int, length: int) -> bytes:
        if path.endswith("bad.txt"):
            raise DamagedFilesystemError(self.name, f"{path}: damaged cluster")
        return b"abc"[offset : offset + length]

    def holes(self, path: str) -> list[tuple[int, int]]:
        return []


def test_hostile_names_are_not_written_and_links_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    target = tmp_path / "target"
    fs = HostileFs(str(outside))
    for force in (False, True):
        extractor = Extractor(target, force=force)
        try:
            extractor.extract(fs, "", "vda-part1", fs.entry(""))  # type: ignore[arg-type]
        finally:
            extractor.close()
        report = extractor.report
        skipped = {item["path"]: item["reason"] for item in report.skipped}
        for unsafe in ("vda-part1/..", "vda-part1/.", "vda-part1/a/b", "vda-part1/x\0y"):
            assert "unsafe name" in skipped[unsafe], skipped
        assert "device, fifo or socket" in skipped["vda-part1/fifo"]
        assert [d["path"] for d in report.damaged] == ["vda-part1/bad.txt"]
        assert not outside.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]
        root = target / "vda-part1"
        assert (root / "ok.txt").read_bytes() == b"abc"
        assert not (root / "bad.txt").exists()  # never a file with wrong bytes
        assert not (root / "a").exists() and not (tmp_path / "escaped.txt").exists()
        assert os.readlink(root / "abs") == f"{outside}/abs"
        assert (root / "ok.txt").stat().st_mtime_ns == TIME_NS
    # the folder "dupe" after the symlink "dupe": refused, then (forced) the link is replaced
    assert (target / "vda-part1/dupe").is_dir() and not (target / "vda-part1/dupe").is_symlink()
    assert (target / "vda-part1/dupe/inside.txt").read_bytes() == b"abc"


def test_a_target_that_cannot_be_made_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(AppError, match="cannot use"):
        Extractor(tmp_path / "file" / "below", force=False)
