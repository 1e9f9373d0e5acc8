"""The Prometheus adapter of ``provkit.metrics``: counters, histograms and gauges on one registry.

``PrometheusMetrics(registry=None, *, factory=True)`` implements ``provkit.metrics.SuiteMetrics`` on its
own ``prometheus_client.CollectorRegistry`` (one per program, so two services in one process never share a
series).  Each process registers only its own series: a series with labels appears once it has a value, and
the factory's unlabelled ones (``FACTORY_SERIES``: the outbox, revocations, code rotations), which would
read 0 forever anywhere else, only with ``factory=True`` (``provkit.observe.Observability.open`` passes
``factory=False`` for every program but the factory).  The names (all label values are closed sets; never
a device id):

| metric                                          | labels                          |
|-------------------------------------------------|---------------------------------|
| ``grpc_server_handled_total``                   | grpc_service, grpc_method, grpc_code |
| ``grpc_server_handling_seconds`` (histogram)    | grpc_service, grpc_method       |
| ``devprov_refusals_total``                      | grpc_method, reason (ErrorInfo.reason) |
| ``devprov_certificates_minted_total``           | mode (csr, server-generated), key_type |
| ``devprov_enrollments_total``                   | outcome (created, unchanged, replaced, queued,  |
|                                                 | replayed, refused)              |
| ``devprov_activations_total``                   | outcome (enrollment, enrollment+hub-twin,       |
|                                                 | unchanged, replayed, refused)   |
| ``devprov_activation_codes_rotated_total``      | -                               |
| ``devprov_certificates_revoked_total``          | -                               |
| ``devprov_outbox_depth``                        | - (pending enrollments)         |
| ``devprov_outbox_oldest_age_seconds``           | - (0 when empty)                |
| ``devprov_cloud_calls_total``                   | service (dps, hub), operation, outcome |
| ``devprov_cloud_call_seconds`` (histogram)      | service, operation              |
| ``devprov_cloud_throttled_total``               | service (every 429 seen, retries included) |
| ``devprov_http_requests_total``                 | route (the pattern), status     |
| ``devprov_http_request_seconds`` (histogram)    | route                           |
| ``devprov_renewals_issued_total``               | outcome (issued, replayed)      |
| ``devprov_renewals_refused_total``              | reason (the renewal refusal's)  |
| ``devprov_certificates_expiring``               | within (expired, 7d, 30d, 90d, 365d, later: |
|                                                 | certificates in use by days to expiry) |
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _FactorySeries:
    """``FACTORY_SERIES``, registered in the factory's registry only."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.rotated = Counter(
            "devprov_activation_codes_rotated", "Activation codes replaced by new ones.", registry=r
        )
        self.revoked = Counter("devprov_certificates_revoked", "Certificates revoked.", registry=r)
        self.outbox_depth = Gauge(
            "devprov_outbox_depth", "Enrollments waiting in the outbox for DPS.", registry=r
        )
        self.outbox_age = Gauge(
            "devprov_outbox_oldest_age_seconds",
            "Age of the oldest enrollment waiting in the outbox (0 when none waits).",
            registry=r,
        )


def split_method(method: str) -> tuple[str, str]:
    """``/devprov.v1.FactoryService/Enroll`` -> (``devprov.v1.FactoryService``, ``Enroll``)."""
    service, _, name = method.lstrip("/").partition("/")
    return service, name


# The factory's own unlabelled series (exported at 0 from the start wherever they are registered).
FACTORY_SERIES = (
    "devprov_activation_codes_rotated",
    "devprov_certificates_revoked",
    "devprov_outbox_depth",
    "devprov_outbox_oldest_age_seconds",
)


class PrometheusMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, factory: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by method and status code.",
            ["grpc_service", "grpc_method", "grpc_code"],
            registry=r,
        )
        self._handling = Histogram(
            "grpc_server_handling_seconds",
            "Time to handle an RPC on the server (caller check, servicer, error mapping).",
            ["grpc_service", "grpc_method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._refusals = Counter(
            "devprov_refusals",
            "Calls refused, by method and google.rpc.ErrorInfo reason.",
            ["grpc_method", "reason"],
            registry=r,
        )
        self._minted = Counter(
            "devprov_certificates_minted",
            "Certificates issued (replays not counted), by key source and key type.",
            ["mode", "key_type"],
            registry=r,
        )
        self._enrolled = Counter(
            "devprov_enrollments", "Enrollment answers, by outcome.", ["outcome"], registry=r
        )
        self._activated = Counter(
            "devprov_activations", "Activation answers, by outcome.", ["outcome"], registry=r
        )
        self._factory = _FactorySeries(r) if factory else None
        self._cloud_calls = Counter(
            "devprov_cloud_calls",
            "Calls to the DPS and IoT Hub service APIs, by operation and outcome.",
            ["service", "operation", "outcome"],
            registry=r,
        )
        self._cloud_seconds = Histogram(
            "devprov_cloud_call_seconds",
            "Latency of DPS and IoT Hub service API calls (SDK retries included).",
            ["service", "operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._throttled = Counter(
            "devprov_cloud_throttled",
            "HTTP 429 answers seen from DPS or a hub (each retry counts).",
            ["service"],
            registry=r,
        )

        self._http = Counter(
            "devprov_http_requests",
            "Web requests answered, by route pattern and HTTP status.",
            ["route", "status"],
            registry=r,
        )
        self._http_seconds = Histogram(
            "devprov_http_request_seconds",
            "Time to answer a web request, by route pattern.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

        self._renewed = Counter(
            "devprov_renewals_issued",
            "Certificate renewals answered with a certificate, new (issued) or again (replayed).",
            ["outcome"],
            registry=r,
        )
        self._renewal_refused = Counter(
            "devprov_renewals_refused", "Certificate renewals refused, by reason.", ["reason"], registry=r
        )
        self._expiring = Gauge(
            "devprov_certificates_expiring",
            "Device certificates in use (unrevoked, not superseded) by days to expiry (the bucket's bound).",
            ["within"],
            registry=r,
        )

    def rpc_handled(self, method: str, code: str, seconds: float) -> None:
        service, name = split_method(method)
        self._handled.labels(service, name, code).inc()
        self._handling.labels(service, name).observe(seconds)

    def refused(self, method: str, reason: str) -> None:
        self._refusals.labels(split_method(method)[1], reason).inc()

    def minted(self, mode: str, key_type: str) -> None:
        self._minted.labels(mode, key_type).inc()

    def enrolled(self, outcome: str, count: int = 1) -> None:
        if count:
            self._enrolled.labels(outcome).inc(count)

    def activated(self, outcome: str) -> None:
        self._activated.labels(outcome).inc()

    def codes_rotated(self, count: int = 1) -> None:
        if self._factory is not None:
            self._factory.rotated.inc(count)

    def revoked(self, count: int = 1) -> None:
        if self._factory is not None:
            self._factory.revoked.inc(count)

    def outbox(self, depth: int, oldest_age_seconds: float) -> None:
        if self._factory is not None:
            self._factory.outbox_depth.set(depth)
            self._factory.outbox_age.set(max(0.0, oldest_age_seconds))

    def cloud_call(self, service: str, operation: str, outcome: str, seconds: float) -> None:
        self._cloud_calls.labels(service, operation, outcome).inc()
        self._cloud_seconds.labels(service, operation).observe(seconds)

    def throttled(self, service: str) -> None:
        self._throttled.labels(service).inc()

    def http_handled(self, route: str, status: int, seconds: float) -> None:
        self._http.labels(route, str(status)).inc()
        self._http_seconds.labels(route).observe(seconds)

    def renewed(self, outcome: str) -> None:
        if outcome in ("issued", "replayed"):
            self._renewed.labels(outcome).inc()
        else:
            self._renewal_refused.labels(outcome).inc()

    def certificate_expiry(self, counts: Mapping[str, int]) -> None:
        for within, count in counts.items():
            self._expiring.labels(within).set(count)
