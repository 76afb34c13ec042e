"""The backup job through libvirt: a domain's disks (pull-mode backup, checkpoints) into the store.

libvirt owns the domain's QMP monitor, so the point-in-time view and the dirty bitmaps are asked
of libvirt: a pull-mode backup (`backupBegin`) exports each disk over NBD as it was at the
instant the backup began, and a checkpoint created in the same instant starts a bitmap that
records every later write. The pull and the store's ingest are those of the QMP path.

The bitmap invariant in libvirt's terms. Every checkpoint bitmap of a libvirt domain records on
its own (libvirt 6+), so this store keeps exactly one: `lbr-<store id>-<point id>`, the checkpoint
created with its newest restore point. Its XML is kept with that point (`libvirt_checkpoint` in
the point's definition) and libvirt's record of it is deleted after each backup
(VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY: the bitmap stays in the image and keeps recording),
so other tools (virtnbdbackup refuses to run beside a checkpoint it did not make) never see it.
A backup:

1. redefines the kept checkpoint (REDEFINE | REDEFINE_VALIDATE: libvirt checks its bitmaps);
   a refusal (bitmap missing or broken) makes the disks a resync, not a failure; this store's
   checkpoints left by a killed backup are deleted (the kept one covers their writes);
2. begins the pull-mode backup: incremental from the kept checkpoint, with the new checkpoint;
3. pulls every disk into the store and commits;
4. after the commit: the old checkpoint is deleted with its bitmap, the new one keeps only its
   bitmap; on any failure before: the new checkpoint is deleted with its bitmap and the old one
   keeps its bitmap, which has recorded every write since the previous point.
Checkpoints of other stores and other tools are never touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lbqemu import libvirt as lv
from lbqemu.bitmaps import store_prefix
from lbqemu.errors import CheckpointUnusableError, DiskSelectionError, DomainBusyError, QemuError
from lbqemu.nbd import DEFAULT_CHUNK, DEFAULT_DEPTH, NbdSource
from lbrestore.backup import (
    BackupHooks,
    BackupSummary,
    DiskSummary,
    PullSpec,
    newest_by_disk,
    pull_disk,
    record_events,
    record_failure,
)
from lbrestore.errors import AppError, UsageError
from lbstore.ingest import Ingest
from lbstore.model import RestorePoint
from lbstore.store import Store

CHECKPOINT_KEY = "libvirt_checkpoint"
"""The key of a point's definition that holds the checkpoint XML created with it."""
DEFAULT_WORK_PARENT = Path("/var/tmp")
"""Where the private folder for the NBD socket and scratch files goes by default (QEMU, running
as its own user, must reach it; /tmp may be private to a service)."""


@dataclass(frozen=True)
class LibvirtBackupOptions:
    """What `lbrestore backup VM --libvirt URI` was asked to do."""

    vm: str
    uri: str
    disks: tuple[str, ...] = ()
    full: bool = False
    nbd: str | None = None
    tls_creds: str | None = None
    insecure_tcp: bool = False
    scratch_dir: Path | None = None
    chunk: int = DEFAULT_CHUNK
    depth: int = DEFAULT_DEPTH


@dataclass
class _Plan:
    """One disk's mode; `since` names the checkpoint an incremental reads changes since."""

    disk: lv.DomainDisk
    size: int
    mode: str
    reason: str | None = None
    since: str | None = None


@dataclass
class Checkpoints:
    """This store's checkpoints on the domain during one backup."""

    prefix: str
    old: str | None = None  # the kept checkpoint, redefined (libvirt knows it during the job)
    old_disks: tuple[str, ...] = ()
    distrust: str | None = None  # why the kept checkpoint cannot be used, if it cannot
    new: str | None = None  # the checkpoint created with this backup, once it began


def previous_checkpoint(points: list[RestorePoint]) -> str | None:
    """The checkpoint XML kept with the VM's newest restore point (None: none was)."""
    newest = max(points, key=lambda p: (p.created, p.id), default=None)
    if newest is None or not newest.definition:
        return None
    value = newest.definition.get(CHECKPOINT_KEY)
    return str(value) if value else None


def prepare_checkpoints(domain: lv.Domain, prefix: str, kept: str | None) -> Checkpoints:
    """Redefine the kept checkpoint; delete what a killed backup of this store left.

    Only names with this store's prefix are looked at. A kept checkpoint that libvirt refuses
    is reported in `distrust` (the job resyncs)."""
    state = Checkpoints(prefix)
    kept_name = lv.checkpoint_name(kept) if kept else None
    for name in domain.checkpoint_names():
        if name.startswith(prefix) and name != kept_name:
            # Created by a backup that never committed: the kept one has recorded its writes.
            domain.delete_checkpoint(name, metadata_only=False)
    if kept is None or kept_name is None:
        state.distrust = "no checkpoint of this store on the domain"
        return state
    try:
        if kept_name not in domain.checkpoint_names():
            domain.redefine_checkpoint(kept)
    except CheckpointUnusableError as exc:
        state.distrust = f"checkpoint {kept_name} unusable: {exc.problem}"
        return state
    state.old, state.old_disks = kept_name, tuple(lv.checkpoint_disks(kept))
    return state


