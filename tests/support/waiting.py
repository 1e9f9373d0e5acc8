"""Waiting in tests until something observable has happened: the one helper every test uses.

    reply = await until(lambda: stub.GetStatus(request), "the device to be enrolled", timeout=60)
    await until(lambda: runtime.snapshot.telemetry_sent >= 3, "three messages sent")
    match = until_sync(lambda: re.search("Up", printed.text), "the stack to be up", timeout=180)

``check`` is called every ``interval`` seconds (it may be a coroutine function) until it returns something
truthy, which is returned; after ``timeout`` seconds the test fails with ``what`` (a string, or a callable
that describes the state reached).  ``fail_if``, called each round after a falsy ``check``, ends the wait at
once when it returns a reason - it may also raise: ``ended(task)`` (an asyncio task that finished, its
exception raised), ``exited(process)`` (a subprocess that exited); their ``what`` may be a callable too (a
log to show).

The rule these helpers serve: a test never sleeps a fixed time and then asserts that something did NOT
happen.  It waits for a positive event (a log line, a state, a counter) after which the absence means
something, or it drives time itself (``support.clock.ManualClock``) or gates the work with an Event.
"""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

Description = str | Callable[[], str]


class NotReached(AssertionError):
    """The condition was not reached in time."""


def _say(what: Description) -> str:
    return what() if callable(what) else what


def _failed(fail_if: Callable[[], str | None] | None) -> None:
    if fail_if is not None and (reason := fail_if()):
        raise AssertionError(reason)


async def until(
    check: Callable[[], T | Awaitable[T]],
    what: Description = "the condition",
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    fail_if: Callable[[], str | None] | None = None,
) -> T:
    """Await until ``check()`` is truthy; its value (see the module's description)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        _failed(fail_if)
        if loop.time() > deadline:
            raise NotReached(f"not reached in {timeout:g} s: {_say(what)}")
        await asyncio.sleep(interval)


def until_sync(
    check: Callable[[], T],
    what: Description = "the condition",
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    fail_if: Callable[[], str | None] | None = None,
) -> T:
    """:func:`until` for code without an event loop (threads, subprocesses watched from plain tests)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        _failed(fail_if)
        if time.monotonic() > deadline:
            raise NotReached(f"not reached in {timeout:g} s: {_say(what)}")
        time.sleep(interval)


def ended(task: asyncio.Future[Any], what: Description = "the task") -> Callable[[], str | None]:
    """For ``fail_if``: the task finished first (its exception, if any, is raised)."""

    def check() -> str | None:
        if not task.done():
            return None
        task.result()
        return f"{_say(what)} ended first"

    return check


def exited(
    process: subprocess.Popen[Any] | asyncio.subprocess.Process, what: Description = "the process"
) -> Callable[[], str | None]:
    """For ``fail_if``: the process exited first."""

    def check() -> str | None:
        code = process.poll() if isinstance(process, subprocess.Popen) else process.returncode
        return None if code is None else f"{_say(what)} exited first ({code})"

    return check
