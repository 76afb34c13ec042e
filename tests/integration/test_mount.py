"""`lbrestore mount` / `umount` through the real kernel FUSE: bytes, partitions, ext4, EROFS.

Restore points come from raw images made with sfdisk, mkfs.ext4 -d and qemu-io, imported into a
real store; every expectation is the image itself (`cmp`). Each test unmounts everything it
mounted in teardown, lazily as a last resort, so a failure never leaves a mount behind.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lbfuse.mount import READAHEAD
from lbfuse.mountpoints import FSTYPE, mounts
from lbstore.importer import import_images
from lbstore.store import Store

MIB = 1 << 20
VDA_SIZE = 48 * MIB
VDB_SIZE = 16 * MIB
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


# --- building the store -------------------------------------------------------------------------


@dataclass
class Point:
    """A committed restore point and copies of the images it must show."""

    id: int
    created: datetime
    images: dict[str, Path]
    ext4_files: dict[str, bytes]


@dataclass
class Fixture:
    store: Path
    points: list[Point]
    partitions: dict[str, dict[int, tuple[int, int]]]


def _run(*args: str | Path, input: str | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args], input=input, capture_output=True, text=True, check=True
    )
    return result.stdout


def _qemu_io(image: Path, *commands: str) -> None:
    args: list[str | Path] = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    _run(*args, image)


def _sfdisk_ranges(image: Path) -> dict[int, tuple[int, int]]:
    table = json.loads(_run("sfdisk", "-J", image))["partitiontable"]
    ranges = {}
    for part in table["partitions"]:
        if part["type"].lower() in ("5", "f", "85"):
            continue  # an extended container: no file
        number = int(part["node"].removeprefix(str(image)))
        ranges[number] = (part["start"] * 512, part["size"] * 512)
    return ranges


def _put_ext4(image: Path, offset: int, length: int, files: dict[str, bytes], work: Path) -> None:
    """Write an ext4 filesystem holding `files` (made with mkfs.ext4 -d) into a partition."""
    content = work / "content"
    shutil.rmtree(content, ignore_errors=True)
    content.mkdir()
    for name, data in files.items():
        (content / name).write_bytes(data)
    fs = work / "fs.img"
    fs.unlink(missing_ok=True)
    with fs.open("wb") as f:
        f.truncate(length)
    _run("mkfs.ext4", "-q", "-F", "-b", "1024", "-d", content, fs, f"{length // 1024}")
    with image.open("r+b") as out, fs.open("rb") as src:
        out.seek(offset)
        out.write(src.read())


def _snapshot(images: dict[str, Path], folder: Path) -> dict[str, Path]:
    folder.mkdir()
    copies = {}
    for name, path in images.items():
        copies[name] = folder / f"{name}.img"
        shutil.copyfile(path, copies[name])
    return copies


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    """A VM `vm1` with three restore points: vda (GPT, ext4 + data), vdb (MBR with a logical)."""
    work = tmp_path_factory.mktemp("mount-chain")
    vda, vdb = work / "vda.img", work / "vdb.img"
    for path, size in ((vda, VDA_SIZE), (vdb, VDB_SIZE)):
        with path.open("wb") as f:
            f.truncate(size)
    _run("sfdisk", "-q", vda, input='label: gpt\nsize=16M, name="root"\nsize=24M, name="data"\n')
    script = "label: dos\n1: size=4M, type=83\n2: size=10M, type=5\n5: size=3M, type=83\n"
    _run("sfdisk", "-q", vdb, input=script)
    parts = {"vda": _sfdisk_ranges(vda), "vdb": _sfdisk_ranges(vdb)}
    root, data = parts["vda"][1], parts["vda"][2]
    vdb1, vdb5 = parts["vdb"][1][0], parts["vdb"][5][0]
    store = work / "store"
    Store.init(store)
    images = {"vda": vda, "vdb": vdb}
    versions: list[dict[str, bytes]] = [
        {"hello.txt": b"hello from point one\n", "blob.bin": bytes(range(256)) * 300},
        {"hello.txt": b"point two says hi\n", "second.txt": b"2\n" * 5000},
        {"hello.txt": b"three\n", "big.bin": os.urandom(300_000)},
    ]
    edits = [
        [("vda", f"write -P 0x5a {data[0]} 8M"), ("vdb", f"write -P 0x11 {vdb1} 4M")],
        [("vda", f"write -P 0xa5 {data[0] + 4 * MIB} 1M"), ("vdb", f"write -P 0x55 {vdb5} 64k")],
        [("vda", f"write -z {data[0]} 2M"), ("vda", f"write -P 0x77 {data[0] + 20 * MIB} 3M")],
    ]
    points = []
    with Store.open(store, write=True) as opened:
        for depth, (files, edit) in enumerate(zip(versions, edits, strict=True), start=1):
            _put_ext4(vda, root[0], root[1], files, work)
            for disk, command in edit:
                _qemu_io(images[disk], command)
            created = T0 + timedelta(hours=depth)
            point = import_images(opened, "vm1", images, created=created)
            copies = _snapshot(images, work / f"v{depth}")
            points.append(Point(point.id, created, copies, files))
    return Fixture(store, points, parts)


# --- mounting through the CLI, and cleaning up whatever happens ---------------------------------


def _lbrestore(
    store: Path, *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbrestore", "--store", str(store), *map(str, args)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def _mounts_under(folder: Path) -> list[tuple[Path, str, str]]:
    found = []
    for entry in mounts():
        if entry.mountpoint == folder or folder in entry.mountpoint.parents:
            found.append((entry.mountpoint, entry.fstype, entry.source))
    return found


def _serving_pid(mountpoint: Path) -> int:
    for entry in mounts():
        if entry.mountpoint == mountpoint and entry.fstype == FSTYPE:
            assert entry.pid is not None
            return entry.pid
    raise AssertionError(f"{mountpoint} is not a lbrestore mount")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _cleanup_mounts(folder: Path) -> None:
    """Unmount everything below `folder`, innermost first; lazily if a clean unmount fails."""
    for mountpoint, fstype, _source in sorted(_mounts_under(folder), key=lambda m: -len(str(m[0]))):
        if fstype.startswith("fuse"):
            done = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
            if done.returncode:
                subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
        else:
            done = subprocess.run(["umount", str(mountpoint)], capture_output=True)
            if done.returncode:
                subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Path]:
    """A folder for mountpoints and $XDG_RUNTIME_DIR; everything mounted below is unmounted."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    try:
        yield tmp_path
    finally:
        _cleanup_mounts(tmp_path)


