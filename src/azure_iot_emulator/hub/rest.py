"""IoT Hub service REST API (the subset azure-iot-hub's IoTHubRegistryManager uses), one app per hub.

Routes (``?api-version=...`` accepted and ignored; every request needs an ``iothubowner`` SAS)::

    GET    /devices?top=N                      list device identities (also /devices/, as Node's SDK asks)
    GET    /devices/{id}                       device identity                    200 | 404
    PUT    /devices/{id}                       create (no If-Match) / update      200 | 409 | 412
    DELETE /devices/{id}                       delete (If-Match optional)         204 | 404 | 412
    DELETE /devices/{id}/commands              purge the device's cloud-to-device queue: 200
                                               {"deviceId", "moduleId": null, "totalMessagesPurged"} | 404
    POST   /devices/query                      {"query": "SELECT ... FROM devices [WHERE ...] [GROUP BY ...]"}
                                               (hub/query.py), paged with x-ms-max-item-count /
                                               x-ms-continuation; unsupported syntax: 400
    GET    /twins/{id}                         twin                               200 | 404
    PATCH  /twins/{id}                         merge tags + desired (null deletes) 200 | 400 | 412
    PUT    /twins/{id}                         replace tags + desired             200 | 400 | 412
    POST   /twins/{id}/methods                 direct method                      200 | 404 | 504
    GET    /devices/{id}/messages?top=N        emulator extension: the device's recent telemetry
                                               (oldest first, with enqueuedTimeUtc and properties)
    GET    /messages?after=N&top=M             emulator extension: this hub's telemetry from every device
                                               with a sequenceNumber above N (default 0), oldest first, at
                                               most M (default 500): a reader tails the hub by passing the
                                               last sequenceNumber it saw

Bodies are parsed by ``jsonsafe`` (nesting, lone surrogates, numbers beyond a double, duplicate keys, UTF-8):
what it refuses is 400 ``ArgumentInvalid``, like any other malformed body.

Errors use Azure's envelope: ``{"Message": "ErrorCode:<Name>;<text>", "ExceptionMessage": "Tracking ID:..."}``
with an ``iothub-errorcode`` header.  Never a ``Retry-After`` on 4xx.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

import jsonsafe
from azure_iot_emulator import ids
from azure_iot_emulator.https import local_port, self_guarded
from azure_iot_emulator.hub.service import HubError, HubService
from azure_iot_emulator.sas import SasError, request_resources, verify_sas

log = logging.getLogger(__name__)

SERVICE_POLICY = "iothubowner"
MAX_BODY_BYTES = 1024 * 1024
DEFAULT_PAGE = 100

_SERVICE_KEY = web.AppKey("hub_service", HubService)
_HUB_KEY = web.AppKey("hub_host", str)


def _error_response(status: int, code: str, message: str) -> web.Response:
    stamp = datetime.now(UTC).strftime("%m/%d/%Y %H:%M:%S")
    body = {
        "Message": f"ErrorCode:{code};{message}",
        "ExceptionMessage": f"Tracking ID:{uuid.uuid4().hex}-G:0-TimeStamp:{stamp}",
    }
    return web.json_response(body, status=status, headers={"iothub-errorcode": code})


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


def _make_auth_middleware(
    keys: Callable[[], dict[str, str]], clock: Callable[[], datetime], names: Sequence[str]
) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if self_guarded(request):  # MQTT over WebSockets on the same listener
            return await handler(request)
        header = request.headers.get("Authorization")
        try:
            key = keys().get(SERVICE_POLICY)
            if key is None:
                raise SasError("WRONG_POLICY", "no such policy")
            resources = request_resources(names, local_port(request), request.path)
            verify_sas(header, key_b64=key, policy=SERVICE_POLICY, now=clock(), resources=resources)
        except SasError as exc:
            log.info("hub REST %s %s refused: %s", request.method, request.path, exc.reason)
            return _error_response(401, "IotHubUnauthorizedAccess", f"Unauthorized: {exc}")
        try:
            return await handler(request)
        except HubError as exc:
            return _error_response(exc.status, exc.code, exc.message)
        except web.HTTPException:
            raise
        except Exception:
            tracking = uuid.uuid4().hex
            log.exception("hub REST %s %s failed (tracking %s)", request.method, request.path, tracking)
            return _error_response(500, "ServerError", f"Internal error, tracking id {tracking}")

    return middleware


async def _read_json(request: web.Request) -> Any:
    raw = await request.read()
    if len(raw) > MAX_BODY_BYTES:
        raise HubError(413, "RequestEntityTooLarge", 413002, "request body too large")
    try:
        return jsonsafe.loads(raw) if raw else None
    except jsonsafe.JsonRefused as exc:
        raise HubError(400, "ArgumentInvalid", 400004, f"request body refused ({exc.reason}): {exc}") from exc


def _int_param(request: web.Request, name: str, default: int, maximum: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= maximum:
        raise HubError(400, "ArgumentInvalid", 400004, f"{name} must be an integer between 1 and {maximum}")
    return int(text)


def _device_id(request: web.Request) -> str:
    """The path's device id, refused (400, nothing looked up) unless Azure would accept it."""
    device_id = request.match_info["device_id"]
    if not ids.is_device_id(device_id):
        raise HubError(
            400, "ArgumentInvalid", 400004, f"invalid device id {device_id!r}: {ids.DEVICE_ID_RULE}"
        )
    return device_id


