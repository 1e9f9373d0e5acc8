"""The emulator's ``connection.json``: what a running emulator tells its clients (endpoints, keys, CA)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NotRequired, TypedDict

CONNECTION_FILE = "connection.json"


class DpsConnection(TypedDict):
    connection_string: str
    rest_endpoint: str


class HubConnection(TypedDict):
    host_name: str
    connection_string: str
    rest_endpoint: str
    # The built-in Event Hub-compatible endpoint (AMQP, port 5671 of the hub's address):
    eventhub_endpoint: NotRequired[str]  # sb://{host}/
    eventhub_name: NotRequired[str]  # the entity (EntityPath)
    eventhub_connection_string: NotRequired[str]  # Endpoint=sb://...;SharedAccessKeyName=...;EntityPath=...


class ConnectionInfo(TypedDict):
    pid: int
    ca_pem_path: str
    id_scope: str
    global_endpoint: str
    mqtt_port: int
    https_port: int  # every host's HTTPS port (service REST APIs, DPS device API, WebSockets)
    dps: DpsConnection
    hubs: list[HubConnection]
    default_hub: str
    metrics_url: NotRequired[str]  # only when the emulator serves /metrics


def _hub(data: dict[str, object]) -> HubConnection:
    hub = HubConnection(
        host_name=str(data["host_name"]),
        connection_string=str(data["connection_string"]),
        rest_endpoint=str(data["rest_endpoint"]),
    )
    if data.get("eventhub_connection_string"):
        hub["eventhub_endpoint"] = str(data.get("eventhub_endpoint", ""))
        hub["eventhub_name"] = str(data.get("eventhub_name", ""))
        hub["eventhub_connection_string"] = str(data["eventhub_connection_string"])
    return hub


def parse_connection_info(data: object) -> ConnectionInfo | None:
    """The document's facts, or None when it is not a connection file this emulator writes."""
    if not isinstance(data, dict):
        return None
    try:
        dps, hubs = data["dps"], data["hubs"]
        if not isinstance(dps, dict) or not isinstance(hubs, list):
            return None
        if not all(isinstance(h, dict) for h in hubs):
            return None
        info = ConnectionInfo(
            pid=int(data["pid"]),
            ca_pem_path=str(data["ca_pem_path"]),
            id_scope=str(data["id_scope"]),
            global_endpoint=str(data["global_endpoint"]),
            mqtt_port=int(data["mqtt_port"]),
            https_port=int(data["https_port"]),
            dps=DpsConnection(
                connection_string=str(dps["connection_string"]), rest_endpoint=str(dps["rest_endpoint"])
            ),
            hubs=[_hub(h) for h in hubs],
            default_hub=str(data["default_hub"]),
        )
        if data.get("metrics_url"):
            info["metrics_url"] = str(data["metrics_url"])
        return info
    except (KeyError, TypeError, ValueError):
        return None


def read_connection_info(path: Path) -> ConnectionInfo | None:
    """The file's facts, or None while it is missing, half-written or not ours."""
    try:
        return parse_connection_info(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None
