"""Trust between the parties over real mTLS: every RPC x every party (and callers without a valid party),
the factory takeover of an OEM certificate, and wrong-code storms.  Real factory_svc and activation_svc
gRPC servers on loopback requiring client certificates from one client CA, pointed at a real emulator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from enrollment.provisioning_env import (
    DeviceFiles,
    OemTls,
    activation_env,
    dps_enrollment,
    factory_env,
    failure,
    mint,
)
from google.protobuf import descriptor_pool

from activation_svc.app import ActivationApp
from activation_svc.settings import load_settings as load_activation_settings
from devprov.v1 import activation_service_pb2 as apb
from devprov.v1 import activation_service_pb2_grpc as apb_grpc
from devprov.v1 import factory_service_pb2 as fpb
from devprov.v1 import factory_service_pb2_grpc as fpb_grpc
from factory_svc.app import FactoryApp
from factory_svc.settings import load_settings as load_factory_settings
from provkit.authz import SUITE_POLICY
from provkit.channels import ChannelSecurity, admitted_stream, create_channel
from provkit.context import Role
from provkit.devpki import DevTlsAuthority, TlsPair
from provkit.grpc_errors import RpcErrorDetails, error_details
from provkit.grpc_server import RunningServer
from provkit.pki_cli import issue_party

META = json.dumps({"tags": {"customer": "acme"}, "properties": {"desired": {"interval_s": 5}}})
PARTIES = {
    "factory": (Role.FACTORY, "plant-1"),
    "oem": (Role.OEM, "acme"),
    "portal": (Role.PORTAL, "acme"),
    "operator": (Role.OPERATOR, "ops"),
}
GATE_REASONS = {"CALLER_NOT_AUTHORIZED", "CALLER_IDENTITY_UNRECOGNISED", "CLIENT_CERTIFICATE_REQUIRED"}


def new_id() -> str:
    return str(uuid.uuid4())


@dataclass
class Trust:
    emulator: Any
    factory_app: FactoryApp
    activation_app: ActivationApp
    servers: dict[str, RunningServer]
    ca: DevTlsAuthority
    folder: Path
    certificates: dict[str, TlsPair]

    @contextlib.asynccontextmanager
    async def stubs(
        self, who: str
    ) -> AsyncIterator[tuple[fpb_grpc.FactoryServiceStub, apb_grpc.ActivationServiceStub]]:
        pair = self.certificates[who]
        security = ChannelSecurity(ca_pem=self.ca.ca_pem, cert_pem=pair.cert_pem, key_pem=pair.key_pem)
        async with (
            create_channel(self.servers["factory"].address, security) as factory,
            create_channel(self.servers["activation"].address, security) as activation,
        ):
            yield fpb_grpc.FactoryServiceStub(factory), apb_grpc.ActivationServiceStub(activation)


def _certificates(tls: OemTls) -> dict[str, TlsPair]:
    ca = tls.authority
    past = DevTlsAuthority(ca.cert, ca.key, datetime.now(UTC) - timedelta(days=30))
    return {
        **{name: issue_party(ca, role, tenant, common_name=name) for name, (role, tenant) in PARTIES.items()},
        "oem-globex": issue_party(ca, Role.OEM, "globex"),
        "oem-mallory": issue_party(ca, Role.OEM, "mallory"),
        "portal-globex": issue_party(ca, Role.PORTAL, "globex"),
        "no party": ca.client_certificate("no-party"),
        "another CA": issue_party(DevTlsAuthority.create("another CA"), Role.FACTORY, "plant-1"),
        "expired": issue_party(past, Role.FACTORY, "plant-1", days=1),
    }


@pytest.fixture
async def trust(tmp_path, module_emulator) -> AsyncIterator[Trust]:
    """Both services of the test's own (data, TLS), on the module's emulator (each test's devices are its
    own)."""
    emulator = module_emulator
    tls = OemTls.create(tmp_path / "tls")
    env = {
        **{k: v for k, v in factory_env(tmp_path, emulator).items() if "INSECURE" not in k},
        "FACTORY_SERVER_TLS_CERT_FILE": str(tls.server_cert),
        "FACTORY_SERVER_TLS_KEY_FILE": str(tls.server_key),
        "FACTORY_SERVER_CLIENT_CA_FILE": str(tls.ca_file),
    }
    factory_app = await FactoryApp.open(load_factory_settings(env=env))
    activation_settings = load_activation_settings(env=activation_env(tmp_path, emulator, tls))
    activation_app = await ActivationApp.open(activation_settings)
    servers = {"factory": await factory_app.start(), "activation": await activation_app.start()}
    try:
        certificates = _certificates(tls)
        yield Trust(emulator, factory_app, activation_app, servers, tls.authority, tmp_path, certificates)
    finally:
        for server in servers.values():
            await server.stop(0)
        await activation_app.close()
        await factory_app.close()


async def _enrolled(factory: fpb_grpc.FactoryServiceStub, folder: Path) -> tuple[DeviceFiles, str]:
    device = await mint(factory, new_id(), folder / "devices")
    request = fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem)
    reply = await factory.Enroll(request)
    assert reply.activation_code
    return device, reply.activation_code


# -------------------------------------------------------------------------------------------- the matrix
# One request per RPC (a builder may mint first, as the factory); the device id the call is about.
Builder = Callable[[fpb_grpc.FactoryServiceStub, Path, DeviceFiles, str], Awaitable[tuple[Any, str]]]


async def _mint(factory, folder, device, code):
    device_id = new_id()
    keygen = fpb.ServerKeyGeneration()
    return fpb.MintCertificateRequest(device_id=device_id, server_key_generation=keygen), device_id


async def _enroll(factory, folder, device, code):
    fresh = await mint(factory, new_id(), folder / "devices")
    return fpb.EnrollRequest(device_id=fresh.device_id, certificate_pem=fresh.chain_pem), fresh.device_id


async def _enroll_batch(factory, folder, device, code):
    fresh = await mint(factory, new_id(), folder / "devices")
    item = fpb.EnrollBatchItem(device_id=fresh.device_id, certificate_pem=fresh.chain_pem)
    return fpb.EnrollBatchRequest(items=[item]), fresh.device_id


async def _transfer(factory, folder, device, code):
    fresh, _code = await _enrolled(factory, folder)
    request = fpb.TransferOwnershipRequest(device_id=fresh.device_id, owner_oem="globex", reason="sold on")
    return request, fresh.device_id


async def _rotate_code(factory, folder, device, code):
    fresh, _ = await _enrolled(factory, folder)  # not the shared device: its code must keep working
    return fpb.RotateActivationCodeRequest(device_id=fresh.device_id), fresh.device_id


async def _revoke(factory, folder, device, code):
    fresh = await mint(factory, new_id(), folder / "devices")
    reason = fpb.REVOCATION_REASON_KEY_COMPROMISE
    return fpb.RevokeCertificateRequest(device_id=fresh.device_id, reason=reason), fresh.device_id


async def _lot(factory, folder, device, code):
    """A production lot of one device (a stream: the header, then the item)."""
    device_id = new_id()
    header = fpb.LotHeader(
        lot_id=f"lot-{device_id}", key_source=fpb.KEY_SOURCE_SERVER_GENERATED, item_count=1
    )
    items = fpb.LotItems(items=[fpb.LotItem(index=0, device_id=device_id)])
    return [fpb.MintCertificatesRequest(header=header), fpb.MintCertificatesRequest(items=items)], device_id


def _about(request_of: Callable[[DeviceFiles, str], Any]) -> Builder:
    async def build(factory, folder, device, code):
        return request_of(device, code), device.device_id

    return build


REQUESTS: dict[str, Builder] = {
    "/devprov.v1.FactoryService/MintCertificate": _mint,
    "/devprov.v1.FactoryService/Enroll": _enroll,
    "/devprov.v1.FactoryService/EnrollBatch": _enroll_batch,
    "/devprov.v1.FactoryService/RevokeCertificate": _revoke,
    "/devprov.v1.FactoryService/MintCertificates": _lot,
    "/devprov.v1.FactoryService/ListCertificates": _about(
        lambda d, c: fpb.ListCertificatesRequest(device_id=d.device_id)
    ),
    "/devprov.v1.FactoryService/GetCertificate": _about(lambda d, c: fpb.GetCertificateRequest()),
    "/devprov.v1.FactoryService/GetEnrollmentStatus": _about(
        lambda d, c: fpb.GetEnrollmentStatusRequest(device_id=d.device_id)
    ),
    "/devprov.v1.FactoryService/TransferOwnership": _transfer,
    "/devprov.v1.FactoryService/RotateActivationCode": _rotate_code,
    "/devprov.v1.FactoryService/AcknowledgeActivationCodes": _about(
        lambda d, c: fpb.AcknowledgeActivationCodesRequest(device_ids=[d.device_id])
    ),
    "/devprov.v1.ActivationService/Activate": _about(
        lambda d, c: apb.ActivateRequest(device_id=d.device_id, activation_code=c, metadata_json=META)
    ),
    "/devprov.v1.ActivationService/Deactivate": _about(
        lambda d, c: apb.DeactivateRequest(device_id=d.device_id, activation_code=c)
    ),
    "/devprov.v1.ActivationService/GetDeviceStatus": _about(
        lambda d, c: apb.GetDeviceStatusRequest(device_id=d.device_id, activation_code=c)
    ),
    "/devprov.v1.ActivationService/GetMetadataTemplate": _about(
        lambda d, c: apb.GetMetadataTemplateRequest()
    ),
}


async def _state(trust: Trust, factory: fpb_grpc.FactoryServiceStub, device_id: str) -> tuple:
    """Everything a call about ``device_id`` could change, and the two refusal trails' lengths."""
    certificates = await trust.factory_app.ledger.certificates.page(device_id, 100, None)
    enrollment = await dps_enrollment(trust.emulator, device_id)
    status = await factory.GetEnrollmentStatus(fpb.GetEnrollmentStatusRequest(device_id=device_id))
    audit = await trust.activation_app.audit.entries(device_id)
    return (
        [c.serial_number for c in certificates],
        enrollment and (enrollment["etag"], enrollment["provisioningStatus"]),
        status.state,
        [(e.action, e.outcome) for e in audit if e.outcome != "refused"],
    )


