"""lbguest.diff's rules on small in-memory trees (the GuestFilesystem interface, plus the optional
`fingerprints`): what equal tokens and fingerprints skip, the racy rule, file -> folder, order.

The same rules on real ext4 and FAT images of a real store: tests/integration/test_guest_diff.py
(this module has another basename: pytest collects test modules by basename).
"""

from __future__ import annotations

import errno
import stat
from dataclasses import dataclass, field

import pytest

from lbguest.diff import DiffStats, diff_paths
from lbguest.errors import GuestPathError
from lbguest.model import EntryKind, GuestEntry

OLD_NS = 1_000_000_000_500
NEWEST_NS = 2_000_000_000_500
MODES = {EntryKind.FOLDER: stat.S_IFDIR | 0o755, EntryKind.FILE: stat.S_IFREG | 0o644}


@dataclass
class Node:
    kind: EntryKind
    data: bytes = b""
    ctime_ns: int = OLD_NS
    token: bool = True
    mode: int = 0o644


@dataclass
class MemoryFs:
    """path -> Node; reads are counted; `prints` offers fingerprints (raw bytes = repr)."""

    nodes: dict[str, Node]
    prints: bool = False
    name: str = "vda"
    fs_type: str = "ext4"
    journal: str = "journal clean"
    reads: list[str] = field(default_factory=list)
    parsed: list[str] = field(default_factory=list)

    def entry(self, path: str) -> GuestEntry:
        node = self.nodes.get(path)
        if node is None:
            raise GuestPathError(path, errno.ENOENT)
        self.parsed.append(path)
        size = len(node.data)
        token = (path, node.ctime_ns, size) if node.token else None
        mode = (MODES[node.kind] & ~0o777) | node.mode
        name = path.rsplit("/", 1)[-1]
        return GuestEntry(
            name, node.kind, mode, 0, 0, size, node.ctime_ns, 0, node.ctime_ns, 1, 1, None, token
        )

    def _children(self, path: str) -> list[str]:
        prefix = f"{path}/" if path else ""
        return sorted(
            p for p in self.nodes if p and p.startswith(prefix) and "/" not in p[len(prefix) :]
        )

    def listdir(self, path: str) -> list[GuestEntry]:
        return [self.entry(child) for child in self._children(path)]

    def read(self, path: str, offset: int, length: int) -> bytes:
        self.reads.append(path)
        return self.nodes[path].data[offset : offset + length]

    def holes(self, path: str) -> list[tuple[int, int]]:
        return []


class PrintingFs(MemoryFs):
    def fingerprints(self, path: str) -> dict[str, tuple[EntryKind, int, bytes]] | None:
        found = {}
        for child in self._children(path):
            node = self.nodes[child]
            raw = repr((node.kind, node.data, node.ctime_ns, node.mode)).encode()
            found[child.rsplit("/", 1)[-1]] = (node.kind, node.ctime_ns, raw)
        return found


class ShortPrintingFs(PrintingFs):
    """Fingerprints without the ctime (kind, raw bytes): files are parsed for the racy rule."""

    def fingerprints(self, path: str) -> dict[str, tuple[EntryKind, bytes]] | None:  # type: ignore[override]
        found = super().fingerprints(path) or {}
        return {name: (kind, raw) for name, (kind, _ctime, raw) in found.items()}


def trees(fs_class: type[MemoryFs]) -> tuple[MemoryFs, MemoryFs]:
    folder, file = EntryKind.FOLDER, EntryKind.FILE
    old = {
        "": Node(folder),
        "a": Node(folder),
        "a/same.txt": Node(file, b"same"),
        "a/rewritten.txt": Node(file, b"AAAA"),
        "a/racy.txt": Node(file, b"RRRR", NEWEST_NS),  # the newest change of the old point
        "a/chmod.sh": Node(file, b"#!"),
        "a-b": Node(file, b"x"),
        "kind": Node(file, b"was a file"),
        "gone": Node(folder),
        "gone/x": Node(file, b"x"),
        "fat.txt": Node(file, b"FFFF", token=False),
    }
    new = {
        **old,
        "a/rewritten.txt": Node(file, b"AAAB", NEWEST_NS + 5),
        "a/racy.txt": Node(file, b"RRRS", NEWEST_NS),  # same tick: the token cannot tell
        "a/chmod.sh": Node(file, b"#!", NEWEST_NS + 5, mode=0o755),
        "kind": Node(folder),
        "kind/now.txt": Node(file, b"n"),
        "fat.txt": Node(file, b"FFFG", token=False),
    }
    del new["gone"], new["gone/x"]
    return fs_class(old), fs_class(new)


@pytest.mark.parametrize("fs_class", [MemoryFs, PrintingFs, ShortPrintingFs])
def test_changes_of_every_kind_sorted_by_path_and_only_what_must_be_read(
    fs_class: type[MemoryFs],
) -> None:
    old, new = trees(fs_class)
    stats = DiffStats()
    changes = diff_paths(old, new, "", "vda", stats)
    assert [c.line() for c in changes] == [
        "M vda/a/chmod.sh",
        "M vda/a/racy.txt",
        "M vda/a/rewritten.txt",
        "M vda/fat.txt",
        "- vda/gone/",
        "- vda/gone/x",
        "- vda/kind",
        "+ vda/kind/",
        "+ vda/kind/now.txt",
    ]  # "a/..." before "a-b": by path component, folders right before what they hold
    assert {c.path: c.what for c in changes if c.sign == "M"} == {
        "vda/a/chmod.sh": ("mode",),
        "vda/a/racy.txt": ("content",),
        "vda/a/rewritten.txt": ("content",),
        "vda/fat.txt": ("content",),
    }
    assert stats.racy == 1
    assert sorted(set(old.reads)) == ["a/chmod.sh", "a/racy.txt", "a/rewritten.txt", "fat.txt"]
    assert "a/same.txt" not in old.reads and "a-b" not in old.reads
    if issubclass(fs_class, PrintingFs):  # equal fingerprints: not even parsed
        assert "a" not in old.parsed + new.parsed and "a/same.txt" not in new.parsed
    if fs_class is PrintingFs:  # the ctime is in the fingerprint
        assert "a/same.txt" not in old.parsed


def test_no_change_and_paths_that_are_not_there() -> None:
    old, new = trees(MemoryFs)
    assert diff_paths(old, old, "", "vda") == []
    assert [c.line() for c in diff_paths(old, new, "gone", "vda/gone")] == [
        "- vda/gone/",
        "- vda/gone/x",
    ]
    assert [c.line() for c in diff_paths(None, new, "a/same.txt", "vda/a/same.txt")] == [
        "+ vda/a/same.txt"
    ]
    with pytest.raises(GuestPathError):
        diff_paths(old, new, "nowhere", "vda/nowhere")
