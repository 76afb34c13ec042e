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


# --- QMP, discovery, fleecing, NBD pull (lbqemu/qmp.py, discovery.py, fleece.py, nbd.py) ----------


class EndpointAddressError(QemuError):
    """An address given on the command line (`--qmp`, `--nbd`) is malformed (exit code 2)."""

    exit_code = 2

    def __init__(self, address: str, problem: str) -> None:
        self.address = address
        self.problem = problem
        super().__init__(f"address {address!r}: {problem}")


class InsecureTransportError(QemuError):
    """Plain TCP without TLS was requested without the explicit opt-in (exit code 2)."""

    exit_code = 2

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__(
            f"NBD over plain TCP ({address}) would send disk contents unencrypted: "
            "give --tls-creds DIR, use a unix socket, or allow it explicitly with --insecure-tcp"
        )


class QmpConnectError(QemuError):
    """No QMP session could be established with QEMU at `address`."""

    def __init__(self, address: str, problem: str) -> None:
        self.address = address
        self.problem = problem
        super().__init__(f"cannot connect to QEMU's QMP at {address}: {problem}")


class QmpCommandError(QemuError):
    """QEMU answered a QMP command with an error; `error_class` and `desc` are QEMU's own."""

    def __init__(self, command: str, desc: str, error_class: str | None = None) -> None:
        self.command = command
        self.desc = desc
        self.error_class = error_class
        super().__init__(f"QEMU refused {command}: {desc}")


class QmpTimeoutError(QemuError):
    """QEMU did not answer (a command, or an awaited event) within `timeout` seconds."""

    def __init__(self, what: str, timeout: float) -> None:
        self.what = what
        self.timeout = timeout
        super().__init__(f"QEMU: no answer to {what} within {timeout:g} s")


class QmpDisconnectedError(QemuError):
    """The QMP connection was lost (QEMU exited or closed the socket)."""

    def __init__(self, address: str, problem: str) -> None:
        self.address = address
        self.problem = problem
        super().__init__(f"lost the QMP connection to {address}: {problem}")


class QemuJobError(QemuError):
    """A QEMU block job failed or ended unexpectedly; `problem` is QEMU's error text."""

    def __init__(self, job_id: str, problem: str) -> None:
        self.job_id = job_id
        self.problem = problem
        super().__init__(f"QEMU job {job_id}: {problem}")


class DiskSelectionError(QemuError):
    """`--disk` named a disk the VM does not have (exit code 2); lists the disks it has."""

    exit_code = 2

    def __init__(self, unknown: list[str], available: list[str]) -> None:
        self.unknown = unknown
        self.available = available
        have = ", ".join(available) or "none"
        super().__init__(f"no such disk: {', '.join(unknown)} (the VM has: {have})")


class NbdError(QemuError):
    """Reading a point-in-time view over NBD failed; `problem` is libnbd's message."""

    def __init__(self, export: str, problem: str) -> None:
        self.export = export
        self.problem = problem
        super().__init__(f"NBD export {export}: {problem}")


class PullCancelledError(QemuError):
    """The NBD pull was stopped on request (Ctrl-C or another failure of the job)."""

    def __init__(self, export: str) -> None:
        self.export = export
        super().__init__(f"NBD export {export}: pull cancelled")


class BackupInProgressError(QemuError):
    """Another receiver on this host is backing up the same VM right now (its `pid`)."""

    def __init__(self, pid: int, scratch: str) -> None:
        self.pid = pid
        self.scratch = scratch
        super().__init__(
            f"another backup of this VM is running (process {pid}, scratch folder {scratch}): "
            "QEMU has one NBD server, so backups of one VM run one at a time"
        )


# --- libvirt (lbqemu/libvirt.py) ----------------------------------------------------------------


class LibvirtError(QemuError):
    """libvirt refused a call or could not be reached; `operation` says what was asked,
    `problem` is libvirt's own message and `code` its error number (VIR_ERR_*), when known."""

    def __init__(self, operation: str, problem: str, code: int | None = None) -> None:
        self.operation = operation
        self.problem = problem
        self.code = code
        super().__init__(f"libvirt: {operation}: {problem}")


class LibvirtUnavailableError(LibvirtError):
    """libvirt's Python bindings are not installed (Debian package python3-libvirt)."""

    def __init__(self) -> None:
        super().__init__("import", "the Python bindings are missing (install python3-libvirt)")


class CheckpointUnusableError(LibvirtError):
    """A checkpoint cannot be redefined or backed up from: its bitmap is missing or broken
    (libvirt's VIR_ERR_CHECKPOINT_INCONSISTENT) or libvirt refused its XML. The backup job
    answers with a resync."""


class DomainBusyError(LibvirtError):
    """The domain runs another job (a backup by another tool or receiver): libvirt allows one
    at a time (exit code 4, as a busy store)."""

    exit_code = 4
