"""A QMP session with QEMU on top of qemu.qmp's QMPClient: connect retry, commands, events, jobs.

This module is the plumbing only (addresses, retries, error mapping, event waiting); what the
commands mean for a backup lives in bitmaps.py and fleece.py. Everything is async: a CLI command
makes one asyncio.run() around the whole job.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from qemu.qmp import ConnectError, EventListener, QMPClient, QMPError
from qemu.qmp.qmp_client import ExecuteError

from lbqemu.errors import (
    EndpointAddressError,
    QemuJobError,
    QmpCommandError,
    QmpConnectError,
    QmpDisconnectedError,
    QmpTimeoutError,
)

DEFAULT_CONNECT_TIMEOUT = 30.0
DEFAULT_COMMAND_TIMEOUT = 120.0
DISCONNECT_TIMEOUT = 10.0
JOB_EVENTS = ("JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR")

SocketAddress = str | tuple[str, int]


def parse_address(address: str) -> SocketAddress:
    """`unix:PATH` -> PATH, `tcp:HOST:PORT` -> (HOST, PORT); else an EndpointAddressError."""
    kind, sep, rest = address.partition(":")
    if not sep or not rest:
        raise EndpointAddressError(address, "expected unix:PATH or tcp:HOST:PORT")
    if kind == "unix":
        return rest
    if kind == "tcp":
        host, sep, port = rest.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise EndpointAddressError(address, "expected tcp:HOST:PORT with a port in 1..65535")
        return (host, int(port))
    raise EndpointAddressError(
        address, f"unknown address kind {kind!r}: use unix:PATH or tcp:HOST:PORT"
    )


class QmpSession:
    """One QMP connection to QEMU. Use as `async with QmpSession(address) as qmp:`."""

    def __init__(
        self,
        address: str,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
    ) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._target = parse_address(address)
        self._client = QMPClient("lbrestore")

    async def __aenter__(self) -> QmpSession:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect, retrying while the socket is missing or QEMU does not accept yet.

        A QMP monitor serves one client at a time: a connection that is accepted but never
        greeted (another client holds the monitor) fails at the deadline with a clear error."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        delay = 0.02
        while True:
            self._client = QMPClient("lbrestore")
            try:
                left = max(deadline - loop.time(), 0.05)
                await asyncio.wait_for(self._client.connect(self._target), left)
                return
            except TimeoutError as exc:
                await self.close()
                raise QmpConnectError(
                    self.address,
                    "QEMU accepted the connection but did not greet within "
                    f"{self.connect_timeout:g} s (is another client using this monitor?)",
                ) from exc
            except ConnectError as exc:
                if loop.time() + delay > deadline:
                    cause = exc.exc if getattr(exc, "exc", None) else exc
                    raise QmpConnectError(self.address, str(cause) or repr(cause)) from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def close(self) -> None:
        """Disconnect; errors of an already broken connection are ignored, and a peer that
        never lets go does not hold the caller longer than DISCONNECT_TIMEOUT."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.disconnect(), DISCONNECT_TIMEOUT)

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Run one QMP command and return its result; QEMU's error text becomes QmpCommandError."""
        limit = self.command_timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), limit)
        except ExecuteError as exc:
            raise QmpCommandError(command, str(exc), exc.error_class) from exc
        except TimeoutError as exc:
            raise QmpTimeoutError(command, limit) from exc
        except (QMPError, EOFError, OSError) as exc:
            # ExecInterruptedError, StateError (disconnecting), protocol errors: the session
            # is gone or unusable.
            raise QmpDisconnectedError(self.address, str(exc) or type(exc).__name__) from exc

    async def transaction(self, actions: list[dict[str, Any]]) -> None:
        """Run QMP `transaction`: all actions happen at one instant, or none of them."""
        if actions:
            await self.execute("transaction", {"actions": actions})

    @contextlib.contextmanager
    def listener(
        self, names: Iterable[str], event_filter: Callable[[dict[str, Any]], bool] | None = None
    ) -> Any:
        """Listen for events; enter BEFORE executing the command that triggers them."""
        with self._client.listener(tuple(names), event_filter) as listener:  # type: ignore[arg-type]
            yield listener

    async def next_event(self, listener: EventListener, what: str, timeout: float) -> Any:
        """The next event from `listener`, or QmpTimeoutError naming `what` was awaited."""
        try:
            return await asyncio.wait_for(listener.get(), timeout)
        except TimeoutError as exc:
            raise QmpTimeoutError(what, timeout) from exc

    @contextlib.asynccontextmanager
    async def job_watch(self, job_id: str) -> AsyncIterator[JobWatch]:
        """Watch one job's events from before it is started until the block is left."""

        def mine(event: Any) -> bool:
            data = event.get("data", {})
            return data.get("id") == job_id or data.get("device") == job_id

        with self.listener(JOB_EVENTS, mine) as listener:
            yield JobWatch(self, job_id, listener)


class JobWatch:
    """Waits for a QEMU job's status changes (JOB_STATUS_CHANGE / BLOCK_JOB_* events)."""

    def __init__(self, session: QmpSession, job_id: str, listener: EventListener) -> None:
        self.session = session
        self.job_id = job_id
        self.listener = listener
        self.status = "created"
        self.error: str | None = None

    async def wait_status(self, *wanted: str, timeout: float) -> str:
        """Wait until the job reaches one of `wanted` statuses (or concludes); returns it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.status not in wanted and self.status not in ("concluded", "null"):
            left = max(deadline - loop.time(), 0.0)
            event = await self.session.next_event(self.listener, f"job {self.job_id}", left)
            data = event.get("data", {})
            if event["event"] == "JOB_STATUS_CHANGE":
                self.status = data["status"]
            elif event["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
                self.error = data.get("error", self.error)
            elif event["event"] == "BLOCK_JOB_ERROR":
                self.error = f"I/O error ({data.get('operation')}, {data.get('action')})"
        return self.status

    async def cancel(self, *, timeout: float) -> None:
        """Cancel the job and dismiss it once concluded; a job already gone is fine."""
        try:
            await self.session.execute("job-cancel", {"id": self.job_id})
        except QmpCommandError:
            return
        await self.wait_status("concluded", timeout=timeout)
        with contextlib.suppress(QmpCommandError):
            await self.session.execute("job-dismiss", {"id": self.job_id})

    def raise_if_failed(self) -> None:
        """QemuJobError when the job reported an error."""
        if self.error:
            raise QemuJobError(self.job_id, self.error)
