"""Errors raised by lbqemu. Every class carries a stable exit code for the CLI."""

from __future__ import annotations


class QemuError(Exception):
    """Root of every error that lbqemu raises on purpose (exit code 1)."""

    exit_code = 1


# --- qemu-guest-agent (lbqemu/guest.py) ---------------------------------------------------------


class GuestAgentError(QemuError):
    """The qemu-guest-agent could not do what was asked.

    `address` is the agent's socket address, `command` the agent command involved (or None),
    `agent_error` the agent's own error text when the agent answered with an error.
    """

    def __init__(
        self,
        address: str,
        problem: str,
        *,
        command: str | None = None,
        agent_error: str | None = None,
    ) -> None:
        self.address = address
        self.problem = problem
        self.command = command
        self.agent_error = agent_error
        what = f" ({command})" if command else ""
        detail = f": {agent_error}" if agent_error else ""
        super().__init__(f"guest agent {address}{what}: {problem}{detail}")


class GuestAgentUnavailableError(GuestAgentError):
    """No guest agent could be reached at the address (no socket, nobody listening, closed)."""


class GuestAgentTimeoutError(GuestAgentError):
    """The guest agent did not answer within `timeout` seconds (no agent running in the guest?)."""

    def __init__(self, address: str, command: str, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(address, f"no answer within {timeout:g} s", command=command)


class GuestThawError(GuestAgentError):
    """Thawing after a successful freeze failed: the guest filesystems may still be frozen."""


# --- TLS credentials (lbqemu/tls.py) ------------------------------------------------------------


class TlsCredentialsError(QemuError):
    """A TLS credentials folder is unusable; `path` names the file or folder, `problem` says why."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"TLS credentials {path}: {problem}")


class NbdTlsError(QemuError):
    """An NBD connection over TLS failed (handshake refused, certificate not trusted, no TLS).

    `server` is the NBD server address, `problem` the underlying libnbd message.
    """

    def __init__(self, server: str, problem: str) -> None:
        self.server = server
        self.problem = problem
        super().__init__(f"NBD over TLS to {server} failed: {problem}")
