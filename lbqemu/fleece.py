"""Point-in-time views of running disks (fleecing) and their NBD export.

Why blockdev-backup sync=none and not the copy-before-write filter + snapshot-access driver:
QEMU 7.2 has both, but inserting the copy-before-write filter above a disk that a guest device
already uses needs `blockdev-replace` (QEMU 9.x); in 7.2 the filter can only be placed when the
device is created. blockdev-backup sync=none inserts that same filter itself, for the job's
lifetime, on any live disk, and it is a `transaction` action, so every disk's view and the
bitmap changes happen at one instant. The job's target is a scratch qcow2 whose backing is the
disk's own node: reads of clusters the guest has not rewritten fall through to the disk, and a
guest write first copies the old cluster into the scratch file. Exporting the scratch node
over NBD gives the view; `bitmaps: [old]` offers the `qemu:dirty-bitmap:<old>` meta context,
found by QEMU through the backing chain.

Everything this module creates in QEMU carries the `lbr-` prefix, so that leftovers of a
receiver that was killed can be recognised and removed (`remove_leftovers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lbqemu.discovery import DiskInfo
from lbqemu.errors import (
    BackupInProgressError,
    EndpointAddressError,
    InsecureTransportError,
    QemuJobError,
    QmpCommandError,
)
from lbqemu.qmp import JobWatch, QmpSession, parse_address

SCRATCH_PREFIX = "lbr-scratch-"
OWNER_FILE = "owner"  # "<host> <pid>" of the receiver that made the scratch folder
JOB_TIMEOUT = 60.0
UNIX_PATH_MAX = 100  # sockaddr_un.sun_path is 108 bytes on Linux, with its NUL


@dataclass(frozen=True)
class NbdEndpoint:
    """Where QEMU's NBD server listens: a unix socket, or TCP (with TLS unless insecure)."""

    path: str | None = None
    host: str | None = None
    port: int | None = None
    tls_creds_dir: str | None = None

    @property
    def is_tcp(self) -> bool:
        return self.path is None

    def qmp_addr(self) -> dict[str, Any]:
        """The `addr` argument of nbd-server-start."""
        if self.path is not None:
            return {"type": "unix", "data": {"path": self.path}}
        return {"type": "inet", "data": {"host": self.host, "port": str(self.port)}}

    def describe(self) -> str:
        return f"unix:{self.path}" if self.path else f"tcp:{self.host}:{self.port}"


def nbd_endpoint(
    address: str | None,
    scratch_dir: Path,
    *,
    tls_creds_dir: str | None = None,
    insecure_tcp: bool = False,
) -> NbdEndpoint:
    """The NBD endpoint for `--nbd` (default: a unix socket in the scratch folder).

    Plain TCP sends disk contents in clear: refused unless TLS or the explicit opt-in."""
    if address is None:
        return NbdEndpoint(path=str(scratch_dir / "nbd.sock"))
    target = parse_address(address)
    if isinstance(target, str):
        if tls_creds_dir:
            raise EndpointAddressError(address, "--tls-creds needs a tcp:HOST:PORT NBD address")
        return NbdEndpoint(path=target)
    if not tls_creds_dir and not insecure_tcp:
        raise InsecureTransportError(address)
    return NbdEndpoint(host=target[0], port=target[1], tls_creds_dir=tls_creds_dir)


@dataclass
class ExportedDisk:
    """One disk's view: the scratch node, the job that fills it, and its NBD export."""

    disk: DiskInfo
    index: int
    token: str
    scratch: Path
    bitmap: str | None
    watch: JobWatch | None = None

    @property
    def node(self) -> str:
        return f"lbr-fl{self.index}-{self.token}"

    @property
    def file_node(self) -> str:
        return f"lbr-fs{self.index}-{self.token}"

    @property
    def job_id(self) -> str:
        return f"lbr-job{self.index}-{self.token}"

    @property
    def export_id(self) -> str:
        return f"lbr-ex{self.index}-{self.token}"

    @property
    def export_name(self) -> str:
        """The NBD export name: the disk's name."""
        return self.disk.name


