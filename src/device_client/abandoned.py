"""Late failures of SDK operations the runtime has abandoned.

The runtime cancels an SDK call when it is stopped or when the call outlives its deadline.  The SDK keeps
its own future for the operation and may fail it later (e.g. a SUBSCRIBE on a connection that is being
shut down); nobody awaits that future any more, so asyncio would report "Future exception was never
retrieved" as an ERROR with a traceback although nothing is wrong.  :func:`install` logs exactly those
reports -- an azure-iot-device exception nobody retrieved -- at DEBUG and hands every other report to the
handler that was there before.
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


def install(loop: asyncio.AbstractEventLoop) -> None:
    """Filter the loop's exception reports as described above (idempotent)."""
    previous = loop.get_exception_handler()
    if getattr(previous, _MARK, False):
        return

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if _is_abandoned_sdk_failure(context):
            log.debug("late failure of an abandoned SDK operation: %r", context.get("exception"))
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    setattr(handler, _MARK, True)
    loop.set_exception_handler(handler)
