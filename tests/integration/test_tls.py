"""lbqemu.tls against real NBD servers over TCP on loopback, with certificates made per module.

Servers: `qemu-nbd` with a `tls-creds-x509` object built from `tls_creds_object()`, and a real
QEMU whose `object-add` / `nbd-server-start` take the same dict. Clients: libnbd handles set up
by `configure_client()` / `connect_tcp()`, and a plain handle for the no-TLS cases.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest
from conftest import assert_point_equals, backup, our_bitmaps, points
from fixtures.tls import TlsDirs, make_tls_dirs
from qemu_vm import MiB, TestVM, running_vm

from lbqemu.errors import NbdTlsError, QemuError, TlsCredentialsError
from lbqemu.tls import check_creds_dir, configure_client, connect_tcp, tls_creds_object

IMAGE_SIZE = 4 * MiB


@pytest.fixture(scope="module")
def tls_dirs(tmp_path_factory: pytest.TempPathFactory) -> TlsDirs:
    return make_tls_dirs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A small qcow2 with a recognisable pattern, and its contents as qemu-img reads them."""
    folder = tmp_path_factory.mktemp("image")
    path, raw = folder / "disk.qcow2", folder / "disk.raw"
    create = ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(IMAGE_SIZE)]
    subprocess.run(create, check=True)
    for pattern, offset in ((0x5A, 0), (0xC3, 3 * MiB)):
        subprocess.run(
            ["qemu-io", "-c", f"write -P {pattern} {offset} 512k", str(path)],
            check=True, capture_output=True,
        )  # fmt: skip
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(path), str(raw)], check=True)
    return path, raw.read_bytes()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind port 0, read it, release it)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def object_option(props: dict[str, Any]) -> str:
    """The `--object` command-line form of an object-add dict."""
    parts = [props["qom-type"]]
    for key, value in props.items():
        if key != "qom-type":
            text = ("on" if value else "off") if isinstance(value, bool) else str(value)
            parts.append(f"{key}={text.replace(',', ',,')}")
    return ",".join(parts)


