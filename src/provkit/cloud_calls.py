"""What the DPS and IoT Hub adapters wrap around each SDK call: one span, one latency, one outcome.

API
---
``CallObserver(service, metrics=NO_METRICS, tracer=None)``   ``service`` is ``"dps"`` or ``"hub"``.
    ``async with observer.call(operation, **attributes):`` a span named ``"<service> <operation>"``
    (attributes: the hub name, never a device id), and ``metrics.cloud_call(service, operation, outcome,
    seconds)`` when the block ends; a ``CloudError`` leaving the block names the outcome.
    ``.throttled()`` counts one HTTP 429.
``cloud_outcome(exc) -> str``   ok, not_found, already_exists, etag_mismatch, throttled, unavailable,
    rejected or error.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from provkit.cloud import (
    CloudAlreadyExists,
    CloudEtagMismatch,
    CloudNotFound,
    CloudRejected,
    CloudUnavailable,
)
from provkit.metrics import NO_METRICS, CloudMetrics

_OUTCOMES: tuple[tuple[type[Exception], str], ...] = (
    (CloudNotFound, "not_found"),
    (CloudAlreadyExists, "already_exists"),
    (CloudEtagMismatch, "etag_mismatch"),
    (CloudUnavailable, "unavailable"),
    (CloudRejected, "rejected"),
)


def cloud_outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    for kind, name in _OUTCOMES:
        if isinstance(exc, kind):
            return "throttled" if getattr(exc, "status", None) == 429 else name
    return "error"


class CallObserver:
    def __init__(
        self, service: str, metrics: CloudMetrics = NO_METRICS, tracer: trace.Tracer | None = None
    ) -> None:
        self._service = service
        self._metrics = metrics
        self._tracer = tracer or trace.NoOpTracer()

    def throttled(self) -> None:
        self._metrics.throttled(self._service)

    @asynccontextmanager
    async def call(self, operation: str, **attributes: str) -> AsyncIterator[None]:
        started = time.perf_counter()
        error: BaseException | None = None
        with self._tracer.start_as_current_span(
            f"{self._service} {operation}",
            kind=SpanKind.CLIENT,
            attributes={"devprov.cloud.service": self._service, **attributes},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield
            except BaseException as exc:
                error = exc
                raise
            finally:
                outcome = cloud_outcome(error)
                if error is not None:
                    span.set_attribute("devprov.cloud.outcome", outcome)
                    if outcome in ("unavailable", "throttled", "error"):
                        span.set_status(Status(StatusCode.ERROR, outcome))
                self._metrics.cloud_call(self._service, operation, outcome, time.perf_counter() - started)
