"""One activation from the portal is one trace: the portal's request span, the gRPC client span, the
activation_svc server span (its parent across the gRPC hop is the client span), and under it the spans of
the DPS and IoT Hub SDK calls.  Spans go to an in-memory exporter; the service's log lines of that request
carry the trace id.  A refused call's server span carries its status code and reason."""

from __future__ import annotations

import io
import json
import logging
import uuid

import grpc
import pytest
from aiohttp.test_utils import TestClient, TestServer
from enrollment.provisioning_env import (
    OemTls,
    activate_request,
    activation_env,
    factory_env,
    failure,
    mint,
    register,
    running_activation,
    running_factory,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from portal.portal_env import activate_form, hidden_fields, portal_env

from activation_svc.portal.app import create_app
from activation_svc.portal.settings import load_portal_settings
from devprov.v1 import factory_service_pb2 as fpb
from provkit.logging import ContextFilter, JsonFormatter
from provkit.observe import Observability

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

ACTIVATE = "/devprov.v1.ActivationService/Activate"
TEMPLATE = "/devprov.v1.ActivationService/GetMetadataTemplate"


def _one(spans: list[ReadableSpan], name: str, kind: SpanKind) -> ReadableSpan:
    found = [s for s in spans if s.name == name and s.kind == kind]
    assert len(found) == 1, [(s.name, s.kind) for s in spans]
    return found[0]


def _ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[str]:
    names = []
    while span.parent is not None:
        span = by_id[span.parent.span_id]
        names.append(span.name)
    return names


@pytest.fixture
def service_log():
    """activation_svc's log lines as JSON, with the context fields the suite's logging adds."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("activation_svc")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


async def test_portal_activation_is_one_trace_across_the_grpc_hop(tmp_path, emulator, service_log):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tls = OemTls.create(tmp_path / "oem-tls")
    async with (
        running_factory(factory_env(tmp_path, emulator)) as (_factory_app, factory),
        running_activation(
            activation_env(tmp_path, emulator, tls), tls, observe=Observability(provider=provider)
        ) as (app, activation),
    ):
        device = await mint(factory, str(uuid.uuid4()), tmp_path / "devices")
        reply = await factory.Enroll(
            fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem)
        )
        hub = emulator.hub_hosts[0]
        first = json.dumps({"tags": {"line": "a"}})
        await activation.Activate(activate_request(device.device_id, reply.activation_code, first, hub))
        assert (await register(emulator, device)).status == "assigned"
        exporter.clear()
        service_log.seek(0)
        service_log.truncate()

        # the second activation, from the portal, also merges the new metadata into the hub twin
        settings = load_portal_settings(env=portal_env(app.grpc_address, tls, emulator))  # type: ignore[attr-defined]
        portal = create_app(settings, observe=Observability(provider=provider))
        async with TestClient(TestServer(portal)) as client:
            page = await (await client.get("/")).text()
            second = json.dumps({"tags": {"line": "b"}})
            form = activate_form(hidden_fields(page), device.device_id, reply.activation_code, second, hub)
            response = await client.post("/activate", data=form)
            assert response.status == 200
            assert "v-lifecycle" in await response.text()
        spans = list(exporter.get_finished_spans())

        # a refused call: its server span says why
        exporter.clear()
        wrong = activate_request(device.device_id, "0000-0000-0000-0000", second, hub)
        assert (await failure(activation.Activate(wrong))).reason == "ACTIVATION_DENIED"
        refused = _one(list(exporter.get_finished_spans()), ACTIVATE, SpanKind.SERVER)
        assert refused.status.status_code is StatusCode.ERROR
        assert refused.attributes["devprov.reason"] == "ACTIVATION_DENIED"
        assert refused.attributes["rpc.grpc.status_code"] == grpc.StatusCode.PERMISSION_DENIED.value[0]

    by_id = {s.context.span_id: s for s in spans}
    web = _one(spans, "POST /activate", SpanKind.SERVER)
    client_span = _one(spans, ACTIVATE, SpanKind.CLIENT)
    server_span = _one(spans, ACTIVATE, SpanKind.SERVER)
    trace_id = web.context.trace_id
    assert client_span.parent is not None and client_span.parent.span_id == web.context.span_id
    assert server_span.parent is not None and server_span.parent.span_id == client_span.context.span_id
    assert server_span.parent.is_remote  # the link came over the wire, in the call's metadata
    cloud = [s for s in spans if s.name.startswith(("dps ", "hub "))]
    names = {s.name for s in cloud}
    assert {"dps get_enrollment", "dps update_enrollment", "hub get_device", "hub get_twin"} <= names
    assert "hub update_twin" in names  # the new tag reached the twin
    for span in cloud:
        assert span.kind == SpanKind.CLIENT and span.context.trace_id == trace_id
        assert _ancestors(span, by_id)[:3] == [ACTIVATE, ACTIVATE, "POST /activate"], span.name
    # the form page is a trace of its own: GET / and the template it asks the service for
    page_trace = _one(spans, "GET /", SpanKind.SERVER).context.trace_id
    assert {s.name for s in spans if s.context.trace_id == page_trace} == {"GET /", TEMPLATE}
    assert all(s.context.trace_id == trace_id for s in spans if s.context.trace_id != page_trace)
    assert device.device_id not in json.dumps([dict(s.attributes or {}) for s in cloud])

    lines = [json.loads(line) for line in service_log.getvalue().splitlines() if line.strip()]
    activated = [line for line in lines if line["message"] == "activated"]
    assert activated and all(line["trace_id"] == format(trace_id, "032x") for line in activated)
