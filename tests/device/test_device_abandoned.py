"""A late failure of an SDK operation the runtime abandoned is not reported as an error; others still are."""

from __future__ import annotations

import asyncio
import gc
import logging

from azure.iot.device.common.transport_exceptions import NoConnectionError

from device_client import abandoned


def _abandon(loop: asyncio.AbstractEventLoop, exc: BaseException) -> None:
    future = loop.create_future()
    future.set_exception(exc)
    del future
    gc.collect()  # the unretrieved exception is reported when the future is collected


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_abandoned_sdk_failure_is_debug_and_other_failures_still_error(caplog):
    caplog.set_level(logging.DEBUG)
    loop = asyncio.new_event_loop()
    try:
        abandoned.install(loop)
        abandoned.install(loop)  # idempotent: one filter
        _abandon(loop, NoConnectionError("The client is not currently connected."))
        assert _errors(caplog) == []
        assert any("abandoned SDK operation" in r.getMessage() for r in caplog.records)

        _abandon(loop, ValueError("a real bug"))
        assert any("never retrieved" in m for m in _errors(caplog))
    finally:
        loop.close()


def test_sdk_completing_a_cancelled_operation_is_debug_and_other_callback_errors_still_error(caplog):
    """The SDK's own thread hands a result to a future the runtime has cancelled (the SDK's async adapter
    calls ``loop.call_soon_threadsafe(future.set_result, ...)``): asyncio's InvalidStateError report is
    noise; a callback that fails for another reason is still an error."""
    caplog.set_level(logging.DEBUG)
    loop = asyncio.new_event_loop()
    try:
        abandoned.install(loop)
        cancelled = loop.create_future()
        cancelled.cancel()
        loop.call_soon_threadsafe(cancelled.set_result, "too late")
        loop.run_until_complete(asyncio.sleep(0))
        assert _errors(caplog) == []
        assert any("abandoned SDK operation" in r.getMessage() for r in caplog.records)

        done = loop.create_future()
        done.set_result("first")
        loop.call_soon_threadsafe(done.set_result, "second")  # not cancelled: a real double completion
        loop.run_until_complete(asyncio.sleep(0))
        assert any("Exception in callback" in m for m in _errors(caplog))
    finally:
        loop.close()
