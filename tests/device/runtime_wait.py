"""Waiting on a DeviceRuntime that runs as a task of the test's event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from support.waiting import ended, until

from device_client.runtime import DeviceRuntime, RuntimeSnapshot


async def snapshot_until(
    runtime: DeviceRuntime,
    task: asyncio.Task[None],
    predicate: Callable[[RuntimeSnapshot], bool],
    timeout: float = 30.0,
) -> RuntimeSnapshot:
    """The runtime's snapshot once ``predicate`` holds for it; fails when the runtime ends first (with its
    exception, if it raised) or the time runs out."""
    await until(
        lambda: predicate(runtime.snapshot),
        lambda: f"not reached; last snapshot {runtime.snapshot}",
        timeout=timeout,
        fail_if=ended(task, "the runtime"),
    )
    return runtime.snapshot