async def _refusals(trust: Trust) -> tuple[list, list]:
    factory = await trust.factory_app.ledger.refusals.recorded()
    activation = [e for e in await trust.activation_app.audit.entries() if e.outcome == "refused"]
    return factory, activation


def _call(stubs: tuple, method: str) -> Callable[..., Any]:
    service, name = method.strip("/").split("/")
    stub = stubs[0] if service.endswith("FactoryService") else stubs[1]
    call = getattr(stub, name)
    if name != "MintCertificates":
        return call

    async def stream(messages: list, timeout: float) -> None:  # the lot's answers, to the end, as `lot` sends
        async for _ in admitted_stream(call, messages, timeout=timeout):
            pass

    return stream


async def test_every_registered_method_has_a_row_and_every_row_a_method(trust: Trust) -> None:
    pool = descriptor_pool.Default()
    served = {
        f"/{name}/{method.name}"
        for server in trust.servers.values()
        for name in server.services
        for method in pool.FindServiceByName(name).methods
    }
    assert served == set(SUITE_POLICY.rules) == set(REQUESTS)


@pytest.mark.slow
async def test_every_rpc_for_every_party_is_allowed_or_refused_by_the_table_and_a_refusal_changes_nothing(
    trust: Trust,
) -> None:
    async with trust.stubs("factory") as (bench, _):
        device, code = await _enrolled(bench, trust.folder)
        outcomes: dict[tuple[str, str], str] = {}
        for method, build in REQUESTS.items():
            for who in [*PARTIES, "no party", "another CA", "expired"]:
                request, device_id = await build(bench, trust.folder, device, code)
                before, refused_before = await _state(trust, bench, device_id), await _refusals(trust)
                async with trust.stubs(who) as stubs:
                    try:
                        await _call(stubs, method)(request, timeout=20)
                        outcomes[method, who] = "OK"
                        continue
                    except grpc.aio.AioRpcError as exc:
                        details: RpcErrorDetails = error_details(exc)
                if details.reason not in GATE_REASONS and details.code is not grpc.StatusCode.UNAVAILABLE:
                    outcomes[method, who] = f"past the gate: {details.reason}"
                    continue
                outcomes[method, who] = details.code.name
                assert await _state(trust, bench, device_id) == before, (method, who)
                refused_after = await _refusals(trust)
                if details.code is grpc.StatusCode.UNAVAILABLE:  # refused by the TLS handshake
                    assert refused_after == refused_before, (method, who)
                    continue
                trail = 0 if "FactoryService" in method else 1
                new = refused_after[trail][len(refused_before[trail]) :]
                assert len(new) == 1 and len(refused_after[1 - trail]) == len(refused_before[1 - trail])
                row = new[0]
                seen_role = PARTIES[who][0].value if who in PARTIES else ""
                if trail == 0:
                    assert (row.method, row.role, row.reason) == (method, seen_role, details.reason)
                else:
                    assert (row.action, row.outcome) == (method, "refused")
                    assert f"role={seen_role or '-'}" in row.detail
                if who in PARTIES:
                    assert details.metadata["role"] == seen_role and seen_role in details.message
                    assert row.caller.startswith(f"urn:devprov:{seen_role}:")
    expected: dict[tuple[str, str], str] = {}
    for method in REQUESTS:
        for who, (role, _tenant) in PARTIES.items():
            expected[method, who] = "OK" if role in SUITE_POLICY.roles_for(method) else "PERMISSION_DENIED"
        expected[method, "no party"] = "UNAUTHENTICATED"
        expected[method, "another CA"] = expected[method, "expired"] = "UNAVAILABLE"
    # GetCertificate with an empty serial is refused past the gate (INVALID_ARGUMENT): allowed, reached
    for who in ("factory", "operator"):
        assert outcomes.pop(("/devprov.v1.FactoryService/GetCertificate", who)).startswith("past the gate")
        expected.pop(("/devprov.v1.FactoryService/GetCertificate", who))
    assert outcomes == expected