@contextlib.contextmanager
def qemu_nbd(
    image: Path, workdir: Path, creds: Path | None, host: str = "127.0.0.1"
) -> Iterator[int]:
    """`qemu-nbd` serving `image` read-only as export `disk` on host:PORT; yields PORT.

    `--fork` returns once the server listens; a port taken in between is retried."""
    args_tls: list[str] = []
    if creds is not None:
        props = tls_creds_object(creds, "server", id="tls0")
        args_tls = ["--object", object_option(props), "--tls-creds", "tls0"]
    pid_file = workdir / f"qemu-nbd-{os.getpid()}-{id(image)}.pid"
    for _attempt in range(5):
        port = free_port(host)
        done = subprocess.run(
            ["qemu-nbd", *args_tls, "--fork", "--pid-file", str(pid_file), "-b", host,
             "-p", str(port), "-f", "qcow2", "-x", "disk", "-t", "--read-only", str(image)],
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode == 0:
            break
        if "in use" not in done.stderr:
            raise RuntimeError(f"qemu-nbd did not start: {done.stderr}")
    else:
        raise RuntimeError(f"qemu-nbd did not start: {done.stderr}")
    pid = int(pid_file.read_text())
    try:
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def read_all(handle: nbd.NBD) -> bytes:
    size = handle.get_size()
    step = 1 * MiB
    return b"".join(bytes(handle.pread(min(step, size - o), o)) for o in range(0, size, step))


def tls_handle() -> nbd.NBD:
    handle = nbd.NBD()
    handle.set_export_name("disk")
    return handle


# --- a real TLS server, our client ------------------------------------------------------------


def test_client_reads_the_image_over_tls(
    tls_dirs: TlsDirs, image: tuple[Path, bytes], tmp_path: Path
) -> None:
    path, expected = image
    with qemu_nbd(path, tmp_path, tls_dirs.good) as port:
        handle = tls_handle()
        connect_tcp(handle, "127.0.0.1", port, tls_dirs.good)
        assert handle.get_tls_negotiated()
        assert read_all(handle) == expected
        handle.shutdown()


def test_configure_client_on_a_plain_handle_also_reads(
    tls_dirs: TlsDirs, image: tuple[Path, bytes], tmp_path: Path
) -> None:
    path, expected = image
    with qemu_nbd(path, tmp_path, tls_dirs.good) as port:
        handle = tls_handle()
        configure_client(handle, tls_dirs.good, hostname="localhost")
        handle.connect_tcp("localhost", str(port))  # the certificate names localhost too
        assert handle.get_tls() == nbd.TLS_REQUIRE and handle.get_tls_verify_peer()
        assert read_all(handle)[:MiB] == expected[:MiB]
        handle.shutdown()


def test_client_trusting_the_wrong_ca_is_refused(
    tls_dirs: TlsDirs, image: tuple[Path, bytes], tmp_path: Path
) -> None:
    with qemu_nbd(image[0], tmp_path, tls_dirs.good) as port:
        handle = tls_handle()
        with pytest.raises(NbdTlsError, match="certificate verification") as caught:
            connect_tcp(handle, "127.0.0.1", port, tls_dirs.wrong_ca)
        assert caught.value.server == f"127.0.0.1:{port}"
        assert not handle.aio_is_ready()  # no connection left to read from


def test_client_certificate_from_another_ca_is_refused(
    tls_dirs: TlsDirs, image: tuple[Path, bytes], tmp_path: Path
) -> None:
    # One folder for both ends, as lbrestore uses it: the server trusts the folder's CA, which
    # did not issue the folder's client certificate. The file checks pass; the handshake fails.
    check_creds_dir(tls_dirs.wrong_client)
    with (
        qemu_nbd(image[0], tmp_path, tls_dirs.wrong_client) as port,
        pytest.raises(NbdTlsError, match="TLS"),
    ):
        connect_tcp(tls_handle(), "127.0.0.1", port, tls_dirs.wrong_client)


def test_qemu_refuses_a_server_certificate_its_ca_did_not_issue(
    tls_dirs: TlsDirs, image: tuple[Path, bytes], tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError, match="failed validation"):  # noqa: SIM117
        with qemu_nbd(image[0], tmp_path, tls_dirs.mismatched):
            pass


def test_server_name_not_in_the_certificate_is_refused(
    tls_dirs: TlsDirs, image: tuple[Path, bytes], tmp_path: Path
) -> None:
    # 127.0.0.2 is loopback too, but the certificate names only localhost and 127.0.0.1.
    with (
        qemu_nbd(image[0], tmp_path, tls_dirs.good, host="127.0.0.2") as port,
        pytest.raises(NbdTlsError, match="certificate verification"),
    ):
        connect_tcp(tls_handle(), "127.0.0.2", port, tls_dirs.good)


def test_server_demands_a_client_certificate(
    tls_dirs: TlsDirs, image: tuple[Path, bytes], tmp_path: Path
) -> None:
    # The good folder holds a client certificate, so the server object verifies peers.
    assert tls_creds_object(tls_dirs.good)["verify-peer"] is True
    with qemu_nbd(image[0], tmp_path, tls_dirs.good) as port, pytest.raises(NbdTlsError):
        connect_tcp(tls_handle(), "127.0.0.1", port, tls_dirs.ca_only)


def test_plain_client_is_refused_by_the_tls_server(
    tls_dirs: TlsDirs, image: tuple[Path, bytes], tmp_path: Path
) -> None:
    with qemu_nbd(image[0], tmp_path, tls_dirs.good) as port:
        plain = tls_handle()  # no TLS configured
        with pytest.raises(nbd.Error, match="server requires TLS"):
            plain.connect_tcp("127.0.0.1", str(port))


def test_tls_client_refuses_a_plain_server(
    tls_dirs: TlsDirs, image: tuple[Path, bytes], tmp_path: Path
) -> None:
    # No silent downgrade: a server without TLS must not get our reads.
    with qemu_nbd(image[0], tmp_path, creds=None) as port, pytest.raises(NbdTlsError):
        connect_tcp(tls_handle(), "127.0.0.1", port, tls_dirs.good)


def test_qemu_object_add_and_nbd_server_start_take_the_dict(
    tls_dirs: TlsDirs, tmp_path: Path
) -> None:
    """The dict goes to a real QEMU's object-add; its NBD server then serves a disk over TLS."""
    with running_vm(tmp_path / "vm", {"vda": 4 * MiB}) as vm:
        vm.qemu_io("vda", "write -P 0x7e 1M 256k")
        expected = vm.snapshot("vda", tmp_path / "vda.raw").read_bytes()
        vm.cmd("object-add", **tls_creds_object(tls_dirs.good, "server", id="lbr-tls0"))
        port = free_port()
        addr = {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}
        vm.cmd("nbd-server-start", addr=addr, **{"tls-creds": "lbr-tls0"})
        node = vm.disks["vda"].node
        vm.cmd("block-export-add", type="nbd", id="ex0", name="disk", writable=False,
               **{"node-name": node})  # fmt: skip

        handle = tls_handle()
        connect_tcp(handle, "127.0.0.1", port, tls_dirs.good)
        assert read_all(handle) == expected
        handle.shutdown()

        with pytest.raises(NbdTlsError, match="certificate verification"):
            connect_tcp(tls_handle(), "127.0.0.1", port, tls_dirs.wrong_ca)


# --- the credentials folder --------------------------------------------------------------------


def copy_dir(src: Path, dest: Path) -> Path:
    dest.mkdir()
    for file in src.iterdir():
        (dest / file.name).write_bytes(file.read_bytes())
    return dest


def test_check_accepts_the_good_folder(tls_dirs: TlsDirs) -> None:
    creds = check_creds_dir(tls_dirs.good)
    assert creds.has_server_cert and creds.has_client_cert and creds.has_dh_params
    client_only = check_creds_dir(tls_dirs.ca_only, "client")
    assert not client_only.has_client_cert and not client_only.has_server_cert


@pytest.mark.parametrize(
    ("remove", "endpoint", "named", "problem"),
    [
        ("ca-cert.pem", "client", "ca-cert.pem", "missing"),
        ("server-key.pem", "server", "server-key.pem", "missing"),
        ("server-cert.pem", "both", "server-cert.pem", "missing"),
        ("client-key.pem", "client", "client-key.pem", "missing"),
    ],
)
def test_check_names_the_missing_file(
    tls_dirs: TlsDirs, tmp_path: Path, remove: str, endpoint: Any, named: str, problem: str
) -> None:
    folder = copy_dir(tls_dirs.good, tmp_path / "creds")
    (folder / remove).unlink()
    with pytest.raises(TlsCredentialsError) as caught:
        check_creds_dir(folder, endpoint)
    assert caught.value.path == str(folder / named)
    assert problem in caught.value.problem


def test_check_refuses_a_server_folder_without_server_files(tls_dirs: TlsDirs) -> None:
    with pytest.raises(TlsCredentialsError, match=r"server-cert\.pem: missing"):
        tls_creds_object(tls_dirs.ca_only, "server")


def test_check_refuses_non_pem_and_non_files(tls_dirs: TlsDirs, tmp_path: Path) -> None:
    folder = copy_dir(tls_dirs.good, tmp_path / "creds")
    (folder / "server-cert.pem").write_text("not a certificate\n")
    with pytest.raises(TlsCredentialsError, match=r"server-cert\.pem: not a PEM file"):
        check_creds_dir(folder)
    (folder / "server-cert.pem").unlink()
    (folder / "server-cert.pem").mkdir()
    with pytest.raises(TlsCredentialsError, match=r"server-cert\.pem: not a regular file"):
        check_creds_dir(folder)


def test_check_refuses_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(TlsCredentialsError, match="no such folder"):
        check_creds_dir(tmp_path / "nowhere")


def test_creds_object_arguments(tls_dirs: TlsDirs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tls_dirs.good.parent)
    props = tls_creds_object(Path(tls_dirs.good.name))  # relative: QEMU must get it absolute
    assert props == {
        "qom-type": "tls-creds-x509",
        "id": "lbr-tls0",
        "dir": str(tls_dirs.good.resolve()),
        "endpoint": "server",
        "verify-peer": True,
    }
    client = tls_creds_object(tls_dirs.ca_only, "client", id="c0")
    assert client["endpoint"] == "client" and client["verify-peer"] is True
    assert tls_creds_object(tls_dirs.good, verify_peer=False)["verify-peer"] is False


# --- end to end: `lbrestore backup` over TCP + TLS on loopback --------------------------------


def lbrestore(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbrestore", "--store", str(store), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def tls_options(creds: Path | None) -> dict[str, Any]:
    """Backup options with QEMU's NBD server on a fresh loopback port, TLS from `creds`."""
    options: dict[str, Any] = {"nbd": f"tcp:127.0.0.1:{free_port()}"}
    if creds is not None:
        options["tls_creds"] = str(creds)
    return options


def assert_refused_cleanly(done: subprocess.CompletedProcess[str], *words: str) -> None:
    """A failed command: exit code 1, one line on stderr naming the problem, no traceback."""
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def qemu_left_nothing(vm: TestVM) -> None:
    """No export, job, NBD server or TLS object of ours is left in QEMU."""
    assert vm.cmd("query-block-exports") == [] and vm.cmd("query-jobs") == []
    objects = [o["name"] for o in vm.cmd("qom-list", path="/objects")]
    assert not [name for name in objects if name.startswith("lbr-")], objects


def test_backup_over_tls_and_wrong_certificates_refused(
    make_vm: Callable[..., TestVM], store_path: Path, tls_dirs: TlsDirs, tmp_path: Path
) -> None:
    """Backups run in this process (as the CLI runs them); one refusal goes through the CLI."""
    vm = make_vm({"vda": 8 * MiB})
    vm.qemu_io("vda", "write -P 0x5c 0 1M")
    snaps = vm.snapshot_all(tmp_path, "s1")
    first = backup(store_path, vm, **tls_options(tls_dirs.good))
    assert first.kind == "full"
    assert_point_equals(store_path, first.point_id, snaps)
    qemu_left_nothing(vm)

    vm.qemu_io("vda", "write -P 0x6d 2M 64k")
    bitmaps_before = [b["name"] for b in our_bitmaps(vm, "vda")]

    def assert_nothing_changed() -> None:
        assert points(store_path) == [(first.point_id, "full")]
        mine = our_bitmaps(vm, "vda")
        assert [b["name"] for b in mine] == bitmaps_before
        assert mine[0]["recording"] and mine[0]["count"] >= 64 * 1024
        qemu_left_nothing(vm)

    # The server rejects a client certificate its CA did not issue: in the TLS handshake,
    # after the point-in-time transaction, so the new bitmap must be merged back.
    cli = lbrestore(
        store_path, "backup", vm.name, "--qmp", vm.qmp_address,
        "--nbd", f"tcp:127.0.0.1:{free_port()}", "--tls-creds", str(tls_dirs.wrong_client),
    )  # fmt: skip
    assert_refused_cleanly(cli, "NBD over TLS", "failed")
    assert_nothing_changed()
    # QEMU rejects a server certificate its CA did not issue, when the object is added.
    with pytest.raises(QemuError, match=r"server-cert\.pem"):
        backup(store_path, vm, **tls_options(tls_dirs.mismatched))
    assert_nothing_changed()
    # Plain TCP is refused unless asked for explicitly.
    with pytest.raises(QemuError, match="unencrypted"):
        backup(store_path, vm, **tls_options(None))
    assert_nothing_changed()

    snaps = vm.snapshot_all(tmp_path, "s2")
    second = backup(store_path, vm, **tls_options(tls_dirs.good))
    assert second.kind == "incremental"
    assert second.bytes_read == 64 * 1024
    assert_point_equals(store_path, second.point_id, snaps)
