"""The suite's metrics port: what the servers, servicers and cloud adapters report, and a no-op default.

The domain never imports this module; the gRPC server plumbing (``provkit.grpc_server``), the servicers
(where an outcome is known) and the DPS / IoT Hub adapters call it.  Labels are small closed sets (method
names, error reasons, outcomes, key types, hub names): never a device id.

API
---
``RpcMetrics``       ``rpc_handled(method, code, seconds)``, ``refused(method, reason)``
``DomainMetrics``    ``minted(mode, key_type)``, ``enrolled(outcome, count=1)``, ``activated(outcome)``
``LifecycleMetrics`` ``codes_rotated(count=1)``, ``revoked(count=1)``, ``outbox(depth, oldest_age_seconds)``
``CloudMetrics``     ``cloud_call(service, operation, outcome, seconds)``, ``throttled(service)``
``HttpMetrics``      ``http_handled(route, status, seconds)`` (the portal; ``route`` is the route pattern)
``RenewalMetrics``   ``renewed(outcome)`` (``issued``, ``replayed``, or the refusal's reason),
                     ``certificate_expiry(counts)`` (certificates in use by days-to-expiry bucket)
``SuiteMetrics``     all six (what ``provkit.prometheus_metrics.PrometheusMetrics`` implements)
``NO_METRICS``       the no-op implementation every component uses unless given another
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class RpcMetrics(Protocol):
    def rpc_handled(self, method: str, code: str, seconds: float) -> None: ...

    def refused(self, method: str, reason: str) -> None: ...


class DomainMetrics(Protocol):
    def minted(self, mode: str, key_type: str) -> None: ...

    def enrolled(self, outcome: str, count: int = 1) -> None: ...

    def activated(self, outcome: str) -> None: ...


class LifecycleMetrics(Protocol):
    def codes_rotated(self, count: int = 1) -> None: ...

    def revoked(self, count: int = 1) -> None: ...

    def outbox(self, depth: int, oldest_age_seconds: float) -> None: ...


class CloudMetrics(Protocol):
    def cloud_call(self, service: str, operation: str, outcome: str, seconds: float) -> None: ...

    def throttled(self, service: str) -> None: ...


class HttpMetrics(Protocol):
    def http_handled(self, route: str, status: int, seconds: float) -> None: ...


class RenewalMetrics(Protocol):
    def renewed(self, outcome: str) -> None: ...

    def certificate_expiry(self, counts: Mapping[str, int]) -> None: ...


class SuiteMetrics(
    RpcMetrics, DomainMetrics, LifecycleMetrics, CloudMetrics, HttpMetrics, RenewalMetrics, Protocol
):
    pass


class NoMetrics:
    """Counts nothing (metrics not configured)."""

    def rpc_handled(self, method: str, code: str, seconds: float) -> None:
        pass

    def refused(self, method: str, reason: str) -> None:
        pass

    def minted(self, mode: str, key_type: str) -> None:
        pass

    def enrolled(self, outcome: str, count: int = 1) -> None:
        pass

    def activated(self, outcome: str) -> None:
        pass

    def codes_rotated(self, count: int = 1) -> None:
        pass

    def revoked(self, count: int = 1) -> None:
        pass

    def outbox(self, depth: int, oldest_age_seconds: float) -> None:
        pass

    def cloud_call(self, service: str, operation: str, outcome: str, seconds: float) -> None:
        pass

    def throttled(self, service: str) -> None:
        pass

    def http_handled(self, route: str, status: int, seconds: float) -> None:
        pass

    def renewed(self, outcome: str) -> None:
        pass

    def certificate_expiry(self, counts: Mapping[str, int]) -> None:
        pass


NO_METRICS: SuiteMetrics = NoMetrics()
