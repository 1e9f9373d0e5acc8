"""Everything the emulator's wiring needs from the IoT Hub half, in one object.

hub = HubPart(db, hub_hosts, clock, service_keys=lambda host: {"iothubowner": keys[host]})
hub.registry                 # HubRegistry (DPS calls provision_from_dps on it)
hub.endpoints                # one MQTT endpoint per hub host (register with the MQTT core)
hub.rest_app(host)           # the aiohttp service REST app of one hub (served on 443 of its host)
hub.amqp_endpoint(host)      # the hub's AMQP endpoint (built-in Event Hub-compatible endpoint, C2D sends)
await hub.close()            # at shutdown
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta

from aiohttp import web

from azure_iot_emulator.hub.amqp_endpoint import HubAmqpEndpoint
from azure_iot_emulator.hub.c2d import C2dLimits
from azure_iot_emulator.hub.endpoint import HubEndpoint
from azure_iot_emulator.hub.eventhub.model import DEFAULT_PARTITIONS, DEFAULT_RETENTION_DAYS
from azure_iot_emulator.hub.eventhub.rest import consumer_group_routes
from azure_iot_emulator.hub.eventhub.service import EventHubService
from azure_iot_emulator.hub.eventhub.store import EventHubStore
from azure_iot_emulator.hub.registry import HubRegistry
from azure_iot_emulator.hub.rest import build_hub_rest_app
from azure_iot_emulator.hub.routing import HubRoutes, message_row
from azure_iot_emulator.hub.service import HubService
from azure_iot_emulator.hub.telemetry import BuiltinFilter, TelemetryMetrics, TelemetryStore
from azure_iot_emulator.hub.topics import PropertyBag
from azure_iot_emulator.quotas import TokenBuckets
from azure_iot_emulator.store import Database


class HubPart:
    def __init__(
        self,
        db: Database,
        hub_hosts: Sequence[str],
        clock: Callable[[], datetime],
        service_keys: Callable[[str], dict[str, str]],
        *,
        registry: HubRegistry | None = None,
        d2c_quota: TokenBuckets | None = None,
        metrics: TelemetryMetrics | None = None,
        c2d_limits: C2dLimits | None = None,
        partitions: int = DEFAULT_PARTITIONS,
        retention: timedelta = timedelta(days=DEFAULT_RETENTION_DAYS),
        routing: Mapping[str, HubRoutes] | None = None,
    ) -> None:
        """``routing``: each hub's message routes (``hub/routing.py``); none: Azure's default."""
        self.registry = registry or HubRegistry(db, hub_hosts, clock)
        self.registry.reset_connection_states()  # nobody is connected to a process that just started
        # The built-in endpoint's positions are written in the telemetry's own transactions.
        events = EventHubStore(db, {host: partitions for host in hub_hosts}, clock())
        self.telemetry = TelemetryStore(
            db,
            clock,
            on_insert=self.registry.record_activity,
            on_positions=events.record,
            metrics=metrics,
            to_builtin=builtin_filter(routing or {}),
        )
        events.index_unpositioned()
        self.service = HubService(
            self.registry, self.telemetry, clock, d2c_quota, c2d_limits=c2d_limits, routing=routing
        )
        self.eventhub = EventHubService(events, hub_hosts, clock, retention)
        self.eventhub.prune()
        self.service.add_telemetry_listener(self.eventhub.stored)
        self._clock = clock
        self._keys = service_keys
        self.endpoints = [HubEndpoint(host, self.service) for host in hub_hosts]
        self._amqp: dict[str, HubAmqpEndpoint] = {}

    def rest_app(self, host: str, names: Sequence[str] = ()) -> web.Application:
        """``names``: other names of the hub (its address) a SAS token's ``sr`` may use."""
        app = build_hub_rest_app(self.service, host, lambda: self._keys(host), self._clock, names)
        app.router.add_routes(consumer_group_routes(self.eventhub, host))
        return app

    def amqp_endpoint(self, host: str, names: Sequence[str] = ()) -> HubAmqpEndpoint:
        """The AMQP endpoint of one hub (served on 5671 of its address); ``names`` as for the REST app."""
        if host not in self._amqp:
            self._amqp[host] = HubAmqpEndpoint(
                host, tuple(names), self.eventhub, self.registry, lambda: self._keys(host), self._clock,
                self.service,
            )
        return self._amqp[host]

    async def close(self) -> None:
        for endpoint in self._amqp.values():
            endpoint.close()
        await self.service.close()


def builtin_filter(routing: Mapping[str, HubRoutes]) -> BuiltinFilter | None:
    """Which device messages the built-in endpoint gets; None (all, at no cost) while no hub has routes."""
    if all(routes.all_device_messages for routes in routing.values()):
        return None

    def to_builtin(hub: str, device_id: str, properties: PropertyBag, body: bytes) -> bool:
        routes = routing.get(hub)
        if routes is None or routes.all_device_messages:
            return True
        return routes.device_message(message_row(device_id, properties, body))

    return to_builtin
