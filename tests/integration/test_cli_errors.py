"""Every failure is one line with the contract's exit code (issue 8 item 6): usage errors 2,
runtime errors 1, never a traceback.

The table reproduces the issue's "Why" cases (OverflowError, ValueError, PermissionError,
Unicode digits, nan timeouts, URL-looking folders, bare nbd://). The CLI runs in this process
(`lbrestore.cli.main`, as the console script does) so the table stays cheap: an exception that
escapes the one handler fails the test just as a traceback would. Cases that need a process of
their own (another user, a corrupted index page) run the CLI in subprocesses.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
from pathlib import Path

import blake3
import click
import pytest
from safety_helpers import NOBODY, assert_one_line, cli, needs_root, run, shared_folder

from lbrestore.cli import main
from lbrestore.commands import COMMAND_MODULES, load_command

MIB = 1 << 20


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding vm1@#1 (one 1 MiB disk) and the image it came from."""
    root = tmp_path_factory.mktemp("errors")
    image = root / "vda.raw"
    image.write_bytes(blake3.blake3(b"errors").digest(length=MIB))
    assert cli(root / "store", "init").returncode == 0
    assert cli(root / "store", "import", "vm1", f"--disk=vda={image}").returncode == 0
    return root / "store"


def in_process(
    capsys: pytest.CaptureFixture[str], store: Path, *args: str
) -> tuple[int, list[str]]:
    """Run `lbrestore --store STORE ARGS` here: (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as ended:
        main(["--store", str(store), *args])
    code = ended.value.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return (code if isinstance(code, int) else 1), err.strip().splitlines()


IMAGE = "{image}"
OUT = "{out}"
CASES = [
    # (arguments, exit code, text of the one line)
    (["info", "vm1@9999-12-31T23:59:59-12:00"], 2, "outside the years 1 to 9999"),
    (["import", "vm1", f"--disk=vda={IMAGE}", "--at", "0001-01-01T00:00:00+01:00"], 2, "--at"),
    (["verify", "--sample", "nan"], 2, "not a finite number"),
    (["verify", "--sample", "inf"], 2, "--sample"),
    (["verify", "vm1", "--boot", "--boot-timeout", "nan"], 2, "not a finite number"),
    (["backup", "vm1", "--qmp", "unix:/nonexistent", "--scratch-dir", "/proc"], 2, "/proc"),
    (["backup", "vm1", "--qmp", "unix:/nonexistent", "--scratch-dir", "/sys"], 2, "/sys"),
    (["backup", "vm1", "--qmp", "unix:/nonexistent", "--qga-timeout", "nan"], 2, "finite"),
    (["info", "vm1@#\uff11"], 2, "unknown restore point spec"),
    (["info", "vm1@\u0663h-ago"], 2, "unknown restore point spec"),
    (["restore", "vm1@#\uff11", "--to", OUT], 2, "unknown restore point spec"),
    (["info", "vm1@garbage"], 2, "unknown restore point spec"),
    (["info", "bad/name@latest"], 2, "invalid VM name"),
    (["list", "../x"], 2, "invalid VM name"),
    (["verify", "a b"], 2, "invalid VM name"),
    (["import", "vm1", "--disk", "vda"], 2, "NAME=IMAGE"),
    (["import", "vm1", f"--disk=a/b={IMAGE}"], 2, "invalid disk name"),
    (["import", "-x", f"--disk=vda={IMAGE}"], 2, "No such option"),
    (["restore", "vm1", "--to", OUT, "--name", "../evil"], 2, "invalid VM name"),
    (["restore", "vm1", "--to", "NBD://host/x"], 2, "not an NBD URI"),
    (["restore", "vm1", "--to", "nbd:/x"], 2, "not an NBD URI"),
    (["restore", "vm1", "--to", "Nbd+Unix:///x?socket=/s"], 2, "not an NBD URI"),
    (["restore", "vm1", "--to", "nbd://"], 2, "name the NBD server"),
    (["restore", "vm1", "--to", "nbd://host:99999/x"], 2, "port"),
    (["restore", "vm1", "--to", "nbd+unix:///x"], 2, "socket=PATH"),
    (["restore", "vm1", "--to", "nbd://host/x", "--force"], 2, "folder targets only"),
    (["restore", "vm1", "--format", "vmdk", "--to", OUT], 2, "--format"),
    (["no-such-command"], 2, "No such command"),
    (["info", "vm1@#99"], 1, "no restore point #99"),
    (["info", "vm2@latest"], 1, "no VM named 'vm2'"),
    (["restore", "vm1", "--disk", "vdz", "--to", OUT], 1, "has no disk vdz"),
]


@pytest.mark.parametrize(("args", "code", "text"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_line_with_the_contract_exit_code(
    store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    code: int,
    text: str,
) -> None:
    monkeypatch.chdir(tmp_path)  # a URL taken for a folder would appear here
    image = store.parent / "vda.raw"
    out = tmp_path / "out"
    argv = [a.replace(IMAGE, str(image)).replace(OUT, str(out)) for a in args]
    before = sorted(p.name for p in (store / "data" / "vm1" / "vda").iterdir())
    got, lines = in_process(capsys, store, *argv)
    assert len(lines) == 1, lines
    assert got == code, lines
    assert text in lines[0], lines[0]
    assert lines[0].startswith("lbrestore: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no folder NBD:, nbd:, out
    assert sorted(p.name for p in (store / "data" / "vm1" / "vda").iterdir()) == before


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "-inf", "soon"])
def test_lock_timeout_must_be_a_finite_number(
    store: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("LBRESTORE_LOCK_TIMEOUT", value)
    image = store.parent / "vda.raw"
    code, lines = in_process(capsys, store, "import", "vm1", f"--disk=vda={image}")
    assert code == 2 and len(lines) == 1 and "LBRESTORE_LOCK_TIMEOUT" in lines[0], lines


def test_qmp_over_tcp_and_insecure_nbd_warn_in_one_line_each(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = in_process(
        capsys, store, "backup", "vm1", "--qmp", "tcp:127.0.0.1:9", "--connect-timeout", "0"
    )
    assert code == 1 and len(lines) == 2, lines
    assert lines[0].startswith("lbrestore: warning: QMP over TCP") and "authentication" in lines[0]
    code, lines = in_process(
        capsys,
        store,
        "backup",
        "vm1",
        "--qmp=unix:/nonexistent",
        "--connect-timeout=0",
        "--nbd=tcp:0.0.0.0:10809",
        "--insecure-tcp",
    )
    assert code == 1 and len(lines) == 2, lines
    assert "every interface" in lines[0] and "without TLS" in lines[0]
    code, lines = in_process(capsys, store, "backup", "vm1", "--qmp=unix:/x", "--connect-timeout=0")
    assert code == 1 and len(lines) == 1 and "warning" not in lines[0], lines


def test_every_option_of_every_command_has_help() -> None:
    for name in sorted(COMMAND_MODULES):
        command = load_command(name)
        assert command is not None
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden and param.name != "help":
                assert param.help, f"{name} {param.opts} has no help text"


# --- in subprocesses ---------------------------------------------------------------------------


@needs_root
def test_folders_at_mode_000_give_one_line(store: Path) -> None:
    """`data/vm1` or `tmp/` at mode 000 for the store's owner (a normal user): one line each,
    never "PermissionError: [Errno 13]" (mount printed it) nor a traceback."""
    with shared_folder() as base:
        copy = base / "store"
        shutil.copytree(store, copy)
        image = base / "vda.raw"
        shutil.copy(store.parent / "vda.raw", image)
        for path in [base, *base.rglob("*")]:
            os.chown(path, NOBODY, NOBODY)
        (base / "mnt").mkdir()
        os.chown(base / "mnt", NOBODY, NOBODY)
        env = {**os.environ, "XDG_RUNTIME_DIR": str(base)}
        for folder in ("data/vm1", "tmp"):
            (copy / folder).chmod(0o000)
            for args in (
                ["list"],
                ["info", "vm1@latest"],
                ["verify"],
                ["restore", "vm1@latest", "--to", str(base / "out")],
                ["import", "vm1", f"--disk=vda={image}"],
                ["mount", "vm1@latest", str(base / "mnt")],
            ):
                argv = [*cli_argv(copy), *args]
                result = run(argv, user=NOBODY, env=env)
                assert "Traceback" not in result.stderr and "Errno" not in result.stderr, args
                assert len(result.stderr.strip().splitlines()) <= 1, (args, result.stderr)
                refused = folder == "data/vm1" and args[0] in ("restore", "import", "mount")
                if refused or (folder == "tmp" and args[0] == "import"):
                    assert_one_line(result, 1, "ermission denied")
                elif result.returncode not in (0, 3):  # e.g. FUSE refused to this user
                    assert_one_line(result, 1)
            (copy / folder).chmod(0o700)
            if os.path.ismount(base / "mnt"):
                run(["fusermount3", "-u", "-z", str(base / "mnt")])


def cli_argv(store: Path) -> list[str]:
    return [sys.executable, "-m", "lbrestore", "--store", str(store)]


def test_a_corrupted_index_page_gives_one_line(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every page of index.sqlite overwritten in turn: list, info, verify, restore and import
    fail with one line (or succeed, where the page was unused), never an escaping exception."""
    with sqlite3.connect(store / "index.sqlite") as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
    pages = (store / "index.sqlite").stat().st_size // page_size
    image = store.parent / "vda.raw"
    failures = 0
    for page in range(pages):
        copy = tmp_path / f"store{page}"
        shutil.copytree(store, copy)
        with open(copy / "index.sqlite", "r+b") as f:
            f.seek(page * page_size)
            f.write(bytes([0xA5]) * page_size)
        for args in (
            ["list"],
            ["info", "vm1@latest"],
            ["verify"],
            ["restore", "vm1@latest", "--to", str(tmp_path / f"out{page}")],
            ["import", "vm1", f"--disk=vda={image}"],
        ):
            code, lines = in_process(capsys, copy, *args)
            if code != 0:
                assert len(lines) == 1, (page, args, lines)
                failures += 1
        shutil.rmtree(copy)
    assert failures > 0
