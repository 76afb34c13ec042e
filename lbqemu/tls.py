"""x509 TLS for the NBD pull over TCP: QEMU's credentials object and the libnbd client setup.

One folder serves both ends, in the layout QEMU's `tls-creds-x509` object and libnbd both read:

    ca-cert.pem                       the authority both ends trust (always required)
    server-cert.pem, server-key.pem   QEMU's NBD server (endpoint=server)
    client-cert.pem, client-key.pem   the receiver, as NBD client (optional, as a pair)
    dh-params.pem                     Diffie-Hellman parameters for the server (optional)

Without `dh-params.pem`, QEMU generates 2048-bit DH parameters every time the credentials
object is created (seconds of CPU per backup); `certtool --get-dh-params` writes a standard
group instantly. `TlsCredentials.has_dh_params` lets the caller say so.

When the folder holds a client certificate, QEMU is told to demand one from every client
(verify-peer), so only a holder of a certificate from the CA can read the disks. The receiver
always verifies the server's certificate against `ca-cert.pem`, by host name.

Checking the folder first matters: libnbd given a missing folder falls back to other locations
and fails later with an unhelpful handshake message; here the error names the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nbd

from lbqemu.errors import NbdTlsError, TlsCredentialsError

Endpoint = Literal["server", "client"]

CA_CERT = "ca-cert.pem"
SERVER_FILES = ("server-cert.pem", "server-key.pem")
CLIENT_FILES = ("client-cert.pem", "client-key.pem")
DH_PARAMS = "dh-params.pem"
PEM_MARKER = b"-----BEGIN "


@dataclass(frozen=True)
class TlsCredentials:
    """A checked credentials folder: what it can be used for."""

    path: Path
    has_server_cert: bool
    has_client_cert: bool
    has_dh_params: bool = False


def _check_pem(file: Path) -> None:
    """The file exists, is readable by us, and holds PEM data; else one clear error."""
    if not file.exists():
        raise TlsCredentialsError(str(file), "missing")
    if not file.is_file():
        raise TlsCredentialsError(str(file), "not a regular file")
    try:
        with file.open("rb") as handle:
            head = handle.read(4096)
    except OSError as exc:
        raise TlsCredentialsError(str(file), f"not readable: {exc.strerror or exc}") from exc
    if PEM_MARKER not in head:
        raise TlsCredentialsError(str(file), "not a PEM file (no '-----BEGIN' line)")


def _present(folder: Path, names: tuple[str, ...]) -> bool:
    """Whether a cert/key pair is there; half a pair is an error naming the missing half."""
    found = [(folder / name).exists() for name in names]
    if any(found) and not all(found):
        missing = next(name for name, there in zip(names, found, strict=True) if not there)
        raise TlsCredentialsError(
            str(folder / missing), f"missing (its pair {names[found.index(True)]} is present)"
        )
    return all(found)


def check_creds_dir(
    path: str | Path, endpoint: Endpoint | Literal["both"] = "both"
) -> TlsCredentials:
    """Check a credentials folder for the server end, the client end, or both (lbrestore's case).

    Required: `ca-cert.pem`; the server pair for `server`/`both`. The client pair is optional
    but must be complete; `dh-params.pem` is optional. Raises TlsCredentialsError naming the
    first bad file.
    """
    folder = Path(path)
    if not folder.is_dir():
        problem = "no such folder" if not folder.exists() else "not a folder"
        raise TlsCredentialsError(str(folder), problem)
    _check_pem(folder / CA_CERT)
    has_server = _present(folder, SERVER_FILES)
    if endpoint in ("server", "both") and not has_server:
        _check_pem(folder / SERVER_FILES[0])  # raises "missing" for the certificate
    has_client = _present(folder, CLIENT_FILES)
    has_dh = (folder / DH_PARAMS).exists()
    present = (
        (SERVER_FILES if has_server else ())
        + (CLIENT_FILES if has_client else ())
        + ((DH_PARAMS,) if has_dh else ())
    )
    for name in present:
        _check_pem(folder / name)
    return TlsCredentials(folder.resolve(), has_server, has_client, has_dh)


def tls_creds_object(
    creds_dir: str | Path,
    endpoint: Endpoint = "server",
    id: str = "lbr-tls0",
    verify_peer: bool | None = None,
) -> dict[str, Any]:
    """The arguments of QMP `object-add` for a `tls-creds-x509` object on `creds_dir`.

    `verify_peer=None` means: a client always verifies the server; a server demands client
    certificates when the folder holds a client certificate. The folder is checked first and
    passed as an absolute path (QEMU resolves relative paths against its own working folder).
    """
    creds = check_creds_dir(creds_dir, endpoint)
    if verify_peer is None:
        verify_peer = endpoint == "client" or creds.has_client_cert
    return {
        "qom-type": "tls-creds-x509",
        "id": id,
        "dir": str(creds.path),
        "endpoint": endpoint,
        "verify-peer": verify_peer,
    }


def configure_client(handle: nbd.NBD, creds_dir: str | Path, hostname: str | None = None) -> None:
    """Make a fresh libnbd handle require TLS with these credentials and verify the server.

    The server certificate must name `hostname`. libnbd before 1.22 has no separate TLS host
    name: it checks the host given to `connect_tcp`, so pass that same host (or None).
    """
    if not handle.supports_tls():
        raise NbdTlsError("(not connected)", "this libnbd was built without TLS support")
    creds = check_creds_dir(creds_dir, "client")
    handle.set_tls(nbd.TLS_REQUIRE)
    handle.set_tls_certificates(str(creds.path))
    handle.set_tls_verify_peer(True)
    if hostname is not None and hasattr(handle, "set_tls_hostname"):
        handle.set_tls_hostname(hostname)


def connect_tcp(
    handle: nbd.NBD,
    host: str,
    port: int | str,
    creds_dir: str | Path,
    hostname: str | None = None,
) -> None:
    """Configure TLS on `handle` and connect; a refused or failed handshake raises NbdTlsError.

    The caller sets the export name (and meta contexts) before calling this.
    """
    configure_client(handle, creds_dir, hostname)
    server = f"{host}:{port}"
    try:
        handle.connect_tcp(host, str(port))
    except nbd.Error as exc:
        raise NbdTlsError(server, str(exc.string or exc)) from exc
    if not handle.get_tls_negotiated():  # TLS_REQUIRE should make this impossible
        raise NbdTlsError(server, "the connection is not encrypted")
