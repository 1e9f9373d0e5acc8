"""A grpc.aio server built from settings: TLS / mTLS / loopback-only insecure, health, reflection,
request ids, caller identity, domain-error mapping, graceful shutdown.

API
---
``ClientAuth``                 enum: NONE (plain TLS), OPTIONAL (certificate checked if sent; calls without
                               one fail UNAUTHENTICATED except health/reflection), REQUIRE (TLS handshake
                               refuses clients without a certificate from the client CA).
``ServerTLS(cert_file, key_file, client_ca_file=None, client_auth=ClientAuth.REQUIRE)``
``ServerSettings(host="127.0.0.1", port=0, tls=None, insecure=False, allow_insecure_non_loopback=False,
                 grace_seconds=10.0, error_domain="devprov")``
                               exactly one of ``tls`` / ``insecure=True``; insecure refuses a non-loopback
                               host unless ``allow_insecure_non_loopback``.
``ServiceBinding(name, servicer, add_to_server)``; ``binding(servicer, add_fn, service_descriptor)``
                               what to serve (the generated ``add_XServicer_to_server`` and the
                               ``DESCRIPTOR.services_by_name[...]`` of the pb2 module).
``async start_server(settings, services) -> RunningServer``   binds and starts; ``.port``, ``.address``,
                               ``.health`` (grpc_health aio servicer), ``async .stop(grace=None)``.
``async serve(settings, services, *, on_started=None) -> None``   start, then wait for SIGINT/SIGTERM and
                               stop gracefully (health NOT_SERVING, no new RPCs, in-flight finish within
                               ``grace_seconds``).
``ServerConfigError``          a settings problem (insecure non-loopback bind, missing files...).

Handlers are plain async servicer methods: they raise ``provkit.errors.DomainError`` (mapped by
``provkit.grpc_errors``), read ``provkit.context.current_request_id()`` / ``current_caller()``.  The request
id comes from the ``x-request-id`` metadata or is generated, and is echoed in the trailing metadata (and
in ``ErrorInfo.metadata["request_id"]`` of errors).  The wrapping happens once at registration: each
``ServiceBinding.add_to_server`` receives a registering proxy, not the raw server.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import inspect
import ipaddress
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from provkit.context import CallerIdentity, request_scope
from provkit.errors import DomainError, Unauthenticated
from provkit.grpc_errors import internal_status, to_grpc_status
from provkit.signals import wait_for_stop_signal

log = logging.getLogger("provkit.grpc")

REQUEST_ID_HEADER = "x-request-id"
_OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.")


class ServerConfigError(ValueError):
    """The server settings cannot work (reported at start-up, before binding)."""


class ClientAuth(enum.Enum):
    NONE = "none"
    OPTIONAL = "optional"
    REQUIRE = "require"


@dataclass(frozen=True)
class ServerTLS:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    client_auth: ClientAuth = ClientAuth.REQUIRE

    def __post_init__(self) -> None:
        if self.client_auth is not ClientAuth.NONE and self.client_ca_file is None:
            raise ServerConfigError(f"client_auth={self.client_auth.value} needs a client CA file")


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 0
    tls: ServerTLS | None = None
    insecure: bool = False
    allow_insecure_non_loopback: bool = False
    grace_seconds: float = 10.0
    error_domain: str = "devprov"
    options: tuple[tuple[str, Any], ...] = field(default=())


@dataclass(frozen=True)
class ServiceBinding:
    name: str  # full service name, e.g. "devprov.v1.FactoryService"
    servicer: object
    add_to_server: Callable[[object, grpc.aio.Server], None]


def binding(
    servicer: object, add_to_server: Callable[[Any, Any], None], service_descriptor: Any
) -> ServiceBinding:
    return ServiceBinding(service_descriptor.full_name, servicer, add_to_server)


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------------------- caller identity
@functools.lru_cache(maxsize=1024)
def _identity_from_pem(pem: bytes) -> tuple[str | None, str]:
    cert = x509.load_pem_x509_certificate(pem)
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    cn = str(names[0].value) if names else None
    return cn, cert.fingerprint(hashes.SHA256()).hex().upper()


def caller_identity(context: grpc.aio.ServicerContext) -> CallerIdentity:
    auth = context.auth_context() or {}
    peer = context.peer() or ""
    transport = b"".join(auth.get("transport_security_type", []))
    pem = b"".join(auth.get("x509_pem_cert", []))
    if pem:
        cn, thumb = _identity_from_pem(pem)
        return CallerIdentity("mtls", cn, thumb, peer)
    if transport == b"ssl":
        return CallerIdentity("tls-anonymous", peer=peer)
    return CallerIdentity("insecure", peer=peer)


# ------------------------------------------------------------------------------------- handler wrapping
# Handlers are wrapped once, when a service is registered (not by a per-call interceptor, which costs a
# handler object and an extra await per RPC): the wrapper sets the request scope, enforces a client
# certificate in OPTIONAL mode, and maps exceptions through the error table.
def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return secrets.token_hex(16)


class _HandlerWrapper:
    def __init__(self, domain: str, require_client_cert: bool) -> None:
        self._domain = domain
        self._require_client_cert = require_client_cert

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        guarded = self._require_client_cert and not method.lstrip("/").startswith(_OPEN_SERVICES)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, guarded),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, guarded),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    async def _enter(self, context: grpc.aio.ServicerContext, guarded: bool) -> tuple[str, CallerIdentity]:
        request_id = _request_id(context)
        caller = caller_identity(context)
        context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
        if guarded and not caller.authenticated:
            await self._fail(
                context,
                Unauthenticated("CLIENT_CERTIFICATE_REQUIRED", "a client certificate is required"),
                request_id,
                "",
            )
        return request_id, caller

    async def _fail(
        self, context: grpc.aio.ServicerContext, exc: BaseException, request_id: str, method: str
    ) -> None:
        if isinstance(exc, DomainError):
            log.info(
                "request refused: %s",
                exc.message,
                extra={
                    "reason": exc.reason,
                    "method": method,
                    "kind": exc.kind.value,
                    "request_id": request_id,
                },
            )
            await context.abort_with_status(to_grpc_status(exc, self._domain, request_id=request_id))
        log.error(
            "unexpected error in %s", method, exc_info=exc, extra={"method": method, "request_id": request_id}
        )
        await context.abort_with_status(internal_status(request_id, self._domain))

    def _wrap_unary(self, behavior: Callable[..., Any], method: str, guarded: bool) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            request_id, caller = await self._enter(context, guarded)
            with request_scope(request_id, caller):
                try:
                    result = behavior(request, context)
                    if inspect.isawaitable(result):
                        result = await result
                    return result
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:
                    await self._fail(context, exc, request_id, method)

        return wrapped

    def _wrap_stream(self, behavior: Callable[..., Any], method: str, guarded: bool) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            request_id, caller = await self._enter(context, guarded)
            with request_scope(request_id, caller):
                try:
                    async for item in behavior(request, context):
                        yield item
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception as exc:
                    await self._fail(context, exc, request_id, method)

        return wrapped


class _WrappedGenericHandler(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, wrapper: _HandlerWrapper) -> None:
        self._inner = inner
        self._wrapper = wrapper
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrapper.wrap(handler, method)
        self._cache[method] = (handler, wrapped)  # one entry per method name
        return wrapped


class _RegisteringServer:
    """What a ``ServiceBinding.add_to_server`` sees: registers the service's handlers, wrapped."""

    def __init__(self, server: grpc.aio.Server, wrapper: _HandlerWrapper) -> None:
        self._server = server
        self._wrapper = wrapper

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers([_WrappedGenericHandler(h, self._wrapper) for h in handlers])

    def add_registered_method_handlers(
        self, service_name: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        wrapped = {name: self._wrapper.wrap(h, f"/{service_name}/{name}") for name, h in handlers.items()}
        self._server.add_registered_method_handlers(service_name, wrapped)


# ------------------------------------------------------------------------------------------------ server
def _credentials(tls: ServerTLS) -> grpc.ServerCredentials:
    try:
        key = tls.key_file.read_bytes()
        cert = tls.cert_file.read_bytes()
        client_ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    except OSError as exc:
        raise ServerConfigError(f"cannot read TLS file: {exc}") from exc
    if tls.client_auth is ClientAuth.NONE:
        return grpc.ssl_server_credentials([(key, cert)])
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=tls.client_auth is ClientAuth.REQUIRE
    )


