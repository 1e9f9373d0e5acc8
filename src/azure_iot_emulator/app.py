"""The emulator's wiring: one object builds config, CA, database, the DPS and IoT Hub parts, the MQTT
core with its TLS listeners and the HTTPS listener of every host, and starts/stops them.

Every host is served as Azure serves it: MQTT on 8883 and HTTPS on 443 of its own address, where the host's
service REST API (``self.service_apps``, one aiohttp app per address) shares the port with the routes that
authenticate devices themselves (``self.https_routes``: the DPS device API, MQTT over WebSockets).  So
connection strings are Azure's shape, ``HostName=<host>;SharedAccessKeyName=...;SharedAccessKey=...``.

To add a part: give :meth:`Emulator._build_parts` another endpoint (``self.endpoints``) and/or routes on a
host's HTTPS port (``self.https_routes``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import secrets
import ssl
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aiohttp import web

from azure_iot_emulator.config import AMQP_PORT, HTTPS_PORT, EmulatorConfig, listen_address
from azure_iot_emulator.connection_info import (
    CONNECTION_FILE,
    ConnectionInfo,
    HubConnection,
    read_connection_info,
)
from azure_iot_emulator.dps.allocation import CustomAllocationWebhook
from azure_iot_emulator.dps.part import DpsPart
from azure_iot_emulator.https import HttpsListener, add_self_guarded_routes
from azure_iot_emulator.hub.c2d import C2dLimits
from azure_iot_emulator.hub.eventhub.model import entity_name
from azure_iot_emulator.hub.eventhub.store import PartitionCountChanged
from azure_iot_emulator.hub.part import HubPart
from azure_iot_emulator.longlived import LongLivedObjects
from azure_iot_emulator.metrics import EmulatorMetrics
from azure_iot_emulator.mqtt.broker import Broker
from azure_iot_emulator.mqtt.endpoint import Endpoint
from azure_iot_emulator.mqtt.tls import OutputGuard, server_context, start_listener, start_tls_listener
from azure_iot_emulator.mqtt.websocket import websocket_route
from azure_iot_emulator.pauses import PauseRecorder
from azure_iot_emulator.pki import ServerPki, issue_server_certificate
from azure_iot_emulator.quotas import hub_d2c
from azure_iot_emulator.store import Database
from litestore.files import DIRECTORY_MODE, private_directory
from mainkit.settings import SettingsError

log = logging.getLogger(__name__)

DB_FILE = "emulator.db"
DPS_POLICY = "provisioningserviceowner"
HUB_POLICY = "iothubowner"

_META_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS emulator_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


@dataclass(frozen=True)
class EmulatorSecrets:
    id_scope: str
    dps_key: str
    hub_keys: Mapping[str, str]
    """Every hub its own ``iothubowner`` key, by host name (lower case)."""

    def hub_key(self, host: str) -> str:
        return self.hub_keys[host.lower()]


class PrivilegedPortError(PermissionError):
    """The HTTPS port (443 unless chosen) could not be bound for lack of privilege."""


def _new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def load_or_create_secrets(db: Database, hub_hosts: Sequence[str]) -> EmulatorSecrets:
    """ID scope and service policy keys (the DPS's, and one per hub): generated when first needed,
    persisted, reused after."""
    with db.transaction() as conn:
        conn.execute(_META_SCHEMA[0])
        values = {r["key"]: r["value"] for r in conn.execute("SELECT key, value FROM emulator_meta")}
        wanted: dict[str, Callable[[], str]] = {
            "id_scope": lambda: "0ne" + secrets.token_hex(4).upper(),
            "dps_key": _new_key,
        }
        wanted.update({f"hub_key:{host.lower()}": _new_key for host in hub_hosts})
        for key, make in wanted.items():
            if key not in values:
                values[key] = make()
                conn.execute("INSERT INTO emulator_meta (key, value) VALUES (?, ?)", (key, values[key]))
    hub_keys = {host.lower(): values[f"hub_key:{host.lower()}"] for host in hub_hosts}
    return EmulatorSecrets(values["id_scope"], values["dps_key"], hub_keys)


def private_data_directory(path: Path) -> None:
    """The data directory holds keys: 0700, also when it already existed (unlike a directory litestore
    merely finds, this one is the emulator's own), and so are the parents it creates.  The database file
    and its -wal/-shm are made 0600 by litestore when it opens them."""
    private_directory(path)
    os.chmod(path, DIRECTORY_MODE)


def privileged_port_advice(address: str, port: int) -> str:
    """The one sentence that says why the HTTPS port could not be bound and the three ways out."""
    interpreter = os.path.realpath(sys.executable)
    return (
        f"cannot listen on port {port} of {address}: binding a port below 1024 needs root or "
        f"CAP_NET_BIND_SERVICE, so run the emulator as root, grant the interpreter the capability "
        f"(sudo setcap cap_net_bind_service=+ep {interpreter}), or choose another port with --https-port "
        f"(https_port in a settings file; connection strings then carry it)"
    )


def endpoint_host(host: str, port: int) -> str:
    """A service endpoint as connection strings name it: the bare host on Azure's 443, else host:port."""
    return host if port == HTTPS_PORT else f"{host}:{port}"


class Emulator:
    def __init__(
        self,
        config: EmulatorConfig,
        clock: Callable[[], datetime] | None = None,
        long_lived: LongLivedObjects | None = None,
    ) -> None:
        """``long_lived``: freeze long-lived objects out of the garbage collector's walks
        (``longlived.py``), a decision for the whole process: ``serve`` makes it, an embedding test
        need not."""
        self.config = config
        self.clock = clock or (lambda: datetime.now(UTC))
        self.db: Database | None = None
        self.secrets: EmulatorSecrets | None = None
        self.pki: ServerPki | None = None
        self.broker: Broker | None = None
        self.hub: HubPart | None = None
        self.dps: DpsPart | None = None
        self.endpoints: list[Endpoint] = []
        self._mqtt_servers: list[asyncio.Server] = []  # and the AMQP listeners
        self._amqp_ports: dict[str, int] = {}
        self.service_apps: dict[str, web.Application] = {}
        self.https_routes: dict[str, list[web.RouteDef]] = {}
        self._https: dict[str, HttpsListener] = {}
        self.connection: ConnectionInfo | None = None
        self.metrics = EmulatorMetrics()
        self.metrics_url = ""
        self.output = OutputGuard(config.stalled_peer_timeout)
        """Back-pressure of every TLS listener (MQTT, AMQP, HTTPS): peers that do not read."""
        self.pauses = PauseRecorder(config.pause_log) if config.pause_log is not None else None
        self.long_lived = long_lived

    # ---------------------------------------------------------------------------------------- parts
    def _build_parts(self) -> None:
        cfg, db, keys = self.config, self.db, self.secrets
        assert db is not None and keys is not None
        try:
            self.hub = HubPart(
                db, cfg.hub_hosts, self.clock, service_keys=lambda host: {HUB_POLICY: keys.hub_key(host)},
                d2c_quota=hub_d2c(cfg.hub_tier) if cfg.azure_quotas else None,
                metrics=self.metrics if self.pauses is None else self.pauses.watching(self.metrics),
                c2d_limits=C2dLimits(cfg.c2d_default_ttl, cfg.c2d_max_delivery_count),
                partitions=cfg.hub_partitions,
                retention=timedelta(days=cfg.hub_retention_days),
                routing=cfg.routing(),
            )
        except PartitionCountChanged as exc:
            raise SettingsError(str(exc)) from exc
        self.dps = DpsPart(
            db,
            id_scope=keys.id_scope,
            hub_hosts=cfg.hub_hosts,
            registry=self.hub.registry,
            clock=self.clock,
            service_keys=lambda: {DPS_POLICY: keys.dps_key},
            assignment_delay=cfg.assignment_delay,
            names=(cfg.dps_host, listen_address(cfg.dps_host)),
            azure_quotas=cfg.azure_quotas,
            metrics=self.metrics,
            webhook=CustomAllocationWebhook(
                timeout=cfg.allocation_webhook_timeout, ca_file=cfg.allocation_webhook_ca
            ),
            writes=self.metrics.service_writes,
        )
        self.endpoints = [self.dps.endpoint, *self.hub.endpoints]
        # The HTTPS port of every host (one aiohttp app per address, the config gives each its own): the
        # host's service REST API, with the DPS device API on the DPS host and MQTT over WebSockets
        # everywhere (added with the broker).
        dps_address = listen_address(cfg.dps_host)
        self.service_apps = {dps_address: self.dps.rest_app()}
        for host in cfg.hub_hosts:
            address = listen_address(host)
            self.service_apps[address] = self.hub.rest_app(host, names=(address,))
        self.https_routes = {address: [] for address in self.service_apps}
        self.https_routes[dps_address].extend(self.dps.device_api.routes())

    # ------------------------------------------------------------------------------------ lifecycle
    async def start(self) -> ConnectionInfo:
        cfg = self.config
        private_data_directory(cfg.data_dir)
        if self.pauses is not None:
            self.pauses.start()
        self.db = Database(cfg.data_dir / DB_FILE)
        self.secrets = load_or_create_secrets(self.db, cfg.hub_hosts)
        self.pki = issue_server_certificate(cfg.data_dir, [cfg.dps_host, *cfg.hub_hosts], self.clock())
        self._build_parts()
        self.broker = Broker(
            self.db, self.endpoints, max_packet_size=cfg.max_packet_size, counter=self.long_lived
        )
        if self.long_lived is not None:
            self.long_lived.start()  # before the first connection: what start-up made lives as long as we do
        for routes in self.https_routes.values():  # MQTT over WebSockets on 443 of every host
            routes.append(websocket_route(self.broker))
        self._watch(self.broker, self.db.path)
        try:
            await self._listen()
            if cfg.metrics_listen:
                self.metrics_url = await self.metrics.serve(cfg.metrics_listen)
        except BaseException:
            await self.stop()
            raise
        self.connection = info = self._connection_info()
        self._write_connection_file(info)
        return info

    async def _listen(self) -> None:
        cfg = self.config
        assert self.pki is not None and self.broker is not None
        tls = server_context(self.pki.cert_path, self.pki.key_path)
        for address in self.service_apps:
            server = await start_listener(self.broker, tls, address, cfg.mqtt_port, guard=self.output)
            self._mqtt_servers.append(server)
        assert self.hub is not None
        for host in cfg.hub_hosts:  # AMQP on 5671 of every hub's address
            address = listen_address(host)
            endpoint = self.hub.amqp_endpoint(host, names=(address,))
            server = await start_tls_listener(
                endpoint.opener(), tls, address, cfg.amqp_port, guard=self.output
            )
            self._mqtt_servers.append(server)
            self._amqp_ports[host] = server.sockets[0].getsockname()[1]
        await self._listen_https(tls)

    async def _listen_https(self, tls: ssl.SSLContext) -> None:
        """Every host's service REST API lives on its HTTPS port, so the emulator cannot run without it:
        a port it may not bind (443 without root or CAP_NET_BIND_SERVICE) stops the start with one
        sentence naming the ways out (:func:`privileged_port_advice`)."""
        port = self.config.https_port
        for address, app in self.service_apps.items():
            add_self_guarded_routes(app, self.https_routes[address])
            listener = HttpsListener(app, tls, address, port, self.output)
            try:
                await listener.start()
            except PermissionError as exc:
                await listener.stop()
                raise PrivilegedPortError(privileged_port_advice(address, port)) from exc
            except BaseException:
                await listener.stop()
                raise
            self._https[address] = listener

    def _endpoint(self, host: str) -> str:
        """``host`` as its connection string names it, with the port its HTTPS listener bound."""
        return endpoint_host(host, self._https[listen_address(host)].bound_port)

    def _watch(self, broker: Broker, db_path: Path) -> None:
        hubs = self.config.hub_hosts

        def connected() -> dict[str, int]:
            links = broker.links_per_endpoint()
            return {hub: links.get(hub, 0) for hub in hubs}

        files = [db_path, db_path.with_name(db_path.name + "-wal")]
        self.metrics.watch(connected, lambda: files)
        output = self.output
        self.metrics.watch_output(output.queued_bytes, lambda: len(output.stalled), lambda: output.dropped)

    def _connection_info(self) -> ConnectionInfo:
        cfg, keys = self.config, self.secrets
        assert keys is not None and self.pki is not None
        dps_endpoint = self._endpoint(cfg.dps_host)
        hubs: list[HubConnection] = []
        for host in cfg.hub_hosts:
            endpoint = self._endpoint(host)
            port = self._amqp_ports[host]
            amqp = f"sb://{host}/" if port == AMQP_PORT else f"sb://{host}:{port}/"
            hubs.append(
                {
                    "host_name": host,
                    "connection_string": f"HostName={endpoint};SharedAccessKeyName={HUB_POLICY};"
                    f"SharedAccessKey={keys.hub_key(host)}",
                    "rest_endpoint": f"https://{endpoint}",
                    "eventhub_endpoint": amqp,
                    "eventhub_name": entity_name(host),
                    "eventhub_connection_string": f"Endpoint={amqp};SharedAccessKeyName={HUB_POLICY};"
                    f"SharedAccessKey={keys.hub_key(host)};EntityPath={entity_name(host)}",
                }
            )
        info: ConnectionInfo = {
            "pid": os.getpid(),
            "ca_pem_path": str(self.pki.ca_path.resolve()),
            "id_scope": keys.id_scope,
            "global_endpoint": cfg.dps_host,
            "mqtt_port": cfg.mqtt_port,
            "https_port": self._https[listen_address(cfg.dps_host)].bound_port,
            "dps": {
                "connection_string": f"HostName={dps_endpoint};SharedAccessKeyName={DPS_POLICY};"
                f"SharedAccessKey={keys.dps_key}",
                "rest_endpoint": f"https://{dps_endpoint}",
            },
            "hubs": hubs,
            "default_hub": cfg.default_hub,
        }
        if self.metrics_url:
            info["metrics_url"] = self.metrics_url
        return info

    def _write_connection_file(self, info: ConnectionInfo) -> None:
        path = self.config.data_dir / CONNECTION_FILE
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds service keys
        with os.fdopen(fd, "w") as handle:
            json.dump(info, handle, indent=2)
        os.replace(tmp, path)
        if self.config.ready_file is not None:
            self.config.ready_file.write_text(str(path.resolve()) + "\n")

    async def stop(self) -> None:
        await self.metrics.stop()
        for server in self._mqtt_servers:
            server.close()
        self._mqtt_servers.clear()
        for listener in self._https.values():
            await listener.stop()
        self._https.clear()
        if self.broker is not None:
            await self.broker.close()
        if self.long_lived is not None:
            self.long_lived.stop()
        if self.hub is not None:
            await self.hub.close()
        if self.dps is not None:
            await self.dps.close()
        if self.db is not None:
            self.db.close()
            self.db = None
        if self.pauses is not None:
            await self.pauses.stop()
        with_path = self.config.data_dir / CONNECTION_FILE
        if self.connection is not None and with_path.exists():
            current = read_connection_info(with_path)
            if current is not None and current["pid"] == os.getpid():
                with_path.unlink()