def _ctx(request: web.Request) -> tuple[HubService, str]:
    return request.app[_SERVICE_KEY], request.app[_HUB_KEY]


async def list_devices(request: web.Request) -> web.Response:
    service, hub = _ctx(request)
    top = _int_param(request, "top", 1000, 1000)
    return _json(service.list_devices(hub, top))


async def get_device(request: web.Request) -> web.Response:
    service, hub = _ctx(request)
    return _json(service.get_device(hub, _device_id(request)))


async def put_device(request: web.Request) -> web.Response:
    service, hub = _ctx(request)
    body = await _read_json(request)
    return _json(
        service.put_device(hub, _device_id(request), body, request.headers.get("If-Match"))
    )


async def delete_device(request: web.Request) -> web.Response:
    service, hub = _ctx(request)
    service.delete_device(hub, _device_id(request), request.headers.get("If-Match"))
    return web.Response(status=204)


async def purge_c2d(request: web.Request) -> web.Response:
    service, hub = _ctx(request)
    return _json(service.purge_c2d(hub, _device_id(request)))


async def query_devices(request: web.Request) -> web.Response:
    service, hub = _ctx(request)
    body = await _read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("query"), str):
        raise HubError(400, "ArgumentInvalid", 400004, 'body must be {"query": "SELECT * FROM devices ..."}')
    page_text = request.headers.get("x-ms-max-item-count")
    page = int(page_text) if page_text and page_text.isdigit() and int(page_text) > 0 else DEFAULT_PAGE
    continuation = request.headers.get("x-ms-continuation") or "0"
    if not continuation.isdigit():
        raise HubError(400, "ArgumentInvalid", 400004, "invalid x-ms-continuation")
    start = int(continuation)
    items = service.query_devices(hub, body["query"])
    chunk = items[start : start + page]
    headers = {"x-ms-item-type": "Twin"}
    if start + page < len(items):
        headers["x-ms-continuation"] = str(start + page)
    return _json(chunk, headers=headers)


async def get_twin(request: web.Request) -> web.Response:
    service, hub = _ctx(request)
    return _json(service.get_twin(hub, _device_id(request)))


async def patch_twin(request: web.Request) -> web.Response:
    service, hub = _ctx(request)
    body = await _read_json(request)
    twin = await service.update_twin(
        hub, _device_id(request), body, request.headers.get("If-Match"), replace_all=False
    )
    return _json(twin)


async def put_twin(request: web.Request) -> web.Response:
    service, hub = _ctx(request)
    body = await _read_json(request)
    twin = await service.update_twin(
        hub, _device_id(request), body, request.headers.get("If-Match"), replace_all=True
    )
    return _json(twin)


async def invoke_method(request: web.Request) -> web.Response:
    service, hub = _ctx(request)
    body = await _read_json(request)
    return _json(await service.invoke_method(hub, _device_id(request), body))


async def device_messages(request: web.Request) -> web.Response:
    service, hub = _ctx(request)
    top = _int_param(request, "top", 20, 1000)
    return _json(service.recent_messages(hub, _device_id(request), top))


async def hub_messages(request: web.Request) -> web.Response:
    service, hub = _ctx(request)
    text = request.query.get("after", "0")
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise HubError(400, "ArgumentInvalid", 400004, "after must be a sequence number (0 or more)")
    top = _int_param(request, "top", 500, 1000)
    return _json(service.messages_after(hub, int(text), top))


def build_hub_rest_app(
    service: HubService,
    hub: str,
    keys: Callable[[], dict[str, str]],
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    names: Sequence[str] = (),
) -> web.Application:
    """The REST app of hub ``hub``; ``keys()`` returns {policy name: base64 key} (``iothubowner``).  A SAS
    token's ``sr`` must name this hub: ``hub`` or one of ``names`` (its address), with or without the
    port the request reached."""
    app = web.Application(
        middlewares=[_make_auth_middleware(keys, clock, (hub, *names))], client_max_size=MAX_BODY_BYTES + 1
    )
    app[_SERVICE_KEY] = service
    app[_HUB_KEY] = hub
    app.router.add_get("/devices", list_devices)
    app.router.add_get("/devices/", list_devices)  # azure-iothub (Node.js) lists with the trailing slash
    app.router.add_post("/devices/query", query_devices)
    app.router.add_get("/devices/{device_id}/messages", device_messages)
    app.router.add_get("/messages", hub_messages)
    app.router.add_get("/devices/{device_id}", get_device)
    app.router.add_put("/devices/{device_id}", put_device)
    app.router.add_delete("/devices/{device_id}", delete_device)
    app.router.add_delete("/devices/{device_id}/commands", purge_c2d)
    app.router.add_get("/twins/{device_id}", get_twin)
    app.router.add_patch("/twins/{device_id}", patch_twin)
    app.router.add_put("/twins/{device_id}", put_twin)
    app.router.add_post("/twins/{device_id}/methods", invoke_method)
    return app
