"""lbqemu.guest against a real qemu-guest-agent (freeze always blocked: it runs on the host).

What can be shown safely: a refused freeze is reported and the block still runs; the thaw is sent
after the block on every path (success, exception, cancellation), seen in the agent's own log; a
refused thaw is surfaced; an agent that never answers, a missing socket and a dead socket give
clear errors without hanging; stale replies are flushed by guest-sync-delimited. End to end,
`lbrestore backup --qga` completes with the refused freeze reported, and fails cleanly (nothing
committed, no bitmap left) when the agent is absent or when the VM's guest runs no agent.

Not shown, because it would freeze the host: a freeze that succeeds, and GuestThawError when
the thaw after it fails.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import assert_point_equals
from fixtures.qga import RunningAgent, running_agent
from qemu_vm import MiB, TestVM, running_vm

from lbqemu.errors import GuestAgentError, GuestAgentTimeoutError, GuestAgentUnavailableError
from lbqemu.guest import FreezeReport, GuestAgent, frozen
from lbstore.store import Store

# Generous: only reached when something is wrong (the agent answers in milliseconds).
AGENT_TIMEOUT = 10.0


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    with running_agent(tmp_path / "qga") as running:
        yield running


def stopped_log(agent: RunningAgent) -> list[str]:
    """The agent's request log, read after stopping it so that every line is flushed."""
    agent.proc.terminate()
    agent.proc.wait(timeout=10)
    return agent.requests_in_log()


def test_refused_freeze_is_reported_and_the_block_still_runs(agent: RunningAgent) -> None:
    async def run() -> tuple[FreezeReport, bool]:
        ran = False
        async with frozen(agent.address, AGENT_TIMEOUT) as report:
            ran = True
            assert report.refused is not None  # known inside the block already
        return report, ran

    report, ran = asyncio.run(run())

    assert ran
    assert not report.frozen
    assert report.consistency == "crash"
    assert "guest-fsfreeze-freeze has been disabled" in (report.refused or "")
    assert report.thawed and report.thaw_error is None
    assert report.to_dict()["consistency"] == "crash"
    log = stopped_log(agent)
    assert log.index("guest-fsfreeze-freeze") < log.index("guest-fsfreeze-thaw")


def test_thaw_is_sent_when_the_block_raises(agent: RunningAgent) -> None:
    async def run() -> None:
        async with frozen(agent.address, AGENT_TIMEOUT):
            raise RuntimeError("transaction failed")

    with pytest.raises(RuntimeError, match="transaction failed"):
        asyncio.run(run())

    log = stopped_log(agent)
    assert "guest-fsfreeze-thaw" in log
    assert log.index("guest-fsfreeze-freeze") < log.index("guest-fsfreeze-thaw")


def test_thaw_is_sent_when_the_task_is_cancelled(agent: RunningAgent) -> None:
    async def run() -> None:
        inside = asyncio.Event()

        async def backup() -> None:
            async with frozen(agent.address, AGENT_TIMEOUT):
                inside.set()
                await asyncio.Event().wait()  # never set: only a cancel gets out

        task = asyncio.create_task(backup())
        await inside.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())

    assert stopped_log(agent)[-1] == "guest-fsfreeze-thaw"


def test_refused_thaw_is_surfaced_in_the_report(tmp_path: Path) -> None:
    with running_agent(tmp_path / "qga", also_blocked=("guest-fsfreeze-thaw",)) as agent:

        async def run() -> FreezeReport:
            async with frozen(agent.address, AGENT_TIMEOUT) as report:
                pass
            return report

        report = asyncio.run(run())

    assert report.thaw_attempted and not report.thawed
    assert "guest-fsfreeze-thaw has been disabled" in (report.thaw_error or "")
    # Nothing was frozen, so a refused thaw is not an error: the backup goes on.
    assert not report.frozen


def test_agent_that_never_answers_times_out(tmp_path: Path) -> None:
    silent = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(silent))
        server.listen(1)  # connections are queued by the kernel and never answered

        async def run() -> None:
            async with frozen(f"unix:{silent}", timeout=0.3):
                pytest.fail("the block must not run without an agent")

        with pytest.raises(GuestAgentTimeoutError) as caught:
            asyncio.run(run())

    assert caught.value.command == "guest-sync-delimited"
    assert caught.value.timeout == 0.3
    assert "no answer within 0.3 s" in str(caught.value)


def test_missing_socket_is_a_clear_error(tmp_path: Path) -> None:
    async def run() -> None:
        async with frozen(f"unix:{tmp_path / 'nope.sock'}"):
            pytest.fail("the block must not run without an agent")

    with pytest.raises(GuestAgentUnavailableError, match=r"no agent socket at .*nope\.sock"):
        asyncio.run(run())


def test_socket_with_nobody_listening_is_a_clear_error(tmp_path: Path) -> None:
    dead = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as left_behind:
        left_behind.bind(str(dead))  # bound, never listening: what a crashed agent leaves

        async def run() -> None:
            await GuestAgent.connect(f"unix:{dead}")

        with pytest.raises(GuestAgentUnavailableError, match="nothing is listening"):
            asyncio.run(run())


