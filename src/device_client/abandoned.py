"""Late failures of SDK operations the runtime has abandoned.

The runtime cancels an SDK call when it is stopped or when the call outlives its deadline.  The SDK keeps
its own future for the operation and may fail it later (e.g. a SUBSCRIBE on a connection that is being
shut down); nobody awaits that future any more, so asyncio would report "Future exception was never
retrieved" as an ERROR with a traceback although nothing is wrong.  Or the SDK completes the operation
after all, and its callback (``call_soon_threadsafe(future.set_result, ...)`` from its own thread) meets a
future the runtime has cancelled: asyncio reports the ``InvalidStateError`` of that callback the same way
(Azure/azure-iot-sdk-python#695).  :func:`install` logs exactly those two reports at DEBUG and hands every
other report to the handler that was there before.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)
_MARK = "_device_client_abandoned_filter"


def _is_abandoned_sdk_failure(context: dict[str, Any]) -> bool:
    exc = context.get("exception")
    return (
        exc is not None
        and type(exc).__module__.startswith("azure.iot.device")
        and "never retrieved" in str(context.get("message", ""))
    )


def _is_late_completion(context: dict[str, Any]) -> bool:
    """A result or exception delivered to a future that was already cancelled."""
    if not isinstance(context.get("exception"), asyncio.InvalidStateError):
        return False
    callback = getattr(context.get("handle"), "_callback", None)
    target = getattr(callback, "__self__", None)
    return (
        isinstance(target, asyncio.Future)
        and target.cancelled()
        and getattr(callback, "__name__", "") in ("set_result", "set_exception")
    )


def install(loop: asyncio.AbstractEventLoop) -> None:
    """Filter the loop's exception reports as described above (idempotent)."""
    previous = loop.get_exception_handler()
    if getattr(previous, _MARK, False):
        return

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if _is_abandoned_sdk_failure(context) or _is_late_completion(context):
            log.debug("late failure of an abandoned SDK operation: %r", context.get("exception"))
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    setattr(handler, _MARK, True)
    loop.set_exception_handler(handler)
