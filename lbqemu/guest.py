"""qemu-guest-agent client: freeze the guest's filesystems around the point-in-time transaction.

The agent speaks QMP-like JSON over a unix socket (the host end of the VM's
`org.qemu.guest_agent.0` virtio-serial port, or a `qemu-ga -m unix-listen` socket) but sends no
greeting and keeps no per-client state: replies that an earlier client never read may still be
queued. Every exchange therefore starts with `guest-sync-delimited`: the agent answers it with a
0xFF byte followed by the echoed id, so everything before the matching reply is stale and dropped.
Every exchange has a timeout, because a VM without a running agent accepts the connection and
never answers.

`GuestAgent` is the protocol plumbing; `frozen()` is the meaning: freeze before the block, thaw
after it on every path, and report what happened. A refused freeze is not fatal (the backup is
then crash-consistent, and the report says why); an agent that cannot be reached or does not
answer is an error, and so is a thaw that fails after a successful freeze.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lbqemu.errors import (
    GuestAgentError,
    GuestAgentTimeoutError,
    GuestAgentUnavailableError,
    GuestThawError,
)

RESYNC_BYTE = b"\xff"
"""Sent before `guest-sync-delimited` to reset the agent's JSON parser; precedes its reply."""

MAX_REPLY_BYTES = 1 << 20
DEFAULT_TIMEOUT = 10.0


def agent_socket_path(address: str) -> Path:
    """The socket path of a `unix:PATH` agent address; anything else is refused."""
    scheme, sep, rest = address.partition(":")
    if not sep or scheme != "unix" or not rest:
        raise GuestAgentError(address, "unsupported agent address (expected unix:PATH)")
    return Path(rest)


class GuestAgent:
    """One connection to a qemu-guest-agent. Protocol only: knows commands, not backups."""

    def __init__(
        self,
        address: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        timeout: float,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, address: str, timeout: float = DEFAULT_TIMEOUT) -> GuestAgent:
        """Open the agent's socket (no sync yet); a missing or dead socket raises at once."""
        path = agent_socket_path(address)
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(path, limit=MAX_REPLY_BYTES)
        except TimeoutError:
            raise GuestAgentTimeoutError(address, "connect", timeout) from None
        except FileNotFoundError:
            raise GuestAgentUnavailableError(address, f"no agent socket at {path}") from None
        except ConnectionRefusedError:
            raise GuestAgentUnavailableError(
                address, f"nothing is listening on {path} (agent not running?)"
            ) from None
        except OSError as exc:
            raise GuestAgentUnavailableError(
                address, f"cannot connect to {path}: {exc.strerror or exc}"
            ) from exc
        return cls(address, reader, writer, timeout)

    async def close(self) -> None:
        """Close the connection; never raises (the agent may already be gone)."""
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def sync(self) -> None:
        """Flush stale replies: `guest-sync-delimited` with a fresh id, drop all before its echo."""
        sync_id = random.randrange(1, 1 << 31)
        request = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
        async with self._deadline("guest-sync-delimited"):
            await self._write(RESYNC_BYTE + json.dumps(request).encode())
            while True:
                await self._read_until_marker()
                reply = await self._read_reply_line()
                if reply.get("return") == sync_id:
                    return

    async def send_command(self, command: str, arguments: dict[str, Any] | None = None) -> None:
        """Send one command without waiting for its reply (see `read_reply`)."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        async with self._deadline(command):
            await self._write(json.dumps(request).encode())

    async def read_reply(self, command: str) -> Any:
        """Read the reply to `command`; an agent error raises GuestAgentError with its text."""
        async with self._deadline(command):
            reply = await self._read_reply_line()
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            text = f"{error.get('class', 'Error')}: {error.get('desc', reply['error'])}"
            raise GuestAgentError(
                self.address, "the agent refused", command=command, agent_error=text
            )
        if "return" not in reply:
            raise GuestAgentError(self.address, f"unexpected reply {reply!r}", command=command)
        return reply["return"]

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Sync, then run one command and return its result."""
        await self.sync()
        await self.send_command(command, arguments)
        return await self.read_reply(command)

    async def fsfreeze_status(self) -> str:
        """`thawed` or `frozen`, as the agent sees it."""
        return str(await self.execute("guest-fsfreeze-status"))

    async def fsfreeze_freeze(self) -> int:
        """Freeze every guest filesystem; returns how many were frozen."""
        return int(await self.execute("guest-fsfreeze-freeze"))

    async def fsfreeze_thaw(self) -> int:
        """Thaw every guest filesystem; returns how many were thawed (0 if none was frozen)."""
        return int(await self.execute("guest-fsfreeze-thaw"))

    @contextlib.asynccontextmanager
    async def _deadline(self, command: str) -> AsyncIterator[None]:
        """Bound one exchange by the timeout; turn it into GuestAgentTimeoutError."""
        try:
            async with asyncio.timeout(self.timeout):
                yield
        except TimeoutError:
            raise GuestAgentTimeoutError(self.address, command, self.timeout) from None

    async def _write(self, data: bytes) -> None:
        try:
            self._writer.write(data + b"\n")
            await self._writer.drain()
        except OSError as exc:
            raise GuestAgentUnavailableError(
                self.address, f"connection lost: {exc.strerror or exc}"
            ) from exc

    async def _read_until_marker(self) -> None:
        try:
            await self._reader.readuntil(RESYNC_BYTE)
        except asyncio.IncompleteReadError:
            raise GuestAgentUnavailableError(
                self.address, "the agent closed the connection"
            ) from None
        except asyncio.LimitOverrunError as exc:
            # Stale output longer than the buffer: drop it and keep looking for the marker.
            await self._reader.readexactly(exc.consumed)
            await self._read_until_marker()
        except OSError as exc:
            raise GuestAgentUnavailableError(self.address, f"connection lost: {exc}") from exc

    async def _read_reply_line(self) -> dict[str, Any]:
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            raise GuestAgentUnavailableError(
                self.address, "the agent closed the connection"
            ) from None
        except (asyncio.LimitOverrunError, OSError) as exc:
            raise GuestAgentUnavailableError(self.address, f"unreadable reply: {exc}") from exc
        try:
            reply = json.loads(line.decode("utf-8", errors="replace"))
        except json.JSONDecodeError as exc:
            raise GuestAgentError(self.address, f"malformed reply {line[:200]!r}") from exc
        if not isinstance(reply, dict):
            raise GuestAgentError(self.address, f"malformed reply {line[:200]!r}")
        return reply


