"""The DPS adapter honours 429/503 with Retry-After (a tiny TLS server plays an overloaded DPS answering
the way Azure does, exactly as often as a test needs; the emulator's own quotas, ``--azure-quotas``, are
met in test_enroll_under_azure_quotas.py), and reports what is left as CloudUnavailable; every 429 it sees
is counted, each call once.  Its trimmed request pipeline sends what Microsoft's client sends."""

from __future__ import annotations

import ssl

import pytest
from aiohttp import web
from azure.iot.deviceprovisioning.aio import DeviceProvisioningClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from provkit.cloud import CloudUnavailable, DpsConfig
from provkit.cloud_calls import CallObserver
from provkit.devpki import DevTlsAuthority
from provkit.dps import DpsEnrollments
from provkit.prometheus_metrics import PrometheusMetrics
from provkit.settings import Secret

pytestmark = pytest.mark.slow

ENROLLMENT = {"registrationId": "dev-1", "provisioningStatus": "disabled", "etag": "e1"}


@pytest.fixture
async def overloaded_dps(tmp_path):
    """(base config, state) of a DPS stand-in that throttles the first `state["throttle"]` requests."""
    authority = DevTlsAuthority.create()
    (tmp_path / "ca.pem").write_bytes(authority.ca_pem)
    authority.server_certificate(["127.0.0.1"]).write(tmp_path / "server.pem", tmp_path / "server.key")
    state = {"throttle": 0, "status": 429, "requests": 0, "retry_after": "1", "headers": []}

    async def handler(request: web.Request) -> web.Response:
        state["requests"] += 1
        state["headers"].append(dict(request.headers))
        if state["requests"] <= state["throttle"]:
            return web.json_response(
                {"errorCode": 429001, "message": "throttled"},
                status=state["status"],
                headers={"Retry-After": state["retry_after"]},
            )
        return web.json_response(ENROLLMENT)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    connection = (
        f"HostName=127.0.0.1:{port};SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=ZHBz"
    )
    try:
        yield DpsConfig(Secret(connection), tmp_path / "ca.pem", retry_total=3, retry_backoff_max=2), state
    finally:
        await runner.cleanup()


async def _get_once(config: DpsConfig):
    """The enrollment ``dev-1`` read through an adapter opened for this one call."""
    dps = await DpsEnrollments.open(config)
    try:
        return await dps.get("dev-1")
    finally:
        await dps.close()


async def test_429_with_retry_after_is_retried_then_succeeds(overloaded_dps):
    config, state = overloaded_dps
    state["throttle"] = 2
    enrollment = await _get_once(config)
    assert enrollment is not None and enrollment.etag == "e1"
    assert state["requests"] == 3


async def test_503_beyond_the_retry_budget_is_unavailable_with_the_service_delay(overloaded_dps):
    config, state = overloaded_dps
    state.update(throttle=100, status=503, retry_after="1")
    dps = await DpsEnrollments.open(DpsConfig(config.connection_string, config.ca_file, retry_total=1))
    try:
        with pytest.raises(CloudUnavailable) as caught:
            await dps.get("dev-1")
    finally:
        await dps.close()
    assert caught.value.status == 503 and caught.value.retry_after == 1.0
    assert state["requests"] == 2


async def test_every_429_is_counted_and_the_call_once_with_its_outcome(overloaded_dps):
    config, state = overloaded_dps
    state["throttle"] = 2
    metrics = PrometheusMetrics()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    observer = CallObserver("dps", metrics, provider.get_tracer("test"))
    dps = await DpsEnrollments.open(config, observer=observer)
    try:
        assert await dps.get("dev-1") is not None  # after two 429s the SDK's retry gets it
        state.update(requests=0, throttle=100)
        with pytest.raises(CloudUnavailable):
            await dps.get("dev-1")  # 429 on the first try and on each of the 3 retries
    finally:
        await dps.close()
    registry = metrics.registry
    assert registry.get_sample_value("devprov_cloud_throttled_total", {"service": "dps"}) == 6
    labels = {"service": "dps", "operation": "get_enrollment"}
    assert registry.get_sample_value("devprov_cloud_calls_total", {**labels, "outcome": "ok"}) == 1
    assert registry.get_sample_value("devprov_cloud_calls_total", {**labels, "outcome": "throttled"}) == 1
    assert registry.get_sample_value("devprov_cloud_call_seconds_count", labels) == 2
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["dps get_enrollment", "dps get_enrollment"]
    assert spans[1].attributes["devprov.cloud.outcome"] == "throttled"


async def test_the_adapter_sends_what_microsofts_client_sends(overloaded_dps):
    """The adapter leaves policies out of the SDK's pipeline (provkit.dps._DpsClient); DPS must not see a
    difference: the same headers (user agent, SAS authorisation, content negotiation), the same request."""
    config, state = overloaded_dps
    enrollment = await _get_once(config)
    assert enrollment is not None and enrollment.etag == "e1"
    sdk = DeviceProvisioningClient.from_connection_string(
        config.connection_string.reveal(), connection_verify=str(config.ca_file), retry_total=0
    )
    try:
        assert (await sdk.enrollment.get(id="dev-1"))["etag"] == "e1"
    finally:
        await sdk.close()
    ours, theirs = state["headers"]
    per_request = {"x-ms-client-request-id", "Authorization"}  # a new id and signature each time
    assert {k: v for k, v in ours.items() if k not in per_request} == {
        k: v for k, v in theirs.items() if k not in per_request
    }
    assert set(ours) == set(theirs)
    assert ours["Authorization"].startswith("SharedAccessSignature ")
    assert ours["User-Agent"].startswith("azsdk-python-az-iot-dps-python/")
