"""The read-only filesystem model (lbfuse.vfs) and its FUSE adapter's translation (no kernel)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import mfusepy
import pytest

from lbfuse.errors import (
    BadHandleError,
    EntryNotFoundError,
    IsAFolderError,
    NotAFolderError,
    ReadOnlyError,
    SourceReadError,
)
from lbfuse.mount import FuseAdapter, fuse_options, raise_readahead
from lbfuse.mountpoints import FSTYPE, parse_mountinfo_line, unescape
from lbfuse.vfs import (
    FILE_MODE,
    FOLDER_MODE,
    BytesSource,
    ReadOnlyTree,
    build_restore_point_tree,
)

MIB = 1 << 20
CREATED = datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=UTC)
CREATED_NS = int(CREATED.timestamp()) * 10**9 + 890000 * 1000


class RecordingSource:
    """Bytes in memory that count how the model reads them."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.data[offset : offset + length]


class FailingSource(RecordingSource):
    """A disk whose reads fail past the partition table, like a damaged store file."""

    def read(self, offset: int, length: int) -> bytes:
        if 1 * MIB <= offset < 11 * MIB:
            raise OSError(errno.ENOENT, "file vanished")
        return super().read(offset, length)


@pytest.fixture(scope="module")
def gpt_disk(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A 16 MiB disk with a GPT of two partitions, each filled with a distinct pattern."""
    path = tmp_path_factory.mktemp("disk") / "disk.img"
    with path.open("wb") as f:
        f.truncate(16 * MIB)
    subprocess.run(
        ["sfdisk", "-q", str(path)],
        input="label: gpt\nsize=4M\nsize=6M\n",
        text=True,
        check=True,
    )
    data = bytearray(path.read_bytes())
    data[1 * MIB : 5 * MIB] = b"\x11" * (4 * MIB)
    data[5 * MIB : 11 * MIB] = bytes(range(256)) * (6 * MIB // 256)
    return bytes(data)


def _tree(disk: bytes, **kwargs: object) -> tuple[ReadOnlyTree, RecordingSource]:
    source = RecordingSource(disk)
    tree = build_restore_point_tree(
        {"vda": source}, b'{"id": 7}\n', CREATED, uid=1234, gid=5678, **kwargs
    )  # type: ignore[arg-type]
    return tree, source


def test_layout_names_and_sizes(gpt_disk: bytes) -> None:
    tree, _ = _tree(gpt_disk)
    assert tree.names() == ["vda-part1.raw", "vda-part2.raw", "vda.raw", "vm.json"]
    assert tree.listdir("/") == tree.names()
    assert tree.getattr("/vda.raw").size == 16 * MIB
    assert tree.getattr("/vda-part1.raw").size == 4 * MIB
    assert tree.getattr("/vda-part2.raw").size == 6 * MIB
    assert tree.getattr("/vm.json").size == len(b'{"id": 7}\n')


def test_attributes_owner_modes_and_fixed_times(gpt_disk: bytes) -> None:
    tree, _ = _tree(gpt_disk)
    root = tree.getattr("/")
    assert root.mode == FOLDER_MODE == stat.S_IFDIR | 0o500 and root.is_folder
    for name in tree.names():
        attrs = tree.getattr("/" + name)
        assert attrs.mode == FILE_MODE == stat.S_IFREG | 0o400
        assert (attrs.uid, attrs.gid) == (1234, 5678)
        assert attrs.time_ns == CREATED_NS
        assert attrs.blocks == (attrs.size + 511) // 512
    inodes = [tree.getattr("/" + n).inode for n in tree.names()] + [root.inode]
    assert len(set(inodes)) == len(inodes)


def test_naive_and_foreign_zone_times_are_utc(gpt_disk: bytes) -> None:
    naive = build_restore_point_tree({}, b"", CREATED.replace(tzinfo=None), uid=0, gid=0)
    other = CREATED.astimezone(timezone(timedelta(hours=5)))
    zoned = build_restore_point_tree({}, b"", other, uid=0, gid=0)
    assert naive.getattr("/").time_ns == zoned.getattr("/").time_ns == CREATED_NS


def test_partition_reads_are_the_byte_range(gpt_disk: bytes) -> None:
    tree, _ = _tree(gpt_disk)
    handle = tree.open("/vda-part2.raw", os.O_RDONLY)
    assert tree.read(handle, 0, 6 * MIB) == gpt_disk[5 * MIB : 11 * MIB]
    assert tree.read(handle, 100, 1000) == gpt_disk[5 * MIB + 100 : 5 * MIB + 1100]
    part1 = tree.read_path("/vda-part1.raw", 0, 8 * MIB)
    assert part1 == gpt_disk[1 * MIB : 5 * MIB]


def test_one_source_read_per_request_and_clamped_at_end(gpt_disk: bytes) -> None:
    tree, source = _tree(gpt_disk)
    handle = tree.open("/vda.raw", os.O_RDONLY)
    source.reads.clear()
    assert tree.read(handle, 3 * MIB, MIB) == gpt_disk[3 * MIB : 4 * MIB]
    assert source.reads == [(3 * MIB, MIB)]
    source.reads.clear()
    assert tree.read(handle, 16 * MIB - 10, MIB) == gpt_disk[-10:]
    assert tree.read(handle, 16 * MIB, MIB) == b""
    assert tree.read(handle, 20 * MIB, MIB) == b""
    assert tree.read(handle, 0, 0) == b""
    assert source.reads == [(16 * MIB - 10, 10)]
    # Partition files never read outside their range.
    part = tree.open("/vda-part1.raw", os.O_RDONLY)
    source.reads.clear()
    assert tree.read(part, 4 * MIB - 1, MIB) == b"\x11"
    assert source.reads == [(5 * MIB - 1, 1)]


def test_vm_json_content(gpt_disk: bytes) -> None:
    tree, _ = _tree(gpt_disk)
    assert tree.read_path("/vm.json", 0, 4096) == b'{"id": 7}\n'
    assert tree.read_path("/vm.json", 3, 2) == b'd"'


def test_lookups_fail_with_the_right_error(gpt_disk: bytes) -> None:
    tree, _ = _tree(gpt_disk)
    with pytest.raises(EntryNotFoundError) as info:
        tree.getattr("/nope.raw")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(NotAFolderError):
        tree.getattr("/vda.raw/x")
    with pytest.raises(NotAFolderError):
        tree.listdir("/vda.raw")
    with pytest.raises(EntryNotFoundError):
        tree.listdir("/sub")
    with pytest.raises(IsAFolderError):
        tree.open("/", os.O_RDONLY)
    with pytest.raises(BadHandleError):
        tree.read(999, 0, 1)


@pytest.mark.parametrize(
    "flags",
    [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_RDONLY | os.O_APPEND, os.O_CREAT],
)
def test_open_for_writing_is_erofs(gpt_disk: bytes, flags: int) -> None:
    tree, _ = _tree(gpt_disk)
    with pytest.raises(ReadOnlyError) as info:
        tree.open("/vda.raw", flags)
    assert info.value.errno == errno.EROFS


def test_access_and_refuse(gpt_disk: bytes) -> None:
    tree, _ = _tree(gpt_disk)
    tree.access("/vda.raw", os.R_OK)
    tree.access("/", os.R_OK | os.X_OK)
    with pytest.raises(ReadOnlyError):
        tree.access("/vda.raw", os.W_OK)
    with pytest.raises(ReadOnlyError):
        tree.refuse("/new", "create")
    with pytest.raises(EntryNotFoundError):
        tree.refuse("/missing", "unlink")
    with pytest.raises(ReadOnlyError):
        tree.refuse("/vm.json", "unlink")


def test_handles_are_released(gpt_disk: bytes) -> None:
    tree, _ = _tree(gpt_disk)
    first = tree.open("/vda.raw", os.O_RDONLY)
    second = tree.open("/vda.raw", os.O_RDONLY)
    assert first != second
    tree.release(first)
    tree.release(first)  # twice: harmless
    with pytest.raises(BadHandleError):
        tree.read(first, 0, 1)
    assert tree.read(second, 0, 1) == gpt_disk[:1]


def test_source_failure_is_eio(gpt_disk: bytes) -> None:
    source = FailingSource(gpt_disk)
    tree = build_restore_point_tree({"vda": source}, b"{}", CREATED, uid=0, gid=0)
    handle = tree.open("/vda-part1.raw", os.O_RDONLY)
    with pytest.raises(SourceReadError) as info:
        tree.read(handle, 0, 4096)
    assert info.value.errno == errno.EIO


def test_short_source_read_is_an_error_not_short_data(gpt_disk: bytes) -> None:
    class Short(RecordingSource):
        def read(self, offset: int, length: int) -> bytes:
            return super().read(offset, length)[:-1] if offset > 0 else super().read(offset, length)

    tree = build_restore_point_tree({"vda": Short(gpt_disk)}, b"{}", CREATED, uid=0, gid=0)
    with pytest.raises(SourceReadError):
        tree.read_path("/vda.raw", 4096, 4096)


def test_no_partition_table_means_only_the_disk() -> None:
    tree = build_restore_point_tree(
        {"sdb": BytesSource(bytes(MIB)), "vda": BytesSource(b"\1" * MIB)},
        b"{}",
        CREATED,
        uid=0,
        gid=0,
    )
    assert tree.names() == ["sdb.raw", "vda.raw", "vm.json"]
    assert tree.statfs()["f_blocks"] == (2 * MIB + 2 + 4095) // 4096


def test_partitions_can_be_left_out(gpt_disk: bytes) -> None:
    tree, _ = _tree(gpt_disk, partitions=False)
    assert tree.names() == ["vda.raw", "vm.json"]


def test_disk_named_like_a_partition_file_keeps_its_name(gpt_disk: bytes) -> None:
    disks = {"vda": RecordingSource(gpt_disk), "vda-part1": BytesSource(b"x" * 512)}
    tree = build_restore_point_tree(disks, b"{}", CREATED, uid=0, gid=0)
    assert tree.getattr("/vda-part1.raw").size == 512
    assert tree.getattr("/vda-part2.raw").size == 6 * MIB


# --- the adapter's translation (called directly; the kernel path is in tests/integration) ----


def test_adapter_getattr_and_readdir(gpt_disk: bytes) -> None:
    adapter = FuseAdapter(_tree(gpt_disk)[0])
    attrs = adapter.getattr("/vda.raw")
    assert attrs["st_size"] == 16 * MIB and attrs["st_mode"] == FILE_MODE
    assert attrs["st_mtime"] == attrs["st_atime"] == attrs["st_ctime"] == CREATED_NS
    assert (attrs["st_uid"], attrs["st_gid"]) == (1234, 5678)
    assert list(adapter.readdir("/", 0))[:2] == [".", ".."]
    assert adapter.use_ns is True


def test_adapter_read_uses_the_handle(gpt_disk: bytes) -> None:
    adapter = FuseAdapter(_tree(gpt_disk)[0])
    fi = mfusepy.fuse_file_info(flags=os.O_RDONLY)
    assert adapter.open("/vda-part2.raw", fi) == 0
    assert fi.fh > 0
    assert adapter.read(None, 512, 0, fi.fh) == gpt_disk[5 * MIB : 5 * MIB + 512]
    adapter.release(None, fi)
    with pytest.raises(mfusepy.FuseOSError):
        adapter.read(None, 512, 0, fi.fh)


def _open_flags(adapter: FuseAdapter) -> dict[str, tuple[int, int]]:
    """(direct_io, keep_cache) of every file as the adapter opens it."""
    flags = {}
    for name in ("/vda.raw", "/vda-part1.raw", "/vm.json"):
        fi = mfusepy.fuse_file_info(flags=os.O_RDONLY)
        adapter.open(name, fi)
        flags[name] = (fi.direct_io, fi.keep_cache)
        adapter.release(None, fi)
    return flags


CACHED, STREAMED = (0, 1), (1, 0)


def test_adapter_streams_disks_by_default(gpt_disk: bytes) -> None:
    adapter = FuseAdapter(_tree(gpt_disk)[0])
    assert _open_flags(adapter) == {
        "/vda.raw": STREAMED,
        "/vda-part1.raw": STREAMED,
        "/vm.json": CACHED,
    }


def test_adapter_kernel_cache_either_way(gpt_disk: bytes) -> None:
    on = FuseAdapter(_tree(gpt_disk)[0], kernel_cache=True)
    off = FuseAdapter(_tree(gpt_disk, cache_disks=False)[0], kernel_cache=False)
    assert set(_open_flags(on).values()) == {CACHED}
    assert _open_flags(off) == {
        "/vda.raw": STREAMED,
        "/vda-part1.raw": STREAMED,
        "/vm.json": CACHED,
    }


def test_mountinfo_paths_are_unescaped() -> None:
    assert unescape(r"/tmp/a\040b\011c\134d") == "/tmp/a b\tc\\d"


def test_a_mountinfo_line_gives_device_type_source_and_options() -> None:
    line = (
        r"97 29 0:52 / /run/user/1000/lbrestore-vm1-7-x\040y ro,nosuid,nodev,relatime "
        r"shared:52 - fuse.lbrestore lbrestore:vm1@7:pid4242:auto "
        "ro,user_id=1000,group_id=1000,default_permissions\n"
    )
    entry = parse_mountinfo_line(line)
    assert entry is not None
    assert entry.mountpoint == Path("/run/user/1000/lbrestore-vm1-7-x y")
    assert (entry.device, entry.fstype, entry.source) == (
        "0:52",
        FSTYPE,
        "lbrestore:vm1@7:pid4242:auto",
    )
    assert entry.options[:2] == ("ro", "nosuid") and "default_permissions" in entry.options
    assert (entry.pid, entry.auto_created) == (4242, True)
    plain = parse_mountinfo_line("25 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw")
    assert plain is not None and (plain.pid, plain.auto_created) == (None, False)
    assert parse_mountinfo_line("garbage without separator") is None


def test_readahead_of_a_path_that_is_no_mount_is_not_raised(tmp_path: Path) -> None:
    assert raise_readahead(tmp_path, 4 * MIB) is False


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        ("getattr", ("/nope",), errno.ENOENT),
        ("open", ("/vda.raw", mfusepy.fuse_file_info(flags=os.O_RDWR)), errno.EROFS),
        ("read", (None, 1, 0, 4242), errno.EBADF),
        ("access", ("/vda.raw", os.W_OK), errno.EROFS),
        ("write", ("/vda.raw", b"x", 0, 1), errno.EROFS),
        ("create", ("/new", 0o600, 0), errno.EROFS),
        ("truncate", ("/vda.raw", 0), errno.EROFS),
        ("unlink", ("/vm.json",), errno.EROFS),
        ("mkdir", ("/d", 0o700), errno.EROFS),
        ("rmdir", ("/d",), errno.ENOENT),
        ("rename", ("/vm.json", "/x"), errno.EROFS),
        ("chmod", ("/vda.raw", 0o777), errno.EROFS),
        ("chown", ("/vda.raw", 0, 0), errno.EROFS),
        ("utimens", ("/vda.raw", None), errno.EROFS),
        ("setxattr", ("/vda.raw", "user.x", b"1", 0), errno.EROFS),
        ("removexattr", ("/vda.raw", "user.x"), errno.EROFS),
        ("symlink", ("/l", "vda.raw"), errno.EROFS),
        ("link", ("/l", "/vda.raw"), errno.EROFS),
        ("mknod", ("/n", 0o600, 0), errno.EROFS),
        ("fallocate", ("/vda.raw", 0, 0, 1, 1), errno.EROFS),
        ("getxattr", ("/vda.raw", "user.x"), mfusepy.ENOATTR),
    ],
)
def test_adapter_maps_errors_to_errno(
    gpt_disk: bytes, name: str, args: tuple[object, ...], expected: int
) -> None:
    adapter = FuseAdapter(_tree(gpt_disk)[0])
    with pytest.raises(mfusepy.FuseOSError) as info:
        getattr(adapter, name)(*args)
    assert info.value.errno == expected


def test_adapter_unexpected_failure_is_eio(gpt_disk: bytes) -> None:
    adapter = FuseAdapter(build_restore_point_tree({}, b"{}", CREATED, uid=0, gid=0))
    adapter.tree = None  # type: ignore[assignment]  # any bug inside becomes EIO, not a crash
    with pytest.raises(mfusepy.FuseOSError) as info:
        adapter.getattr("/")
    assert info.value.errno == errno.EIO


def test_mount_options_are_read_only_owner_only_and_cached() -> None:
    options = fuse_options("lbrestore:vm@1:pid1")
    assert options["ro"] is True and options["default_permissions"] is True
    assert "allow_other" not in options and "allow_root" not in options
    assert options["kernel_cache"] is True and options["max_read"] >= MIB


def test_every_write_callback_is_registered() -> None:
    """Each write-ish operation is overridden (else mfusepy leaves it to libfuse's ENOSYS)."""
    for name in ("write", "create", "truncate", "unlink", "mkdir", "rmdir", "rename", "chmod",
                 "chown", "utimens", "setxattr", "removexattr", "symlink", "link", "mknod",
                 "fallocate"):  # fmt: skip
        assert not getattr(getattr(FuseAdapter, name), "libfuse_ignore", False), name


def test_module_has_no_fuse_import() -> None:
    source = Path(__file__).parents[2].joinpath("lbfuse", "vfs.py").read_text()
    assert "mfusepy" not in source and "import fuse" not in source


def test_read_into_fills_the_buffer_in_place(gpt_disk: bytes) -> None:
    class IntoSource(RecordingSource):
        def readinto(self, offset: int, dest: memoryview) -> int:
            self.reads.append((offset, len(dest)))
            dest[:] = self.data[offset : offset + len(dest)]
            return len(dest)

    source = IntoSource(gpt_disk)
    tree = build_restore_point_tree({"vda": source}, b"{}", CREATED, uid=0, gid=0)
    handle = tree.open("/vda-part2.raw", os.O_RDONLY)
    buf = bytearray(MIB)
    source.reads.clear()
    assert tree.read_into(handle, 6 * MIB - 100, memoryview(buf)) == 100
    assert buf[:100] == gpt_disk[11 * MIB - 100 : 11 * MIB] and buf[100:] == bytes(MIB - 100)
    assert source.reads == [(11 * MIB - 100, 100)]
    assert tree.read_into(handle, 6 * MIB, memoryview(buf)) == 0
    # A source without readinto is copied in; vm.json is one.
    meta = tree.open("/vm.json", os.O_RDONLY)
    assert tree.read_into(meta, 0, memoryview(buf)) == 2 and buf[:2] == b"{}"
    with pytest.raises(BadHandleError):
        tree.read_into(12345, 0, memoryview(buf))


def test_read_into_failure_is_eio(gpt_disk: bytes) -> None:
    class Broken(RecordingSource):
        def readinto(self, offset: int, dest: memoryview) -> int:
            raise OSError(errno.EIO, "bad sector")

    tree = build_restore_point_tree({"vda": Broken(gpt_disk)}, b"{}", CREATED, uid=0, gid=0)
    handle = tree.open("/vda.raw", os.O_RDONLY)
    with pytest.raises(SourceReadError):
        tree.read_into(handle, 0, memoryview(bytearray(512)))


def test_everything_is_cacheable_unless_disks_are_excluded(gpt_disk: bytes) -> None:
    tree, _ = _tree(gpt_disk, cache_disks=False)
    assert [tree.cacheable("/" + n) for n in tree.names()] == [False, False, False, True]
    cached, _ = _tree(gpt_disk)
    assert all(cached.cacheable("/" + n) for n in cached.names())
