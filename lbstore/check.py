"""`lbrestore check`: the store against its index, and the explicit repair of what it finds.

`check_store(root)` only reads: the index is opened read-only and no lock is taken. It looks at
- the index itself (missing, empty or unreadable while data/ holds points),
- every committed file: present, its qcow2 structure as `qemu-img check` judges it (refcounts,
  leaks, tables in bounds, overlaps: lbstore.qcow2.consistency), its header (virtual size,
  cluster size, backing file named relatively as the right point's file),
- every committed file's sidecar: present, intact, saying what the index says,
- data/ against the index: points the index does not know (recoverable from their sidecars or
  not), stray files, and tmp/ leftovers of writers that died.
Each problem names the restore points it affects (every point whose chain holds the file).

`repair_store(root)` takes the store's lock, rebuilds the index when it is unusable, commits
points the index lost from their sidecars, rewrites sidecars from the index, lowers the
refcounts of leaked clusters (the only change it makes to a committed file: no read changes),
moves files that nothing describes into lost+found/ (never deleting them), lets recovery empty
tmp/, then checks again: what is left is what cannot be repaired without losing data, and the
report says so. No repair ever deletes a committed point's file or changes what it reads.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lbstore.errors import IndexDamagedError, Qcow2Error, StoreNotFoundError
from lbstore.fsutil import fsync_dir, rename_noreplace
from lbstore.index import INDEX_NAME, probe_index
from lbstore.lock import names_a_live_holder
from lbstore.model import RestorePoint
from lbstore.private import make_private_dir
from lbstore.qcow2.consistency import check_image, repair_leaks
from lbstore.qcow2.reader import Qcow2Image
from lbstore.rebuild import (
    RebuildReport,
    adopt_points,
    header_problem,
    image_header_problem,
    point_record,
    scan_data,
)
from lbstore.sidecar import Sidecar, SidecarError, read_sidecar, rewrite_sidecar, sidecar_path
from lbstore.store import LOST_AND_FOUND, Store, os_errors


@dataclass
class Problem:
    """One thing wrong with the store: what, where, which points it affects, and whether
    `--repair` can fix it without losing data."""

    kind: str
    message: str
    points: list[str] = field(default_factory=list)
    path: str | None = None
    repairable: bool = True

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {
            "kind": self.kind,
            "message": self.message,
            "points": self.points,
            "path": self.path,
            "repairable": self.repairable,
        }

    def line(self) -> str:
        """One human line."""
        affected = f" (affects {', '.join(self.points)})" if self.points else ""
        fix = "" if self.repairable else " [cannot be repaired without losing data]"
        return f"{self.kind}: {self.message}{affected}{fix}"


@dataclass
class CheckReport:
    """What a check found (and, after `--repair`, what the repair did)."""

    problems: list[Problem] = field(default_factory=list)
    points_checked: int = 0
    files_checked: int = 0
    repaired: list[str] = field(default_factory=list)
    unrepaired: list[str] = field(default_factory=list)
    """What a repair could not bring back into the store (kept in lost+found/ where it could)."""
    rebuilt: RebuildReport | None = None
    in_progress: list[str] = field(default_factory=list)
    """Work a live writer is doing right now (a backup's pending point, a running merge): not
    a problem, and not counted in the exit code."""

    @property
    def ok(self) -> bool:
        """True when nothing is wrong and a repair lost no restore point."""
        return not self.problems and not self.unrepaired

    @property
    def exit_code(self) -> int:
        """0 clean, 3 problems found (or left after a repair)."""
        return 0 if self.ok else 3

    def add(self, problem: Problem) -> None:
        """Record a problem."""
        self.problems.append(problem)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        result: dict[str, Any] = {
            "ok": self.ok,
            "points_checked": self.points_checked,
            "files_checked": self.files_checked,
            "problems": [p.as_dict() for p in self.problems],
            "repaired": self.repaired,
            "not_repaired": self.unrepaired,
            "in_progress": self.in_progress,
        }
        if self.rebuilt is not None:
            result["rebuilt"] = {
                "recovered_points": [r.point_id for r in self.rebuilt.recovered],
                "vms": self.rebuilt.vms,
                "disks": self.rebuilt.disk_count,
                "not_recovered": {str(k): v for k, v in self.rebuilt.not_recovered.items()},
                "old_index": self.rebuilt.moved_aside,
            }
        return result


# --- checking -------------------------------------------------------------------------------------


def check_store(root: Path) -> CheckReport:
    """Check the store at `root` against its index; reads only, takes no lock."""
    report = CheckReport()
    with os_errors(root):
        state = probe_index(root / INDEX_NAME, thorough=True)
        if state == "missing" and not (root / "data").is_dir():
            raise StoreNotFoundError(root)
    if state != "ok":
        _check_without_index(root, state, report)
        return report
    try:
        store = Store.open(root, readonly_index=True)
    except IndexDamagedError as exc:
        _check_without_index(root, "damaged", report)
        report.problems[0].message += f" ({exc.problem})"
        return report
    with store:
        try:
            _check_with_index(store, report)
        except IndexDamagedError as exc:
            report.problems.insert(
                0, Problem("index", f"index.sqlite is damaged: {exc.problem}", path=INDEX_NAME)
            )
    return report


def _check_without_index(root: Path, state: str, report: CheckReport) -> None:
    """The index cannot be used: say so, and what data/ holds (what a rebuild would get)."""
    scan = scan_data(root / "data")
    names = sorted(f"{entry.vm}@#{point_id}" for point_id, entry in scan.points.items())
    words = {"missing": "missing", "empty": "empty", "damaged": "unreadable (damaged)"}
    report.add(
        Problem(
            "index",
            f"index.sqlite is {words.get(state, state)} while data/ holds {len(names)} "
            "restore point(s); --repair rebuilds it from the sidecars",
            points=names,
            path=INDEX_NAME,
        )
    )
    known: set[tuple[int, str]] = set()
    for point_id in sorted(scan.points):
        entry = scan.points[point_id]
        result = point_record(entry, known)
        address = f"{entry.vm}@#{point_id}"
        if isinstance(result, str):
            report.add(Problem("unrecoverable", result, [address], repairable=False))
            continue
        record, _ = result
        known.update((point_id, d.name) for d in record.disks)
        report.points_checked += 1
        for disk in record.disks:
            report.files_checked += 1
            problem = structure_problem(root / "data" / disk.file)
            if problem is not None:
                report.add(Problem("structure", problem, [address], f"data/{disk.file}", False))
    _check_strays(root, scan.strays, report)
    _check_tmp(root, report)


def _check_with_index(store: Store, report: CheckReport) -> None:
    points = store.restore_points()
    report.points_checked = len(points)
    store_id = store.identity().get("id")
    chains = ChainTree(points)
    for point in points:
        for record in point.disks:
            report.files_checked += 1
            for problem in _file_problems(store, point, record.name, store_id):
                problem.points = chains.dependents(point.id, record.name)
                report.add(problem)
    scan = scan_data(store.data_dir)
    known_ids = store.index.point_ids() | store.index.merging_point_ids()
    unknown = [i for i in sorted(scan.points) if i not in known_ids]
    known_disks = {(p.id, d.name) for p in points for d in p.disks}
    busy = _busy_vms(store.path)
    for point_id in unknown:
        entry = scan.points[point_id]
        address = f"{entry.vm}@#{point_id}"
        if _is_busy(busy, entry.vm):
            report.in_progress.append(f"{address}: being committed by a running writer")
            continue
        result = point_record(entry, known_disks)
        if isinstance(result, str):
            report.add(
                Problem(
                    "orphan",
                    f"files of point #{point_id} are not in the index and cannot be recovered "
                    f"({result}); --repair moves them to {LOST_AND_FOUND}/",
                    [address],
                    path=f"data/{entry.vm}",
                )
            )
            continue
        known_disks.update((point_id, d.name) for d in result[0].disks)
        report.add(
            Problem(
                "unindexed-point",
                f"point #{point_id} is whole in data/ (files and sidecars) but the index does "
                "not know it; --repair adds it",
                [address],
            )
        )
    for row in store.index.merges():
        if _is_busy(busy, row["vm"]):
            report.in_progress.append(f"{row['vm']}@#{row['point_id']}: being merged away")
            continue
        report.add(
            Problem(
                "interrupted-merge",
                f"the merge removing point #{row['point_id']} of {row['vm']} was interrupted "
                f"(step {row['step']}) or is running now; --repair finishes it",
                [f"{row['vm']}@#{row['point_id']}"],
            )
        )
    for row in store.index.pending_points():
        if _is_busy(busy, row["vm"]):
            report.in_progress.append(
                f"{row['vm']}@#{row['id']}: being written by a running writer"
            )
            continue
        report.add(
            Problem(
                "interrupted-write",
                f"point #{row['id']} of {row['vm']} was begun and never committed "
                "(or is being written now); --repair finishes or discards it",
                [f"{row['vm']}@#{row['id']}"],
            )
        )
    _check_strays(store.path, scan.strays, report)
    _check_tmp(store.path, report)


def _file_problems(
    store: Store, point: RestorePoint, disk: str, store_id: str | None
) -> list[Problem]:
    """Problems of one committed file and its sidecar (affected points filled in later)."""
    record = point.disk(disk)
    assert record is not None
    path = store.data_dir / record.file
    where = f"data/{record.file}"
    if not path.is_file():
        return [Problem("missing-file", f"{where} is missing", path=where, repairable=False)]
    problems = []
    structure, header, leaks = file_problems(
        path, record.virtual_size, record.cluster_size, record.backing_point_id
    )
    if structure is not None:
        problems.append(Problem("structure", structure, path=where, repairable=False))
    elif header is not None:
        problems.append(Problem("header", f"{where}: {header}", path=where, repairable=False))
    if leaks:
        problems.append(
            Problem(
                "leak",
                f"{where}: {leaks} leaked cluster(s) (space wasted, no data at risk); "
                "--repair lowers their refcounts",
                path=where,
            )
        )
    expected = store.sidecar_from_index(point.id, disk, store_id)
    sidecar_file = sidecar_path(store.data_dir, point.vm, disk, point.id)
    try:
        found = read_sidecar(sidecar_file)
    except SidecarError as exc:
        problems.append(
            Problem("sidecar", f"data/{record.file[:-6]}.point: {exc.problem}", path=where)
        )
        return problems
    difference = sidecar_difference(found, expected)
    if difference is not None:
        problems.append(
            Problem(
                "sidecar",
                f"data/{record.file[:-6]}.point disagrees with the index ({difference})",
                path=where,
            )
        )
    return problems


def sidecar_difference(found: Sidecar, expected: Sidecar) -> str | None:
    """The first field in which a sidecar differs from what the index says, or None."""
    fields = (
        ("vm", found.vm, expected.vm),
        ("created", found.created, expected.created),
        ("kind", found.kind, expected.kind),
        ("disks", found.point_disks, expected.point_disks),
        ("definition", found.definition, expected.definition),
        ("disk record", _disk_meta(found), _disk_meta(expected)),
        ("checksums", found.disk.checksums, expected.disk.checksums),
        ("zero runs", found.disk.zero_runs, expected.disk.zero_runs),
    )
    for name, left, right in fields:
        if left != right:
            return f"{name} differs"
    return None


def _disk_meta(sidecar: Sidecar) -> tuple[object, ...]:
    d = sidecar.disk
    return (d.name, d.file, d.backing_point_id, d.mode, d.virtual_size, d.cluster_size)


def file_problems(
    path: Path, virtual_size: int, cluster_size: int, backing_point_id: int | None
) -> tuple[str | None, str | None, int]:
    """(structure problem, header problem, leaked clusters) of one qcow2 file on its own.

    The structure is what `qemu-img check` judges (lbstore.qcow2.consistency: refcounts,
    tables in bounds, overlaps); the header must agree with the index (sizes, backing file
    named relatively as the right point's file). Leaks are not damage: --repair fixes them.
    """
    try:
        consistency = check_image(path)
        if consistency.corruptions:
            shown = "; ".join(consistency.problems[:3])
            more = len(consistency.problems) - 3
            shown += f"; and {more} more" if more > 0 else ""
            return f"{path.name}: {consistency.corruptions} corruption(s): {shown}", None, 0
        with Qcow2Image.open(path, backing=False) as image:
            header = image_header_problem(image, virtual_size, cluster_size, backing_point_id)
            return None, header, consistency.leaks
    except Qcow2Error as exc:
        return f"{path.name}: {exc.problem}", None, 0
    except OSError as exc:
        return f"{path.name}: cannot be read: {exc.strerror or exc}", None, 0


def structure_problem(path: Path) -> str | None:
    """What is structurally wrong with one qcow2 file on its own, or None."""
    return file_problems(path, 0, 0, None)[0]


class ChainTree:
    """Which points read through which file: the overlays of each (point, disk), built once."""

    def __init__(self, points: Iterable[RestorePoint]) -> None:
        self.vm_of: dict[int, str] = {}
        self.children: dict[tuple[int, str], list[int]] = {}
        for point in points:
            self.vm_of[point.id] = point.vm
            for record in point.disks:
                if record.backing_point_id is not None:
                    key = (record.backing_point_id, record.name)
                    self.children.setdefault(key, []).append(point.id)

    def dependents(self, point_id: int, disk: str) -> list[str]:
        """Addresses of every point whose `disk` chain holds this point's file (itself too)."""
        found: set[int] = set()
        stack = [point_id]
        while stack:
            current = stack.pop()
            if current not in found:
                found.add(current)
                stack += self.children.get((current, disk), [])
        return [f"{self.vm_of[i]}@#{i}" for i in sorted(found) if i in self.vm_of]


def _check_strays(root: Path, strays: list[Path], report: CheckReport) -> None:
    for path in strays:
        relative = path.relative_to(root)
        report.add(
            Problem(
                "orphan",
                f"{relative} is not a restore point file; --repair moves it to {LOST_AND_FOUND}/",
                path=str(relative),
            )
        )


def _busy_vms(root: Path) -> set[str] | None:
    """The VMs whose writer lock names a live holder now; None when a whole-store writer
    (repair) holds the store lock, which makes every VM busy."""
    if names_a_live_holder([root / "lock"]):
        return None
    return {
        path.stem.removeprefix("vm-")
        for path in sorted((root / "locks").glob("vm-*.lock"))
        if names_a_live_holder([path])
    }


def _is_busy(busy: set[str] | None, vm: str) -> bool:
    return busy is None or vm in busy


def _writer_running(root: Path) -> bool:
    """True when the store's lock file or a VM writer's under locks/ names a live holder."""
    return names_a_live_holder([root / "lock", *sorted((root / "locks").glob("vm-*.lock"))])


def _check_tmp(root: Path, report: CheckReport) -> None:
    tmp = root / "tmp"
    if not tmp.is_dir() or _writer_running(root):
        return  # a running writer's files are work in progress, not leftovers
    for path in sorted(tmp.iterdir()):
        report.add(
            Problem(
                "tmp-leftover",
                f"tmp/{path.name} was left by a writer that died; --repair removes it",
                path=f"tmp/{path.name}",
            )
        )


# --- repairing ------------------------------------------------------------------------------------


def repair_store(root: Path, *, lock_timeout: float = 10.0) -> CheckReport:
    """Repair what can be repaired without losing data, then check again (the returned report
    lists what is left, and `repaired` what was done)."""
    with os_errors(root):
        if probe_index(root / INDEX_NAME) == "missing" and not (root / "data").is_dir():
            raise StoreNotFoundError(root)
    done: list[str] = []
    lost: list[str] = []
    with Store.open(
        root, write=True, lock_timeout=lock_timeout, purpose="lbrestore check --repair", repair=True
    ) as store:
        rebuilt = store.rebuilt
        if rebuilt is not None:
            done.append(f"rebuilt the index from data/: {rebuilt.summary()}")
            lost += [f"point #{i}: {why}" for i, why in sorted(rebuilt.not_recovered.items())]
        done += _recovery_actions(store)
        done += _adopt_unindexed(store, lost)
        done += _rewrite_sidecars(store)
        done += _move_orphans(store)
        report = check_store(root)  # under the lock: nothing changes meanwhile
        done += _repair_leaks(store, report, lost)
        if done:
            store.record_event(None, "repaired", "; ".join(done)[:2000], actions=done)
    report.repaired = done
    report.unrepaired = [f"could not recover {line}" for line in lost]
    report.rebuilt = rebuilt
    return report


def _recovery_actions(store: Store) -> list[str]:
    """What opening the store for writing did (recovery runs on every writer's open)."""
    return list(store.recovery_actions)


def _adopt_unindexed(store: Store, lost: list[str]) -> list[str]:
    """Add points that are whole in data/ but unknown to the index; note the others in `lost`."""
    scan = scan_data(store.data_dir)
    unknown = [i for i in scan.points if i not in store.index.point_ids()]
    if not unknown:
        return []
    report = RebuildReport()
    with store.index.batch():
        adopt_points(store.index, scan, unknown, report)
    # Files without any sidecar are not a committed point (every committed file has one):
    # they are orphans, moved to lost+found/ below, not a loss.
    lost += [
        f"point #{i}: {why}"
        for i, why in sorted(report.not_recovered.items())
        if scan.points[i].sidecar_paths
    ]
    return [f"added {r.vm}@#{r.point_id} to the index from its sidecars" for r in report.recovered]


def _rewrite_sidecars(store: Store) -> list[str]:
    """Sidecars that are damaged or disagree with the index, written again from the index,
    for files whose header agrees with the index."""
    done = []
    store_id = store.identity().get("id")
    for point in store.restore_points():
        for record in point.disks:
            path = store.data_dir / record.file
            expected = store.sidecar_from_index(point.id, record.name, store_id)
            try:
                if sidecar_difference(read_sidecar(path.with_suffix(".point")), expected) is None:
                    continue
            except SidecarError:
                pass
            if not path.is_file() or header_problem(
                path, record.virtual_size, record.cluster_size, record.backing_point_id
            ):
                continue  # the file itself is wrong: which one to trust is not ours to guess
            mode = path.stat().st_mode & 0o777
            rewrite_sidecar(store.data_dir, expected, mode)
            done.append(f"rewrote the sidecar of {point.vm}@#{point.id} disk {record.name}")
    return done


def _repair_leaks(store: Store, report: CheckReport, lost: list[str]) -> list[str]:
    """Lower the refcounts of leaked clusters in the files the check found leaky
    (lbstore.qcow2.consistency), and drop those problems from the report once fixed.

    Only refcounts of clusters nothing references change, so every read stays the same; a file
    with corruptions is refused by repair_leaks and stays reported. A committed file is
    read-only (0400): it is made writable for its owner for the repair only.
    """
    done = []
    for problem in [p for p in report.problems if p.kind == "leak" and p.path]:
        path = store.path / str(problem.path)
        mode = stat.S_IMODE(path.stat().st_mode)
        os.chmod(path, mode | stat.S_IWUSR)
        try:
            result = repair_leaks(path)
        except (Qcow2Error, OSError) as exc:
            lost.append(f"leaks of {problem.path}: {exc}")
            continue
        finally:
            os.chmod(path, mode)
        if result.repaired:
            done.append(f"repaired {result.repaired} leaked cluster(s) of {problem.path}")
        if check_image(path).leaks == 0:
            report.problems.remove(problem)
    return done


def _move_orphans(store: Store) -> list[str]:
    """Move what nothing describes out of data/ into lost+found/ (kept, never deleted)."""
    scan = scan_data(store.data_dir)
    known = store.index.point_ids()
    paths = list(scan.strays)
    for point_id, entry in scan.points.items():
        if point_id not in known:
            paths += [*entry.files.values(), *entry.sidecar_paths.values()]
    done = []
    for path in sorted(paths):
        relative = path.relative_to(store.data_dir)
        target = store.path / LOST_AND_FOUND / relative
        _make_private_dirs(target.parent, store.path)
        suffix = 0
        while target.exists() or target.is_symlink():
            suffix += 1
            target = target.with_name(f"{path.name}.{suffix}")
        rename_noreplace(path, target)
        fsync_dir(target.parent)
        fsync_dir(path.parent)
        done.append(f"moved data/{relative} to {target.relative_to(store.path)}")
    return done


def _make_private_dirs(folder: Path, root: Path) -> None:
    """mkdir -p below `root`, each new folder 0700 (the store is private)."""
    missing = []
    while not folder.exists() and folder != root:
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        make_private_dir(path)


__all__ = ["CheckReport", "Problem", "check_store", "repair_store"]
