"""The allocation webhook's listener: ``POST /api/allocate`` over TLS, beside activation_svc's gRPC server.

Authentication, as Azure Functions take it: the function key in the URL (``?code=KEY``, the form DPS's
``webhookUrl`` carries) or in the ``x-functions-key`` header, compared in constant time; with
``allocation.client_ca_file`` the listener also requires a client certificate from that CA (mTLS, for a
forwarder such as an Azure Function in front of it).  Nobody without the key learns anything: 401 before
the body is read.

Answers (the body never says why; the audit log does, ``activation_svc.allocation.service``; wrong keys,
which anyone can send, through ``refusals``: a ``provkit.refusal_audit.RefusalAggregator`` writes the first
per peer address and counts the repeats, caller ``dps-allocation-webhook from <address>``):

| situation                                                            | status |
|----------------------------------------------------------------------|--------|
| activated device: Azure's AllocationResponse (hub, initial twin)      | 200    |
| unknown, not activated, revoked, deprovisioned, wrong certificate,    | 403, one body for all |
| registration id not the certificate's CN, hub not linked              |        |
| body not JSON (``jsonsafe``) or not an AllocationRequest              | 400    |
| function key missing or wrong                                         | 401    |
| body over 64 KiB                                                      | 413    |
| ``Content-Type`` not ``application/json``                             | 415    |
| the device registry cannot be read                                    | 503    |

DPS fails the registration on any answer but 200 (Azure: 400207, or 400209 for 401); the device sees a
failed registration and waits as for one not activated (``device_client.dps``).  Each answer is counted
and timed on ``/metrics`` (``http_handled``, route ``/api/allocate``).

A request the key admits is read in this order: content type, size, JSON (``jsonsafe``), the
AllocationRequest's shape; a refusal at any of them reads and writes no record and is audited (detail:
ALLOCATION_REQUEST_MALFORMED, what was wrong, with ``jsonsafe``'s reason), like every refusal of the
webhook; nothing of the body reaches the answer.
"""

from __future__ import annotations

import hmac
import json
import logging
import ssl
import time
from pathlib import Path

from aiohttp import web

import jsonsafe
from activation_svc.allocation.model import AllocationReason, MalformedRequest, allocation_query
from activation_svc.allocation.service import AllocationRefused, AllocationService
from provkit.authz import RefusalLog
from provkit.cloud import CloudUnavailable
from provkit.metrics import NO_METRICS, HttpMetrics
from provkit.settings import Secret

log = logging.getLogger("activation_svc.allocation.http")

PATH = "/api/allocate"
MAX_BODY = 64 * 1024
CALLER = "dps-allocation-webhook"
_REFUSED = {"message": "the device is not allocated"}
_MALFORMED = {"message": "not an AllocationRequest"}


def server_context(cert_file: Path, key_file: Path, client_ca_file: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    if client_ca_file is not None:
        context.load_verify_locations(cafile=str(client_ca_file))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _json(status: int, body: object) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


def key_matches(request: web.Request, key: Secret) -> bool:
    given = request.query.get("code") or request.headers.get("x-functions-key") or ""
    return hmac.compare_digest(given.encode("utf-8"), key.reveal().encode("utf-8"))


class AllocationHttp:
    def __init__(
        self,
        service: AllocationService,
        host: str,
        port: int,
        context: ssl.SSLContext,
        key: Secret,
        metrics: HttpMetrics = NO_METRICS,
        refusals: RefusalLog | None = None,
    ) -> None:
        self._service = service
        self._refusals: RefusalLog = refusals or service
        self._metrics = metrics
        self._host, self._port = host, port
        self._context = context
        self._key = key
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _allocate(self, request: web.Request) -> web.Response:
        if not key_matches(request, self._key):
            # Anyone who reaches the port can send this, as fast as they like: it goes through the
            # aggregator (the first per peer address written, its repeats counted, provkit.refusal_audit).
            peer = request.remote or ""
            wrong_key = AllocationReason.FUNCTION_KEY_WRONG
            refusal = self._service.refusal(wrong_key, f"{CALLER} from {peer}", peer)
            await self._refusals.record_refusal(refusal)
            return _json(401, {"message": "unauthorized"})
        if request.content_type != "application/json":
            await self._malformed(f"content type {request.content_type[:100]!r}, not application/json")
            return _json(415, {"message": "send application/json"})
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            await self._malformed(f"body over {MAX_BODY} bytes")
            return _json(413, {"message": f"the body is limited to {MAX_BODY} bytes"})
        try:
            query = allocation_query(jsonsafe.loads(body))
        except jsonsafe.JsonRefused as exc:
            await self._malformed(f"{exc.reason}: {exc}")
            return _json(400, _MALFORMED)
        except MalformedRequest as exc:
            await self._malformed(str(exc))
            return _json(400, _MALFORMED)
        try:
            allocated = await self._service.allocate(query, CALLER)
        except AllocationRefused:
            return _json(403, _REFUSED)
        except CloudUnavailable:
            log.warning("allocation answered 503: the device registry cannot be read")
            return _json(503, {"message": "unavailable, retry later"})
        return _json(200, allocated.response())

    async def _malformed(self, what: str) -> None:
        # One row each, not aggregated: only a holder of the function key gets this far (DPS, or a
        # forwarder), and whoever holds it can cause per-device refusals (written one by one) just as well.
        detail = f"{AllocationReason.ALLOCATION_REQUEST_MALFORMED.value}: {what}"
        await self._service.audit("", CALLER, "refused", detail[:500])

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            response = await self._allocate(request)
        except web.HTTPException as exc:
            self._metrics.http_handled(PATH, exc.status, time.perf_counter() - started)
            raise
        except Exception:
            log.exception("allocation request failed")
            response = _json(500, {"message": "internal error"})
        self._metrics.http_handled(PATH, response.status, time.perf_counter() - started)
        return response

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post(PATH, self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, ssl_context=self._context)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or ()
        self.port = sockets[0].getsockname()[1] if sockets else self._port
        log.info("allocation webhook listening", extra={"url": self.url})

    @property
    def url(self) -> str:
        return f"https://{self._host}:{self.port}{PATH}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