@pytest.mark.slow
async def test_the_oem_takeover_fails_at_the_first_step(trust: Trust) -> None:
    """An OEM's certificate at factory_svc: minting a new key for an activated device is refused, and so
    is the re-enrollment that would have handed it a fresh code; nothing changes anywhere."""
    async with trust.stubs("factory") as (bench, _), trust.stubs("oem") as (oem_factory, oem):
        device, code = await _enrolled(bench, trust.folder)
        await oem.Activate(
            apb.ActivateRequest(device_id=device.device_id, activation_code=code, metadata_json=META)
        )
        before = await _state(trust, bench, device.device_id)
        keygen = fpb.ServerKeyGeneration()
        minted = await failure(
            oem_factory.MintCertificate(
                fpb.MintCertificateRequest(device_id=device.device_id, server_key_generation=keygen)
            )
        )
        assert (minted.code, minted.reason) == (grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_AUTHORIZED")
        assert minted.metadata["role"] == "oem"
        enrolled = await failure(
            oem_factory.Enroll(
                fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem, replace=True)
            )
        )
        assert enrolled.reason == "CALLER_NOT_AUTHORIZED"
        assert await _state(trust, bench, device.device_id) == before
        status = await oem.GetDeviceStatus(
            apb.GetDeviceStatusRequest(device_id=device.device_id, activation_code=code)
        )
        assert status.lifecycle == apb.LIFECYCLE_ACTIVATED  # the original code still holds
    refusals = await trust.factory_app.ledger.refusals.recorded()
    assert [(r.method.rsplit("/", 1)[1], r.role, r.device_id) for r in refusals] == [
        ("MintCertificate", "oem", device.device_id),
        ("Enroll", "oem", device.device_id),
    ]
    assert all(r.caller.startswith("urn:devprov:oem:acme oem sha256:") for r in refusals)


