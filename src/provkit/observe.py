"""Observability of one program: its Prometheus ``/metrics`` endpoint and its OpenTelemetry tracing.

Both are off unless configured; off, every component gets ``provkit.metrics.NO_METRICS`` and a no-op
tracer, the gRPC server and channels get no interceptor, and nothing listens.

Settings (a program's prefix, e.g. FACTORY_ / ACTIVATION_ / ACTIVATION_PORTAL_ for ``[portal]``):

| key (TOML)            | environment                    | default                                    |
|-----------------------|--------------------------------|--------------------------------------------|
| metrics.listen        | <PREFIX>_METRICS_LISTEN        | - (off); ``host:port`` serves ``/metrics`` |
| tracing.exporter      | <PREFIX>_TRACING_EXPORTER      | none; console (JSON on stdout) or otlp     |
| tracing.otlp_endpoint | <PREFIX>_TRACING_OTLP_ENDPOINT | - (OTEL_EXPORTER_OTLP_ENDPOINT or default) |

API
---
``ObserveSettings(metrics_listen="", exporter="none", otlp_endpoint="")``; ``observe_settings(source,
    section="")`` reads them (``section`` prefixes the keys, e.g. ``"portal"``).
``Observability.open(settings, service_name, *, factory=False) -> Observability``   builds the registry
    (with the factory's own series only for ``factory=True``: ``provkit.prometheus_metrics``) and the tracer
    provider the settings ask for; ``Observability.off()``; ``Observability(metrics, registry, provider)``
    (tests pass a provider with an in-memory exporter).
    ``.metrics`` (``SuiteMetrics``), ``.registry`` (None when off), ``.tracer(name)``,
    ``.cloud_calls(service)``, ``.server_interceptors()``, ``.client_interceptors()``,
    ``async .start_endpoint(listen, refresh=())`` -> ``MetricsEndpoint`` (``.url``, ``async .stop()``);
    each ``refresh`` coroutine runs before a scrape is rendered (gauges read from a store).
    ``.metrics_url`` (empty while no endpoint runs); ``async .shutdown()`` stops the endpoint, flushes and
    stops the tracer provider.
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from provkit.cloud_calls import CallObserver
from provkit.metrics import NO_METRICS, SuiteMetrics
from provkit.prometheus_metrics import PrometheusMetrics
from provkit.settings import SettingsError, SettingsSource

log = logging.getLogger("provkit.observe")

EXPORTERS = ("none", "console", "otlp")
_NO_TRACER = trace.NoOpTracer()

Refresh = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class ObserveSettings:
    metrics_listen: str = ""  # host:port; empty: no /metrics
    exporter: str = "none"
    otlp_endpoint: str = ""

    @property
    def tracing(self) -> bool:
        return self.exporter != "none"


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SettingsError(f"a metrics listen address is host:port, got {text!r}")
    return host, int(port)


def observe_settings(source: SettingsSource, section: str = "") -> ObserveSettings:
    def key(name: str) -> str:
        return f"{section}.{name}" if section else name

    listen = (source.text(key("metrics.listen"), "") or "").strip()
    if listen:
        parse_listen(listen)
    exporter = (source.text(key("tracing.exporter"), "none") or "none").strip().lower()
    if exporter not in EXPORTERS:
        raise SettingsError(
            f"{source.env_name(key('tracing.exporter'))} must be one of {', '.join(EXPORTERS)}, "
            f"got {exporter!r}"
        )
    endpoint = (source.text(key("tracing.otlp_endpoint"), "") or "").strip()
    return ObserveSettings(listen, exporter, endpoint)


def _exporter(settings: ObserveSettings) -> SpanExporter:
    if settings.exporter == "console":
        return ConsoleSpanExporter(out=sys.stdout)  # the stdout of now (the default is bound at import)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=settings.otlp_endpoint) if settings.otlp_endpoint else OTLPSpanExporter()


def tracer_provider(settings: ObserveSettings, service_name: str) -> TracerProvider | None:
    if not settings.tracing:
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(_exporter(settings)))
    return provider


@dataclass
class MetricsEndpoint:
    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def stop(self) -> None:
        await self.runner.cleanup()


@dataclass
class Observability:
    metrics: SuiteMetrics = NO_METRICS
    registry: CollectorRegistry | None = None
    provider: TracerProvider | None = None
    settings: ObserveSettings = field(default_factory=ObserveSettings)
    endpoint: MetricsEndpoint | None = None

    @classmethod
    def off(cls) -> Observability:
        return cls()

    @classmethod
    def open(cls, settings: ObserveSettings, service_name: str, *, factory: bool = False) -> Observability:
        metrics: SuiteMetrics = NO_METRICS
        registry = None
        if settings.metrics_listen:
            prometheus = PrometheusMetrics(factory=factory)
            metrics, registry = prometheus, prometheus.registry
        return cls(metrics, registry, tracer_provider(settings, service_name), settings)

    def tracer(self, name: str) -> trace.Tracer:
        return self.provider.get_tracer(name) if self.provider is not None else _NO_TRACER

    def cloud_calls(self, service: str) -> CallObserver:
        """What the ``service`` ("dps" or "hub") adapter wraps its SDK calls in."""
        return CallObserver(service, self.metrics, self.tracer(f"provkit.{service}"))

    def server_interceptors(self) -> list[Any]:
        if self.provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        return [aio_server_interceptor(tracer_provider=self.provider)]

    def client_interceptors(self) -> list[Any]:
        if self.provider is None:
            return []
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        return list(aio_client_interceptors(tracer_provider=self.provider))

    async def start_endpoint(
        self, listen: str = "", refresh: Sequence[Refresh] = ()
    ) -> MetricsEndpoint | None:
        """Serve ``/metrics`` on ``listen`` (default: the configured address); None when metrics are off."""
        listen = listen or self.settings.metrics_listen
        if self.registry is None or not listen:
            return None
        host, port = parse_listen(listen)
        registry = self.registry

        async def scrape(request: web.Request) -> web.Response:
            for step in refresh:
                try:
                    await step()
                except Exception:  # a stale gauge is better than no scrape at all
                    log.exception("could not refresh a metric before the scrape")
            return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", scrape)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, reuse_port=False)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self.endpoint = MetricsEndpoint(runner, host, sock.getsockname()[1])
        log.info("metrics endpoint listening", extra={"url": self.endpoint.url})
        return self.endpoint

    @property
    def metrics_url(self) -> str:
        return self.endpoint.url if self.endpoint is not None else ""

    async def shutdown(self) -> None:
        """Stop the ``/metrics`` endpoint and flush the spans still buffered."""
        if self.endpoint is not None:
            await self.endpoint.stop()
            self.endpoint = None
        if self.provider is not None:
            self.provider.shutdown()
