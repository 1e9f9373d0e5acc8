"""The emulator's wiring: one object builds config, CA, database, the DPS and IoT Hub parts, the MQTT
core with its TLS listeners and the HTTPS REST apps, and starts/stops them.

To add a part: give :meth:`Emulator._build_parts` another endpoint (``self.endpoints``) and/or REST app
(``self.rest_apps``, a list of ``RestApp(name, address, port, app)``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import secrets
import socket
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from azure_iot_emulator.config import EmulatorConfig, listen_address
from azure_iot_emulator.connection_info import (
    CONNECTION_FILE,
    ConnectionInfo,
    HubConnection,
    read_connection_info,
)
from azure_iot_emulator.dps.part import DpsPart
from azure_iot_emulator.https import HttpsListener
from azure_iot_emulator.hub.part import HubPart
from azure_iot_emulator.metrics import EmulatorMetrics
from azure_iot_emulator.mqtt.broker import Broker
from azure_iot_emulator.mqtt.endpoint import Endpoint
from azure_iot_emulator.mqtt.tls import server_context, start_listener
from azure_iot_emulator.mqtt.websocket import websocket_route
from azure_iot_emulator.pki import ServerPki, issue_server_certificate
from azure_iot_emulator.quotas import hub_d2c
from azure_iot_emulator.store import Database

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


@dataclass
class RestApp:
    name: str
    address: str
    port: int
    app: web.Application
    runner: web.AppRunner | None = None
    bound_port: int = 0


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


def private_directory(path: Path) -> None:
    """The data directory holds keys: 0700, also when it already existed (unlike a directory litestore
    merely finds, this one is the emulator's own).  The database file and its -wal/-shm are made 0600 by
    litestore when it opens them."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _bind(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(512)
    sock.setblocking(False)
    return sock


class Emulator:
    def __init__(self, config: EmulatorConfig, clock: Callable[[], datetime] | None = None) -> None:
        self.config = config
        self.clock = clock or (lambda: datetime.now(UTC))
        self.db: Database | None = None
        self.secrets: EmulatorSecrets | None = None
        self.pki: ServerPki | None = None
        self.broker: Broker | None = None
        self.hub: HubPart | None = None
        self.dps: DpsPart | None = None
        self.endpoints: list[Endpoint] = []
        self.rest_apps: list[RestApp] = []
        self._mqtt_servers: list[asyncio.Server] = []
        self.https_routes: dict[str, list[web.RouteDef]] = {}
        self._https: list[HttpsListener] = []
        self.connection: ConnectionInfo | None = None
        self.metrics = EmulatorMetrics()
        self.metrics_url = ""

    # ---------------------------------------------------------------------------------------- parts
    def _build_parts(self) -> None:
        cfg, db, keys = self.config, self.db, self.secrets
        assert db is not None and keys is not None
        self.hub = HubPart(
            db, cfg.hub_hosts, self.clock, service_keys=lambda host: {HUB_POLICY: keys.hub_key(host)},
            d2c_quota=hub_d2c(cfg.hub_tier) if cfg.azure_quotas else None,
            metrics=self.metrics,
        )
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
        )
        self.endpoints = [self.dps.endpoint, *self.hub.endpoints]
        dps_address = listen_address(cfg.dps_host)
        # Port 443 of every host (one aiohttp app per address): the DPS device API on the DPS host, MQTT
        # over WebSockets everywhere (added with the broker); the service REST APIs can join later.
        self.https_routes = {listen_address(h): [] for h in (cfg.dps_host, *cfg.hub_hosts)}
        self.https_routes[dps_address].extend(self.dps.device_api.routes())
        self.rest_apps = [RestApp("dps", dps_address, cfg.dps_rest_port, self.dps.rest_app())]
        for host in cfg.hub_hosts:
            self.rest_apps.append(
                RestApp(
                    host, listen_address(host), cfg.hub_rest_port,
                    self.hub.rest_app(host, names=(listen_address(host),)),
                )
            )

    # ------------------------------------------------------------------------------------ lifecycle
    async def start(self) -> ConnectionInfo:
        cfg = self.config
        private_directory(cfg.data_dir)
        self.db = Database(cfg.data_dir / DB_FILE)
        self.secrets = load_or_create_secrets(self.db, cfg.hub_hosts)
        self.pki = issue_server_certificate(cfg.data_dir, [cfg.dps_host, *cfg.hub_hosts], self.clock())
        self._build_parts()
        self.broker = Broker(self.db, self.endpoints, max_packet_size=cfg.max_packet_size)
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
        addresses = dict.fromkeys(listen_address(h) for h in (cfg.dps_host, *cfg.hub_hosts))
        for address in addresses:
            self._mqtt_servers.append(await start_listener(self.broker, tls, address, cfg.mqtt_port))
        rest_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        rest_tls.load_cert_chain(self.pki.cert_path, self.pki.key_path)
        for rest in self.rest_apps:
            sock = _bind(rest.address, rest.port)
            rest.bound_port = sock.getsockname()[1]
            rest.runner = web.AppRunner(rest.app, access_log=None, handle_signals=False)
            await rest.runner.setup()
            await web.SockSite(rest.runner, sock, ssl_context=rest_tls).start()
        await self._listen_https(tls)

    async def _listen_https(self, tls: Any) -> None:
        """Port 443 needs privileges on most systems: without them the emulator runs without it (the
        MQTT and REST ports do not depend on it) and says so."""
        for address, routes in self.https_routes.items():
            app = web.Application(client_max_size=1024 * 1024)
            app.add_routes(routes)
            listener = HttpsListener(app, tls, address, self.config.https_port)
            try:
                await listener.start()
            except PermissionError as exc:
                log.warning(
                    "HTTPS port %s not available on %s (%s): no DPS device HTTPS API, no MQTT over "
                    "WebSockets", self.config.https_port, address, exc,
                )
                await listener.stop()
                continue
            except BaseException:
                await listener.stop()
                raise
            self._https.append(listener)

    def _watch(self, broker: Broker, db_path: Path) -> None:
        hubs = self.config.hub_hosts

        def connected() -> dict[str, int]:
            links = broker.links_per_endpoint()
            return {hub: links.get(hub, 0) for hub in hubs}

        files = [db_path, db_path.with_name(db_path.name + "-wal")]
        self.metrics.watch(connected, lambda: files)

    def _connection_info(self) -> ConnectionInfo:
        cfg, keys = self.config, self.secrets
        assert keys is not None and self.pki is not None
        dps_rest = next(r for r in self.rest_apps if r.name == "dps")
        dps_endpoint = f"{dps_rest.address}:{dps_rest.bound_port}"
        hubs: list[HubConnection] = []
        for host in cfg.hub_hosts:
            rest = next(r for r in self.rest_apps if r.name == host)
            endpoint = f"{rest.address}:{rest.bound_port}"
            hubs.append(
                {
                    "host_name": host,
                    "connection_string": f"HostName={endpoint};SharedAccessKeyName={HUB_POLICY};"
                    f"SharedAccessKey={keys.hub_key(host)}",
                    "rest_endpoint": f"https://{endpoint}",
                }
            )
        info: ConnectionInfo = {
            "pid": os.getpid(),
            "ca_pem_path": str(self.pki.ca_path.resolve()),
            "id_scope": keys.id_scope,
            "global_endpoint": cfg.dps_host,
            "mqtt_port": cfg.mqtt_port,
            "https_port": self._https[0].bound_port if self._https else None,
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
        for listener in self._https:
            await listener.stop()
        self._https.clear()
        if self.broker is not None:
            await self.broker.close()
        for rest in self.rest_apps:
            if rest.runner is not None:
                await rest.runner.cleanup()
                rest.runner = None
        if self.hub is not None:
            await self.hub.close()
        if self.dps is not None:
            await self.dps.close()
        if self.db is not None:
            self.db.close()
            self.db = None
        with_path = self.config.data_dir / CONNECTION_FILE
        if self.connection is not None and with_path.exists():
            current = read_connection_info(with_path)
            if current is not None and current["pid"] == os.getpid():
                with_path.unlink()