@pytest.mark.slow
async def test_a_storm_of_wrong_codes_from_one_party_never_blocks_anothers_right_code(trust: Trust) -> None:
    async with (
        trust.stubs("factory") as (bench, _),
        trust.stubs("oem-mallory") as (_f1, mallory),
        trust.stubs("oem") as (_f2, owner),
    ):
        device, code = await _enrolled(bench, trust.folder)
        wrong = apb.ActivateRequest(device_id=device.device_id, activation_code="0000-0000-0000-0000")
        storm = [asyncio.ensure_future(failure(mallory.Activate(wrong))) for _ in range(20)]
        reply = await owner.Activate(
            apb.ActivateRequest(device_id=device.device_id, activation_code=code, metadata_json=META)
        )
        assert reply.lifecycle == apb.LIFECYCLE_ACTIVATED
        refused = await asyncio.gather(*storm)
        limited = [r for r in refused if r.reason == "ACTIVATION_RATE_LIMITED"]
        assert {r.reason for r in refused} == {"ACTIVATION_DENIED", "ACTIVATION_RATE_LIMITED"}
        assert all(r.retry_after and r.retry_after >= 1 for r in limited)
        again = await owner.GetDeviceStatus(
            apb.GetDeviceStatusRequest(device_id=device.device_id, activation_code=code)
        )
        assert again.lifecycle == apb.LIFECYCLE_ACTIVATED


