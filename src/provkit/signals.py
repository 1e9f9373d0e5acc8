"""Waiting for the signals that stop a server (SIGINT from a terminal, SIGTERM from a supervisor)."""

from __future__ import annotations

import asyncio
import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def wait_for_stop_signal() -> None:
    """Return when SIGINT or SIGTERM arrives; the handlers are removed again before returning."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)


def exit_with_parent(signum: int = signal.SIGTERM) -> None:  # pragma: no cover - runs in a child
    """Linux ``preexec_fn``: the child gets ``signum`` when the process that started it dies (set after
    Popen's ``user=``/``group=`` changes, which would clear it; it survives the exec)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signum)
    except (OSError, AttributeError):
        pass