def _env(sandbox: Path) -> dict[str, str]:
    return {**os.environ, "XDG_RUNTIME_DIR": str(sandbox / "runtime")}


def _mount(
    fx: Fixture, sandbox: Path, point: Point, name: str | None = None, *options: str
) -> Path:
    args: list[str | Path] = ["mount", *options, f"vm1@#{point.id}"]
    if name is not None:
        (sandbox / name).mkdir()
        args.append(sandbox / name)
    result = _lbrestore(fx.store, *args, env=_env(sandbox))
    assert result.returncode == 0, result.stderr
    mountpoint = Path(result.stdout.strip())
    assert os.path.ismount(mountpoint)
    return mountpoint


def _cmp(a: Path, b: Path, *, skip_b: int = 0, length: int | None = None) -> None:
    args = ["cmp", "-i", f"0:{skip_b}"]
    if length is not None:
        args += ["-n", str(length)]
    result = subprocess.run([*args, str(a), str(b)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _bytes_served_by(pid: int) -> int:
    """Bytes process `pid` has written so far (/proc/PID/io wchar): FUSE replies go to /dev/fuse."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar")


def _read_uncached(path: Path) -> bytes:
    """The file's bytes from the serving process: the kernel's cached pages are dropped first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := os.read(fd, 4 * MIB):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


# --- what a mount shows ---------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_disks_and_partitions_equal_the_images(chain: Fixture, sandbox: Path, depth: int) -> None:
    point = chain.points[depth - 1]
    mountpoint = _mount(chain, sandbox, point, "mnt")
    expected_names = {"vm.json", "files"}
    for disk, image in point.images.items():
        expected_names.add(f"{disk}.raw")
        _cmp(mountpoint / f"{disk}.raw", image)
        for number, (start, length) in chain.partitions[disk].items():
            part = mountpoint / f"{disk}-part{number}.raw"
            expected_names.add(part.name)
            assert part.stat().st_size == length
            _cmp(part, image, skip_b=start, length=length)
    assert set(os.listdir(mountpoint)) == expected_names
    assert {"vda-part1.raw", "vda-part2.raw", "vdb-part1.raw", "vdb-part5.raw"} <= expected_names


def test_metadata_owner_modes_and_times(chain: Fixture, sandbox: Path) -> None:
    point = chain.points[1]
    mountpoint = _mount(chain, sandbox, point, "mnt")
    meta = json.loads((mountpoint / "vm.json").read_text())
    assert meta["id"] == point.id and meta["vm"] == "vm1"
    assert datetime.fromisoformat(meta["created"]) == point.created
    assert meta["created"].endswith("+00:00")
    assert meta["kind"] in ("incremental", "resync")
    assert [(d["name"], d["virtual_size"]) for d in meta["disks"]] == [
        ("vda", VDA_SIZE),
        ("vdb", VDB_SIZE),
    ]
    assert "definition" in meta
    root = mountpoint.stat()
    assert stat.S_IMODE(root.st_mode) == 0o500 and stat.S_ISDIR(root.st_mode)
    files = (mountpoint / "files").stat()
    assert stat.S_IMODE(files.st_mode) == 0o500 and stat.S_ISDIR(files.st_mode)
    for name in set(os.listdir(mountpoint)) - {"files"}:
        st = (mountpoint / name).stat()
        assert stat.S_IMODE(st.st_mode) == 0o400 and stat.S_ISREG(st.st_mode)
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
        assert st.st_mtime_ns == int(point.created.timestamp()) * 10**9
    entry = next(e for e in mounts() if e.mountpoint == mountpoint)
    assert entry.fstype == FSTYPE
    assert entry.options[0] == "ro" and "default_permissions" in entry.options
    assert "allow_other" not in entry.options


def test_ext4_partition_mounts_with_loop(chain: Fixture, sandbox: Path) -> None:
    for point in (chain.points[0], chain.points[2]):
        mountpoint = _mount(chain, sandbox, point, f"mnt{point.id}")
        loop_dir = sandbox / f"loop{point.id}"
        loop_dir.mkdir()
        _run("mount", "-o", "loop,ro", mountpoint / "vda-part1.raw", loop_dir)
        try:
            shown = {p.name for p in loop_dir.iterdir()} - {"lost+found"}
            assert shown == set(point.ext4_files)
            for name, data in point.ext4_files.items():
                assert (loop_dir / name).read_bytes() == data
        finally:
            _run("umount", loop_dir)


WRITE_ATTEMPTS = {
    "open for writing": lambda m: os.open(m / "vda.raw", os.O_WRONLY),
    "open read-write": lambda m: os.open(m / "vda.raw", os.O_RDWR),
    "open with truncation": lambda m: os.open(m / "vm.json", os.O_RDONLY | os.O_TRUNC),
    "append": lambda m: os.open(m / "vm.json", os.O_WRONLY | os.O_APPEND),
    "create": lambda m: os.open(m / "new.txt", os.O_CREAT | os.O_WRONLY, 0o600),
    "truncate": lambda m: os.truncate(m / "vda.raw", 0),
    "unlink": lambda m: os.unlink(m / "vm.json"),
    "mkdir": lambda m: os.mkdir(m / "folder"),
    "rename": lambda m: os.rename(m / "vm.json", m / "other.json"),
    "chmod": lambda m: os.chmod(m / "vda.raw", 0o600),
    "chown": lambda m: os.chown(m / "vda.raw", 1, 1),
    "utime": lambda m: os.utime(m / "vda.raw", (0, 0)),
    "setxattr": lambda m: os.setxattr(m / "vda.raw", "user.note", b"x"),
    "removexattr": lambda m: os.removexattr(m / "vda.raw", "user.note"),
    "symlink": lambda m: os.symlink("vda.raw", m / "link"),
    "hard link": lambda m: os.link(m / "vda.raw", m / "link"),
    "mknod": lambda m: os.mknod(m / "fifo", stat.S_IFIFO | 0o600),
}


def test_every_kind_of_write_fails_with_erofs(chain: Fixture, sandbox: Path) -> None:
    mountpoint = _mount(chain, sandbox, chain.points[2], "mnt")
    failures = {}
    for what, attempt in WRITE_ATTEMPTS.items():
        try:
            attempt(mountpoint)
        except OSError as exc:
            if exc.errno != errno.EROFS:
                failures[what] = exc
        else:
            failures[what] = "succeeded"
    assert failures == {}
    with open(mountpoint / "vda.raw", "rb") as f:
        with pytest.raises(OSError) as info:
            os.write(f.fileno(), b"x")
        assert info.value.errno == errno.EBADF  # opened read-only: the kernel refuses
    _cmp(mountpoint / "vda.raw", chain.points[2].images["vda"])
    assert not os.access(mountpoint / "vda.raw", os.W_OK)


def test_two_points_mounted_at_once(chain: Fixture, sandbox: Path) -> None:
    first, third = chain.points[0], chain.points[2]
    a = _mount(chain, sandbox, first)
    b = _mount(chain, sandbox, third)
    assert a != b
    with (a / "vda.raw").open("rb") as fa, (b / "vda.raw").open("rb") as fb:
        ea, eb = first.images["vda"].read_bytes(), third.images["vda"].read_bytes()
        for offset in range(0, VDA_SIZE, 4 * MIB):  # interleaved reads of both mounts
            assert fa.read(4 * MIB) == ea[offset : offset + 4 * MIB]
            assert fb.read(4 * MIB) == eb[offset : offset + 4 * MIB]
    assert ea != eb
    for mountpoint in (a, b):
        assert _lbrestore(chain.store, "umount", mountpoint).returncode == 0


# --- lifetime -------------------------------------------------------------------------------------


def test_umount_leaves_no_process_and_removes_the_created_folder(
    chain: Fixture, sandbox: Path
) -> None:
    point = chain.points[0]
    mountpoint = _mount(chain, sandbox, point)
    assert mountpoint.parent == sandbox / "runtime"
    assert mountpoint.name.startswith(f"lbrestore-vm1-{point.id}-")
    pid = _serving_pid(mountpoint)
    assert _alive(pid)
    result = _lbrestore(chain.store, "umount", mountpoint)
    assert result.returncode == 0, result.stderr
    assert not _alive(pid)
    assert not mountpoint.exists()
    assert _mounts_under(sandbox) == []


def test_umount_keeps_a_given_folder(chain: Fixture, sandbox: Path) -> None:
    mountpoint = _mount(chain, sandbox, chain.points[0], "mine")
    pid = _serving_pid(mountpoint)
    assert _lbrestore(chain.store, "umount", mountpoint).returncode == 0
    assert not _alive(pid)
    assert mountpoint.is_dir() and os.listdir(mountpoint) == []


def test_busy_mount_is_reported_then_unmounts(chain: Fixture, sandbox: Path) -> None:
    mountpoint = _mount(chain, sandbox, chain.points[0], "mnt")
    with (mountpoint / "vda.raw").open("rb"):
        result = _lbrestore(chain.store, "umount", mountpoint)
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1
        assert "busy" in result.stderr.lower()
        assert os.path.ismount(mountpoint)
    assert _lbrestore(chain.store, "umount", mountpoint).returncode == 0


def test_foreground_mount_serves_until_unmounted(chain: Fixture, sandbox: Path) -> None:
    point = chain.points[1]
    mountpoint = sandbox / "fg"
    mountpoint.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "lbrestore", "--store", str(chain.store), "mount",
         f"vm1@#{point.id}", str(mountpoint), "--foreground"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        while not os.path.ismount(mountpoint):
            assert process.poll() is None, process.communicate()
            time.sleep(0.02)
        assert _serving_pid(mountpoint) == process.pid
        _cmp(mountpoint / "vdb.raw", point.images["vdb"])
        assert _lbrestore(chain.store, "umount", mountpoint).returncode == 0
        out, err = process.communicate()
        assert process.returncode == 0, err
        assert out.strip() == str(mountpoint)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigterm_unmounts_a_foreground_mount(chain: Fixture, sandbox: Path) -> None:
    mountpoint = sandbox / "fg"
    mountpoint.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "lbrestore", "--store", str(chain.store), "mount",
         f"vm1@#{chain.points[0].id}", str(mountpoint), "--foreground"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        while not os.path.ismount(mountpoint):
            assert process.poll() is None, process.communicate()
            time.sleep(0.02)
        process.terminate()
        process.wait()
        assert not os.path.ismount(mountpoint)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_point_deleted_after_mounting_never_serves_wrong_data(
    chain: Fixture, sandbox: Path, tmp_path: Path
) -> None:
    """ "Merged away" simulated: every file of the point's chain is deleted while mounted."""
    store = tmp_path / "store-copy"
    shutil.copytree(chain.store, store)
    point = chain.points[2]
    fx = Fixture(store, chain.points, chain.partitions)
    warm = _mount(fx, sandbox, point, "warm")  # read once before the files go away
    _cmp(warm / "vda.raw", point.images["vda"])
    cold = _mount(fx, sandbox, point, "cold")  # nothing read yet
    data_files = sorted((store / "data").rglob("*.qcow2"))
    assert len(data_files) >= 6
    for path in data_files:
        path.unlink()
    expected = point.images["vda"].read_bytes()
    served_before = _bytes_served_by(_serving_pid(warm))
    assert _read_uncached(warm / "vda.raw") == expected  # open files keep serving
    assert _bytes_served_by(_serving_pid(warm)) - served_before >= VDA_SIZE  # not from the cache
    # Views hold every file of the chain open from the moment the mount appears, so even a
    # mount that had read nothing keeps serving the point it showed.
    assert _read_uncached(cold / "vda.raw") == expected
    assert _read_uncached(cold / "vdb.raw") == point.images["vdb"].read_bytes()
    for mountpoint in (warm, cold):
        assert _lbrestore(store, "umount", mountpoint).returncode == 0


# --- bad input: one line, exit 1, nothing left behind --------------------------------------------


def _assert_nothing_left(sandbox: Path, before: set[int]) -> None:
    assert os.listdir(sandbox / "runtime") == []
    assert _mounts_under(sandbox) == []
    leftover = {
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and _alive(int(p.name)) and str(sandbox) in _cmdline(p)
    }
    assert leftover - before == set()


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.parametrize(
    ("spec", "prepare", "message"),
    [
        ("vm1@#999", None, "#999"),
        ("vm1@1999-01-01", None, "vm1"),
        ("nosuchvm@latest", None, "nosuchvm"),
        ("vm1@latest", "file", "not a folder"),
        ("vm1@latest", "full", "not empty"),
        ("vm1@latest", "missing", "does not exist"),
        ("vm1@latest", "mounted", "already a mount"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(
    chain: Fixture, sandbox: Path, spec: str, prepare: str | None, message: str
) -> None:
    before = {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}
    args: list[str | Path] = ["mount", spec]
    target = sandbox / "target"
    if prepare == "file":
        target.write_text("x")
    elif prepare == "full":
        target.mkdir()
        (target / "something").write_text("x")
    elif prepare == "mounted":
        target = _mount(chain, sandbox, chain.points[0], "target")
        before = {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()}
    if prepare is not None:
        args.append(target)
    result = _lbrestore(chain.store, *args, env=_env(sandbox))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lbrestore: "), result.stderr
    assert message in lines[0]
    assert result.stdout == ""
    if prepare == "mounted":
        assert _lbrestore(chain.store, "umount", target).returncode == 0
    _assert_nothing_left(sandbox, before)
    if prepare == "full":
        assert os.listdir(target) == ["something"]


def test_umount_of_something_else_is_refused(chain: Fixture, sandbox: Path) -> None:
    plain = sandbox / "plain"
    plain.mkdir()
    for target in (plain, sandbox / "missing", Path("/proc")):
        result = _lbrestore(chain.store, "umount", target)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot unmount" in lines[0], result.stderr


def test_umount_cleans_up_after_a_killed_server(chain: Fixture, sandbox: Path) -> None:
    mountpoint = _mount(chain, sandbox, chain.points[0])
    pid = _serving_pid(mountpoint)
    os.kill(pid, 9)
    while _alive(pid):
        time.sleep(0.02)
    with pytest.raises(OSError) as info:
        os.listdir(mountpoint)
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)  # a dead FUSE mount
    result = _lbrestore(chain.store, "umount", mountpoint)
    assert result.returncode == 0, result.stderr
    assert _mounts_under(sandbox) == []
    assert not mountpoint.exists()


def _readahead_kib(mountpoint: Path) -> int:
    """The readahead of the mount's backing device."""
    dev = mountpoint.stat().st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    return int(bdi.read_text())


def test_kernel_cache_allows_mmap_and_raises_readahead(chain: Fixture, sandbox: Path) -> None:
    """--kernel-cache: disk and partition files in the page cache (mmap works), 4 MiB readahead."""
    point = chain.points[1]
    mountpoint = _mount(chain, sandbox, point, "cached", "--kernel-cache")
    if os.geteuid() == 0:  # only root may raise it
        assert _readahead_kib(mountpoint) == READAHEAD // 1024
    with (
        (mountpoint / "vda.raw").open("rb") as f,
        mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m,
    ):
        assert m[:] == point.images["vda"].read_bytes()
    start, length = chain.partitions["vda"][1]
    part = mountpoint / "vda-part1.raw"
    with part.open("rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m[:] == point.images["vda"].read_bytes()[start : start + length]
    _cmp(mountpoint / "vdb.raw", point.images["vdb"])


@pytest.mark.parametrize("flags", [(), ("--no-kernel-cache",)])
def test_disk_files_stream_by_default(chain: Fixture, sandbox: Path, flags: tuple[str]) -> None:
    """Default and --no-kernel-cache: disk files bypass the page cache (no mmap); vm.json not."""
    point = chain.points[1]
    streamed = _mount(chain, sandbox, point, "streamed", *flags)
    with (streamed / "vda.raw").open("rb") as f:
        with pytest.raises(OSError) as info:
            mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        assert info.value.errno == errno.ENODEV
    with (streamed / "vm.json").open("rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m[:1] == b"{"
    _cmp(streamed / "vda.raw", point.images["vda"])


def test_umount_never_removes_a_folder_it_did_not_create(chain: Fixture, sandbox: Path) -> None:
    # Named like an automatic mountpoint, but given by the user; the server dies first, so
    # umount itself does the cleanup: it must keep the folder.
    mountpoint = _mount(chain, sandbox, chain.points[0], "lbrestore-vm1-1-mine")
    pid = _serving_pid(mountpoint)
    os.kill(pid, 9)
    while _alive(pid):
        time.sleep(0.02)
    assert _lbrestore(chain.store, "umount", mountpoint).returncode == 0
    assert mountpoint.is_dir()
    assert _mounts_under(sandbox) == []