async def test_sixty_concurrent_wrong_codes_get_exactly_the_allowed_number_of_checks(trust: Trust) -> None:
    allowed = trust.activation_app.settings.max_failures
    async with trust.stubs("factory") as (bench, _), trust.stubs("oem-globex") as (_f, globex):
        device, _code = await _enrolled(bench, trust.folder)
        wrong = apb.ActivateRequest(device_id=device.device_id, activation_code="0000-0000-0000-0000")
        refused = await asyncio.gather(*(failure(globex.Activate(wrong)) for _ in range(60)))
    reasons = [r.reason for r in refused]
    assert reasons.count("ACTIVATION_DENIED") == allowed
    assert reasons.count("ACTIVATION_RATE_LIMITED") == 60 - allowed
    outcomes = [e.outcome for e in await trust.activation_app.audit.entries(device.device_id)]
    assert outcomes.count("denied") == allowed and outcomes.count("rate-limited") == 60 - allowed


async def test_the_owning_oem_asks_for_status_without_the_code_and_nobody_else_learns_anything(
    trust: Trust,
) -> None:
    """`activation-svc status` needed the code even for the device's owner.  Now the owner's identity (its
    back office's certificate) suffices; without a code anyone else - another OEM, a portal even for the
    owner, anyone before the device has an owner - gets exactly what an unknown device gets."""

    def status(stub: apb_grpc.ActivationServiceStub, device_id: str, code: str = "") -> Any:
        return stub.GetDeviceStatus(apb.GetDeviceStatusRequest(device_id=device_id, activation_code=code))

    def seen(refused: RpcErrorDetails) -> tuple:
        metadata = {k: v for k, v in refused.metadata.items() if k != "request_id"}  # each call's own
        return refused.code, refused.reason, refused.message, metadata, refused.retry_after

    async with (
        trust.stubs("factory") as (bench, _),
        trust.stubs("oem") as (_f1, acme),
        trust.stubs("oem-globex") as (_f2, globex),
        trust.stubs("portal") as (_f3, portal),
    ):
        device, code = await _enrolled(bench, trust.folder)
        unknown = seen(await failure(status(acme, new_id())))
        assert unknown[:2] == (grpc.StatusCode.PERMISSION_DENIED, "ACTIVATION_DENIED")
        assert seen(await failure(status(acme, device.device_id))) == unknown  # nobody owns it yet
        await acme.Activate(
            apb.ActivateRequest(device_id=device.device_id, activation_code=code, metadata_json=META)
        )
        mine = await status(acme, device.device_id)
        assert (mine.lifecycle, mine.owner_oem) == (apb.LIFECYCLE_ACTIVATED, "acme")
        assert seen(await failure(status(globex, device.device_id))) == seen(
            await failure(status(globex, new_id()))
        )
        assert seen(await failure(status(portal, device.device_id))) == seen(
            await failure(status(portal, new_id()))
        )
        with_code = await status(portal, device.device_id, code)  # a portal still gets it with the code
        assert with_code.owner_oem == "acme"