@dataclass
class FreezeReport:
    """What `frozen()` did, for the backup summary and the event log.

    `frozen` is true only when the agent froze at least one filesystem; then the restore point is
    filesystem-consistent. Otherwise `refused` says why, and the point is crash-consistent.
    """

    address: str
    frozen: bool = False
    filesystems: int | None = None
    refused: str | None = None
    thaw_attempted: bool = False
    thawed: bool = False
    thaw_error: str | None = None
    frozen_seconds: float | None = None

    @property
    def consistency(self) -> str:
        """`filesystem` when the guest was frozen around the transaction, else `crash`."""
        return "filesystem" if self.frozen else "crash"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {**asdict(self), "consistency": self.consistency}


@contextlib.asynccontextmanager
async def frozen(qga_address: str, timeout: float = DEFAULT_TIMEOUT) -> AsyncIterator[FreezeReport]:
    """Freeze the guest's filesystems for the duration of the block; always thaw afterwards.

    Raises GuestAgentUnavailableError / GuestAgentTimeoutError before the block when the agent
    cannot be reached or does not answer (after a best-effort thaw if a freeze was sent), and
    GuestThawError after the block when a successful freeze could not be undone. A freeze that
    the agent refuses is reported in the yielded FreezeReport and the block runs anyway.
    """
    report = FreezeReport(address=qga_address)
    agent = await GuestAgent.connect(qga_address, timeout)
    try:
        await agent.sync()  # no agent answering: fail here, before anything is sent
        freeze_sent = False
        frozen_at = time.monotonic()
        try:
            freeze_sent = await _freeze(agent, report)
            frozen_at = time.monotonic()
            yield report
        finally:
            if freeze_sent:
                await _thaw_even_if_cancelled(agent, report)
                if report.frozen:
                    report.frozen_seconds = time.monotonic() - frozen_at
            if report.frozen and not report.thawed:
                # Raised even when the block failed: a guest left frozen is the urgent news;
                # the block's error stays attached as __context__.
                raise GuestThawError(
                    qga_address,
                    "thaw failed, the guest's filesystems may still be frozen",
                    command="guest-fsfreeze-thaw",
                    agent_error=report.thaw_error,
                )
    finally:
        await agent.close()


async def _freeze(agent: GuestAgent, report: FreezeReport) -> bool:
    """Ask for the freeze; record a refusal in the report. Returns whether a freeze was sent.

    Not sent when the guest is already frozen by someone else: that freeze is not ours to undo.
    A timeout, a lost connection or a cancellation while the freeze is in flight raises, once
    the thaw has been attempted (the agent runs commands in order: the thaw follows the freeze).
    """
    try:
        if await agent.fsfreeze_status() == "frozen":
            report.refused = "the guest is already frozen by another client"
            return False
    except (GuestAgentTimeoutError, GuestAgentUnavailableError):
        raise
    except GuestAgentError:
        pass  # status not offered by this agent: go on with the freeze
    try:
        count = await agent.fsfreeze_freeze()
    except (GuestAgentTimeoutError, GuestAgentUnavailableError, asyncio.CancelledError):
        # The freeze may have happened (or may still happen): undo it before giving up.
        await _thaw_even_if_cancelled(agent, report)
        raise
    except GuestAgentError as exc:
        report.refused = f"the agent refused to freeze: {exc.agent_error or exc.problem}"
        return True
    report.filesystems = count
    report.frozen = count > 0
    if not report.frozen:
        report.refused = "the agent found no filesystem to freeze"
    return True


async def _thaw_even_if_cancelled(agent: GuestAgent, report: FreezeReport) -> None:
    """Thaw and record the outcome; a cancellation waits for the (time-bounded) thaw to end."""
    task = asyncio.ensure_future(_thaw(agent, report))
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


async def _thaw(agent: GuestAgent, report: FreezeReport) -> None:
    report.thaw_attempted = True
    try:
        await agent.fsfreeze_thaw()
    except GuestAgentError as exc:
        report.thaw_error = exc.agent_error or exc.problem
    else:
        report.thawed = True