def plan_disks(
    disks: list[lv.DomainDisk],
    sizes: dict[str, int],
    newest: dict[str, tuple[int, int]],
    checkpoints: Checkpoints,
    force_full: bool,
) -> list[_Plan]:
    """Each disk's mode: incremental when the kept checkpoint covers it, else resync or full."""
    plans = []
    for disk in disks:
        size = sizes[disk.target]
        _, last_size = newest.get(disk.target, (None, None))
        plan = _Plan(disk, size, "resync")
        if last_size is None:
            plan.mode, plan.reason = "full", "disk new to the store"
        elif force_full:
            plan.mode, plan.reason = "full", "full backup requested"
        elif last_size != size:
            plan.reason = f"disk resized ({last_size} -> {size} bytes)"
        elif not disk.can_checkpoint:
            plan.reason = f"no checkpoint bitmaps in a {disk.format or 'unknown'} image"
        elif checkpoints.distrust is not None:
            plan.reason = checkpoints.distrust
        elif disk.target not in checkpoints.old_disks:
            plan.reason = f"no bitmap of checkpoint {checkpoints.old} on this disk"
        else:
            plan.mode, plan.since = "incremental", checkpoints.old
        plans.append(plan)
    return plans


def choose_disks(all_disks: list[lv.DomainDisk], wanted: tuple[str, ...]) -> list[lv.DomainDisk]:
    """The writable disks, or those named by --disk (by target dev)."""
    writable = [d for d in all_disks if not d.read_only]
    if not wanted:
        return writable
    unknown = [name for name in wanted if name not in {d.target for d in writable}]
    if unknown:
        raise DiskSelectionError(unknown, [d.target for d in writable])
    return [d for d in writable if d.target in wanted]


def domain_definition(domain: lv.Domain, plans: list[_Plan]) -> dict[str, Any]:
    """The VM definition kept with the point: the domain XML and the facts drawn from it."""
    xml = domain.definition_xml()
    facts = lv.domain_facts(xml)
    devices = facts.pop("disk_devices")
    facts["disks"] = [
        {
            "name": p.disk.target,
            "virtual_size": p.size,
            "format": p.disk.format,
            "device": devices.get(p.disk.target),
            "source": p.disk.source,
        }
        for p in plans
    ]
    facts["libvirt_xml"] = xml
    return facts


