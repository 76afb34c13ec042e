"""ext2/3/4 fingerprints (raw inode bytes read without parsing) agree with the parsed entries."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lbguest.files import GuestFiles


class FileSource:
    def __init__(self, path: Path) -> None:
        self._data = path.read_bytes()
        self.size = len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        return self._data[offset : offset + length]


@pytest.mark.parametrize("kind", ["ext2", "ext4"])
def test_fingerprints_agree_with_parsed_entries(tmp_path: Path, kind: str) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub/file.txt").write_text("text\n")
    (tree / "big.bin").write_bytes(os.urandom(70000))
    os.symlink("sub/file.txt", tree / "link")
    image = tmp_path / "fs.img"
    subprocess.run([f"mkfs.{kind}", "-q", "-F", "-d", tree, image, "8M"], check=True)
    fs = GuestFiles.open({"vda": FileSource(image)}).get("vda")
    for folder in ("", "sub"):
        prints = fs.fingerprints(folder)  # type: ignore[attr-defined]
        entries = {entry.name: entry for entry in fs.listdir(folder)}
        assert sorted(prints) == sorted(entries)
        for name, (kind_, ctime_ns, raw) in prints.items():
            assert kind_ is entries[name].kind
            assert ctime_ns == entries[name].ctime_ns
            assert int.from_bytes(raw[:8], "little") == entries[name].inode
