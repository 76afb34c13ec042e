"""Issue 8's corruption campaign: a store of several VMs, damaged one seeded mutation at a time.

Each mutation flips, zeroes or truncates a byte range of one file of a copy of a small store:
a data file anywhere, its L1/L2/refcount tables or header (found through the header), a page
of index.sqlite, the -wal file or a per-point sidecar when the store has them. Then the
commands a user would run (restore of a point to a folder, info, list, verify; a mount now and
then), a subset chosen by the seed, must each either give exactly the right bytes or fail with
one line naming the damage (exit 1 or 3, never a traceback); never wrong bytes with exit 0.

The commands run through the real entry point (`lbrestore.cli.main`) in a forked child of the
test process: real exit codes, real stderr (an uncaught exception prints its traceback, as
Python does), without paying the interpreter's start-up for each of several hundred commands.

Failures the campaign found in code that is not this test's to change are listed in
KNOWN_KINDS (a pattern of the failure line and the reason); each has a deterministic
reproduction run as a strict xfail, and the loops set matching lines aside (counted, never
silently: the xfail fails the day the bug is fixed, and the pattern is removed then). Seeds are
not pinned, because other work on the store changes what a given seed hits.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import sqlite3
import struct
import subprocess
import sys
import tempfile
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lbrestore.cli import main as lbrestore_main
from lbrestore.commands import COMMAND_MODULES, load_command

for _name in COMMAND_MODULES:  # imported once here, so that each forked command starts warm
    load_command(_name)

MUTATIONS = 200
VMS: dict[str, dict[str, int]] = {
    "vm1": {"vda": 2 << 20, "vdb": 1 << 20},
    "vm2": {"vda": 2 << 20},
    "vm3": {"vda": 1536 << 10},
}
POINTS = 3
DAYS = ("2026-01-0{}T08:00:00", "2026-02-0{}T08:00:00", "2026-03-0{}T08:00:00")
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00

# (pattern of a failure line, reason): known failures, each reproduced by a strict xfail below.
KNOWN_KINDS: list[tuple[str, str]] = []


def unexpected(failures: list[str], known: Counter[str]) -> list[str]:
    """The failures no KNOWN_KINDS pattern explains; the others are counted in `known`."""
    left = []
    for line in failures:
        reasons = [reason for pattern, reason in KNOWN_KINDS if re.search(pattern, line)]
        if reasons:
            known[reasons[0]] += 1
        else:
            left.append(line)
    return left


# --- running the CLI -----------------------------------------------------------------------------


@dataclass
class Result:
    """What a user sees of one command."""

    args: tuple[str, ...]
    code: int
    stdout: str
    stderr: str


def cli(store: Path, *args: str) -> Result:
    """`lbrestore --store STORE ARGS` through lbrestore.cli.main in a forked child."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            _child(out.fileno(), err.fileno(), ["--store", str(store), *args])
        _pid, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return Result(
            args,
            os.waitstatus_to_exitcode(status),
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )


def _child(out: int, err: int, argv: list[str]) -> None:  # pragma: no cover - the child
    code = 1
    try:
        os.dup2(out, 1)
        os.dup2(err, 2)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        try:
            lbrestore_main(argv)
            code = 0
        except SystemExit as exc:
            if isinstance(exc.code, int) or exc.code is None:
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()  # what the interpreter prints for an uncaught exception
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def run(*args: str | Path) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


# --- the store -----------------------------------------------------------------------------------


@dataclass
class Campaign:
    """A pristine store and what every point of it must read as."""

    store: Path
    expected: dict[tuple[int, str], bytes]  # (point id, disk) -> guest bytes
    expected_files: dict[tuple[int, str], Path]  # the same as raw files, for qemu-img compare
    points: dict[str, list[int]]  # vm -> point ids, oldest first
    disks: dict[int, list[str]]  # point id -> disk names
    vm_of: dict[int, str]
    readers: dict[str, list[tuple[int, str]]]  # data file (relative) -> (point, disk) reading it
    tops: dict[tuple[int, str], str]  # (point, disk) -> its top data file (relative)
    listing: list[dict[str, Any]]
    infos: dict[int, object] = field(default_factory=dict)


