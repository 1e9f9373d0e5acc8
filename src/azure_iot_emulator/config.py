"""The emulator's one settings object, resolved once at start by the one settings loader
(``mainkit.settings``): ``serve``'s flags, then the environment (``IOT_EMULATOR_<KEY>``, e.g.
``IOT_EMULATOR_HUB_HOSTS=127.0.0.2,127.0.0.3``), then the settings file (``--config``: TOML, or JSON for
any other file name; keys as in ``KEYS``, the flag names with underscores), then the defaults."""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from azure_iot_emulator.dps.allocation import DEFAULT_WEBHOOK_TIMEOUT, MAX_WEBHOOK_TIMEOUT
from azure_iot_emulator.hub.c2d import (
    DEFAULT_MAX_DELIVERY_COUNT,
    DEFAULT_TTL_SECONDS,
    MAX_DELIVERY_COUNT,
    MAX_TTL_SECONDS,
)
from azure_iot_emulator.hub.routing import HubRoutes, RouteError, RouteSpec, build_routing, route_from_table
from azure_iot_emulator.mqtt.tls import DEFAULT_STALL_TIMEOUT
from azure_iot_emulator.pauses import refuse_foreign
from azure_iot_emulator.quotas import HUB_D2C_PER_SECOND
from mainkit.settings import FlagKeys, SettingsError, SettingsFile, SettingsSource

ENV_PREFIX = "IOT_EMULATOR"

