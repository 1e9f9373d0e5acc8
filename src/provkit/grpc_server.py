"""A grpc.aio server built from settings: TLS / mTLS / loopback-only insecure, health, reflection,
request ids, caller identity and authorization, domain-error mapping, graceful shutdown.

API
---
``ClientAuth``                 enum: NONE (plain TLS: no client certificate is asked for, so every call but
                               health/reflection is refused), REQUIRE (TLS handshake refuses clients without
                               a certificate from the client CA).  There is no "optional": gRPC's Python
                               server either requires a client certificate or never asks for one, so a
                               caller's certificate could not be "checked if sent".
``ServerTLS(cert_file, key_file, client_ca_file=None, client_auth=ClientAuth.REQUIRE)``
``ServerSettings(host="127.0.0.1", port=0, tls=None, insecure=False, allow_insecure_non_loopback=False,
                 grace_seconds=10.0, error_domain="devprov", insecure_identity="")``
                               exactly one of ``tls`` / ``insecure=True``; insecure refuses a non-loopback
                               host unless ``allow_insecure_non_loopback``.  Without TLS nobody can prove
                               who they are: ``insecure_identity`` (a ``urn:devprov:<role>:<tenant>`` URI)
                               is the party every insecure caller is taken for; empty, every call
                               except health/reflection is refused.
``ServiceBinding(name, servicer, add_to_server)``; ``binding(servicer, add_fn, service_descriptor)``
                               what to serve (the generated ``add_XServicer_to_server`` and the
                               ``DESCRIPTOR.services_by_name[...]`` of the pb2 module).
``async start_server(settings, services, *, policy=SUITE_POLICY, refusals=None, metrics=NO_METRICS,
                   interceptors=()) -> RunningServer``
                               binds and starts; ``.port``, ``.address``,
                               ``.health`` (grpc_health aio servicer), ``async .stop(grace=None)``.
``async serve(settings, services, *, on_started=None, **same keywords as start_server) -> None``
                               start, then wait for SIGINT/SIGTERM and
                               stop gracefully (health NOT_SERVING, no new RPCs, in-flight finish within
                               ``grace_seconds``).
``async serve_app(app)``       the same for a ``ServedApp`` (``async start() -> RunningServer``,
                               ``async close()``): what the services' ``run_server`` use.
``run_service(main)``          run a service's top-level coroutine to completion on uvloop (libuv's event
                               loop; grpc.aio runs on it, and each call costs the loop less than on
                               asyncio's own: see the mint section of BENCHMARKS.md).
``serve_command(settings, run_server) -> int``
                               a service's ``serve`` command: logging as ``settings.log_level`` asks, then
                               ``run_server(settings)`` through ``run_service``; exit code 0.
``ServerConfigError``          a settings problem (insecure non-loopback bind, missing files...).

Handlers are plain async servicer methods: they raise ``provkit.errors.DomainError`` (mapped by
``provkit.grpc_errors``), read ``provkit.context.current_request_id()`` / ``current_caller()``.  The request
id comes from the ``x-request-id`` metadata or is generated, and is echoed in the trailing metadata (and
in ``ErrorInfo.metadata["request_id"]`` of errors).  The wrapping happens once at registration: each
``ServiceBinding.add_to_server`` receives a registering proxy, not the raw server.

Every call of a registered service goes through one gate before its servicer runs:

1. the caller: the verified client certificate's ``urn:devprov:<role>:<tenant>`` URI (``provkit.parties``)
   becomes a ``provkit.context.Caller``.  No certificate: UNAUTHENTICATED ``CLIENT_CERTIFICATE_REQUIRED``;
   a certificate naming no party (or two): UNAUTHENTICATED ``CALLER_IDENTITY_UNRECOGNISED``.
2. the table (``provkit.authz``, ``policy``): a role it does not list for the method, or a method it does
   not list at all, is PERMISSION_DENIED ``CALLER_NOT_AUTHORIZED``.

A refusal changes nothing, is logged with the caller and handed to ``refusals`` (the service's audit,
behind a ``provkit.refusal_audit.RefusalAggregator``: anyone can cause these, so the first of a kind is
written and its repeats are counted; ``Refusal.source`` tells kinds apart).
A bidi call the gate lets through gets the response header ``ADMITTED_HEADER`` (``x-devprov-admitted``)
before its servicer runs; clients write their requests after it (``provkit.channels.admitted_stream``).

The same wrapper reports each call to ``metrics`` (``provkit.metrics.RpcMetrics``): its status code and
latency, and every refusal under its ``ErrorInfo.reason``, streaming calls included.  ``interceptors``
(OpenTelemetry's server interceptor when tracing is on, see ``provkit.observe``) run before the wrapper,
so the call's span is current in its log lines; with none configured there is no per-call layer.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import ipaddress
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeAlias, TypeVar

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from provkit.authz import SUITE_POLICY, AccessPolicy, Refusal, RefusalLog, is_open
from provkit.context import Caller, CallerIdentity, Role, deadline_scope, request_scope
from provkit.errors import ConfigurationError, DomainError, Reason, Unauthenticated
from provkit.grpc_errors import STATUS_BY_KIND, internal_status, to_grpc_status
from provkit.logging import configure_logging
from provkit.metrics import NO_METRICS, RpcMetrics
from provkit.parties import (
    UnrecognisedIdentity,
    caller_from_certificate,
    certificate_identity,
    parse_identity_uri,
)
from provkit.signals import wait_for_stop_signal

log = logging.getLogger("provkit.grpc")

REQUEST_ID_HEADER = "x-request-id"
# The response header a request-streaming call gets once the gate has admitted it (see _wrap_stream).
ADMITTED_HEADER = "x-devprov-admitted"
ON_BEHALF_OF_HEADER = "x-devprov-on-behalf-of"  # a portal's end user (ignored from any other role)
_MAX_ON_BEHALF_OF = 64


class ServerConfigError(ConfigurationError, ValueError):
    """The server settings cannot work (reported at start-up, before binding)."""


class ClientAuth(enum.Enum):
    NONE = "none"
    REQUIRE = "require"


@dataclass(frozen=True)
class ServerTLS:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    client_auth: ClientAuth = ClientAuth.REQUIRE

    def __post_init__(self) -> None:
        if self.client_auth is ClientAuth.REQUIRE and self.client_ca_file is None:
            raise ServerConfigError("client_auth=require needs a client CA file")


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
    insecure_identity: str = ""  # urn:devprov:<role>:<tenant>: who an insecure (loopback dev) caller is


# Handlers and contexts of any service: the gate wraps them whatever their message types.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class HandlerRegistry(Protocol):
    """The part of a server a generated ``add_*Servicer_to_server`` function uses."""

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None: ...

    def add_registered_method_handlers(self, service_name: str, handlers: dict[str, Handler]) -> None: ...


@dataclass(frozen=True)
class ServiceBinding:
    name: str  # full service name, e.g. "devprov.v1.FactoryService"
    servicer: object
    add_to_server: Callable[[Any, HandlerRegistry], None]


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
def _transport(context: Context) -> tuple[bytes, bool]:
    """The verified client certificate's PEM (empty without one), and whether the channel is TLS."""
    auth = context.auth_context() or {}
    tls = b"".join(auth.get("transport_security_type", [])) == b"ssl"
    return b"".join(auth.get("x509_pem_cert", [])), tls


