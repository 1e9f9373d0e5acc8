"""The DPS service REST API (api-version 2021-10-01) as the azure-iot-deviceprovisioning SDK uses it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

import jsonsafe
from azure_iot_emulator.dps.errors import DpsError, bad_request, throttled, unauthorized
from azure_iot_emulator.dps.service import ENROLLMENTS, GROUPS, DpsService, Kind
from azure_iot_emulator.https import local_port, self_guarded
from azure_iot_emulator.quotas import TokenBuckets
from azure_iot_emulator.sas import SasError, request_resources, resource_allows, verify_sas

log = logging.getLogger(__name__)

SERVICE = web.AppKey("service", DpsService)
CLOCK: web.AppKey[Callable[[], datetime]] = web.AppKey("clock")
QUOTA: web.AppKey[TokenBuckets | None] = web.AppKey("quota")
MAX_BODY = 256 * 1024


def _error(exc: DpsError, now: datetime) -> web.Response:
    headers = {"x-ms-error-code": str(exc.code)}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    return web.json_response(exc.body(now), status=exc.status, headers=headers)


class _VerifiedTokens:
    """SAS headers already verified (the SDK reuses one token for many requests), with their expiry and
    resource, so a repeat costs a dictionary look-up instead of parsing and an HMAC.  Keyed by (header,
    policy, key): a rotated key never matches an old entry; expiry and audience are still checked on every
    request."""

    LIMIT = 256

    def __init__(self) -> None:
        self._known: dict[tuple[str, str, str], tuple[int, str]] = {}

    def authorised(
        self, header: str | None, keys: dict[str, str], now: datetime, resources: Sequence[str]
    ) -> str | None:
        """None when authorised, else the refusal reason."""
        if header is not None:
            stamp = now.timestamp()
            for policy, key in keys.items():
                known = self._known.get((header, policy, key))
                if known is not None and known[0] >= stamp:
                    if any(resource_allows(known[1], r) for r in resources):
                        return None
                    return "WRONG_AUDIENCE"
        reason = "MISSING"
        for policy, key in keys.items():
            try:
                token = verify_sas(header, key_b64=key, policy=policy, now=now, resources=resources)
            except SasError as exc:
                reason = exc.reason
                continue
            if header is not None:
                if len(self._known) >= self.LIMIT:
                    self._known.clear()
                self._known[(header, policy, key)] = (token.expiry, token.resource)
            return None
        return reason


WriteCounter = Callable[[str, int], None]
WRITES: web.AppKey[WriteCounter | None] = web.AppKey("writes")


def _count_write(request: web.Request, kind: str, count: int = 1) -> None:
    """A service write that succeeded (``--metrics-listen``: ``iot_emulator_dps_service_writes_total``)."""
    counter = request.app[WRITES]
    if counter is not None and count > 0:
        counter(kind, count)


def _auth_middleware(
    keys: Callable[[], dict[str, str]],
    clock: Callable[[], datetime],
    names: Sequence[str],
    quota: TokenBuckets | None,
) -> Any:
    verified = _VerifiedTokens()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if self_guarded(request):  # the DPS device API on the same listener
            return await handler(request)
        now = clock()
        header = request.headers.get("Authorization")
        resources = request_resources(names, local_port(request), request.path)
        reason = verified.authorised(header, keys(), now, resources)
        if reason is not None:
            log.info("DPS REST %s %s refused: SAS %s", request.method, request.path, reason)
            return _error(unauthorized(f"Unauthorized: SAS token {reason.lower().replace('_', ' ')}"), now)
        try:
            if quota is not None and (wait := quota.take()) is not None:
                raise throttled("service operations", wait)
            return await handler(request)
        except DpsError as exc:
            return _error(exc, now)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            # Unknown path or method: Azure's error body rather than aiohttp's text page.
            return _error(DpsError(exc.status, exc.status * 1000, exc.reason), now)
        except Exception:
            log.exception("DPS REST %s %s failed", request.method, request.path)
            return _error(DpsError(500, 500000, "Internal error"), now)

    return middleware


async def _body(request: web.Request) -> Any:
    raw = await request.read()
    if len(raw) > MAX_BODY:
        raise DpsError(413, 413001, "request body too large")
    if not raw:
        return None
    try:
        return jsonsafe.loads(raw)
    except jsonsafe.JsonRefused as exc:  # Azure's 400 for a malformed body
        raise bad_request(f"request body refused ({exc.reason}): {exc}") from exc


def _svc(request: web.Request) -> DpsService:
    return request.app[SERVICE]


def _with_etag(body: dict[str, Any]) -> web.Response:
    return web.json_response(body, headers={"ETag": f'"{body["etag"]}"'})


def _page_size(request: web.Request) -> int:
    try:
        return int(request.headers.get("x-ms-max-item-count", "100"))
    except ValueError as exc:
        raise bad_request("x-ms-max-item-count must be an integer") from exc


def _page(items: list[dict[str, Any]], token: str | None, item_type: str, size: int) -> web.Response:
    headers = {"x-ms-item-type": item_type, "x-ms-max-item-count": str(size)}
    if token:
        headers["x-ms-continuation"] = token
    return web.json_response(items, headers=headers)


def _record_routes(prefix: str, kind: Kind) -> list[web.RouteDef]:
    """The routes individual enrollments (``/enrollments``) and enrollment groups (``/enrollmentGroups``)
    share: PUT/GET/DELETE with etags, attestation mechanism, bulk, query."""

    async def put(request: web.Request) -> web.Response:
        body = await _body(request)
        if_match = request.headers.get("If-Match")
        written = _with_etag(_svc(request).put_enrollment(request.match_info["id"], body, if_match, kind))
        _count_write(request, kind.items)
        return written

    async def get(request: web.Request) -> web.Response:
        return _with_etag(_svc(request).get_enrollment(request.match_info["id"], kind))

    async def delete(request: web.Request) -> web.Response:
        _svc(request).delete_enrollment(request.match_info["id"], request.headers.get("If-Match"), kind)
        _count_write(request, kind.items)
        return web.Response(status=204)

    async def attestation(request: web.Request) -> web.Response:
        return web.json_response(_svc(request).attestation_mechanism(request.match_info["id"], kind))

    async def bulk(request: web.Request) -> web.Response:
        body = await _body(request)
        quota = request.app[QUOTA]
        items = body.get(kind.items) if isinstance(body, dict) else None
        # Each record of a bulk call is an operation (the request itself took the first).
        extra = len(items) - 1 if isinstance(items, list) else 0
        if quota is not None and extra > 0 and (wait := quota.take(n=extra)) is not None:
            raise throttled("service operations", wait)
        result = _svc(request).bulk(body, kind)
        failed = result.get("errors") if isinstance(result, dict) else None
        _count_write(request, kind.items, len(items or ()) - len(failed or ()))
        return web.json_response(result)

    async def query(request: web.Request) -> web.Response:
        size = _page_size(request)
        items, token = _svc(request).query(
            await _body(request), size, request.headers.get("x-ms-continuation") or None, kind
        )
        return _page(items, token, "Enrollment" if kind is ENROLLMENTS else "EnrollmentGroup", size)

    return [
        web.post(f"{prefix}/query", query),
        web.post(prefix, bulk),
        web.put(f"{prefix}/{{id}}", put),
        web.get(f"{prefix}/{{id}}", get),
        web.delete(f"{prefix}/{{id}}", delete),
        web.post(f"{prefix}/{{id}}/attestationmechanism", attestation),
    ]


async def get_registration(request: web.Request) -> web.Response:
    return _with_etag(_svc(request).get_registration(request.match_info["id"]))


async def delete_registration(request: web.Request) -> web.Response:
    _svc(request).delete_registration(request.match_info["id"], request.headers.get("If-Match"))
    _count_write(request, "registrations")
    return web.Response(status=204)


async def query_registrations(request: web.Request) -> web.Response:
    """``POST /registrations/{enrollmentGroupId}/query`` (no body): the group's registration states."""
    size = _page_size(request)
    items, token = _svc(request).query_registrations(
        request.match_info["id"], size, request.headers.get("x-ms-continuation") or None
    )
    return _page(items, token, "DeviceRegistration", size)


def build_dps_rest_app(
    service: DpsService,
    keys: Callable[[], dict[str, str]],
    clock: Callable[[], datetime],
    names: Sequence[str],
    quota: TokenBuckets | None = None,
    writes: WriteCounter | None = None,
) -> web.Application:
    """``names``: what the DPS is called (host name, address); a SAS token's ``sr`` must name it.
    ``quota``: the service-operations quota (``--azure-quotas``), else unlimited.  ``writes``: told
    every record written (kind, count)."""
    app = web.Application(
        middlewares=[_auth_middleware(keys, clock, names, quota)], client_max_size=MAX_BODY * 2
    )
    app[SERVICE] = service
    app[CLOCK] = clock
    app[QUOTA] = quota
    app[WRITES] = writes
    app.router.add_routes(_record_routes("/enrollments", ENROLLMENTS))
    app.router.add_routes(_record_routes("/enrollmentGroups", GROUPS))
    r = app.router
    r.add_get("/registrations/{id}", get_registration)
    r.add_delete("/registrations/{id}", delete_registration)
    r.add_post("/registrations/{id}/query", query_registrations)
    return app
