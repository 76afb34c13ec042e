"""Shared fixtures: every test runs with an isolated environment and its own store path."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

pytest_plugins = ["fixtures.guest_disks"]  # guest_disk_points: guest filesystems (issue 12)

# A suite started in the background (`make test &`, cron, nohup) inherits SIGINT ignored, and so
# would every process it starts; the Ctrl-C tests need what a terminal gives: the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the user's store and settings out of every test."""
    for name in ("LBRESTORE_STORE",):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