DEFAULT_DATA_DIR = Path(".iot-emulator")
DEFAULT_DPS_HOST = "localhost"
DEFAULT_HUB_HOSTS = ("127.0.0.2", "127.0.0.3")
MQTT_PORT = 8883
HTTPS_PORT = 443
AMQP_PORT = 5671
DEFAULT_HUB_PARTITIONS = 4  # Azure's default for a hub's built-in endpoint (2..128)
DEFAULT_RETENTION_DAYS = 1.0  # Azure's default (up to 7 days)
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
    amqp_port: int = AMQP_PORT
    """Every hub's AMQP 1.0 over TLS port: the built-in Event Hub-compatible endpoint and cloud-to-device
    sends (Azure's 5671: Event Hubs' clients dial it, their connection strings carry no port)."""
    hub_partitions: int = DEFAULT_HUB_PARTITIONS
    """Partitions of each hub's built-in endpoint, fixed when the hub is first created (as on Azure)."""
    hub_retention_days: float = DEFAULT_RETENTION_DAYS
    """How long the built-in endpoint keeps device-to-cloud messages (Azure: 1 to 7 days)."""
    assignment_delay: float | None = DEFAULT_ASSIGNMENT_DELAY
    """Seconds from a device's register request until DPS answers its poll ``assigned`` (Azure's
    asynchronous registration); None is ``immediate``: the final answer on the register request."""
    allocation_webhook_timeout: float = DEFAULT_WEBHOOK_TIMEOUT
    """Seconds DPS waits for a custom allocation webhook's answer before the registration fails."""
    allocation_webhook_ca: Path | None = None
    """A PEM file of CA certificates trusted (besides the system's) for https custom allocation webhooks."""
    azure_quotas: bool = False
    """Enforce Azure's rate quotas for one unit (``quotas.py``)."""
    hub_tier: str = "S1"
    """The IoT Hub tier whose device-to-cloud rate applies with ``azure_quotas``."""
    c2d_default_ttl: float = DEFAULT_TTL_SECONDS
    """Seconds a cloud-to-device message lives when its sender set no expiry (Azure: 1 hour, 2 days at
    most)."""
    c2d_max_delivery_count: int = DEFAULT_MAX_DELIVERY_COUNT
    """Deliveries of a cloud-to-device message without a PUBACK before it is dropped (Azure: 10, 1-100)."""
    stalled_peer_timeout: float = DEFAULT_STALL_TIMEOUT
    """Seconds a peer that does not read what it is sent (more than the high-water mark queued for it:
    reading from it is paused) may stay so before it is dropped (``mqtt/tls.py``)."""
    routes: tuple[RouteSpec, ...] = ()
    """Message routes to the built-in endpoint (``hub/routing.py``), each for one hub or every hub; none:
    device messages only, as an Azure hub without routes."""
    fallback_route: tuple[str, ...] | None = None
    """The hubs whose fallback route is enabled (None: every hub, Azure's default)."""
    ready_file: Path | None = None
    max_packet_size: int = 512 * 1024
    log_level: str = "INFO"
    metrics_listen: str = ""  # host:port serving /metrics (off when empty)
    pause_log: Path | None = None
    """Append every garbage-collector pause and event-loop stall to this file, as JSON lines
    (``pauses.py``; off when None): for finding what delays acknowledgements under load."""
    extra: dict[str, Any] = field(default_factory=dict)

    def validated(self) -> EmulatorConfig:
        if not self.hub_hosts:
            raise SettingsError("at least one hub host is required")
        lowered = [h.lower() for h in self.hub_hosts]
        if len(set(lowered)) != len(lowered):
            raise SettingsError("hub host names must be distinct")
        try:
            addresses = [listen_address(h) for h in (self.dps_host, *self.hub_hosts)]
        except OSError as exc:  # a host name that does not resolve
            raise SettingsError(f"cannot resolve a host name: {exc}") from exc
        if len(set(addresses)) != len(addresses):
            raise SettingsError(
                "the DPS and every hub need their own address (each serves its REST API on its HTTPS port)"
            )
        if self.assignment_delay is not None and not 0 <= self.assignment_delay <= 3600:
            raise SettingsError("assignment_delay must be 'immediate' or 0-3600 seconds")
        if not 0 < self.allocation_webhook_timeout <= MAX_WEBHOOK_TIMEOUT:
            raise SettingsError(
                f"allocation_webhook_timeout must be above 0 and at most {MAX_WEBHOOK_TIMEOUT:g} seconds "
                "(the device SDK waits 30 s for each DPS answer)"
            )
        if self.allocation_webhook_ca is not None and not self.allocation_webhook_ca.is_file():
            raise SettingsError(f"allocation_webhook_ca {self.allocation_webhook_ca} is not a file")
        if self.pause_log is not None and (why := refuse_foreign(self.pause_log)) is not None:
            raise SettingsError(why)
        if self.hub_tier.upper() not in HUB_D2C_PER_SECOND:
            raise SettingsError(f"hub_tier must be one of {', '.join(HUB_D2C_PER_SECOND)}")
        if not 2 <= self.hub_partitions <= 128:
            raise SettingsError("hub_partitions must be 2-128 (Azure's range)")
        if not 0 < self.hub_retention_days <= 7:
            raise SettingsError("hub_retention_days must be above 0 and at most 7 (Azure's limit)")
        if not 1 <= self.c2d_default_ttl <= MAX_TTL_SECONDS:
            raise SettingsError(f"c2d_default_ttl must be 1 to {MAX_TTL_SECONDS} seconds (2 days)")
        if not 1 <= self.c2d_max_delivery_count <= MAX_DELIVERY_COUNT:
            raise SettingsError(f"c2d_max_delivery_count must be 1 to {MAX_DELIVERY_COUNT}")
        if not 0 < self.stalled_peer_timeout <= 3600:
            raise SettingsError("stalled_peer_timeout must be above 0 and at most 3600 seconds")
        for port in (self.mqtt_port, self.https_port, self.amqp_port):
            if not 0 <= port <= 65535:
                raise SettingsError(f"port {port} out of range")
        self.routing()
        return self

    def routing(self) -> dict[str, HubRoutes]:
        """Every hub's routes, checked (a :class:`SettingsError` naming the route and the problem)."""
        try:
            return build_routing(self.routes, self.fallback_route, self.hub_hosts)
        except RouteError as exc:
            raise SettingsError(f"routes: {exc}") from None

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
        raise SettingsError(f"assignment delay must be 'immediate' or seconds, not {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"assignment delay must be 'immediate' or seconds, not {value!r}") from None


def routes_setting(value: Any, where: str) -> tuple[RouteSpec, ...]:
    """Routes from flags (``[HUB/]NAME:SOURCE[:CONDITION]`` each), a settings file (a list of tables
    ``{name, source, condition?, endpoint?, enabled?, hub?}`` or of flag texts) or the environment (a JSON
    array of either, or one flag text)."""
    if value is None:
        return ()
    if isinstance(value, str):
        if not value.lstrip().startswith("["):
            value = [value]
        else:
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise SettingsError(f"{where}: not a JSON array of routes: {exc}") from None
    if not isinstance(value, list | tuple):
        raise SettingsError(f"{where} must be a list of routes")
    try:
        return tuple(route_from_table(item) for item in value)
    except RouteError as exc:
        raise SettingsError(f"{where}: {exc}") from None


def fallback_setting(value: Any, where: str) -> tuple[str, ...] | None:
    """``true``/``on`` (every hub: None), ``false``/``off`` (none) or the hubs that keep it (a list, or
    comma separated)."""
    if value is None or value is True:
        return None
    if value is False:
        return ()
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("on", "true", "yes", "1", "all"):
            return None
        if text in ("off", "false", "no", "0", "none"):
            return ()
        return tuple(item.strip() for item in value.split(",") if item.strip())
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise SettingsError(f"{where} must be true, false or a list of hubs, not {value!r:.80}")


KEYS = (
    "data_dir",
    "dps_host",
    "hub_hosts",
    "mqtt_port",
    "https_port",
    "amqp_port",
    "hub_partitions",
    "hub_retention_days",
    "assignment_delay",
    "allocation_webhook_timeout",
    "allocation_webhook_ca",
    "azure_quotas",
    "hub_tier",
    "c2d_default_ttl",
    "c2d_max_delivery_count",
    "stalled_peer_timeout",
    "routes",
    "fallback_route",
    "ready_file",
    "max_packet_size",
    "log_level",
    "metrics_listen",
    "pause_log",
)

# Which ``serve`` option sets which key (argparse dest -> key); every key but max_packet_size has one.
FLAGS = FlagKeys({key: key for key in KEYS if key != "max_packet_size"})


def load_file(path: Path) -> SettingsFile:
    """A settings file: TOML (``.toml``) or JSON (any other name), with this program's keys only."""
    return SettingsFile.read(path, json_text=path.suffix.lower() != ".toml", known=KEYS)


def build_config(
    file: Path | None, overrides: Mapping[str, Any], env: Mapping[str, str] | None = None
) -> EmulatorConfig:
    """Command-line values that were given (``overrides``, not None) over the environment (``IOT_EMULATOR_*``)
    over the settings file over the defaults."""
    source = SettingsSource(ENV_PREFIX, env, load_file(file) if file else None, flags=overrides)
    default = EmulatorConfig()
    ready_file = source.text("ready_file")
    pause_log = source.text("pause_log")
    webhook_ca = source.text("allocation_webhook_ca")
    delay = source.value("assignment_delay")
    return replace(
        default,
        data_dir=Path(source.text("data_dir") or default.data_dir),
        dps_host=source.text("dps_host") or default.dps_host,
        hub_hosts=source.text_list("hub_hosts", default.hub_hosts),
        mqtt_port=source.integer("mqtt_port", default.mqtt_port),
        https_port=source.integer("https_port", default.https_port),
        amqp_port=source.integer("amqp_port", default.amqp_port),
        hub_partitions=source.integer("hub_partitions", default.hub_partitions),
        hub_retention_days=source.number("hub_retention_days", default.hub_retention_days),
        assignment_delay=default.assignment_delay if delay is None else assignment_delay(delay),
        allocation_webhook_timeout=source.number(
            "allocation_webhook_timeout", default.allocation_webhook_timeout
        ),
        allocation_webhook_ca=Path(webhook_ca) if webhook_ca else None,
        azure_quotas=source.flag("azure_quotas", default.azure_quotas),
        hub_tier=source.text("hub_tier") or default.hub_tier,
        c2d_default_ttl=source.number("c2d_default_ttl", default.c2d_default_ttl),
        c2d_max_delivery_count=source.integer("c2d_max_delivery_count", default.c2d_max_delivery_count),
        stalled_peer_timeout=source.number("stalled_peer_timeout", default.stalled_peer_timeout),
        routes=routes_setting(source.value("routes"), source.describe("routes")),
        fallback_route=fallback_setting(source.value("fallback_route"), source.describe("fallback_route")),
        ready_file=Path(ready_file) if ready_file else None,
        max_packet_size=source.integer("max_packet_size", default.max_packet_size),
        log_level=source.text("log_level") or default.log_level,
        metrics_listen=source.text("metrics_listen") or default.metrics_listen,
        pause_log=Path(pause_log) if pause_log else None,
    ).validated()
