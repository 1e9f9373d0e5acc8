"""The emulator's MQTT 3.1.1 core: a sans-IO codec (:mod:`.codec`) and per-connection state machine
(:mod:`.connection`), sessions and routing (:mod:`.broker`), a connection as endpoints see it
(:mod:`.link`), a thin asyncio TLS shell on Python's ssl (:mod:`.tls`, with :mod:`.accept_any`).  Services
plug in as endpoints; the interface is documented in :mod:`.endpoint`."""

from azure_iot_emulator.mqtt.broker import Broker
from azure_iot_emulator.mqtt.endpoint import (
    ConnectGate,
    Endpoint,
    LinkObserver,
    ProtocolViolation,
    SubscriptionObserver,
    TrafficHandler,
    handle_in_order,
    wait_for_turn,
)
from azure_iot_emulator.mqtt.link import ConnectInfo, Link, topic_matches

__all__ = [
    "Broker",
    "ConnectGate",
    "ConnectInfo",
    "Endpoint",
    "Link",
    "LinkObserver",
    "ProtocolViolation",
    "SubscriptionObserver",
    "TrafficHandler",
    "handle_in_order",
    "topic_matches",
    "wait_for_turn",
]
