"""provkit's gRPC server: error mapping, request ids, caller identity, TLS modes, health, reflection,
graceful stop.  A real grpc.aio server on loopback serving a small generic probe service."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from provkit.channels import ChannelSecurity, create_channel, request_metadata
from provkit.context import current_caller, current_request_id
from provkit.devpki import DevTlsAuthority
from provkit.errors import FieldViolation, InvalidArgument, ResourceExhausted
from provkit.grpc_errors import error_details
from provkit.grpc_server import (
    ClientAuth,
    ServerConfigError,
    ServerSettings,
    ServerTLS,
    ServiceBinding,
    start_server,
)

SERVICE = "probe.v1.ProbeService"


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return json.dumps({"request_id": current_request_id(), "caller": str(current_caller())}).encode()


async def _invalid(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise InvalidArgument(
        "WIDGET_INVALID",
        "the widget is bent",
        metadata={"widget": "w1"},
        field_violations=[FieldViolation("widget.shape", "must be straight")],
    )


async def _throttled(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise ResourceExhausted("TOO_MANY_WIDGETS", "slow down", retry_after=2.5)


async def _boom(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise RuntimeError("secret internals")


async def _slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await asyncio.sleep(0.5)
    return b"finished"


def _add(servicer: object, server: grpc.aio.Server) -> None:
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(fn)
        for name, fn in {
            "Echo": _echo,
            "Invalid": _invalid,
            "Throttled": _throttled,
            "Boom": _boom,
            "Slow": _slow,
        }.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


PROBE = ServiceBinding(SERVICE, object(), _add)


def _call(channel: grpc.aio.Channel, method: str):
    return channel.unary_unary(f"/{SERVICE}/{method}")


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path | bytes]:
    ca = DevTlsAuthority.create()
    server = ca.server_certificate(["localhost", "127.0.0.1"])
    server.write(tmp_path / "server.pem", tmp_path / "server.key")
    (tmp_path / "ca.pem").write_bytes(ca.ca_pem)
    client = ca.client_certificate("mes-line-1")
    other = DevTlsAuthority.create("someone else").client_certificate("intruder")
    return {"dir": tmp_path, "ca": ca.ca_pem, "client": client, "other": other}


async def test_domain_error_maps_to_status_with_details() -> None:
    running = await start_server(ServerSettings(insecure=True, error_domain="probe.test"), [PROBE])
    try:
        async with create_channel(running.address, ChannelSecurity(insecure=True)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _call(channel, "Invalid")(b"", metadata=request_metadata("req-42"))
            details = error_details(caught.value)
            assert details.code is grpc.StatusCode.INVALID_ARGUMENT
            assert details.reason == "WIDGET_INVALID"
            assert details.domain == "probe.test"
            assert details.metadata == {"widget": "w1", "request_id": "req-42"}
            assert details.field_violations == (FieldViolation("widget.shape", "must be straight"),)

            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _call(channel, "Throttled")(b"")
            details = error_details(caught.value)
            assert details.code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (details.reason, details.retry_after) == ("TOO_MANY_WIDGETS", 2.5)
    finally:
        await running.stop(0)


async def test_unexpected_error_is_internal_and_generic(caplog: pytest.LogCaptureFixture) -> None:
    running = await start_server(ServerSettings(insecure=True), [PROBE])
    try:
        async with create_channel(running.address, ChannelSecurity(insecure=True)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _call(channel, "Boom")(b"", metadata=request_metadata("req-boom"))
    finally:
        await running.stop(0)
    details = error_details(caught.value)
    assert details.code is grpc.StatusCode.INTERNAL
    assert "secret internals" not in details.message
    assert details.metadata["request_id"] == "req-boom"
    logged = [r for r in caplog.records if r.exc_info and getattr(r, "request_id", "") == "req-boom"]
    assert logged and "secret internals" in str(logged[0].exc_info[1])


async def test_request_id_from_metadata_or_generated_and_echoed() -> None:
    running = await start_server(ServerSettings(insecure=True), [PROBE])
    try:
        async with create_channel(running.address, ChannelSecurity(insecure=True)) as channel:
            call = _call(channel, "Echo")(b"", metadata=request_metadata("abc-1"))
            body = json.loads(await call)
            assert body["request_id"] == "abc-1"
            assert ("x-request-id", "abc-1") in tuple(await call.trailing_metadata())
            assert body["caller"].startswith("insecure:")
            generated = json.loads(await _call(channel, "Echo")(b""))
            assert len(generated["request_id"]) == 32
    finally:
        await running.stop(0)


async def test_health_and_reflection_answer() -> None:
    running = await start_server(ServerSettings(insecure=True), [PROBE])
    try:
        async with create_channel(running.address, ChannelSecurity(insecure=True)) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", SERVICE):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = [
                r
                async for r in stub.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")])
                )
            ]
            names = {s.name for s in replies[0].list_services_response.service}
            assert {SERVICE, "grpc.health.v1.Health"} <= names
    finally:
        await running.stop(0)


async def test_insecure_mode_refuses_non_loopback_bind() -> None:
    with pytest.raises(ServerConfigError, match="loopback"):
        await start_server(ServerSettings(host="0.0.0.0", insecure=True), [PROBE])
    with pytest.raises(ServerConfigError):
        await start_server(ServerSettings(), [PROBE])  # neither TLS nor insecure chosen


async def test_tls_without_client_auth_reports_anonymous_caller(pki: dict) -> None:
    d = pki["dir"]
    tls = ServerTLS(d / "server.pem", d / "server.key", client_auth=ClientAuth.NONE)
    running = await start_server(ServerSettings(tls=tls), [PROBE])
    try:
        async with create_channel(f"localhost:{running.port}", ChannelSecurity(ca_pem=pki["ca"])) as channel:
            body = json.loads(await _call(channel, "Echo")(b""))
        assert body["caller"] == "tls-anonymous"
    finally:
        await running.stop(0)


async def test_mtls_requires_a_certificate_from_the_client_ca(pki: dict) -> None:
    d = pki["dir"]
    tls = ServerTLS(d / "server.pem", d / "server.key", d / "ca.pem", ClientAuth.REQUIRE)
    running = await start_server(ServerSettings(tls=tls), [PROBE])
    target = f"localhost:{running.port}"
    client, other = pki["client"], pki["other"]
    try:
        async with create_channel(
            target, ChannelSecurity(ca_pem=pki["ca"], cert_pem=client.cert_pem, key_pem=client.key_pem)
        ) as channel:
            body = json.loads(await _call(channel, "Echo")(b""))
        assert body["caller"].startswith("mes-line-1 sha256:")
        assert len(body["caller"].split("sha256:")[1]) == 64

        for security in (
            ChannelSecurity(ca_pem=pki["ca"]),
            ChannelSecurity(ca_pem=pki["ca"], cert_pem=other.cert_pem, key_pem=other.key_pem),
        ):
            async with create_channel(target, security) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await _call(channel, "Echo")(b"", timeout=5)
                assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
    finally:
        await running.stop(0)


async def test_optional_client_auth_refuses_anonymous_calls_but_not_health(pki: dict) -> None:
    d = pki["dir"]
    tls = ServerTLS(d / "server.pem", d / "server.key", d / "ca.pem", ClientAuth.OPTIONAL)
    running = await start_server(ServerSettings(tls=tls), [PROBE])
    try:
        async with create_channel(f"localhost:{running.port}", ChannelSecurity(ca_pem=pki["ca"])) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _call(channel, "Echo")(b"")
            details = error_details(caught.value)
            assert (details.code, details.reason) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "CLIENT_CERTIFICATE_REQUIRED",
            )
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await running.stop(0)


async def test_graceful_stop_lets_in_flight_calls_finish() -> None:
    running = await start_server(ServerSettings(insecure=True, grace_seconds=5), [PROBE])
    async with create_channel(running.address, ChannelSecurity(insecure=True)) as channel:
        in_flight = asyncio.ensure_future(_call(channel, "Slow")(b""))
        await asyncio.sleep(0.1)
        await running.stop()
        assert await in_flight == b"finished"
        with pytest.raises(grpc.aio.AioRpcError):
            await _call(channel, "Echo")(b"", timeout=2)
