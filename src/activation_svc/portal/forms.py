"""The plumbing every page of the portal shares: the application's keys, HTML answers, reading a posted
form (CSRF-checked, UTF-8 only), the per-address limit of wrong codes and the OEM's template as form
fields (asked from the service).  ``app`` (one device, status) and ``shipment`` (a CSV) build on it."""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Mapping

import grpc
from aiohttp import web

from activation_svc.errors import Reason
from activation_svc.portal import pages
from activation_svc.portal.errors import PortalReason, ServiceProblem
from activation_svc.portal.security import CSRF_FIELD, Csrf
from activation_svc.portal.settings import PortalSettings
from activation_svc.ratelimit import AttemptsExhausted, FailureLimits, Slot
from activation_svc.templates.fields import FieldSet, parse_template_json, template_fields
from devprov.v1 import activation_service_pb2 as pb
from devprov.v1 import activation_service_pb2_grpc as pb_grpc

log = logging.getLogger("activation_svc.portal")

SETTINGS = web.AppKey("settings", PortalSettings)
STUB = web.AppKey("stub", pb_grpc.ActivationServiceStub)
CSRF = web.AppKey("csrf", Csrf)
LIMITS = web.AppKey[FailureLimits]("limits")
_ALL_DEVICES = "*"  # the portal's limit is per address over all devices


def html_page(body: str, status: int = 200, cookie: tuple[Csrf, str | None] | None = None) -> web.Response:
    response = web.Response(text=body, status=status, content_type="text/html", charset="utf-8")
    if cookie is not None and cookie[1] is not None:
        cookie[0].set_cookie(response, cookie[1])
    return response


def text_field(form: Mapping[str, object], name: str) -> str:
    value = form.get(name, "")
    return value if isinstance(value, str) else ""


def client_address(request: web.Request) -> str:
    return request.remote or "unknown"


async def begin_attempt(request: web.Request) -> Slot | ServiceProblem:
    """One code check for this client address, or the problem to show (too many wrong codes)."""
    try:
        return await request.app[LIMITS].begin(client_address(request), _ALL_DEVICES)
    except AttemptsExhausted as exc:
        wait = max(1, round(exc.retry_after))
        log.warning("portal rate limit", extra={"client": client_address(request), "retry_after": wait})
        return ServiceProblem(
            title="Too many attempts",
            sentence="Too many wrong activation codes were sent from your address.",  # the panel says when
            code="RESOURCE_EXHAUSTED",
            reason=PortalReason.PORTAL_RATE_LIMITED,
            message="",
            fields=(),
            http_status=429,
            retry_after=exc.retry_after,
        )


async def settle(attempt: Slot, refused: str | None) -> None:
    """The end of one code check: ``refused`` is the service's reason (None: it answered).  A wrong code
    (or unknown device) counts against the address; anything else does not."""
    if refused is None:
        await attempt.succeeded()
    elif refused == Reason.ACTIVATION_DENIED:
        await attempt.failed()


_NOT_UTF8 = ServiceProblem(
    title="Not sent",
    sentence="The form could not be read: it was not sent as UTF-8 text. Nothing was sent.",
    code="INVALID_ARGUMENT",
    reason=PortalReason.FORM_NOT_UTF8,
    message="",
    fields=(),
    http_status=400,
)


async def form_post(
    request: web.Request,
) -> tuple[Mapping[str, object], web.Response | ServiceProblem | None]:
    """The parsed form, or the answer to send instead (403 on a missing or forged CSRF token), or the
    problem to show on an empty form (a body that is not UTF-8: aiohttp would fail on it, or, for a
    percent-encoded byte, quietly put U+FFFD in its place)."""
    try:
        form = await request.post()  # raises 413 past client_max_size
        if request.content_type == "application/x-www-form-urlencoded":
            charset = request.charset or "utf-8"
            text = (await request.read()).decode(charset)  # post() read it already: kept in memory
            urllib.parse.parse_qsl(text, keep_blank_values=True, encoding=charset, errors="strict")
    except (UnicodeDecodeError, LookupError):
        log.info("form refused: not UTF-8", extra={"path": request.path})
        return {}, _NOT_UTF8
    csrf = request.app[CSRF]
    if not csrf.valid(request, form.get(CSRF_FIELD)):
        log.warning("CSRF token missing or wrong", extra={"path": request.path})
        page = pages.message_page(
            "Form expired",
            "This form could not be verified (it expired or did not come from this site). "
            "Open the page again and resend it.",
        )
        return form, html_page(page, 403, (csrf, csrf.token_for(request)[1]))
    return form, None


async def template_of(request: web.Request) -> FieldSet | None:
    """The caller OEM's template as form fields (asked from the service; None: it has none, or the service
    could not say: the JSON view is shown)."""
    try:
        reply = await request.app[STUB].GetMetadataTemplate(
            pb.GetMetadataTemplateRequest(), timeout=request.app[SETTINGS].timeout_seconds
        )
    except grpc.aio.AioRpcError as exc:
        log.warning("no metadata template from the service", extra={"code": exc.code().name})
        return None
    schema = parse_template_json(reply.schema_json)
    return template_fields(schema) if schema is not None else None