def transport_identity(context: Context) -> tuple[CallerIdentity, bytes]:
    """What the transport proved (and the client certificate's PEM, empty without one)."""
    peer = context.peer() or ""
    pem, tls = _transport(context)
    if pem:
        return certificate_identity(pem, peer), pem
    if tls:
        return CallerIdentity("tls-anonymous", peer=peer), b""
    return CallerIdentity("insecure", peer=peer), b""


def peer_host(peer: str) -> str:
    """A gRPC peer (``ipv4:127.0.0.1:50000``, ``ipv6:[::1]:50000``) without its port."""
    head, _, port = peer.rpartition(":")
    return head if head and port.isdigit() else peer


def refusal_source(identity: CallerIdentity) -> str:
    """Who a refusal came from, as far as the transport knows: the certificate's CN and thumbprint, else the
    peer's address (without the port, which a flooder changes with every connection)."""
    if identity.kind == "mtls":
        return str(identity)
    return f"{identity.kind}:{peer_host(identity.peer)}"


def _for_end_user(caller: Caller, context: Context) -> Caller:
    """A portal names the person it calls for (so one web user's failures are not another's)."""
    if caller.role is not Role.PORTAL:
        return caller
    for key, value in context.invocation_metadata() or ():
        if key == ON_BEHALF_OF_HEADER and isinstance(value, str) and value:
            return replace(caller, on_behalf_of=value[:_MAX_ON_BEHALF_OF])
    return caller