def _qemu_io_commands(rng: random.Random, size: int, first: bool) -> list[str]:
    """Random writes (and, after the first point, zeroes and discards) of a small disk."""
    commands = []
    for _ in range(rng.randint(2, 4)):
        start = rng.randrange(0, size - 4096, 512)
        length = rng.randrange(512, min(160 << 10, size - start), 512)
        commands.append(f"write -P {rng.randrange(1, 255)} {start} {length}")
    if first:  # a compressed write, first: only clusters never written can be compressed
        commands.insert(0, f"write -c -P {rng.randrange(1, 255)} {(size >> 16) - 1 << 16} 64k")
    else:
        commands.append(f"write -z {rng.randrange(0, size - 65536, 4096)} 64k")
        commands.append(f"discard {rng.randrange(0, size - 65536, 65536)} 64k")
    return [arg for command in commands for arg in ("-c", command)]


def _build_images(root: Path, rng: random.Random) -> dict[str, list[dict[str, Path]]]:
    """Per VM, per point: disk name -> qcow2 image made with qemu-img and qemu-io."""
    images: dict[str, list[dict[str, Path]]] = {}
    for vm, disks in VMS.items():
        images[vm] = []
        for index in range(POINTS):
            made = {}
            for disk, size in disks.items():
                path = root / f"{vm}-{disk}-{index}.qcow2"
                if index == 0:
                    run("qemu-img", "create", "-q", "-f", "qcow2", path, str(size))
                else:
                    shutil.copyfile(images[vm][index - 1][disk], path)
                commands = _qemu_io_commands(rng, size, index == 0)
                run("qemu-io", "-f", "qcow2", *commands, path)
                made[disk] = path
            images[vm].append(made)
    return images


def _import_all(store: Path, images: dict[str, list[dict[str, Path]]]) -> dict[str, list[int]]:
    assert cli(store, "init").code == 0
    points: dict[str, list[int]] = {vm: [] for vm in VMS}
    day = 1
    for index in range(POINTS):
        for vm, per_point in images.items():
            disks = [f"--disk={disk}={path}" for disk, path in per_point[index].items()]
            result = cli(store, "import", vm, *disks, "--at", DAYS[index].format(day))
            assert result.code == 0, result.stderr
            day += 1
    listing = json.loads(cli(store, "list", "--json").stdout)
    for row in listing:
        points[row["vm"]].append(row["id"])
    return points


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Campaign:
    root = tmp_path_factory.mktemp("campaign")
    images = _build_images(root, random.Random(8))
    store = root / "store"
    points = _import_all(store, images)
    expected, expected_files = {}, {}
    for vm, ids in points.items():
        for index, point in enumerate(ids):
            for disk, image in images[vm][index].items():
                raw = root / f"expected-{point}-{disk}.raw"
                run("qemu-img", "convert", "-O", "raw", image, raw)
                expected[(point, disk)] = raw.read_bytes()
                expected_files[(point, disk)] = raw
    return _describe(store, expected, expected_files, points)


def _describe(
    store: Path,
    expected: dict[tuple[int, str], bytes],
    expected_files: dict[tuple[int, str], Path],
    points: dict[str, list[int]],
) -> Campaign:
    """What list and info say of the store, and which points read each data file."""
    vm_of = {point: vm for vm, ids in points.items() for point in ids}
    disks = {point: sorted(VMS[vm]) for point, vm in vm_of.items()}
    listing = json.loads(cli(store, "list", "--json").stdout)
    readers: dict[str, list[tuple[int, str]]] = {}
    tops: dict[tuple[int, str], str] = {}
    infos = {}
    for point, vm in vm_of.items():
        info = json.loads(cli(store, "info", f"{vm}@#{point}", "--json").stdout)
        infos[point] = _stable_info(info)
        for disk in info["disks"]:
            tops[(point, disk["name"])] = disk["chain"][0]["file"]
            for link in disk["chain"]:
                readers.setdefault(link["file"], []).append((point, disk["name"]))
    return Campaign(
        store, expected, expected_files, points, disks, vm_of, readers, tops, listing, infos
    )


