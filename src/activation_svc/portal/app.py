"""The activation portal: an aiohttp app that is a gRPC client of ActivationService (and nothing else, but
for the per-address limits it keeps in the service's database when that is PostgreSQL: see below).

API
---
``create_app(settings, *, stub=None, observe=None) -> aiohttp.web.Application``
    The routes below.  Without ``stub`` the app opens its own channel to ``settings.target`` (with
    ``settings.security``) when it starts, inside its event loop, and closes it on cleanup.
    ``observe`` (``provkit.observe.Observability``, default: what ``settings.observe`` asks for): each
    request counted by route pattern and status with its latency; with tracing, a server span per request
    whose context the gRPC call carries to the service (OpenTelemetry's gRPC client interceptor).
``async start_portal(settings, observe=None) -> RunningPortal``   bind and start (``.url``, ``.port``,
    ``.metrics_url``: its ``/metrics`` when configured, ``async .stop()``).
``async serve(settings, *, on_started=None)``       start, print nothing, wait for SIGINT/SIGTERM, stop.

Wrong activation codes are limited per client address here too (``activation_svc.ratelimit``'s rules, over
all devices, growing back-off): past the limit the person gets the form again with a sentence saying when to
try again (HTTP 429, ``Retry-After``), and nothing is sent to the service.  The counts are this process's,
or, when the service's database is PostgreSQL (``settings.limits_database``), rows in it that every portal
replica shares (``activation_svc.shared_limits``), so the limit holds exactly across replicas.  The portal
names the address to the service (``x-devprov-on-behalf-of``) so the service counts each web user's
failures on their own.

Routes: ``GET /[?device=GUID]`` activate form (the device filled in; with the OEM's template, asked from
the service, as form fields, the JSON kept as an advanced view; a label's QR code opens
``/?device=GUID#code=CODE``: the page's script moves the code from the fragment into the form and removes
the fragment, so the code never reaches a server, a log or a Referer); ``POST /activate`` -> result page
or the form again with the service's error; ``GET /batch`` shipment form, ``POST /batch`` (a CSV upload,
``activation_svc.portal.shipment``) -> the result table; ``GET /status[?device_id=]`` status form;
``POST /status`` -> status page; ``GET /static/portal.css``, ``/static/portal.js``; ``GET /healthz``.
Anything else: an HTML 404 / 405.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from aiohttp import web
from aiohttp.typedefs import Handler
from google.protobuf import timestamp_pb2
from opentelemetry import propagate, trace

from activation_svc.audit import AuditLog
from activation_svc.portal import pages
from activation_svc.portal.assets import ASSETS
from activation_svc.portal.errors import FieldProblem, ServiceProblem, describe
from activation_svc.portal.forms import (
    CSRF,
    LIMITS,
    SETTINGS,
    STUB,
    begin_attempt,
    client_address,
    form_post,
    html_page,
    settle,
    template_of,
    text_field,
)
from activation_svc.portal.security import Csrf, add_headers, host_allowed
from activation_svc.portal.settings import PortalSettings
from activation_svc.portal.shipment import batch, batch_form
from activation_svc.shared_limits import failure_limits
from activation_svc.templates.fields import (
    FORM_PREFIX,
    FieldSet,
    metadata_from_values,
)
from devprov.v1 import activation_service_pb2 as pb
from devprov.v1 import activation_service_pb2_grpc as pb_grpc
from provkit.channels import create_channel, request_metadata
from provkit.grpc_errors import error_details
from provkit.grpc_server import ON_BEHALF_OF_HEADER
from provkit.metrics import HttpMetrics
from provkit.observe import Observability
from provkit.proto_names import enum_label
from provkit.signals import wait_for_stop_signal

log = logging.getLogger("activation_svc.portal")

_LIMITS = {
    "device_id": ("Device ID", pages.MAX_DEVICE_ID),
    "activation_code": ("Activation code", pages.MAX_CODE),
    "hub": ("IoT hub", pages.MAX_HUB),
    "metadata": ("Metadata", pages.MAX_METADATA_CHARS),
    "clear_metadata": ("Remove the device's metadata", pages.MAX_CHECKBOX),
    "request_id": ("Request id", pages.MAX_REQUEST_ID),
}


def _too_long(values: dict[str, str]) -> tuple[FieldProblem, ...]:
    problems = []
    for name, value in values.items():
        label, limit = _LIMITS[name]
        if len(value) > limit:
            problems.append(FieldProblem(name, label, "", f"at most {limit} characters (got {len(value)})"))
    return tuple(problems)


def _with_retry(response: web.Response, problem: ServiceProblem) -> web.Response:
    if problem.retry_after:
        response.headers["Retry-After"] = str(max(1, round(problem.retry_after)))
    return response


def _when(stamp: timestamp_pb2.Timestamp) -> str:
    if not (stamp.seconds or stamp.nanos):
        return ""
    return stamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


_NO_TEMPLATE = ServiceProblem(
    title="Not sent",
    sentence="The activation service could not tell the portal your company's template right now, so the "
    "fields could not be read. Nothing was sent; try again.",
    code="UNAVAILABLE",
    reason="",
    message="GetMetadataTemplate failed",
    fields=(),
    http_status=503,
)


# ------------------------------------------------------------------------------------------- handlers
async def activate_form(request: web.Request) -> web.Response:
    csrf = request.app[CSRF]
    token, fresh = csrf.token_for(request)
    device_id = request.query.get("device", "")[: pages.MAX_DEVICE_ID]  # a label's QR code names it
    form = pages.ActivateForm(device_id=device_id, fields=await template_of(request))
    page = pages.activate_page(form, request.app[SETTINGS].hubs, token, str(uuid.uuid4()))
    return html_page(page, cookie=(csrf, fresh))


def _field_values(form: Mapping[str, object], fields: FieldSet | None) -> dict[str, str]:
    """The template fields as typed (only the template's; each at most ``pages.MAX_FIELD`` characters)."""
    known = fields.by_name() if fields is not None else {}
    values = {}
    for key in form:
        name = key.removeprefix(FORM_PREFIX)
        if key.startswith(FORM_PREFIX) and name in known:
            values[name] = text_field(form, key)
    return values


def _metadata_to_send(raw: str, clear: bool, fields: FieldSet | None, values: Mapping[str, str]) -> str:
    """The JSON view's text when it has any (or the remove box is ticked), else the template's fields."""
    if raw.strip() or clear or fields is None:
        return raw
    return json.dumps(metadata_from_values(fields, values), ensure_ascii=False, separators=(",", ":"))


async def activate(request: web.Request) -> web.Response:
    form, refusal = await form_post(request)
    if isinstance(refusal, web.Response):
        return refusal
    settings = request.app[SETTINGS]
    csrf = request.app[CSRF]
    values = {name: text_field(form, name) for name in _LIMITS}
    fields = await template_of(request)
    field_values = _field_values(form, fields)
    token, fresh = csrf.token_for(request)

    def again(
        status: int, problem: ServiceProblem | None = None, local_problems: tuple[FieldProblem, ...] = ()
    ) -> web.Response:
        state = pages.ActivateForm(
            device_id=values["device_id"][: pages.MAX_DEVICE_ID],
            hub=values["hub"][: pages.MAX_HUB],
            metadata=values["metadata"][: pages.MAX_METADATA_CHARS],
            clear_metadata=bool(values["clear_metadata"]),
            problem=problem,
            local_problems=local_problems,
            fields=fields,
            values={k: v[: pages.MAX_FIELD] for k, v in field_values.items()},
        )
        # a new request id: the corrected form is a new request
        return html_page(
            pages.activate_page(state, settings.hubs, token, str(uuid.uuid4())), status, (csrf, fresh)
        )

    if refusal is not None:
        return again(refusal.http_status, problem=refusal)
    too_long = _too_long(values) + tuple(
        FieldProblem("metadata", name, name, f"at most {pages.MAX_FIELD} characters (got {len(value)})")
        for name, value in field_values.items()
        if len(value) > pages.MAX_FIELD
    )
    if too_long:
        return again(400, local_problems=too_long)
    typed_fields = any(key.startswith(FORM_PREFIX) for key in form)
    if typed_fields and fields is None and not values["metadata"].strip():
        # the form had the template's fields but the service cannot say what they are now: sending no
        # metadata would quietly keep the device's instead of what was typed
        return again(503, problem=_NO_TEMPLATE)
    metadata_json = _metadata_to_send(
        values["metadata"], bool(values["clear_metadata"]), fields, field_values
    )
    request_id = values["request_id"] or str(uuid.uuid4())
    attempt = await begin_attempt(request)
    if isinstance(attempt, ServiceProblem):
        return _with_retry(again(attempt.http_status, problem=attempt), attempt)
    try:
        try:
            reply = await request.app[STUB].Activate(
                pb.ActivateRequest(
                    device_id=values["device_id"].strip(),
                    activation_code=values["activation_code"],
                    metadata_json=metadata_json,
                    hub=values["hub"],
                    request_id=request_id,
                    clear_metadata=bool(values["clear_metadata"]),
                ),
                metadata=(*request_metadata(request_id), (ON_BEHALF_OF_HEADER, client_address(request))),
                timeout=settings.timeout_seconds,
            )
        except grpc.aio.AioRpcError as exc:
            problem = describe(error_details(exc))
            await settle(attempt, problem.reason)
            log.info("activation refused", extra={"code": problem.code, "reason": problem.reason})
            return _with_retry(again(problem.http_status, problem=problem), problem)
        await settle(attempt, None)
    finally:
        await attempt.release()
    view = pages.ActivationView(
        device_id=reply.device_id,
        hub=reply.hub,
        path=enum_label(pb.ActivationPath, reply.path, "ACTIVATION_PATH_"),
        lifecycle=enum_label(pb.Lifecycle, reply.lifecycle, "LIFECYCLE_"),
        registered_hub=reply.registered_hub,
        replayed=reply.replayed,
        metadata=enum_label(pb.MetadataChange, reply.metadata_change, "METADATA_CHANGE_"),
    )
    log.info(
        "activated",
        extra={"device": view.device_id, "path": view.path, "hub": view.hub, "metadata": view.metadata},
    )
    return html_page(pages.result_page(view), cookie=(csrf, fresh))


async def to_form(request: web.Request) -> web.Response:
    raise web.HTTPSeeOther("/")


async def status_form(request: web.Request) -> web.Response:
    csrf = request.app[CSRF]
    token, fresh = csrf.token_for(request)
    device_id = request.query.get("device_id", "")[: pages.MAX_DEVICE_ID]
    page = pages.status_form_page(pages.StatusForm(device_id=device_id), token)
    return html_page(page, cookie=(csrf, fresh))


async def status(request: web.Request) -> web.Response:
    form, refusal = await form_post(request)
    if isinstance(refusal, web.Response):
        return refusal
    settings = request.app[SETTINGS]
    csrf = request.app[CSRF]
    token, fresh = csrf.token_for(request)
    values = {name: text_field(form, name) for name in ("device_id", "activation_code")}
    too_long = _too_long(values)
    device_id = values["device_id"][: pages.MAX_DEVICE_ID]
    if refusal is not None:
        page = pages.status_form_page(pages.StatusForm(device_id, problem=refusal), token)
        return html_page(page, refusal.http_status, (csrf, fresh))
    if too_long:
        page = pages.status_form_page(pages.StatusForm(device_id, local_problems=too_long), token)
        return html_page(page, 400, (csrf, fresh))
    attempt = await begin_attempt(request)
    if isinstance(attempt, ServiceProblem):
        page = pages.status_form_page(pages.StatusForm(device_id, problem=attempt), token)
        return _with_retry(html_page(page, attempt.http_status, (csrf, fresh)), attempt)
    try:
        try:
            reply = await request.app[STUB].GetDeviceStatus(
                pb.GetDeviceStatusRequest(
                    device_id=device_id.strip(), activation_code=values["activation_code"]
                ),
                metadata=((ON_BEHALF_OF_HEADER, client_address(request)),),
                timeout=settings.timeout_seconds,
            )
        except grpc.aio.AioRpcError as exc:
            problem = describe(error_details(exc), "No status")
            await settle(attempt, problem.reason)
            page = pages.status_form_page(pages.StatusForm(device_id, problem=problem), token)
            return _with_retry(html_page(page, problem.http_status, (csrf, fresh)), problem)
        await settle(attempt, None)
    finally:
        await attempt.release()
    view = pages.StatusView(
        device_id=reply.device_id,
        lifecycle=enum_label(pb.Lifecycle, reply.lifecycle, "LIFECYCLE_"),
        provisioning_status=reply.provisioning_status,
        owner=reply.owner_oem,
        allocated_hub=reply.allocated_hub,
        registered_hub=reply.registered_hub,
        hub_device_status=reply.hub_device_status,
        hub_connection_state=reply.hub_connection_state,
        last_activity=_when(reply.last_activity_time),
        activated=_when(reply.activated_time),
        deactivated=_when(reply.deactivated_time),
    )
    return html_page(pages.status_page(view), cookie=(csrf, fresh))


async def static(request: web.Request) -> web.StreamResponse:
    asset = ASSETS.get(request.match_info["name"])
    if asset is None:
        raise web.HTTPNotFound()
    if request.headers.get("If-None-Match") == asset.etag:
        return web.Response(status=304, headers={"ETag": asset.etag})
    return web.Response(
        body=asset.body,
        content_type=asset.content_type,
        charset="utf-8",
        headers={"ETag": asset.etag, "Cache-Control": "no-cache"},
    )


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


# ----------------------------------------------------------------------------------------- middlewares
@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    if not host_allowed(request.headers.get("Host"), settings.host, settings.allowed_hosts):
        page = pages.message_page("Wrong host", "This portal does not answer to that host name.")
        return html_page(page, 421)
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        limit = settings.max_body_bytes
        page = pages.message_page("Too large", f"The form is larger than {limit} bytes; nothing was sent.")
        return html_page(page, 413)
    except web.HTTPNotFound:
        return html_page(pages.message_page("Not found", "There is no such page."), 404)
    except web.HTTPMethodNotAllowed as exc:
        page = pages.message_page("Method not allowed", f"{request.method} is not allowed here.")
        response = html_page(page, 405)
        response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        return response


def observing(metrics: HttpMetrics, tracer: trace.Tracer | None) -> Callable[..., Any]:
    """A middleware counting each answer by route pattern (never the path: it may hold a device id) and,
    with a tracer, running the request in a server span (W3C trace context from the request headers), so
    the gRPC call it makes is a child of it."""

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        status = 500
        with contextlib.ExitStack() as scope:
            span = None
            if tracer is not None:
                span = scope.enter_context(
                    tracer.start_as_current_span(
                        f"{request.method} {route}",
                        context=propagate.extract(dict(request.headers)),
                        kind=trace.SpanKind.SERVER,
                        attributes={"http.request.method": request.method, "http.route": route},
                    )
                )
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                if span is not None:
                    span.set_attribute("http.response.status_code", status)
                metrics.http_handled(route, status, time.perf_counter() - started)

    return observe


async def _limits_ctx(app: web.Application) -> AsyncIterator[None]:
    """The per-address limits: in the service's PostgreSQL database when there is one (its schema
    checked: the service's ``migrate`` made the tables), else in this process."""
    settings = app[SETTINGS]
    audit = None if settings.limits_database is None else await AuditLog.open(settings.limits_database)
    app[LIMITS] = failure_limits(
        None if audit is None else audit.db,
        clock=lambda: datetime.now(UTC),
        free_failures=settings.max_failures_per_address,
    )
    try:
        yield
    finally:
        if audit is not None:
            await audit.close()


def create_app(
    settings: PortalSettings,
    *,
    stub: pb_grpc.ActivationServiceStub | None = None,
    observe: Observability | None = None,
) -> web.Application:
    settings.check()
    observe = observe or Observability.open(settings.observe, "activation_portal")
    tracer = observe.tracer("activation_svc.portal") if observe.provider is not None else None
    middlewares = [observing(observe.metrics, tracer), guard]
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=middlewares)
    app[SETTINGS] = settings
    app[CSRF] = Csrf(settings.https)
    app.cleanup_ctx.append(_limits_ctx)
    if stub is not None:
        app[STUB] = stub
    else:

        async def channel_ctx(app: web.Application) -> AsyncIterator[None]:
            channel = create_channel(
                settings.target, settings.security, interceptors=observe.client_interceptors()
            )
            app[STUB] = pb_grpc.ActivationServiceStub(channel)
            try:
                yield
            finally:
                await channel.close()

        app.cleanup_ctx.append(channel_ctx)
    app.on_response_prepare.append(add_headers(settings.https))
    app.router.add_get("/", activate_form)
    app.router.add_post("/activate", activate)
    app.router.add_get("/activate", to_form)
    app.router.add_get("/batch", batch_form)
    app.router.add_post("/batch", batch)
    app.router.add_get("/status", status_form)
    app.router.add_post("/status", status)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/healthz", healthz)
    return app


# ------------------------------------------------------------------------------------------- serving
def ssl_context(settings: PortalSettings) -> ssl.SSLContext | None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    return context


@dataclass
class RunningPortal:
    runner: web.AppRunner
    scheme: str
    host: str
    port: int
    observe: Observability

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return self.observe.metrics_url

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.observe.shutdown()


async def start_portal(settings: PortalSettings, observe: Observability | None = None) -> RunningPortal:
    observe = observe or Observability.open(settings.observe, "activation_portal")
    app = create_app(settings, observe=observe)
    context = ssl_context(settings)
    await observe.start_endpoint()
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, ssl_context=context, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        await observe.shutdown()
        raise
    port = runner.addresses[0][1] if runner.addresses else settings.port  # port 0: the one chosen
    running = RunningPortal(runner, "https" if context else "http", settings.host, port, observe)
    log.info("portal listening", extra={"url": running.url, "target": settings.target})
    return running


async def serve(
    settings: PortalSettings, *, on_started: Callable[[RunningPortal], None] | None = None
) -> None:
    running = await start_portal(settings)
    if on_started is not None:
        on_started(running)
    try:
        await wait_for_stop_signal()
    finally:
        await running.stop()