def test_address_must_be_unix() -> None:
    async def run() -> None:
        async with frozen("tcp:127.0.0.1:4444"):
            pass

    with pytest.raises(GuestAgentError, match=r"expected unix:PATH"):
        asyncio.run(run())


def test_sync_drops_stale_replies(agent: RunningAgent) -> None:
    async def run() -> str:
        ga = await GuestAgent.connect(agent.address, AGENT_TIMEOUT)
        try:
            # Two replies nobody reads, as a crashed earlier exchange would leave behind.
            await ga.send_command("guest-info")
            await ga.send_command("guest-fsfreeze-freeze")
            return await ga.fsfreeze_status()
        finally:
            await ga.close()

    assert asyncio.run(run()) == "thawed"


def test_agent_error_carries_the_agent_text(agent: RunningAgent) -> None:
    async def run() -> None:
        ga = await GuestAgent.connect(agent.address, AGENT_TIMEOUT)
        try:
            await ga.fsfreeze_freeze()
        finally:
            await ga.close()

    with pytest.raises(GuestAgentError) as caught:
        asyncio.run(run())
    assert caught.value.command == "guest-fsfreeze-freeze"
    assert caught.value.agent_error == (
        "CommandNotFound: Command guest-fsfreeze-freeze has been disabled"
    )


# --- end to end: `lbrestore backup --qga` against a real agent --------------------------------


def test_backup_with_guest_agent_completes_and_reports_the_refused_freeze(
    agent: RunningAgent, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    with running_vm(tmp_path / "vm", {"vda": 4 * MiB}) as vm:
        vm.qemu_io("vda", "write -P 0x3c 0 256k")
        snaps = vm.snapshot_all(tmp_path, "s")
        Store.init(store)
        done = lbrestore(
            store, "backup", vm.name, "--qmp", vm.qmp_address, "--qga", agent.address, "--json"
        )
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)

    assert summary["kind"] == "full"
    assert_point_equals(store, summary["point_id"], snaps)
    freeze = summary["guest_freeze"]
    assert freeze["frozen"] is False and freeze["consistency"] == "crash"
    assert "guest-fsfreeze-freeze has been disabled" in freeze["refused"]
    assert freeze["thawed"] is True
    log = stopped_log(agent)
    assert log.index("guest-fsfreeze-freeze") < log.index("guest-fsfreeze-thaw")
    # The reason is kept in the store's event log too.
    with Store.open(store) as opened:
        events = [e for e in opened.events("vm1") if e["kind"] == "guest-not-frozen"]
    assert len(events) == 1 and "has been disabled" in events[0]["message"]


def test_backup_with_an_absent_agent_fails_cleanly(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with running_vm(tmp_path / "vm", {"vda": 4 * MiB}) as vm:
        Store.init(store)
        missing = f"unix:{tmp_path / 'no-agent.sock'}"
        done = lbrestore(store, "backup", vm.name, "--qmp", vm.qmp_address, "--qga", missing)
        assert [b for b in vm.bitmaps("vda") if b["name"].startswith("lbr-")] == []
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"lbrestore: guest agent {missing}: no agent socket at {tmp_path / 'no-agent.sock'}"
    ]
    with Store.open(store) as opened:
        assert opened.restore_points("vm1") == []


def lbrestore(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbrestore", "--store", str(store), *args],
        capture_output=True,
        text=True,
        check=False,
    )


class VMWithAgentPort(TestVM):
    """The harness VM plus the guest-agent virtio-serial port, with no agent behind it."""

    __test__ = False

    @property
    def agent_socket(self) -> Path:
        return self.workdir / "vm-qga.sock"

    def command_line(self) -> list[str]:
        return [
            *super().command_line(),
            "-chardev", f"socket,path={self.agent_socket},server=on,wait=off,id=qga0",
            "-device", "virtio-serial-pci,id=vser0",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]  # fmt: skip


def test_backup_of_a_vm_whose_guest_runs_no_agent_times_out_cleanly(tmp_path: Path) -> None:
    store = tmp_path / "store"
    Store.init(store)
    vm = VMWithAgentPort(workdir=tmp_path / "vm")
    vm.workdir.mkdir()
    vm.create_disk("vda", 4 * MiB)
    vm.start()
    try:
        qga = f"unix:{vm.agent_socket}"
        done = lbrestore(
            store, "backup", vm.name, "--qmp", vm.qmp_address,
            "--qga", qga, "--qga-timeout", "0.5",
        )  # fmt: skip
        assert [b for b in vm.bitmaps("vda") if b["name"].startswith("lbr-")] == []
        assert vm.cmd("query-block-exports") == [] and vm.cmd("query-jobs") == []
    finally:
        vm.kill9()
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"lbrestore: guest agent {qga} (guest-sync-delimited): no answer within 0.5 s"
    ]
    with Store.open(store) as opened:
        assert opened.restore_points("vm1") == []
