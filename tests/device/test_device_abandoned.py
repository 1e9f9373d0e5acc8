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
