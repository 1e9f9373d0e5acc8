"""The emulator's one settings object, resolved once at start (flags, optional TOML/JSON file)."""

from __future__ import annotations

import ipaddress
import json
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from azure_iot_emulator.quotas import HUB_D2C_PER_SECOND

DEFAULT_DATA_DIR = Path(".iot-emulator")
DEFAULT_DPS_HOST = "localhost"
DEFAULT_HUB_HOSTS = ("127.0.0.2", "127.0.0.3")
MQTT_PORT = 8883
HTTPS_PORT = 443
DEFAULT_ASSIGNMENT_DELAY = 1.0


@dataclass(frozen=True)
class EmulatorConfig:
    data_dir: Path = DEFAULT_DATA_DIR
    dps_host: str = DEFAULT_DPS_HOST
    hub_hosts: tuple[str, ...] = DEFAULT_HUB_HOSTS
    mqtt_port: int = MQTT_PORT
    https_port: int = HTTPS_PORT
    """Every host's HTTPS port, as on Azure: its service REST API (so connection strings name the bare host),
    the DPS device API and MQTT over WebSockets.  Another port (0: any free one) is for set-ups that cannot
    bind 443; the connection strings then carry it (``HostName=host:port``), which Python's SDKs accept
    and the Node.js SDKs do not."""
    assignment_delay: float | None = DEFAULT_ASSIGNMENT_DELAY
    """Seconds from a device's register request until DPS answers its poll ``assigned`` (Azure's
    asynchronous registration); None is ``immediate``: the final answer on the register request."""
    azure_quotas: bool = False
    """Enforce Azure's rate quotas for one unit (``quotas.py``)."""
    hub_tier: str = "S1"
    """The IoT Hub tier whose device-to-cloud rate applies with ``azure_quotas``."""
    ready_file: Path | None = None
    max_packet_size: int = 512 * 1024
    log_level: str = "INFO"
    metrics_listen: str = ""  # host:port serving /metrics (off when empty)
    extra: dict[str, Any] = field(default_factory=dict)

    def validated(self) -> EmulatorConfig:
        if not self.hub_hosts:
            raise ValueError("at least one hub host is required")
        lowered = [h.lower() for h in self.hub_hosts]
        if len(set(lowered)) != len(lowered):
            raise ValueError("hub host names must be distinct")
        addresses = [listen_address(h) for h in (self.dps_host, *self.hub_hosts)]
        if len(set(addresses)) != len(addresses):
            raise ValueError(
                "the DPS and every hub need their own address (each serves its REST API on its HTTPS port)"
            )
        if self.assignment_delay is not None and not 0 <= self.assignment_delay <= 3600:
            raise ValueError("assignment_delay must be 'immediate' or 0-3600 seconds")
        if self.hub_tier.upper() not in HUB_D2C_PER_SECOND:
            raise ValueError(f"hub_tier must be one of {', '.join(HUB_D2C_PER_SECOND)}")
        for port in (self.mqtt_port, self.https_port):
            if not 0 <= port <= 65535:
                raise ValueError(f"port {port} out of range")
        return self

    @property
    def default_hub(self) -> str:
        return self.hub_hosts[0]


def listen_address(host: str) -> str:
    """The local address a host name is served on (IP literals as-is, ``localhost`` -> 127.0.0.1)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if host.lower() == "localhost":
        return "127.0.0.1"
    return socket.gethostbyname(host)


def assignment_delay(value: Any) -> float | None:
    """``immediate`` or a number of seconds (flag text or settings-file value)."""
    if isinstance(value, str) and value.strip().lower() == "immediate":
        return None
    if isinstance(value, bool):
        raise ValueError(f"assignment delay must be 'immediate' or seconds, not {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"assignment delay must be 'immediate' or seconds, not {value!r}") from None


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, not {value!r}")
    return value


_FILE_KEYS: dict[str, Callable[[Any], object]] = {
    "data_dir": Path,
    "dps_host": str,
    "hub_hosts": lambda v: tuple(str(h) for h in v),
    "mqtt_port": int,
    "https_port": int,
    "assignment_delay": assignment_delay,
    "azure_quotas": _boolean,
    "hub_tier": str,
    "ready_file": Path,
    "max_packet_size": int,
    "log_level": str,
    "metrics_listen": str,
}


def load_file(path: Path) -> dict[str, Any]:
    text = path.read_text()
    data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table/object")
    unknown = set(data) - set(_FILE_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
    return {key: _FILE_KEYS[key](value) for key, value in data.items()}


def build_config(file: Path | None, overrides: dict[str, Any]) -> EmulatorConfig:
    """File values first, then command-line values that were given (not None)."""
    values: dict[str, Any] = load_file(file) if file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values.get("assignment_delay"), str):  # the flag's text ("immediate" or seconds)
        values["assignment_delay"] = assignment_delay(values["assignment_delay"])
    return replace(EmulatorConfig(), **values).validated()
