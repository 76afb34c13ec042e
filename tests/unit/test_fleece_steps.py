"""The view's per-disk steps run side by side, and a failure is raised only once all ended.

That order matters for the bitmap invariant's cleanup: PointInTimeView undoes what its steps
recorded, so no step may still be creating something in QEMU when the undo starts.
"""

from __future__ import annotations

import asyncio

import pytest

from lbqemu.fleece import _all


def test_every_step_ends_before_the_first_failure_is_raised() -> None:
    ended: list[str] = []

    async def fails_first() -> None:
        await asyncio.sleep(0)
        ended.append("failed")
        raise RuntimeError("disk 0")

    async def slower(name: str, delay: float) -> None:
        await asyncio.sleep(delay)
        ended.append(name)

    async def run() -> None:
        await _all([fails_first(), slower("a", 0.05), slower("b", 0.02)])

    with pytest.raises(RuntimeError, match="disk 0"):
        asyncio.run(run())
    assert ended == ["failed", "b", "a"]


def test_steps_overlap() -> None:
    running = 0
    most = 0

    async def step() -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.01)
        running -= 1

    asyncio.run(_all([step() for _ in range(3)]))
    assert most == 3
