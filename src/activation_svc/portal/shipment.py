"""The portal's shipment page: ``GET /batch`` the upload form (the columns the OEM's template asks for),
``POST /batch`` a CSV (multipart, CSRF-checked, within ``max_body_bytes``, at most ``MAX_BATCH_ROWS``
rows) activated row by row through the service (``activation_svc.batch.shipment``: the rows' request ids
are derived from the rows, so sending the same file again repeats nothing), the per-address limit of
wrong codes applied per row; the answer is the result table."""

from __future__ import annotations

import logging

from aiohttp import web

from activation_svc.batch.shipment import (
    REFUSED,
    RowResult,
    ShipmentError,
    ShipmentRow,
    activate_rows,
    read_shipment,
)
from activation_svc.portal import pages
from activation_svc.portal.errors import PortalReason, ServiceProblem
from activation_svc.portal.forms import (
    CSRF,
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
from activation_svc.ratelimit import Slot
from provkit.grpc_server import ON_BEHALF_OF_HEADER

log = logging.getLogger("activation_svc.portal")

MAX_BATCH_ROWS = 2000  # one upload (the command line takes more)
BATCH_CONCURRENCY = 4


# --------------------------------------------------------------------------------------------- batch
def _unusable(sentence: str, message: str) -> ServiceProblem:
    return ServiceProblem(
        title="Not sent",
        sentence=sentence,
        code="INVALID_ARGUMENT",
        reason=PortalReason.SHIPMENT_UNUSABLE,
        message=message,
        fields=(),
        http_status=400,
    )


async def batch_form(request: web.Request) -> web.Response:
    csrf = request.app[CSRF]
    token, fresh = csrf.token_for(request)
    fields = await template_of(request)
    columns = tuple(f.name for f in fields.fields) if fields is not None else ()
    page = pages.batch_form_page(pages.BatchForm(columns), token, request.app[SETTINGS].max_body_bytes)
    return html_page(page, cookie=(csrf, fresh))


async def batch(request: web.Request) -> web.Response:
    form, refusal = await form_post(request)
    if isinstance(refusal, web.Response):
        return refusal
    settings = request.app[SETTINGS]
    csrf = request.app[CSRF]
    token, fresh = csrf.token_for(request)
    fields = await template_of(request)
    columns = tuple(f.name for f in fields.fields) if fields is not None else ()

    def again(problem: ServiceProblem) -> web.Response:
        page = pages.batch_form_page(pages.BatchForm(columns, problem), token, settings.max_body_bytes)
        return html_page(page, problem.http_status, (csrf, fresh))

    if refusal is not None:
        return again(refusal)
    upload = form.get("shipment")
    if not isinstance(upload, web.FileField):
        return again(_unusable("Choose the shipment's CSV file.", "no file was sent"))
    try:
        text = upload.file.read().decode("utf-8")
    except UnicodeDecodeError:
        return again(_unusable("The file is not UTF-8 text: save the CSV as UTF-8.", "not UTF-8"))
    if isinstance(form.get("metadata"), web.FileField):
        return again(
            _unusable(
                "Paste the metadata JSON into its field: a file is not read there.",
                "the metadata was sent as a file, not as text",
            )
        )
    metadata = text_field(form, "metadata")
    try:
        rows = read_shipment(
            text,
            fields,
            metadata_json=metadata if metadata.strip() else None,
            device_ids=settings.device_ids,
            max_rows=MAX_BATCH_ROWS,
        )
    except ShipmentError as exc:
        return again(_unusable("The shipment cannot be used as it is; nothing was sent.", str(exc)))
    slots: dict[int, Slot] = {}

    async def limited(row: ShipmentRow) -> RowResult | None:
        attempt = await begin_attempt(request)
        if isinstance(attempt, ServiceProblem):
            return RowResult(row.line, row.device_id, row.hub, REFUSED, attempt.reason, "", attempt.sentence)
        slots[row.line] = attempt
        return None

    async def answered(result: RowResult) -> None:
        slot = slots.pop(result.line, None)
        if slot is None:
            return
        try:
            await settle(slot, None if result.succeeded else result.reason)
        finally:
            await slot.release()

    results = await activate_rows(
        request.app[STUB],
        rows,
        concurrency=BATCH_CONCURRENCY,
        call_timeout=settings.timeout_seconds,
        extra_metadata=((ON_BEHALF_OF_HEADER, client_address(request)),),
        before_row=limited,
        on_result=answered,
    )
    log.info(
        "shipment activated",
        extra={"rows": len(results), "succeeded": sum(1 for r in results if r.succeeded)},
    )
    return html_page(pages.batch_result_page(results), cookie=(csrf, fresh))
