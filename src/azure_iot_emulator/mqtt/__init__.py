"""The emulator's MQTT 3.1.1 core: a sans-IO codec (:mod:`.codec`) and per-connection state machine
(:mod:`.connection`), sessions and routing (:mod:`.broker`), a thin asyncio/pyOpenSSL TLS shell
(:mod:`.tls`).  Services plug in as endpoints; the interface is documented in :mod:`.endpoint`."""

from azure_iot_emulator.mqtt.broker import Broker, Link
from azure_iot_emulator.mqtt.endpoint import (
    ConnectGate,
    ConnectInfo,
    Endpoint,
    LinkObserver,
    ProtocolViolation,
    TrafficHandler,
    handle_in_order,
    topic_matches,
    wait_for_turn,
)

__all__ = [
    "Broker",
    "ConnectGate",
    "ConnectInfo",
    "Endpoint",
    "Link",
    "LinkObserver",
    "ProtocolViolation",
    "TrafficHandler",
    "handle_in_order",
    "topic_matches",
    "wait_for_turn",
]