def _stable_info(info: dict) -> object:
    """What `info` says that no damage of a data file may change (sizes on disk may)."""
    return {
        "id": info["id"],
        "vm": info["vm"],
        "created": info["created"],
        "kind": info["kind"],
        "disks": [
            {
                "name": d["name"],
                "virtual_size": d["virtual_size"],
                "chain": [link["point_id"] for link in d["chain"]],
            }
            for d in info["disks"]
        ],
    }


# --- mutations -----------------------------------------------------------------------------------


@dataclass
class Mutation:
    """One damage: `op` ("flip", "zero" or "truncate") of `length` bytes at `offset` of `file`."""

    kind: str
    file: str
    op: str
    offset: int
    length: int

    def __str__(self) -> str:
        if self.op == "truncate":
            return f"{self.kind}: truncate {self.file} to {self.offset} bytes"
        return f"{self.kind}: {self.op} {self.length} bytes at {self.offset:#x} of {self.file}"

    def apply(self, store: Path, rng: random.Random) -> None:
        path = store / self.file
        os.chmod(path, 0o600)
        if self.op == "truncate":
            os.truncate(path, self.offset)
            return
        with path.open("r+b") as f:
            f.seek(self.offset)
            old = f.read(self.length)
            if self.op == "zero":
                new = bytes(len(old))
            else:
                new = bytes(b ^ rng.randrange(1, 256) for b in old)
            f.seek(self.offset)
            f.write(new)


def _be(data: bytes, offset: int, size: int = 8) -> int:
    return int.from_bytes(data[offset : offset + size], "big")


