"""Consumer groups of a hub's built-in endpoint over the hub's REST API (hub SAS, like every hub route).

On Azure they are sub-resources of the hub in the resource provider,
``.../providers/Microsoft.Devices/IotHubs/{hub}/eventHubEndpoints/events/ConsumerGroups/{name}``; the
emulator serves that path's tail on the hub's own REST endpoint, with the resource provider's bodies::

    GET    /eventHubEndpoints/events/ConsumerGroups          {"value": [group, ...]}
    GET    /eventHubEndpoints/events/ConsumerGroups/{name}   group                         200 | 404
    PUT    /eventHubEndpoints/events/ConsumerGroups/{name}   create (body ignored)         200 | 400 | 403
    DELETE /eventHubEndpoints/events/ConsumerGroups/{name}   delete                        200 | 400 | 404

A group is ``{"id", "name", "type": "Microsoft.Devices/IotHubs/EventHubEndpoints/ConsumerGroups",
"properties": {"name", "created"}, "etag"}``.  ``$Default`` always exists and cannot be deleted; names are
1-50 letters, digits, ``.``, ``_``, ``-`` (case-insensitive); a hub has at most 20 groups.  Refusals use
the hub's error envelope (400 ``ArgumentInvalid``, 404 ``ConsumerGroupNotFound``, 403
``IotHubQuotaExceeded``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web

from azure_iot_emulator.hub.eventhub.service import EventHubError, EventHubService
from azure_iot_emulator.hub.service import HubError
from azure_iot_emulator.hub.timefmt import azure_time

BASE = "/eventHubEndpoints/events/ConsumerGroups"
RESOURCE_TYPE = "Microsoft.Devices/IotHubs/EventHubEndpoints/ConsumerGroups"
_CODES = {
    400: ("ArgumentInvalid", 400004),
    403: ("IotHubQuotaExceeded", 403002),
    404: ("ConsumerGroupNotFound", 404001),
}


def _group(name: str, created: datetime) -> dict[str, Any]:
    return {
        "id": f"{BASE}/{name}",
        "name": name,
        "type": RESOURCE_TYPE,
        "properties": {"name": name, "created": azure_time(created)},
        "etag": None,
    }


def _hub_error(exc: EventHubError) -> HubError:
    code, number = _CODES.get(exc.status, ("ArgumentInvalid", 400004))
    return HubError(exc.status, code, number, exc.message)


def consumer_group_routes(eventhub: EventHubService, hub: str) -> list[web.RouteDef]:
    async def list_groups(request: web.Request) -> web.Response:
        return web.json_response({"value": [_group(*g) for g in eventhub.consumer_groups(hub)]})

    async def get_group(request: web.Request) -> web.Response:
        try:
            return web.json_response(_group(*eventhub.consumer_group(hub, request.match_info["name"])))
        except EventHubError as exc:
            raise _hub_error(exc) from exc

    async def put_group(request: web.Request) -> web.Response:
        try:
            return web.json_response(_group(*eventhub.create_consumer_group(hub, request.match_info["name"])))
        except EventHubError as exc:
            raise _hub_error(exc) from exc

    async def delete_group(request: web.Request) -> web.Response:
        try:
            eventhub.delete_consumer_group(hub, request.match_info["name"])
        except EventHubError as exc:
            raise _hub_error(exc) from exc
        return web.json_response({})

    return [
        web.get(BASE, list_groups),
        web.get(BASE + "/{name}", get_group),
        web.put(BASE + "/{name}", put_group),
        web.delete(BASE + "/{name}", delete_group),
    ]
