"""Structured logging: one JSON object per line when stderr is not a terminal, readable text otherwise.

API
---
``configure_logging(level="INFO", *, json_lines=None, stream=None) -> None``
    Installs one handler on the root logger.  ``json_lines=None`` picks JSON when ``stream`` is not a TTY.
    Every record carries ``request_id`` and ``device_id`` from ``provkit.context`` and, while a trace is
    recorded (``provkit.observe``), the OpenTelemetry ``trace_id`` (32 hex digits); extra fields passed as
    ``logger.info("minted", extra={"serial": ...})`` are included.  Never log keys, CSRs, tokens or secrets.
``JsonFormatter``, ``TextFormatter``   the two formatters (usable with any handler); ``ContextFilter`` the
    filter that adds the context fields; ``current_trace_id()``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

from opentelemetry import trace

from provkit.context import current_device_id, current_request_id

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_CONTEXT = ("request_id", "device_id", "trace_id")


class ContextFilter(logging.Filter):
    """Adds the request id, device id and trace id of the current context to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = current_request_id()
        if not getattr(record, "device_id", None):
            record.device_id = current_device_id()
        if not getattr(record, "trace_id", None):
            record.trace_id = current_trace_id()
        return True


def current_trace_id() -> str:
    """The current span's trace id (32 hex digits), or "" when no trace is being recorded."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: v for k, v in vars(record).items() if k not in _STANDARD and k not in _CONTEXT
    }


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _CONTEXT:
            value = getattr(record, key, "")
            if value:
                entry[key] = value
        entry.update(_extras(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S.%f")[:-3]
        parts = [f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"]
        context = {k: getattr(record, k, "") for k in _CONTEXT}
        context.update(_extras(record))
        fields = " ".join(f"{k}={v}" for k, v in context.items() if v not in ("", None))
        if fields:
            parts.append(f"[{fields}]")
        text = " ".join(parts)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure_logging(
    level: str | int = "INFO", *, json_lines: bool | None = None, stream: IO[str] | None = None
) -> None:
    stream = stream or sys.stderr
    if json_lines is None:
        json_lines = not (hasattr(stream, "isatty") and stream.isatty())
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    logging.getLogger("grpc").setLevel(logging.WARNING)