def qcow2_regions(path: Path) -> dict[str, list[tuple[int, int]]]:
    """(offset, length) of the header, L1 table, L2 tables and refcount structures of a file,
    found through its header (qcow2.txt)."""
    data = path.read_bytes()
    l1_offset, l1_size = _be(data, 40), _be(data, 36, 4)
    reftable, reftable_clusters = _be(data, 48), _be(data, 56, 4)
    cluster = 1 << _be(data, 20, 4)
    l1 = [_be(data, l1_offset + 8 * i) & L1E_OFFSET_MASK for i in range(l1_size)]
    blocks = [_be(data, reftable + 8 * i) for i in range(reftable_clusters * cluster // 8)]
    return {
        "header": [(0, 512)],
        "l1": [(l1_offset, 8 * l1_size)],
        "l2": [(l2, cluster) for l2 in l1 if l2],
        "refcount": [(reftable, 8 * len([b for b in blocks if b]))]
        + [(b, cluster) for b in blocks if b],
    }


def _range_in(rng: random.Random, start: int, size: int, granule: int = 1) -> tuple[int, int]:
    length = max(1, min(size, granule * rng.choice((1, 1, 2, 8, 64))))
    return start + rng.randrange(0, max(1, size - length + 1)), length


def choose_mutation(
    campaign: Campaign, rng: random.Random, kinds: tuple[str, ...] | None = None
) -> Mutation:
    """A seeded damage of one file of the store (its kind first, then where); `kinds`
    narrows the choice."""
    store = campaign.store
    data_files = sorted(campaign.readers)
    others = sorted(
        str(p.relative_to(store))
        for p in (store / "data").rglob("*")
        if p.is_file() and p.suffix != ".qcow2"
    )
    wal = [name for name in ("index.sqlite-wal",) if (store / name).exists()]
    every = ["data", "data", "table", "table", "table", "header", "index", "index"]
    every += ["wal"] * bool(wal) + ["sidecar"] * bool(others)
    kind = rng.choice([k for k in every if kinds is None or k in kinds])
    if kind in ("data", "table", "header"):
        return _qcow2_mutation(store, rng.choice(data_files), kind, rng)
    name = {"index": "index.sqlite", "wal": wal[0] if wal else ""}.get(kind) or rng.choice(others)
    return _page_mutation(store, name, kind, rng)


def _qcow2_mutation(store: Path, file: str, kind: str, rng: random.Random) -> Mutation:
    size = (store / file).stat().st_size
    if kind == "data":
        op = rng.choice(("flip", "flip", "zero", "truncate"))
        if op == "truncate":
            return Mutation(kind, file, op, rng.randrange(0, size, rng.choice((1, 512))), 0)
        offset, length = _range_in(rng, 0, size, rng.choice((1, 512)))
        return Mutation(kind, file, op, offset, length)
    regions = qcow2_regions(store / file)
    if kind == "table":
        kind = rng.choice([name for name in ("l1", "l2", "refcount") if regions[name]])
    start, region = rng.choice(regions[kind])
    offset, length = _range_in(rng, start, region, rng.choice((1, 8)))
    return Mutation(kind, file, rng.choice(("flip", "zero")), offset, length)


def _page_mutation(store: Path, file: str, kind: str, rng: random.Random) -> Mutation:
    """Damage of an SQLite file (or a sidecar): a byte range of one page, or a truncation."""
    path = store / file
    size = path.stat().st_size
    page = 4096
    if kind == "index" and size >= 100:
        page = struct.unpack_from(">H", path.read_bytes(), 16)[0] or 65536
    op = rng.choice(("flip", "flip", "zero", "zero", "truncate"))
    if op == "truncate":
        return Mutation(kind, file, op, rng.choice((0, rng.randrange(0, size, page))), 0)
    first = rng.randrange(0, max(1, size // page)) * page
    offset, length = _range_in(rng, first, min(page, size - first), rng.choice((1, 16, 64)))
    return Mutation(kind, file, op, offset, length)


# --- judging what a command did ------------------------------------------------------------------


def _snapshot(store: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(store)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in store.rglob("*")
        if p.is_file()
    }


def reset(work: Path, pristine: Path, state: dict[str, tuple[int, int]]) -> None:
    """Make the working copy the pristine store again (only files that changed are copied)."""
    now = _snapshot(work)
    for name in now.keys() - state.keys():
        (work / name).unlink()
    for folder in sorted(work.rglob("*"), reverse=True):  # folders a repair made (lost+found)
        if folder.is_dir() and not (pristine / folder.relative_to(work)).is_dir():
            folder.rmdir()
    for name, stamp in state.items():
        if now.get(name) != stamp:
            target = work / name
            if target.exists():
                os.chmod(target, 0o600)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(pristine / name, target)


def truly_damaged(campaign: Campaign, work: Path, mutation: Mutation) -> list[int]:
    """Points whose bytes, read by QEMU from the damaged store, differ from what they must be
    (or that QEMU cannot open): the oracle for `verify` answering "no damage"."""
    damaged = set()
    for point, disk in campaign.readers.get(mutation.file, []):
        top = work / campaign.tops[(point, disk)]
        expected = campaign.expected_files[(point, disk)]
        proc = subprocess.run(
            ["qemu-img", "compare", "-q", "-F", "raw", str(top), str(expected)],
            capture_output=True,
        )
        if proc.returncode != 0:
            damaged.add(point)
    return sorted(damaged)


def failure_of(result: Result) -> str | None:
    """A failed command must say so in one line with exit 1 (or report damage, exit 3)."""
    if "Traceback" in result.stderr:
        return "traceback: " + result.stderr.strip().splitlines()[-1]
    if result.code not in (0, 1, 3):
        return f"exit {result.code}: {result.stderr.strip()[-200:]}"
    lines = result.stderr.strip().splitlines()
    if result.code == 1 and len(lines) != 1:
        return f"exit 1 with {len(lines)} lines on stderr: {result.stderr.strip()[-300:]}"
    return None


def restored_right(campaign: Campaign, point: int, folder: Path, fmt: str) -> str | None:
    for disk in campaign.disks[point]:
        path = folder / f"{disk}.{fmt}"
        if not path.exists():
            return f"exit 0 but {path.name} is missing"
        expected = campaign.expected_files[(point, disk)]
        if fmt == "raw":
            same = path.read_bytes() == campaign.expected[(point, disk)]
        else:
            proc = subprocess.run(
                ["qemu-img", "compare", "-q", "-F", "raw", str(path), str(expected)],
                capture_output=True,
            )
            same = proc.returncode == 0
        if not same:
            return f"exit 0 but {disk} of point {point} has wrong bytes"
    return None


@dataclass
class Step:
    """One command of a mutation and how to judge its exit-0 answer."""

    args: tuple[str, ...]
    check: Callable[[Result], str | None]


def plan_steps(
    campaign: Campaign, work: Path, out: Path, mutation: Mutation, rng: random.Random
) -> list[Step]:
    """The commands this seed runs: often a restore (mostly of a point that reads the damaged
    file), now and then a mount, then one of info, list and verify."""
    readers = [point for point, _disk in campaign.readers.get(mutation.file, [])]
    point = rng.choice(readers if readers and rng.random() < 0.75 else sorted(campaign.vm_of))
    vm = campaign.vm_of[point]
    steps = []
    if rng.random() < 0.6:
        fmt = rng.choice(("raw", "raw", "raw", "qcow2"))
        folder = out / "restored"
        steps.append(
            Step(
                ("restore", f"{vm}@#{point}", "--to", str(folder), "--format", fmt),
                lambda r: restored_right(campaign, point, folder, fmt),
            )
        )
    if rng.random() < 0.04:
        steps.append(Step(("mount", f"{vm}@#{point}", str(out / "mnt")), lambda r: None))
    steps.append(_second_step(campaign, work, mutation, point, rng))
    return steps


def _second_step(
    campaign: Campaign, work: Path, mutation: Mutation, point: int, rng: random.Random
) -> Step:
    vm = campaign.vm_of[point]
    which = rng.choice(("info", "list", "verify", "verify-vm"))
    if which == "info":
        return Step(
            ("info", f"{vm}@#{point}", "--json"),
            lambda r: (
                None
                if _stable_info(json.loads(r.stdout)) == campaign.infos[point]
                else f"exit 0 but info differs: {r.stdout[:300]}"
            ),
        )
    if which == "list":
        return Step(
            ("list", "--json"),
            lambda r: (
                None
                if json.loads(r.stdout) == campaign.listing
                else f"exit 0 but list differs: {r.stdout[:300]}"
            ),
        )
    args = ("verify", vm) if which == "verify-vm" else ("verify",)
    return Step(args, lambda r: _verify_right(campaign, work, mutation, vm, which))


def read_mount(campaign: Campaign, point: int, mountpoint: Path) -> str | None:
    """Every 64 KiB piece of each disk read through the mount is right or fails with EIO."""
    for disk in campaign.disks[point]:
        expected = campaign.expected[(point, disk)]
        with (mountpoint / f"{disk}.raw").open("rb", buffering=0) as f:
            for offset in range(0, len(expected), 65536):
                try:
                    got = os.pread(f.fileno(), 65536, offset)
                except OSError as exc:
                    if exc.errno != errno.EIO:
                        return f"mount read of {disk} at {offset:#x} failed with {exc}"
                    continue
                if got != expected[offset : offset + 65536]:
                    return f"mount served wrong bytes of {disk} at {offset:#x} (point {point})"
    return None


def _verify_right(
    campaign: Campaign, work: Path, mutation: Mutation, vm: str, which: str
) -> str | None:
    """verify said "no damage": QEMU must read every point it covered exactly, and the index
    must still list the same points."""
    damaged = truly_damaged(campaign, work, mutation)
    if which == "verify-vm":
        damaged = [p for p in damaged if campaign.vm_of[p] == vm]
    if damaged:
        return f"exit 0 (no damage) but points {damaged} read wrong bytes through qemu-img"
    listing = cli(work, "list", "--json")
    if listing.code == 0 and json.loads(listing.stdout) != campaign.listing:
        return "exit 0 (no damage) but the index lists different points"
    return None


def run_mutation(
    campaign: Campaign,
    work: Path,
    out: Path,
    seed: int,
    tally: Counter[str] | None = None,
    kinds: tuple[str, ...] | None = None,
) -> list[str]:
    """Apply mutation `seed` to the working copy, run its commands, and return what went
    wrong (empty when every command gave the right bytes or failed properly). `tally` counts
    the commands by outcome (exact, refused)."""
    rng = random.Random(seed)
    mutation = choose_mutation(campaign, rng, kinds)
    mutation.apply(work, rng)
    failures = []
    tally = Counter() if tally is None else tally
    for step in plan_steps(campaign, work, out, mutation, rng):
        shutil.rmtree(out / "restored", ignore_errors=True)
        if step.args[0] == "mount":
            problem = _mount_and_read(campaign, work, step.args)
        else:
            result = cli(work, *step.args)
            problem = judge(step, result)
            tally[f"{step.args[0]} {'exact' if result.code == 0 else 'refused'}"] += 1
        if problem:
            failures.append(f"seed {seed}: {mutation}: lbrestore {' '.join(step.args)}: {problem}")
    return failures


def judge(step: Step, result: Result) -> str | None:
    problem = failure_of(result)
    if problem is None and result.code == 0:
        try:
            problem = step.check(result)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            problem = f"exit 0 with unreadable output ({exc}): {result.stdout[:200]}"
    return problem


def _mount_and_read(campaign: Campaign, work: Path, args: tuple[str, ...]) -> str | None:
    mountpoint = Path(args[2])
    mountpoint.mkdir(exist_ok=True)
    result = cli(work, *args)
    try:
        problem = failure_of(result)
        if problem is None and result.code == 0:
            problem = read_mount(campaign, int(args[1].split("#")[1]), mountpoint)
        return problem
    finally:
        if result.code == 0 and cli(work, "umount", str(mountpoint)).code != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


@pytest.fixture
def work(campaign: Campaign, tmp_path: Path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(campaign.store, copy)
    return copy


def test_every_command_gives_right_bytes_or_names_the_damage(
    campaign: Campaign, work: Path, tmp_path: Path
) -> None:
    state = _snapshot(work)
    out = tmp_path / "out"
    out.mkdir()
    failures: list[str] = []
    tally: Counter[str] = Counter()
    for seed in range(MUTATIONS):
        failures += run_mutation(campaign, work, out, seed, tally)
        reset(work, campaign.store, state)
    assert unexpected(failures, Counter()) == []
    # The campaign really damaged what the commands read: restores and verifies were refused
    # (one line, exit 1 or 3) as well as answered exactly.
    for outcome in ("restore exact", "restore refused", "verify exact", "verify refused"):
        assert tally[outcome] >= 5, tally


# --- check --repair afterwards -------------------------------------------------------------------

REPAIR_MUTATIONS = 20


def undamaged_points(campaign: Campaign, mutation: Mutation) -> list[int]:
    """Points that read no byte of the damaged file (every point, when the damage is in the
    index, the WAL or a sidecar: those can be rebuilt from what data/ holds)."""
    hit = {point for point, _disk in campaign.readers.get(mutation.file, [])}
    return [point for point in sorted(campaign.vm_of) if point not in hit]


def repair_and_restore(campaign: Campaign, work: Path, out: Path, seed: int) -> list[str]:
    """Mutation `seed`, then `check --repair` and `check`; then restores of up to three
    undamaged points must be exact, and one of a damaged point exact or refused."""
    rng = random.Random(seed)
    mutation = choose_mutation(campaign, rng)
    mutation.apply(work, rng)
    failures = []
    for args in (("check", "--repair"), ("check",)):
        problem = failure_of(cli(work, *args))
        if problem:
            failures.append(f"seed {seed}: {mutation}: lbrestore {' '.join(args)}: {problem}")
    undamaged = undamaged_points(campaign, mutation)
    damaged = sorted(set(campaign.vm_of) - set(undamaged))
    picked = rng.sample(undamaged, min(3, len(undamaged)))
    for point in picked + rng.sample(damaged, min(1, len(damaged))):
        shutil.rmtree(out / "restored", ignore_errors=True)
        folder = out / "restored"
        spec = f"{campaign.vm_of[point]}@#{point}"
        result = cli(work, "restore", spec, "--to", str(folder), "--format", "raw")
        problem = failure_of(result)
        if problem is None and result.code == 0:
            problem = restored_right(campaign, point, folder, "raw")
        elif problem is None and point in undamaged:
            problem = f"an undamaged point is not restored after check --repair: {result.stderr}"
        if problem:
            failures.append(
                f"seed {seed}: {mutation}: after check --repair: restore {spec}: {problem}"
            )
    return failures


@pytest.mark.skipif("check" not in COMMAND_MODULES, reason="lbrestore check is not on main yet")
def test_check_repair_leaves_every_undamaged_point_exact(
    campaign: Campaign, work: Path, tmp_path: Path
) -> None:
    state = _snapshot(work)
    out = tmp_path / "out"
    out.mkdir()
    failures: list[str] = []
    for seed in range(1000, 1000 + REPAIR_MUTATIONS):
        failures += repair_and_restore(campaign, work, out, seed)
        reset(work, campaign.store, state)
    assert failures == []


def l2_entries(path: Path, value: int) -> list[tuple[int, int]]:
    """(file offset, guest cluster) of the L2 entries inside the disk equal to `value` (1:
    QCOW_OFLAG_ZERO with no host cluster, a zero cluster the point stored; 0: unallocated)."""
    data = path.read_bytes()
    cluster = 1 << _be(data, 20, 4)
    clusters = -(-_be(data, 24) // cluster)
    per_table = cluster // 8
    l1_offset, l1_size = _be(data, 40), _be(data, 36, 4)
    found = []
    for i in range(l1_size):
        table = _be(data, l1_offset + 8 * i) & L1E_OFFSET_MASK
        for j in range(min(per_table, clusters - i * per_table)) if table else ():
            if _be(data, table + 8 * j) == value:
                found.append((table + 8 * j, i * per_table + j))
    return found


def reads_data_at(campaign: Campaign, name: str, cluster: int) -> bool:
    """True when the point whose top file is `name` reads non-zero bytes in `cluster`."""
    for key, top in campaign.tops.items():
        if top == name:
            size = 1 << _be((campaign.store / name).read_bytes()[:32], 20, 4)
            with campaign.expected_files[key].open("rb") as f:
                f.seek(cluster * size)
                return any(f.read(size))
    return False


def set_l2_entry(path: Path, offset: int, value: int) -> None:
    os.chmod(path, 0o600)
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(value.to_bytes(8, "big"))


def zero_mark_damage(
    campaign: Campaign, work: Path, value: int, new: int
) -> tuple[int, Mutation] | None:
    """Change the first L2 entry equal to `value` into `new` such that QEMU then reads some
    point differently; (that point, the change) or None when no such entry exists."""
    for name in sorted(campaign.readers):
        for offset, cluster in l2_entries(work / name, value):
            if value == 0 and not reads_data_at(campaign, name, cluster):
                continue  # a zero mark there would not change what the point reads
            set_l2_entry(work / name, offset, new)
            change = Mutation("l2", name, "set", offset, 8)
            damaged = truly_damaged(campaign, work, change)
            if damaged:
                return damaged[0], change
            set_l2_entry(work / name, offset, value)
    return None


def assert_refused_everywhere(campaign: Campaign, work: Path, point: int, tmp_path: Path) -> None:
    """restore refuses (or gives the right bytes), verify names the damage, a mount answers
    EIO where the bytes would be wrong."""
    vm = campaign.vm_of[point]
    folder = tmp_path / "restored"
    result = cli(work, "restore", f"{vm}@#{point}", "--to", str(folder))
    assert failure_of(result) is None
    if result.code == 0:
        assert restored_right(campaign, point, folder, "qcow2") is None
    verified = cli(work, "verify", vm)
    assert verified.code == 3 and f"#{point}" in verified.stdout + verified.stderr
    assert (
        _mount_and_read(campaign, work, ("mount", f"{vm}@#{point}", str(tmp_path / "mnt"))) is None
    )


def test_a_lost_zero_cluster_mark_is_damage(campaign: Campaign, work: Path, tmp_path: Path) -> None:
    """The L2 entry that marks a cluster as zero in an overlay is zeroed: the cluster then
    reads the backing file's bytes. Every reader must refuse them."""
    found = zero_mark_damage(campaign, work, 1, 0)
    assert found, "the store has an overlay with a zero cluster over non-zero backing data"
    assert_refused_everywhere(campaign, work, found[0], tmp_path)


def test_an_appearing_zero_cluster_mark_is_damage(
    campaign: Campaign, work: Path, tmp_path: Path
) -> None:
    """An unallocated L2 entry of an overlay becomes a zero mark: the cluster then reads zeros
    instead of its backing file's bytes. Every reader must refuse them."""
    found = zero_mark_damage(campaign, work, 0, 1)
    assert found, "the store has an overlay with an unallocated cluster over backing data"
    assert_refused_everywhere(campaign, work, found[0], tmp_path)


# --- a commit that lives only in the WAL ---------------------------------------------------------

WAL_MUTATIONS = 30


@pytest.fixture(scope="module")
def wal_campaign(campaign: Campaign, tmp_path_factory: pytest.TempPathFactory) -> Campaign:
    """The campaign's store plus a fourth point of vm2 whose commit is still only in
    index.sqlite-wal: a reader held an older snapshot while it was imported (as a mount does),
    and the store was copied then, as a crash or a backup of the folder would leave it."""
    root = tmp_path_factory.mktemp("wal")
    live = root / "live"
    shutil.copytree(campaign.store, live)
    image = root / "vm2-vda-3.qcow2"
    run(
        "qemu-img",
        "convert",
        "-O",
        "qcow2",
        campaign.expected_files[(campaign.points["vm2"][-1], "vda")],
        image,
    )
    run("qemu-io", "-f", "qcow2", "-c", "write -P 77 64k 192k", "-c", "write -z 1M 64k", image)
    reader = sqlite3.connect(live / "index.sqlite")
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM sqlite_master").fetchall()
        saved = os.environ.get("LBRESTORE_LOCK_TIMEOUT")
        os.environ["LBRESTORE_LOCK_TIMEOUT"] = "0.5"  # how long a commit waits for the reader
        try:
            result = cli(live, "import", "vm2", f"--disk=vda={image}", "--at", "2026-04-01T08:00")
        finally:
            if saved is None:
                del os.environ["LBRESTORE_LOCK_TIMEOUT"]
            else:
                os.environ["LBRESTORE_LOCK_TIMEOUT"] = saved
        assert result.code == 0, result.stderr
        points = {vm: list(ids) for vm, ids in campaign.points.items()}
        points["vm2"].append(max(campaign.vm_of) + 1)
        expected, files = dict(campaign.expected), dict(campaign.expected_files)
        raw = root / "expected-new.raw"
        run("qemu-img", "convert", "-O", "raw", image, raw)
        expected[(points["vm2"][-1], "vda")] = raw.read_bytes()
        files[(points["vm2"][-1], "vda")] = raw
        described = _describe(live, expected, files, points)  # the reader keeps the WAL
        store = root / "store"
        shutil.copytree(live, store, ignore=shutil.ignore_patterns("*-shm"))
    finally:
        reader.close()
    assert (store / "index.sqlite-wal").stat().st_size > 0
    assert [row["id"] for row in described.listing][-1] == points["vm2"][-1]
    described.store = store
    return described


def test_a_damaged_wal_never_makes_a_command_lie(wal_campaign: Campaign, tmp_path: Path) -> None:
    """Flips, zeroes and truncations of the WAL (and of the index beside it): every command
    gives the right bytes and the right list of points, or fails in one line."""
    work = tmp_path / "store"
    shutil.copytree(wal_campaign.store, work)
    state = _snapshot(work)
    out = tmp_path / "out"
    out.mkdir()
    failures: list[str] = []
    for seed in range(2000, 2000 + WAL_MUTATIONS):
        failures += run_mutation(wal_campaign, work, out, seed, kinds=("wal", "index"))
        reset(work, wal_campaign.store, state)
    assert unexpected(failures, Counter()) == []


def test_a_damaged_wal_frame_does_not_drop_a_commit_silently(
    wal_campaign: Campaign, tmp_path: Path
) -> None:
    """The last byte of the WAL (the page of its last frame) flipped: SQLite ignores that
    frame's transaction. `list` must still show every point, or fail in one line."""
    work = tmp_path / "store"
    shutil.copytree(wal_campaign.store, work)
    wal = work / "index.sqlite-wal"
    Mutation("wal", wal.name, "flip", wal.stat().st_size - 1, 1).apply(work, random.Random(1))
    result = cli(work, "list", "--json")
    assert failure_of(result) is None
    if result.code == 0:
        assert json.loads(result.stdout) == wal_campaign.listing