class _CallerResolver:
    """The call's ``Caller``, from the verified client certificate only (or the configured insecure one)."""

    def __init__(self, insecure_identity: str) -> None:
        self._insecure = parse_identity_uri(insecure_identity) if insecure_identity else None

    def resolve(self, context: Context) -> Caller:
        pem, tls = _transport(context)
        if pem:  # the certificate is parsed once (provkit.parties caches it), not on every call
            try:
                return _for_end_user(caller_from_certificate(pem, context.peer() or ""), context)
            except UnrecognisedIdentity as exc:
                raise Unauthenticated(Reason.CALLER_IDENTITY_UNRECOGNISED, str(exc)) from None
        if self._insecure is not None and not tls:
            identity = CallerIdentity("insecure", peer=context.peer() or "")
            return _for_end_user(Caller(*self._insecure, identity), context)
        raise Unauthenticated(
            Reason.CLIENT_CERTIFICATE_REQUIRED, "a client certificate naming a party is required"
        )


# ------------------------------------------------------------------------------------- handler wrapping
# Handlers are wrapped once, when a service is registered (not by a per-call interceptor, which costs a
# handler object and an extra await per RPC): the wrapper is the server's one interceptor.  It resolves
# the caller, checks the access table, sets the request scope and maps exceptions through the error table.
def _request_id(context: Context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return secrets.token_hex(16)


def _deadline(context: Context) -> float | None:
    """When the caller stops waiting for this call (``time.monotonic()`` seconds), if it said."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


# A refused caller chooses the request (up to gRPC's 4 MiB): its audit row keeps this much of the device id
# (DPS's registration ids are 128 characters at most).
_MAX_AUDITED_DEVICE_ID = 128


def _device_id_of(request: Any) -> str:
    value = getattr(request, "device_id", "")
    return value[:_MAX_AUDITED_DEVICE_ID] if isinstance(value, str) else ""


class _HandlerWrapper:
    def __init__(
        self,
        domain: str,
        resolver: _CallerResolver,
        policy: AccessPolicy,
        refusals: RefusalLog | None,
        metrics: RpcMetrics = NO_METRICS,
    ) -> None:
        self._domain = domain
        self._resolver = resolver
        self._policy = policy
        self._refusals = refusals
        self._metrics = metrics

    def wrap(self, handler: Handler, method: str) -> Handler:
        if is_open(method):
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, requests_stream=False),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None and inspect.isasyncgenfunction(handler.stream_stream):
            return grpc.stream_stream_rpc_method_handler(  # the requests' iterator in place of a request
                self._wrap_stream(handler.stream_stream, method, requests_stream=True),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return _refusing_handler(handler, method)

    async def _enter(
        self, context: Context, method: str, request: Any
    ) -> tuple[str, Caller]:
        """The request id and the authorized caller; a refusal is audited and aborts the call here."""
        request_id = _request_id(context)
        context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
        caller: Caller | None = None
        try:
            caller = self._resolver.resolve(context)
            self._policy.check(method, caller)
        except DomainError as exc:
            identity = caller.identity if caller is not None else transport_identity(context)[0]
            seen = str(caller) if caller is not None else str(identity)
            log.warning(
                "call refused: %s",
                exc.message,
                extra={
                    "reason": exc.reason,
                    "method": method,
                    "caller": seen,
                    "role": caller.role.value if caller else "",
                    "request_id": request_id,
                },
            )
            self._metrics.refused(method, exc.reason)
            await self._audit_refusal(
                Refusal(
                    datetime.now(UTC),
                    method,
                    seen,
                    caller.role.value if caller else "",
                    _device_id_of(request),
                    request_id,
                    exc.reason,
                    refusal_source(identity),
                )
            )
            await context.abort_with_status(to_grpc_status(exc, self._domain, request_id=request_id))
        assert caller is not None
        return request_id, caller

    async def _audit_refusal(self, refusal: Refusal) -> None:
        if self._refusals is None:
            return
        try:
            await self._refusals.record_refusal(refusal)
        except Exception:  # the call is refused all the same; the log line above keeps the trace
            log.exception("could not audit a refused call", extra={"method": refusal.method})

    async def _fail(
        self, context: Context, exc: BaseException, request_id: str, method: str
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
            self._metrics.refused(method, exc.reason)
            await context.abort_with_status(to_grpc_status(exc, self._domain, request_id=request_id))
        log.error(
            "unexpected error in %s", method, exc_info=exc, extra={"method": method, "request_id": request_id}
        )
        await context.abort_with_status(internal_status(request_id, self._domain))

    def _finished(self, method: str, started: float, error: BaseException | None) -> None:
        """One RPC's status code and latency (the code the error table gives a domain error)."""
        if error is None:
            code = grpc.StatusCode.OK
        elif isinstance(error, DomainError):
            code = STATUS_BY_KIND[error.kind]
        elif isinstance(error, _Aborted):
            code = error.code
        elif isinstance(error, asyncio.CancelledError):
            code = grpc.StatusCode.CANCELLED
        else:
            code = grpc.StatusCode.INTERNAL
        self._metrics.rpc_handled(method, code.name, time.perf_counter() - started)
        if error is not None:
            _mark_span(code, error)

    def _wrap_unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def wrapped(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                request_id, caller = await self._enter(context, method, request)
                with request_scope(request_id, caller), deadline_scope(_deadline(context)):
                    try:
                        result = behavior(request, context)
                        if inspect.isawaitable(result):
                            result = await result
                        return result
                    except (asyncio.CancelledError, grpc.aio.AbortError):
                        raise
                    except Exception as exc:
                        error = exc
                        await self._fail(context, exc, request_id, method)
            except grpc.aio.AbortError as exc:
                error = error or _aborted(context, exc)
                raise
            except asyncio.CancelledError as exc:
                error = exc
                raise
            finally:
                self._finished(method, started, error)

        return wrapped

    def _wrap_stream(
        self, behavior: Callable[..., Any], method: str, *, requests_stream: bool
    ) -> Callable[..., Any]:
        async def wrapped(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                request_id, caller = await self._enter(context, method, request)
                if requests_stream:
                    # The verdict goes out before the servicer runs: the response headers with
                    # ADMITTED_HEADER, or (above) a refusal with no headers before it.  A client that
                    # holds its requests back until then (provkit.channels.admitted_stream) writes nothing
                    # into a refused call, so grpc.aio never turns the refusal into "INTERNAL: Internal
                    # error from Core" (a write failing on the closed stream replaces the status).
                    await context.send_initial_metadata(((ADMITTED_HEADER, "1"),))
                with request_scope(request_id, caller):
                    try:
                        async for item in behavior(request, context):
                            yield item
                    except (asyncio.CancelledError, grpc.aio.AbortError):
                        raise
                    except Exception as exc:
                        error = exc
                        await self._fail(context, exc, request_id, method)
            except grpc.aio.AbortError as exc:
                error = error or _aborted(context, exc)
                raise
            except (asyncio.CancelledError, GeneratorExit) as exc:
                error = asyncio.CancelledError() if isinstance(exc, GeneratorExit) else exc
                raise
            finally:
                self._finished(method, started, error)

        return wrapped


def _mark_span(code: grpc.StatusCode, error: BaseException) -> None:
    """The call's server span (when tracing records one) gets the status code and the refusal's reason."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if isinstance(error, DomainError):
        span.set_attribute("devprov.reason", error.reason)
    span.set_status(Status(StatusCode.ERROR, code.name))


class _Aborted(Exception):
    """An abort that did not come from the error table (the gate's refusal, or a servicer's own abort)."""

    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code.name)
        self.code = code


def _aborted(context: Context, exc: grpc.aio.AbortError) -> BaseException:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return _Aborted(code)
    return exc


def _refusing_handler(handler: Handler, method: str) -> Handler:
    """A kind of handler the gate cannot wrap (client streaming; a streaming handler that is not an async
    generator) is never served."""

    async def refuse(request: Any, context: Context) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not served")

    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.unary_stream_rpc_method_handler(refuse)


class _WrappedGenericHandler(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, wrapper: _HandlerWrapper) -> None:
        self._inner = inner
        self._wrapper = wrapper
        self._cache: dict[str, tuple[Handler, Handler]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
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
        self, service_name: str, handlers: dict[str, Handler]
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
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=True)


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
    if settings.insecure_identity:
        if not settings.insecure:
            raise ServerConfigError(
                "an insecure identity is for insecure mode only (with TLS the certificate says who calls)"
            )
        try:
            parse_identity_uri(settings.insecure_identity)
        except UnrecognisedIdentity as exc:
            raise ServerConfigError(f"insecure identity: {exc}") from None


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


async def start_server(
    settings: ServerSettings,
    services: Sequence[ServiceBinding],
    *,
    policy: AccessPolicy = SUITE_POLICY,
    refusals: RefusalLog | None = None,
    metrics: RpcMetrics = NO_METRICS,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> RunningServer:
    check_settings(settings)
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 0), *settings.options], interceptors=list(interceptors) or None
    )
    resolver = _CallerResolver(settings.insecure_identity)
    wrapper = _HandlerWrapper(settings.error_domain, resolver, policy, refusals, metrics)
    registering = _RegisteringServer(server, wrapper)
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
            "event_loop": type(asyncio.get_running_loop()).__module__.partition(".")[0],
        },
    )
    return RunningServer(server, health_servicer, settings.host, port, settings.grace_seconds, names)


async def serve(
    settings: ServerSettings,
    services: Sequence[ServiceBinding],
    *,
    on_started: Callable[[RunningServer], None] | None = None,
    policy: AccessPolicy = SUITE_POLICY,
    refusals: RefusalLog | None = None,
    metrics: RpcMetrics = NO_METRICS,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> None:
    running = await start_server(
        settings, services, policy=policy, refusals=refusals, metrics=metrics, interceptors=interceptors
    )
    if on_started is not None:
        on_started(running)
    await wait_for_stop_signal()
    log.info("shutting down", extra={"grace_seconds": settings.grace_seconds})
    await running.stop()
    log.info("stopped")


class ServedApp(Protocol):
    """A service assembly: ``start()`` binds its server (and its side endpoints), ``close()`` frees it all."""

    async def start(self) -> RunningServer: ...

    async def close(self) -> None: ...


async def serve_app(app: ServedApp) -> None:
    """Start ``app``, wait for SIGINT/SIGTERM, stop gracefully (in-flight calls finish), then close it."""
    try:
        running = await app.start()
        await wait_for_stop_signal()
        log.info("shutting down", extra={"grace_seconds": running.grace_seconds})
        await running.stop()
        log.info("stopped")
    finally:
        await app.close()


T = TypeVar("T")


def run_service(main: Coroutine[Any, Any, T]) -> T:
    """Run a service's top-level coroutine (``serve_app(...)``) on uvloop, as ``asyncio.run`` would."""
    return uvloop.run(main)


class LoggedSettings(Protocol):
    @property
    def log_level(self) -> str: ...


SettingsT = TypeVar("SettingsT", bound=LoggedSettings)


def serve_command(settings: SettingsT, run_server: Callable[[SettingsT], Coroutine[Any, Any, None]]) -> int:
    """``<service> serve``: the service until SIGINT/SIGTERM, logging as its settings ask."""
    configure_logging(settings.log_level)
    run_service(run_server(settings))
    return 0