@dataclass
class PointInTimeView:
    """The fleecing views of several disks, created at one instant and exported over NBD.

    `async with view:` sets everything up (`extra_actions`, e.g. the bitmap changes, join the
    same transaction; `around_transaction`, e.g. a guest filesystem freeze, wraps just that
    transaction) and tears it all down in reverse order on every path."""

    session: QmpSession
    disks: list[tuple[DiskInfo, str | None]]
    endpoint_address: str | None = None
    token: str = "0"
    extra_actions: list[dict[str, Any]] = field(default_factory=list)
    tls_object: dict[str, Any] | None = None
    tls_creds_dir: str | None = None
    insecure_tcp: bool = False
    scratch_parent: Path | None = None
    around_transaction: Callable[[], AbstractAsyncContextManager[Any]] | None = None
    exports: list[ExportedDisk] = field(default_factory=list)
    transaction_done: bool = False
    teardown_problems: list[str] = field(default_factory=list)
    _scratch_dir: Path | None = None
    _endpoint: NbdEndpoint | None = None
    _undo: list[tuple[str, Any]] = field(default_factory=list)
    _stack: contextlib.AsyncExitStack | None = None

    @property
    def endpoint(self) -> NbdEndpoint:
        assert self._endpoint is not None, "view not open"
        return self._endpoint

    async def __aenter__(self) -> PointInTimeView:
        try:
            await self._open()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _open(self) -> None:
        parent = str(self.scratch_parent) if self.scratch_parent else None
        self._scratch_dir = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=parent))
        self._undo.append(("scratch-dir", self._scratch_dir))
        (self._scratch_dir / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        socket_dir = self._scratch_dir
        if len(str(socket_dir / "nbd.sock")) > UNIX_PATH_MAX:
            # A unix socket path has a hard length limit: use a short folder of our own.
            socket_dir = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX))
            self._undo.append(("scratch-dir", socket_dir))
        self._endpoint = nbd_endpoint(
            self.endpoint_address,
            socket_dir,
            tls_creds_dir=self.tls_creds_dir,
            insecure_tcp=self.insecure_tcp,
        )
        for i, (disk, bitmap) in enumerate(self.disks):
            exp = ExportedDisk(disk, i, self.token, self._scratch_dir / f"{i}.qcow2", bitmap)
            self.exports.append(exp)
        # Disks side by side: QEMU runs the scratch creation jobs together, and no disk's
        # round trips wait for another's.
        await _all(self._add_scratch_node(exp) for exp in self.exports)
        await self._start_jobs()
        await self._start_server()
        await _all(self._export(exp) for exp in self.exports)

    async def _export(self, exp: ExportedDisk) -> None:
        """Export one disk's view over NBD, read-only, with its dirty bitmap when it has one."""
        await self.session.execute(
            "block-export-add",
            {
                "type": "nbd",
                "id": exp.export_id,
                "node-name": exp.node,
                "name": exp.export_name,
                "writable": False,
                "bitmaps": [exp.bitmap] if exp.bitmap else [],
            },
        )
        self._undo.append(("export", exp.export_id))

    async def _add_scratch_node(self, exp: ExportedDisk) -> None:
        """A scratch qcow2 backed by the disk's node: it will hold the old data of rewrites.

        Formatted by QEMU itself (a blockdev-create job), not by a qemu-img process: no
        process start per disk."""
        exp.scratch.touch()
        await self.session.execute(
            "blockdev-add",
            {
                "driver": "file",
                "node-name": exp.file_node,
                "filename": str(exp.scratch),
                # Throwaway data: flushes (qcow2 creation, copy-before-write) would only wait.
                "cache": {"no-flush": True},
            },
        )
        self._undo.append(("node", exp.file_node))
        await self._create_job(
            f"lbr-mkq{exp.index}-{exp.token}",
            {
                "driver": "qcow2",
                "file": exp.file_node,
                "size": exp.disk.virtual_size,
                "cluster-size": max(exp.disk.cluster_size, 65536),
            },
        )
        await self.session.execute(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": exp.node,
                "file": exp.file_node,
                "backing": exp.disk.node_name,
                "discard": "unmap",
                "cache": {"no-flush": True},
            },
        )
        self._undo.append(("node", exp.node))

    async def _create_job(self, job_id: str, options: dict[str, Any]) -> None:
        """Run one blockdev-create job to its end; its error becomes QemuJobError."""
        async with self.session.job_watch(job_id) as watch:
            await self.session.execute("blockdev-create", {"job-id": job_id, "options": options})
            await watch.wait_status("concluded", timeout=JOB_TIMEOUT)
            jobs = await self.session.execute("query-jobs")
            error = next((j.get("error") for j in jobs if j.get("id") == job_id), None)
            with contextlib.suppress(QmpCommandError):
                await self.session.execute("job-dismiss", {"id": job_id})
        if error:
            raise QemuJobError(job_id, f"creating the scratch file failed: {error}")

    async def _start_jobs(self) -> None:
        """One transaction: the extra (bitmap) actions plus a fleecing job per disk."""
        self._stack = contextlib.AsyncExitStack()
        actions = list(self.extra_actions)
        for exp in self.exports:
            exp.watch = await self._stack.enter_async_context(self.session.job_watch(exp.job_id))
            actions.append(
                {
                    "type": "blockdev-backup",
                    "data": {
                        "job-id": exp.job_id,
                        "device": exp.disk.node_name,
                        "target": exp.node,
                        "sync": "none",
                    },
                }
            )
        guard = self.around_transaction() if self.around_transaction else contextlib.nullcontext()
        async with guard:
            await self.session.transaction(actions)
        self.transaction_done = True
        for exp in self.exports:
            self._undo.append(("job", exp))

    async def _start_server(self) -> None:
        server: dict[str, Any] = {"addr": self.endpoint.qmp_addr()}
        if self.tls_object is not None:
            await self.session.execute("object-add", self.tls_object)
            self._undo.append(("object", self.tls_object["id"]))
            server["tls-creds"] = self.tls_object["id"]
        await self.session.execute("nbd-server-start", server)
        self._undo.append(("server", None))

    def check_jobs(self) -> None:
        """Raise QemuJobError when a fleecing job failed (its view would be wrong)."""
        for exp in self.exports:
            if exp.watch is not None:
                exp.watch.raise_if_failed()

    async def close(self) -> None:
        """Undo everything in reverse order; problems are collected, never raised."""
        while self._undo:
            kind, what = self._undo.pop()
            try:
                await self._undo_one(kind, what)
            except Exception as exc:  # every later step (the scratch files) must still run
                self.teardown_problems.append(f"{kind} {what}: {exc}")
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None

    async def _undo_one(self, kind: str, what: Any) -> None:
        if kind == "export":
            await self.session.execute("block-export-del", {"id": what, "mode": "hard"})
        elif kind == "server":
            await self.session.execute("nbd-server-stop")
        elif kind == "object":
            await self.session.execute("object-del", {"id": what})
        elif kind == "job":
            assert isinstance(what, ExportedDisk) and what.watch is not None
            await what.watch.cancel(timeout=JOB_TIMEOUT)
        elif kind == "node":
            await _blockdev_del(self.session, what)
        elif kind == "scratch-dir":
            shutil.rmtree(what, ignore_errors=True)