class _Transport:
    """Where libvirt's NBD server listens: a unix socket in a private folder on this host, or
    TCP (with TLS unless --insecure-tcp) when the domain runs on another host."""

    def __init__(self, options: LibvirtBackupOptions, live_xml: str) -> None:
        self.options = options
        self.remote = lv.is_remote(options.uri)
        self.folder: Path | None = None
        self.tcp: tuple[str, int] | None = None
        if options.nbd is not None:
            self.tcp = _tcp_address(options.nbd)
            if not options.tls_creds and not options.insecure_tcp:
                raise UsageError(
                    f"NBD over plain TCP ({options.nbd}) would send disk contents unencrypted: "
                    "give --tls-creds DIR or allow it with --insecure-tcp"
                )
        elif self.remote:
            raise UsageError(
                f"{options.uri} is another host: give --nbd tcp:HOST:PORT for its NBD export "
                "(with --tls-creds DIR)"
            )
        else:
            self.folder = _private_folder(options.scratch_dir, lv.dac_owner(live_xml))

    def scratch(self, target: str, token: str) -> str:
        if self.folder is not None:
            return str(self.folder / f"{target}.scratch")
        parent = self.options.scratch_dir or DEFAULT_WORK_PARENT
        return str(parent / f"lbrestore-{token}-{target}.scratch")

    @property
    def socket(self) -> str | None:
        return str(self.folder / "nbd.sock") if self.folder is not None else None

    def source(self, export: str) -> NbdSource:
        if self.socket is not None:
            return NbdSource.unix(self.socket, export)
        assert self.tcp is not None
        return NbdSource.tcp(self.tcp[0], self.tcp[1], export, self.options.tls_creds)

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _tcp_address(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("tcp:").rpartition(":")
    if not address.startswith("tcp:") or not host or not port.isdigit():
        raise UsageError(f"--nbd {address}: expected tcp:HOST:PORT with --libvirt")
    return host.strip("[]"), int(port)


RECEIVER_FILE = "receiver"
"""In the private folder: the pid and start time of the receiver that began the job."""


def _process_identity(pid: int) -> str | None:
    """`PID START-TIME` of a live process (not a zombie), so a reused pid does not match."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if stat[0] == "Z" else f"{pid} {stat[19]}"


def _private_folder(parent: Path | None, owner: tuple[int, int] | None) -> Path:
    """A folder only QEMU's user (and root) can enter, for the socket and scratch files; it
    names this receiver, so that a job it leaves behind when killed is known as a leftover."""
    try:
        folder = Path(tempfile.mkdtemp(prefix="lbrestore-", dir=parent or DEFAULT_WORK_PARENT))
        (folder / RECEIVER_FILE).write_text(f"{_process_identity(os.getpid())}\n")
        if owner is not None and os.geteuid() == 0:
            os.chown(folder, *owner)
    except OSError as exc:
        raise AppError(f"cannot create a folder for the NBD socket: {exc}") from exc
    return folder


def end_leftover_job(domain: lv.Domain, prefix: str) -> str | None:
    """End the domain's backup job if a killed receiver of this store left it. Returns what was
    removed, or None when the domain runs no job. Any other job makes the domain busy
    (DomainBusyError).

    A job whose NBD socket lies in an lbrestore private folder is a leftover when the receiver
    that folder names no longer runs. A job over TCP (the receiver may be on another host) is
    this store's when a checkpoint with this store's prefix is visible in libvirt: between
    backups this store keeps none there, so only a job of this store made it; and the caller
    holds this VM's write lock in this store, so the receiver that began the job is gone.
    """
    if not domain.has_job():
        return None
    try:
        socket = lv.backup_socket(domain.backup_xml())
    except QemuError:
        raise DomainBusyError(f"back up {domain.name}", "the domain runs another job") from None
    if socket is None:
        return _end_tcp_leftover(domain, prefix)
    folder = Path(socket).parent
    receiver = None
    if folder.name.startswith("lbrestore-"):
        with contextlib.suppress(OSError):
            receiver = (folder / RECEIVER_FILE).read_text().strip()
    pid = (receiver or "").split()[:1]
    if not pid or not pid[0].isdigit() or _process_identity(int(pid[0])) == receiver:
        raise DomainBusyError(f"back up {domain.name}", "the domain runs another job")
    domain.abort_job()
    shutil.rmtree(folder, ignore_errors=True)
    return f"backup job of a receiver that is gone (process {pid[0]})"


def _end_tcp_leftover(domain: lv.Domain, prefix: str) -> str:
    """See end_leftover_job: a TCP job is ended only when this store's checkpoint shows it."""
    if not any(name.startswith(prefix) for name in domain.checkpoint_names()):
        raise DomainBusyError(f"back up {domain.name}", "the domain runs another job")
    domain.abort_job()
    return "backup job over TCP of this store's receiver that is gone"


async def run_libvirt_backup(
    store: Store, options: LibvirtBackupOptions, hooks: BackupHooks | None = None
) -> BackupSummary:
    """Back up the libvirt domain `options.vm` at `options.uri` into `store` (opened for
    writing): a running domain through a pull-mode backup, an inactive one from its images."""
    from lbrestore.libvirt_offline import backup_inactive

    hooks = hooks or BackupHooks()
    summary = BackupSummary(vm=options.vm)
    started = time.monotonic()
    with lv.connection(options.uri) as conn:
        domain = lv.Domain.lookup(conn, options.vm)
        try:
            if domain.is_active():
                point = await _backup_running(store, domain, options, hooks, summary)
            else:
                point = await backup_inactive(store, domain, options, hooks, summary)
        except Exception as exc:
            record_failure(store, options.vm, exc)
            raise
    summary.point_id, summary.kind = point.id, point.kind
    summary.duration = time.monotonic() - started
    record_events(store, summary)
    return summary


async def _backup_running(
    store: Store,
    domain: lv.Domain,
    options: LibvirtBackupOptions,
    hooks: BackupHooks,
    summary: BackupSummary,
) -> RestorePoint:
    leftover = end_leftover_job(domain, store_prefix(store.identity()["id"]))
    if leftover is not None:
        summary.leftovers_removed.append(leftover)
    live = domain.xml()
    disks = choose_disks(lv.parse_disks(live), options.disks)
    if not disks:
        raise AppError(f"domain {options.vm} has no writable disk to back up")
    transport = _Transport(options, live)
    try:
        return await _backup(store, domain, options, disks, transport, hooks, summary)
    finally:
        transport.close()


async def _backup(
    store: Store,
    domain: lv.Domain,
    options: LibvirtBackupOptions,
    disks: list[lv.DomainDisk],
    transport: _Transport,
    hooks: BackupHooks,
    summary: BackupSummary,
) -> RestorePoint:
    sizes = {d.target: domain.capacity(d.target) for d in disks}
    with store.begin(options.vm) as ingest:
        points = store.restore_points(options.vm)
        prefix = store_prefix(store.identity()["id"])
        # Nothing between the redefinition and the job's own cleanup can fail.
        checkpoints = prepare_checkpoints(domain, prefix, previous_checkpoint(points))
        plans = plan_disks(disks, sizes, newest_by_disk(points), checkpoints, options.full)
        job = _Job(domain, options, transport, plans, checkpoints, summary)
        return await job.run(ingest, hooks)


class _Job:
    """One pull-mode backup: begin, pull, commit, end; checkpoints settled on every path."""

    def __init__(
        self,
        domain: lv.Domain,
        options: LibvirtBackupOptions,
        transport: _Transport,
        plans: list[_Plan],
        checkpoints: Checkpoints,
        summary: BackupSummary,
    ) -> None:
        self.domain = domain
        self.options = options
        self.transport = transport
        self.plans = plans
        self.checkpoints = checkpoints
        self.summary = summary
        self.began = False

    async def run(self, ingest: Ingest, hooks: BackupHooks) -> RestorePoint:
        committed = False
        try:
            definition = domain_definition(self.domain, self.plans)
            self._begin(str(ingest.point_id))
            assert self.checkpoints.new is not None
            definition[CHECKPOINT_KEY] = self.domain.checkpoint_xml(self.checkpoints.new)
            exports = lv.exports(self.domain.backup_xml())
            for plan in self.plans:
                await self._pull(ingest, plan, exports[plan.disk.target], hooks)
            ingest.definition = definition
            point: RestorePoint = ingest.commit()
            committed = True
        finally:
            self._settle(committed)
        return point

    def _begin(self, token: str) -> None:
        """Begin the backup; a checkpoint libvirt finds inconsistent only now makes every
        incremental a resync (the bitmaps were checked when it was redefined, so rarely)."""
        try:
            self._begin_once(token)
        except CheckpointUnusableError as exc:
            for plan in self.plans:
                if plan.mode == "incremental":
                    plan.reason = f"checkpoint {plan.since} unusable: {exc.problem}"
                    plan.mode, plan.since = "resync", None
            self._begin_once(token)

    def _begin_once(self, token: str) -> None:
        new = f"{self.checkpoints.prefix}{token}"
        targets = {p.disk.target for p in self.plans}
        backed = [
            lv.BackupDisk(p.disk.target, self.transport.scratch(p.disk.target, token), p.since)
            for p in self.plans
        ]
        excluded = [d.target for d in lv.parse_disks(self.domain.xml()) if d.target not in targets]
        backup = lv.pull_backup_xml(
            backed,
            excluded,
            socket=self.transport.socket,
            tcp=self.transport.tcp,
            tls=bool(self.options.tls_creds),
        )
        bitmapped = [p.disk.target for p in self.plans if p.disk.can_checkpoint]
        unmarked = [p.disk.target for p in self.plans if not p.disk.can_checkpoint]
        self.domain.begin_pull_backup(backup, lv.checkpoint_xml(new, bitmapped, unmarked))
        self.began = True
        self.checkpoints.new = new

    async def _pull(
        self, ingest: Ingest, plan: _Plan, export: tuple[str, str | None], hooks: BackupHooks
    ) -> None:
        dingest = ingest.add_disk(plan.disk.target, plan.size, mode=plan.mode)
        if dingest.mode != plan.mode:  # the store cannot build on its previous file
            plan.mode, plan.reason = dingest.mode, dingest.reason
        result = DiskSummary(plan.disk.target, plan.mode, plan.reason, plan.size)
        self.summary.disks.append(result)
        name, bitmap = export
        spec = PullSpec(
            self.transport.source(name),
            bitmap if plan.mode == "incremental" else None,
            self.options.chunk,
            self.options.depth,
        )
        await pull_disk(spec, dingest, result, hooks)

    def _settle(self, committed: bool) -> None:
        """End the job and leave exactly one bitmap of this store recording, unknown to
        libvirt: the new one after a commit, else the old one (which covers the new one's)."""
        steps: list[tuple[str, bool]] = []
        old, new = self.checkpoints.old, self.checkpoints.new
        if committed:
            steps = [(n, False) for n in (old,) if n] + [(n, True) for n in (new,) if n]
        else:
            steps = [(n, False) for n in (new,) if n] + [(n, True) for n in (old,) if n]
        if self.began:
            self._try(self.domain.abort_job)
        for name, metadata_only in steps:
            self._try(self.domain.delete_checkpoint, name, metadata_only=metadata_only)

    def _try(self, action: Any, *args: Any, **kwargs: Any) -> None:
        try:
            action(*args, **kwargs)
        except QemuError as exc:
            self.summary.problems.append(str(exc))
