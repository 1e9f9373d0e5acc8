"""Telemetry message construction: a JSON body with a sequence number, a timestamp and sample readings."""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from datetime import datetime

from azure.iot.device import Message

CONTENT_TYPE = "application/json"
CONTENT_ENCODING = "utf-8"


@dataclass(frozen=True)
class Readings:
    temperature_c: float
    humidity_pct: float
    supply_voltage_v: float


def sample_readings(seq: int, now: datetime, device_id: str = "") -> Readings:
    """Plausible, deterministic concentrator readings (a slow daily cycle plus a small sequence ripple),
    offset per device so that a fleet does not report one identical value."""
    day_phase = (now.hour * 3600 + now.minute * 60 + now.second) / 86400 * 2 * math.pi
    ripple = math.sin(seq * 0.7)
    site = zlib.crc32(device_id.encode()) % 1000 / 1000  # 0 <= site < 1, stable per device
    return Readings(
        temperature_c=round(19.0 + 4.0 * site + 4.0 * math.sin(day_phase) + 0.3 * ripple, 2),
        humidity_pct=round(40.0 + 10.0 * site + 10.0 * math.cos(day_phase) - 0.5 * ripple, 2),
        supply_voltage_v=round(24.0 + 0.2 * math.sin(seq * 0.31), 3),
    )


def build_body(device_id: str, seq: int, now: datetime) -> bytes:
    readings = sample_readings(seq, now, device_id)
    body = {
        "deviceId": device_id,
        "seq": seq,
        "timestamp": now.isoformat(timespec="milliseconds"),
        "readings": {
            "temperatureC": readings.temperature_c,
            "humidityPct": readings.humidity_pct,
            "supplyVoltageV": readings.supply_voltage_v,
        },
    }
    return json.dumps(body, separators=(",", ":")).encode(CONTENT_ENCODING)


def message_id(device_id: str, seq: int) -> str:
    """The message's stable id, ``<device>:<seq>``: the same on every resend (the hub may store a message
    twice when an acknowledgement is lost), and never reused, as the sequence is persisted with the
    outbox.  Sent as the message-id system property (``$.mid``), so a consumer drops a repeated id."""
    return f"{device_id}:{seq}"


def to_sdk_message(seq: int, message_id: str, body: bytes) -> Message:
    """The SDK message for a buffered body: the same message id on every (re)send."""
    message = Message(
        body, message_id=message_id, content_encoding=CONTENT_ENCODING, content_type=CONTENT_TYPE
    )
    message.custom_properties["seq"] = str(seq)
    return message
