"""provkit's gRPC server: error mapping, request ids, caller identity and the access table, TLS modes,
health, reflection, graceful stop.  A real grpc.aio server on loopback serving a small generic probe
service with its own access table."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from provkit.authz import AccessPolicy, Refusal
from provkit.channels import ChannelSecurity, admitted_stream, create_channel, request_metadata
from provkit.context import Role, current_caller, current_request_id
from provkit.devpki import DevTlsAuthority
from provkit.errors import FieldViolation, InvalidArgument, ResourceExhausted
from provkit.grpc_errors import error_details
from provkit.grpc_server import (
    ClientAuth,
    RunningServer,
    ServerConfigError,
    ServerSettings,
    ServerTLS,
    ServiceBinding,
)
from provkit.grpc_server import start_server as _start_server
from provkit.pki_cli import issue_party

SERVICE = "probe.v1.ProbeService"
OPERATOR = "urn:devprov:operator:ops"
# the probe's table: everything for the operator, Echo for the factory too; "Unlisted" is in no row
POLICY = AccessPolicy(
    {
        **{f"/{SERVICE}/{m}": frozenset({Role.OPERATOR}) for m in ("Invalid", "Throttled", "Boom", "Slow")},
        f"/{SERVICE}/Echo": frozenset({Role.OPERATOR, Role.FACTORY}),
        f"/{SERVICE}/Lot": frozenset({Role.FACTORY}),
    }
)


class Refusals:
    def __init__(self) -> None:
        self.seen: list[Refusal] = []

    async def record_refusal(self, refusal: Refusal) -> None:
        self.seen.append(refusal)


async def start_server(
    settings: ServerSettings, services: list, refusals: Refusals | None = None
) -> RunningServer:
    return await _start_server(settings, services, policy=POLICY, refusals=refusals)


def insecure(**more: object) -> ServerSettings:
    return ServerSettings(insecure=True, insecure_identity=OPERATOR, **more)  # type: ignore[arg-type]


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


async def _lot(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for request in requests:  # a bidi stream, as MintCertificates: each request echoed
        yield request


def _add(servicer: object, server: grpc.aio.Server) -> None:
    handlers: dict[str, grpc.RpcMethodHandler] = {
        name: grpc.unary_unary_rpc_method_handler(fn)
        for name, fn in {
            "Echo": _echo,
            "Invalid": _invalid,
            "Throttled": _throttled,
            "Boom": _boom,
            "Slow": _slow,
            "Unlisted": _echo,
        }.items()
    }
    handlers["Lot"] = grpc.stream_stream_rpc_method_handler(_lot)
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
    client = issue_party(ca, Role.FACTORY, "plant-1", common_name="mes-line-1")
    oem = issue_party(ca, Role.OEM, "acme")
    nameless = ca.client_certificate("no-party")
    twice = ca.client_certificate("two-parties", ["urn:devprov:oem:acme", "urn:devprov:factory:plant-1"])
    other = issue_party(DevTlsAuthority.create("someone else"), Role.FACTORY, "plant-1")
    return {
        "dir": tmp_path,
        "ca": ca.ca_pem,
        "client": client,
        "oem": oem,
        "nameless": nameless,
        "twice": twice,
        "other": other,
    }


async def test_domain_error_maps_to_status_with_details() -> None:
    running = await start_server(insecure(error_domain="probe.test"), [PROBE])
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
    running = await start_server(insecure(), [PROBE])
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
    running = await start_server(insecure(), [PROBE])
    try:
        async with create_channel(running.address, ChannelSecurity(insecure=True)) as channel:
            call = _call(channel, "Echo")(b"", metadata=request_metadata("abc-1"))
            body = json.loads(await call)
            assert body["request_id"] == "abc-1"
            assert ("x-request-id", "abc-1") in tuple(await call.trailing_metadata())
            assert body["caller"].startswith(f"{OPERATOR} insecure:")
            generated = json.loads(await _call(channel, "Echo")(b""))
            assert len(generated["request_id"]) == 32
    finally:
        await running.stop(0)


async def test_health_and_reflection_answer() -> None:
    running = await start_server(insecure(), [PROBE])
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


async def test_without_an_identity_every_call_but_health_is_refused_and_audited(pki: dict) -> None:
    """Plain TLS (no client certificate asked for) and insecure mode without an insecure identity."""
    d = pki["dir"]
    refusals = Refusals()
    plain_tls = ServerTLS(d / "server.pem", d / "server.key", client_auth=ClientAuth.NONE)
    servers = [
        await start_server(ServerSettings(tls=plain_tls), [PROBE], refusals),
        await start_server(ServerSettings(insecure=True), [PROBE], refusals),
    ]
    securities = [ChannelSecurity(ca_pem=pki["ca"]), ChannelSecurity(insecure=True)]
    try:
        for server, security in zip(servers, securities, strict=True):
            async with create_channel(f"localhost:{server.port}", security) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await _call(channel, "Echo")(b"", metadata=request_metadata("anon-1"))
                details = error_details(caught.value)
                assert (details.code, details.reason) == (
                    grpc.StatusCode.UNAUTHENTICATED,
                    "CLIENT_CERTIFICATE_REQUIRED",
                )
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        for server in servers:
            await server.stop(0)
    assert [(r.method, r.role, r.reason, r.request_id) for r in refusals.seen] == [
        (f"/{SERVICE}/Echo", "", "CLIENT_CERTIFICATE_REQUIRED", "anon-1")
    ] * 2
    callers = [r.caller for r in refusals.seen]
    # who, as far as the transport knows: the peer's address (and the kind of channel)
    assert callers[0].startswith("tls-anonymous:ipv") and callers[1].startswith("insecure:")
    assert [r.source.split(":")[0] for r in refusals.seen] == ["tls-anonymous", "insecure"]
    assert all(r.caller.startswith(r.source + ":") for r in refusals.seen)  # the source less the port


async def test_the_table_decides_per_role_and_a_method_missing_from_it_is_refused(pki: dict) -> None:
    d = pki["dir"]
    tls = ServerTLS(d / "server.pem", d / "server.key", d / "ca.pem", ClientAuth.REQUIRE)
    refusals = Refusals()
    running = await start_server(ServerSettings(tls=tls), [PROBE], refusals)
    target = f"localhost:{running.port}"
    client, oem = pki["client"], pki["oem"]
    try:
        factory = ChannelSecurity(ca_pem=pki["ca"], cert_pem=client.cert_pem, key_pem=client.key_pem)
        async with create_channel(target, factory) as channel:
            assert json.loads(await _call(channel, "Echo")(b""))["caller"].startswith("urn:devprov:factory:")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _call(channel, "Unlisted")(b"", metadata=request_metadata("unlisted-1"))
        details = error_details(caught.value)
        assert (details.code, details.reason) == (grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_AUTHORIZED")
        assert details.metadata["role"] == "factory" and "factory" in details.message
        async with create_channel(
            target, ChannelSecurity(ca_pem=pki["ca"], cert_pem=oem.cert_pem, key_pem=oem.key_pem)
        ) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _call(channel, "Echo")(b"")
        details = error_details(caught.value)
        assert (details.code, details.reason) == (grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_AUTHORIZED")
        assert details.metadata["role"] == "oem"
    finally:
        await running.stop(0)
    assert [(r.method, r.role, r.reason) for r in refusals.seen] == [
        (f"/{SERVICE}/Unlisted", "factory", "CALLER_NOT_AUTHORIZED"),
        (f"/{SERVICE}/Echo", "oem", "CALLER_NOT_AUTHORIZED"),
    ]
    assert refusals.seen[1].caller.startswith("urn:devprov:oem:acme oem-acme sha256:")


async def test_a_certificate_naming_no_party_or_two_is_unauthenticated(pki: dict) -> None:
    d = pki["dir"]
    tls = ServerTLS(d / "server.pem", d / "server.key", d / "ca.pem", ClientAuth.REQUIRE)
    running = await start_server(ServerSettings(tls=tls), [PROBE])
    try:
        for pair in (pki["nameless"], pki["twice"]):
            security = ChannelSecurity(ca_pem=pki["ca"], cert_pem=pair.cert_pem, key_pem=pair.key_pem)
            async with create_channel(f"localhost:{running.port}", security) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await _call(channel, "Echo")(b"")
            details = error_details(caught.value)
            assert (details.code, details.reason) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "CALLER_IDENTITY_UNRECOGNISED",
            )
    finally:
        await running.stop(0)


async def test_a_refused_request_stream_always_ends_with_the_gates_status_and_reason(pki: dict) -> None:
    """grpc.aio reports a call that ends while a request is being written as INTERNAL without the server's
    details (grpc/grpc#36066), and the gate refuses before reading: a client streaming at once lost the
    reason in about one call of five.  Requests held back until the gate admits the call
    (``admitted_stream``) go only into admitted calls, so every refusal keeps its status and reason."""
    d = pki["dir"]
    tls = ServerTLS(d / "server.pem", d / "server.key", d / "ca.pem", ClientAuth.REQUIRE)
    running = await start_server(ServerSettings(tls=tls), [PROBE])
    lot = [b"item" * 256] * 20
    expected = {
        "nameless": (grpc.StatusCode.UNAUTHENTICATED, "CALLER_IDENTITY_UNRECOGNISED"),
        "oem": (grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_AUTHORIZED"),
    }
    try:
        for who, (code, reason) in expected.items():
            pair = pki[who]
            security = ChannelSecurity(ca_pem=pki["ca"], cert_pem=pair.cert_pem, key_pem=pair.key_pem)
            async with create_channel(f"localhost:{running.port}", security) as channel:
                method = channel.stream_stream(f"/{SERVICE}/Lot")
                for i in range(100):
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        async for _ in admitted_stream(method, iter(lot), timeout=10):
                            pass
                    details = error_details(caught.value)
                    assert (details.code, details.reason, i) == (code, reason, i), details.message
        client = pki["client"]
        security = ChannelSecurity(ca_pem=pki["ca"], cert_pem=client.cert_pem, key_pem=client.key_pem)
        async with create_channel(f"localhost:{running.port}", security) as channel:

            async def items() -> AsyncIterator[bytes]:
                for item in lot:
                    yield item

            method = channel.stream_stream(f"/{SERVICE}/Lot")
            assert [r async for r in admitted_stream(method, items(), timeout=10)] == lot
    finally:
        await running.stop(0)


async def test_an_insecure_identity_must_be_a_party_and_is_for_insecure_mode_only(pki: dict) -> None:
    d = pki["dir"]
    with pytest.raises(ServerConfigError, match="role"):
        await start_server(ServerSettings(insecure=True, insecure_identity="urn:devprov:king:x"), [PROBE])
    tls = ServerTLS(d / "server.pem", d / "server.key", d / "ca.pem")
    with pytest.raises(ServerConfigError, match="insecure mode only"):
        await start_server(ServerSettings(tls=tls, insecure_identity=OPERATOR), [PROBE])


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
        assert body["caller"].startswith("urn:devprov:factory:plant-1 mes-line-1 sha256:")
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


async def test_graceful_stop_lets_in_flight_calls_finish() -> None:
    running = await start_server(insecure(grace_seconds=5), [PROBE])
    async with create_channel(running.address, ChannelSecurity(insecure=True)) as channel:
        in_flight = asyncio.ensure_future(_call(channel, "Slow")(b""))
        await asyncio.sleep(0.1)
        await running.stop()
        assert await in_flight == b"finished"
        with pytest.raises(grpc.aio.AioRpcError):
            await _call(channel, "Echo")(b"", timeout=2)