async def _all(steps: Iterable[Awaitable[None]]) -> None:
    """Run `steps` side by side, wait until every one has ended, then raise the first failure.

    Waiting for all (not stopping at the first error) means that every step has recorded what
    it made in QEMU before the view's cleanup starts undoing it."""
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def _blockdev_del(session: QmpSession, node: str) -> None:
    """blockdev-del, retried briefly: a just-deleted export may still hold the node."""
    for attempt in range(50):
        try:
            await session.execute("blockdev-del", {"node-name": node})
            return
        except QmpCommandError:
            if attempt == 49:
                raise
            await asyncio.sleep(0.05)


async def remove_leftovers(session: QmpSession) -> list[str]:
    """Remove exports, jobs and scratch nodes a killed receiver left in QEMU; returns what.

    A receiver on this host that is still alive is not a leftover: BackupInProgressError.

    The NBD server is stopped too when no other export remains, so that the next backup can
    start its own."""
    nodes = await session.execute("query-named-block-nodes", {"flat": True})
    for node in nodes:
        if str(node.get("node-name", "")).startswith("lbr-fs"):
            _refuse_if_owner_alive(node.get("image", {}).get("filename") or node.get("file"))
    removed: list[str] = []
    exports = await session.execute("query-block-exports")
    for exp in exports:
        if str(exp.get("id", "")).startswith("lbr-"):
            with contextlib.suppress(QmpCommandError):
                await session.execute("block-export-del", {"id": exp["id"], "mode": "hard"})
                removed.append(f"export {exp['id']}")
    for job in await session.execute("query-jobs"):
        job_id = str(job.get("id", ""))
        if job_id.startswith("lbr-"):
            async with session.job_watch(job_id) as watch:
                await watch.cancel(timeout=JOB_TIMEOUT)
            removed.append(f"job {job_id}")
    if removed:  # the usual case, nothing left over, asks QEMU once per kind of thing
        nodes = await session.execute("query-named-block-nodes", {"flat": True})
    # Format nodes first: each holds its file node.
    for prefix in ("lbr-fl", "lbr-fs"):
        for node in nodes:
            name = str(node.get("node-name", ""))
            if not name.startswith(prefix):
                continue
            filename = node.get("image", {}).get("filename") or node.get("file")
            with contextlib.suppress(QmpCommandError):
                await _blockdev_del(session, name)
                removed.append(f"node {name}")
                _remove_scratch_file(filename)
    objects = [
        str(obj.get("name", ""))
        for obj in await session.execute("qom-list", {"path": "/objects"})
        if str(obj.get("name", "")).startswith("lbr-")
        and str(obj.get("type", "")).startswith("child<")
    ]
    if (removed or objects) and not await session.execute("query-block-exports"):
        with contextlib.suppress(QmpCommandError):
            await session.execute("nbd-server-stop")
    for name in objects:  # TLS credentials, once the server that used them is gone
        with contextlib.suppress(QmpCommandError):
            await session.execute("object-del", {"id": name})
            removed.append(f"object {name}")
    return removed


def _refuse_if_owner_alive(filename: object) -> None:
    """BackupInProgressError when a scratch file belongs to a live receiver on this host."""
    if not isinstance(filename, str):
        return
    folder = Path(filename).parent
    try:
        host, pid_text = (folder / OWNER_FILE).read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return  # not readable here (QEMU on another host?) or not ours: a leftover
    if host != socket.gethostname() or pid == os.getpid():
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    except PermissionError:
        pass  # alive, owned by someone else
    raise BackupInProgressError(pid, str(folder))


def _remove_scratch_file(filename: object) -> None:
    """Delete a leftover scratch file and its folder, only if it is one of ours."""
    if not isinstance(filename, str):
        return
    path = Path(filename)
    if path.parent.name.startswith(SCRATCH_PREFIX):
        shutil.rmtree(path.parent, ignore_errors=True)