def check_settings(settings: ServerSettings) -> None:
    if settings.tls is None and not settings.insecure:
        raise ServerConfigError("configure TLS (certificate and key) or choose insecure mode explicitly")
    if settings.tls is not None and settings.insecure:
        raise ServerConfigError("TLS and insecure mode are exclusive")
    if settings.insecure and not is_loopback_host(settings.host) and not settings.allow_insecure_non_loopback:
        raise ServerConfigError(
            f"insecure mode is for loopback development only; refusing to bind {settings.host!r} "
            "(configure TLS, or force it explicitly)"
        )


@dataclass
class RunningServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    host: str
    port: int
    grace_seconds: float
    services: tuple[str, ...]

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.grace_seconds if grace is None else grace)


async def start_server(settings: ServerSettings, services: Sequence[ServiceBinding]) -> RunningServer:
    check_settings(settings)
    require_cert = settings.tls is not None and settings.tls.client_auth is ClientAuth.OPTIONAL
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *settings.options])
    registering = _RegisteringServer(server, _HandlerWrapper(settings.error_domain, require_cert))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in services:
        service.add_to_server(service.servicer, registering)
    names = tuple(s.name for s in services)
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = (
        f"{settings.host}:{settings.port}"
        if ":" not in settings.host
        else f"[{settings.host}]:{settings.port}"
    )
    try:
        if settings.tls is not None:
            port = server.add_secure_port(address, _credentials(settings.tls))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ServerConfigError(f"cannot bind {address}: {exc}") from exc
    await server.start()
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "gRPC server listening",
        extra={
            "address": f"{settings.host}:{port}",
            "tls": settings.tls is not None,
            "services": list(names),
        },
    )
    return RunningServer(server, health_servicer, settings.host, port, settings.grace_seconds, names)


async def serve(
    settings: ServerSettings,
    services: Sequence[ServiceBinding],
    *,
    on_started: Callable[[RunningServer], None] | None = None,
) -> None:
    running = await start_server(settings, services)
    if on_started is not None:
        on_started(running)
    await wait_for_stop_signal()
    log.info("shutting down", extra={"grace_seconds": settings.grace_seconds})
    await running.stop()
    log.info("stopped")
