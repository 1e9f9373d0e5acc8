"""The one server wrapper counts every call of a registered service by method and status code, with its
latency, and every refusal under its ErrorInfo reason: unary and server-streaming handlers alike, refusals
of the access table included.  The portal counts its answers by route pattern.  Off unless configured:
nothing listens, nothing intercepts."""

from __future__ import annotations

import grpc
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import generate_latest
from support.metrics import Scrape, scrape

from activation_svc.portal.app import create_app
from activation_svc.portal.settings import PortalSettings
from provkit.authz import AccessPolicy
from provkit.channels import ChannelSecurity, create_channel
from provkit.context import Role
from provkit.errors import NotFound
from provkit.grpc_server import ServerSettings, ServiceBinding, start_server
from provkit.metrics import NO_METRICS
from provkit.observe import Observability, ObserveSettings, observe_settings
from provkit.prometheus_metrics import FACTORY_SERIES, PrometheusMetrics
from provkit.settings import SettingsError, SettingsSource

SERVICE = "probe.v1.CountedService"
POLICY = AccessPolicy(
    {
        f"/{SERVICE}/{m}": frozenset({Role.OPERATOR})
        for m in ("Ok", "Missing", "Boom", "Items", "Broken", "Chat", "Upload")
    }
)


async def _ok(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"ok"


async def _missing(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise NotFound("WIDGET_NOT_FOUND", "no such widget")


async def _boom(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise RuntimeError("internals")


async def _items(request: bytes, context: grpc.aio.ServicerContext):
    for n in range(3):
        yield str(n).encode()


async def _broken(request: bytes, context: grpc.aio.ServicerContext):
    yield b"first"
    raise NotFound("WIDGET_GONE", "the widget went away")


async def _chat(requests, context: grpc.aio.ServicerContext):
    async for item in requests:
        yield item


async def _upload(requests, context: grpc.aio.ServicerContext) -> bytes:
    return b"".join([item async for item in requests])


def _add(servicer: object, server: grpc.aio.Server) -> None:
    unary = {n: grpc.unary_unary_rpc_method_handler(f) for n, f in {"Ok": _ok, "Missing": _missing}.items()}
    handlers = {
        **unary,
        "Boom": grpc.unary_unary_rpc_method_handler(_boom),
        "Unlisted": grpc.unary_unary_rpc_method_handler(_ok),
        "Items": grpc.unary_stream_rpc_method_handler(_items),
        "Broken": grpc.unary_stream_rpc_method_handler(_broken),
        "Chat": grpc.stream_stream_rpc_method_handler(_chat),
        "Upload": grpc.stream_unary_rpc_method_handler(_upload),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


async def _code(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def _stream_code(call) -> tuple[int, grpc.StatusCode]:
    seen = 0
    try:
        async for _ in call:
            seen += 1
    except grpc.aio.AioRpcError as exc:
        return seen, exc.code()
    return seen, grpc.StatusCode.OK


async def test_each_call_is_counted_by_method_and_code_refusals_by_reason() -> None:
    metrics = PrometheusMetrics()
    settings = ServerSettings(insecure=True, insecure_identity="urn:devprov:operator:ops")
    server = await start_server(
        settings, [ServiceBinding(SERVICE, object(), _add)], policy=POLICY, metrics=metrics
    )
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:

            def unary(name: str):
                return channel.unary_unary(f"/{SERVICE}/{name}")(b"")

            def stream(name: str):
                return channel.unary_stream(f"/{SERVICE}/{name}")(b"")

            assert await _code(unary("Ok")) == grpc.StatusCode.OK
            assert await _code(unary("Ok")) == grpc.StatusCode.OK
            assert await _code(unary("Missing")) == grpc.StatusCode.NOT_FOUND
            assert await _code(unary("Boom")) == grpc.StatusCode.INTERNAL
            assert await _code(unary("Unlisted")) == grpc.StatusCode.PERMISSION_DENIED
            assert await _stream_code(stream("Items")) == (3, grpc.StatusCode.OK)
            assert await _stream_code(stream("Broken")) == (1, grpc.StatusCode.NOT_FOUND)
            chat = channel.stream_stream(f"/{SERVICE}/Chat")(iter([b"a", b"b"]))
            assert await _stream_code(chat) == (2, grpc.StatusCode.OK)  # bidirectional: served (lots)
            upload = channel.stream_unary(f"/{SERVICE}/Upload")(iter([b"a"]))
            assert await _code(upload) == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(0)

    scraped = Scrape(generate_latest(metrics.registry).decode())

    def handled(method: str, code: str) -> float:
        labels = {"grpc_service": SERVICE, "grpc_method": method, "grpc_code": code}
        return scraped.value("grpc_server_handled_total", **labels)

    assert handled("Ok", "OK") == 2
    assert handled("Missing", "NOT_FOUND") == 1
    assert handled("Boom", "INTERNAL") == 1
    assert handled("Unlisted", "PERMISSION_DENIED") == 1
    assert handled("Items", "OK") == 1
    assert handled("Broken", "NOT_FOUND") == 1
    assert handled("Chat", "OK") == 1
    assert scraped.total("grpc_server_handled_total") == 8  # the refused kind (Upload) is never wrapped
    assert scraped.value("grpc_server_handling_seconds_count", grpc_service=SERVICE, grpc_method="Ok") == 2
    refusals = "devprov_refusals_total"
    assert scraped.value(refusals, grpc_method="Missing", reason="WIDGET_NOT_FOUND") == 1
    assert scraped.value(refusals, grpc_method="Broken", reason="WIDGET_GONE") == 1
    assert scraped.value(refusals, grpc_method="Unlisted", reason="CALLER_NOT_AUTHORIZED") == 1
    assert scraped.total("devprov_refusals_total") == 3  # an unexpected error is no refusal


async def test_off_unless_configured() -> None:
    off = Observability.open(ObserveSettings(), "probe")
    assert off.metrics is NO_METRICS and off.registry is None and off.provider is None
    assert off.server_interceptors() == [] and off.client_interceptors() == []
    assert await off.start_endpoint() is None and off.metrics_url == ""
    source = SettingsSource("PROBE", env={})
    assert observe_settings(source) == ObserveSettings()


def test_observe_settings_are_checked() -> None:
    env = {"PROBE_METRICS_LISTEN": "127.0.0.1:0", "PROBE_TRACING_EXPORTER": "console"}
    settings = observe_settings(SettingsSource("PROBE", env=env))
    assert settings == ObserveSettings("127.0.0.1:0", "console", "")
    with pytest.raises(SettingsError, match="PROBE_TRACING_EXPORTER"):
        observe_settings(SettingsSource("PROBE", env={"PROBE_TRACING_EXPORTER": "zipkin"}))
    with pytest.raises(SettingsError, match="host:port"):
        observe_settings(SettingsSource("PROBE", env={"PROBE_METRICS_LISTEN": "9101"}))


async def test_the_endpoint_serves_the_registry_and_refreshes_gauges_first() -> None:
    observe = Observability.open(ObserveSettings(metrics_listen="127.0.0.1:0"), "probe", factory=True)
    refreshed: list[int] = []

    async def refresh() -> None:
        refreshed.append(1)
        observe.metrics.outbox(len(refreshed) + 4, 12.5)

    endpoint = await observe.start_endpoint(refresh=[refresh])
    assert endpoint is not None and observe.metrics_url.startswith("http://127.0.0.1:")
    try:
        scraped = await scrape(observe.metrics_url)
        assert scraped.value("devprov_outbox_depth") == 5
        assert scraped.value("devprov_outbox_oldest_age_seconds") == 12.5
    finally:
        await observe.shutdown()
    assert observe.metrics_url == ""


async def test_the_portal_counts_answers_by_route_pattern_never_the_path() -> None:
    metrics = PrometheusMetrics()
    settings = PortalSettings(ChannelSecurity(insecure=True))
    app = create_app(settings, observe=Observability(metrics, metrics.registry))
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/")).status == 200
        assert (await client.get("/static/portal.css")).status == 200
        assert (await client.get("/devices/3f2a9c1e-0000-4000-8000-000000000001")).status == 404
        assert (await client.delete("/activate")).status == 405
    scraped = Scrape(generate_latest(metrics.registry).decode())
    requests = "devprov_http_requests_total"
    assert scraped.value(requests, route="/", status="200") == 1
    assert scraped.value(requests, route="/static/{name}", status="200") == 1
    assert scraped.value(requests, route="unmatched", status="404") == 1
    assert scraped.value(requests, route="unmatched", status="405") == 1
    assert scraped.total(requests) == 4
    assert scraped.value("devprov_http_request_seconds_count", route="/") == 1
    assert "3f2a9c1e" not in scraped.text


async def test_console_tracing_prints_each_rpc_span_and_otlp_is_built_from_settings(capsys) -> None:
    observe = Observability.open(ObserveSettings(exporter="console"), "probe")
    assert observe.provider is not None and len(observe.server_interceptors()) == 1
    settings = ServerSettings(insecure=True, insecure_identity="urn:devprov:operator:ops")
    server = await start_server(
        settings,
        [ServiceBinding(SERVICE, object(), _add)],
        policy=POLICY,
        interceptors=observe.server_interceptors(),
    )
    try:
        async with create_channel(
            server.address, ChannelSecurity(insecure=True), interceptors=observe.client_interceptors()
        ) as channel:
            assert await channel.unary_unary(f"/{SERVICE}/Ok")(b"") == b"ok"
    finally:
        await server.stop(0)
        await observe.shutdown()  # flushes the batch
    printed = capsys.readouterr().out
    assert printed.count(f'"name": "/{SERVICE}/Ok"') == 2  # the client's span and the server's
    assert '"service.name": "probe"' in printed

    otlp = Observability.open(ObserveSettings(exporter="otlp", otlp_endpoint="http://127.0.0.1:4317"), "p")
    assert otlp.provider is not None and otlp.client_interceptors()
    await otlp.shutdown()


@pytest.mark.parametrize(
    ("service", "factory"), [("activation_svc", False), ("activation_portal", False), ("factory_svc", True)]
)
def test_each_program_exports_only_its_own_series(service: str, factory: bool) -> None:
    """The activation service and the portal exported the factory's outbox, revocation and code-rotation
    series, always 0 there; only the factory registers them now."""
    observe = Observability.open(ObserveSettings(metrics_listen="127.0.0.1:0"), service, factory=factory)
    assert observe.registry is not None
    names = {family.name for family in observe.registry.collect()}
    assert (set(FACTORY_SERIES) <= names) is factory
    assert not (set(FACTORY_SERIES) & names) or factory
    observe.metrics.outbox(3, 1.5)  # what the factory's code calls: nothing to record elsewhere
    observe.metrics.revoked()
    assert ("devprov_outbox_depth" in generate_latest(observe.registry).decode()) is factory
