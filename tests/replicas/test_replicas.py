"""Two replicas of each service on one PostgreSQL database, against the emulator: the guarantees hold
across them (idempotent replays, every device enrolled once and every code handed out usable, one winner
for one device activated from both at once, wrong codes counted exactly)."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from contextlib import AsyncExitStack

import grpc
import pytest
from aiohttp.test_utils import TestClient, TestServer
from enrollment.provisioning_env import (
    OemTls,
    activate_request,
    activation_env,
    dps_enrollment,
    factory_env,
    mint,
    running_activation,
    running_factory,
)
from portal.portal_env import activate_form, hidden_fields, portal_env

from activation_svc.audit import AuditLog
from activation_svc.portal.app import create_app
from activation_svc.portal.settings import load_portal_settings
from dbstore import DatabaseUrl
from devprov.v1 import activation_service_pb2 as apb
from devprov.v1 import activation_service_pb2_grpc as apb_grpc
from devprov.v1 import factory_service_pb2 as fpb
from factory_svc.enrollment.outbox import Outbox
from factory_svc.ledger import Ledger
from provkit.activation_code import verify_code
from provkit.channels import ChannelSecurity, create_channel
from provkit.context import Role
from provkit.grpc_errors import error_details
from provkit.grpc_server import ON_BEHALF_OF_HEADER
from provkit.pki_cli import issue_party

pytestmark = pytest.mark.slow

METADATA = json.dumps({"tags": {"customer": "acme"}, "properties": {"desired": {"interval_s": 5}}})


async def migrated(url: DatabaseUrl) -> None:
    for store in (await Ledger.open(url, migrate=True), await Outbox.open(url, migrate=True)):
        await store.close()
    await (await AuditLog.open(url, migrate=True)).close()


async def factory_on(stack: AsyncExitStack, tmp_path, emulator, postgres_url: str):
    """Every store migrated on the database, and one factory replica on it (its stub)."""
    await migrated(DatabaseUrl.parse(postgres_url))
    env = factory_env(tmp_path, emulator, FACTORY_DATABASE_URL=postgres_url)
    _app, stub = await stack.enter_async_context(running_factory(env))
    return stub


async def activation_replicas(
    stack: AsyncExitStack, tmp_path, emulator, postgres_url: str, tls: OemTls, extra: dict
):
    """A factory replica and two activation replicas (mTLS with ``tls``) on the database, with ``extra``
    settings, and a device enrolled through the factory: (factory stub, [(app, stub)], device, its code)."""
    factory = await factory_on(stack, tmp_path, emulator, postgres_url)
    replicas = [
        await stack.enter_async_context(
            running_activation(activation_env(tmp_path / f"r{i}", emulator, tls, **extra), tls)
        )
        for i in range(2)
    ]
    device = await mint(factory, str(uuid.uuid4()), tmp_path / "devices")
    enroll = fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem)
    return factory, replicas, device, (await factory.Enroll(enroll)).activation_code


async def test_two_factory_replicas_enroll_one_batch_at_once(tmp_path, emulator, postgres_url):
    await migrated(DatabaseUrl.parse(postgres_url))
    async with AsyncExitStack() as stack:
        replicas = [
            await stack.enter_async_context(
                running_factory(factory_env(tmp_path / f"r{i}", emulator, FACTORY_DATABASE_URL=postgres_url))
            )
            for i in range(2)
        ]
        devices = [await mint(replicas[0][1], str(uuid.uuid4()), tmp_path / "devices") for _ in range(6)]
        items = [fpb.EnrollBatchItem(device_id=d.device_id, certificate_pem=d.chain_pem) for d in devices]
        answers = await asyncio.gather(
            *(stub.EnrollBatch(fpb.EnrollBatchRequest(items=items)) for _app, stub in replicas),
            *(
                stub.EnrollBatch(fpb.EnrollBatchRequest(items=items, request_id="batch-1"))
                for _app, stub in replicas
            ),
        )
        for device in devices:
            enrollment = await dps_enrollment(emulator, device.device_id)
            assert enrollment is not None
            record = enrollment["optionalDeviceInformation"]["activationCode"]
            codes = {
                result.response.activation_code
                for answer in answers
                for result in answer.results
                if result.device_id == device.device_id and result.response.activation_code
            }
            assert codes  # someone handed a code out for every device ...
            assert all(verify_code(code, record) for code in codes)  # ... and every code handed out works
        # a replay of batch-1 answers the answer that was stored, whichever replica gave it
        replay = await replicas[1][1].EnrollBatch(fpb.EnrollBatchRequest(items=items, request_id="batch-1"))
        assert replay.replayed
        replayed = [r.response.activation_code for r in replay.results]
        assert replayed in ([r.response.activation_code for r in answer.results] for answer in answers[2:])


async def test_on_two_replicas_another_oems_portal_naming_150_end_users_never_locks_the_owner_out(
    tmp_path, emulator, postgres_url
):
    tls = OemTls.create(tmp_path / "tls")
    extra = {"ACTIVATION_DATABASE_URL": postgres_url}
    async with AsyncExitStack() as stack:
        factory, replicas, _device, _code = await activation_replicas(
            stack, tmp_path, emulator, postgres_url, tls, extra
        )
        device = await mint(factory, str(uuid.uuid4()), tmp_path / "devices")
        enroll = fpb.EnrollRequest(
            device_id=device.device_id, certificate_pem=device.chain_pem, owner_oem="acme"
        )
        code = (await factory.Enroll(enroll)).activation_code
        pair = issue_party(tls.authority, Role.PORTAL, "globex")
        security = ChannelSecurity(ca_pem=tls.authority.ca_pem, cert_pem=pair.cert_pem, key_pem=pair.key_pem)
        globex = [
            apb_grpc.ActivationServiceStub(
                await stack.enter_async_context(create_channel(app.grpc_address, security))
            )
            for app, _stub in replicas
        ]
        reasons = []
        for n in range(150):  # each name on the other replica than the last
            try:
                await globex[n % 2].Activate(
                    activate_request(device.device_id, "AAAA-AAAA-AAAA-AAAA", METADATA),
                    metadata=((ON_BEHALF_OF_HEADER, f"198.51.100.{n}"),),
                )
            except grpc.aio.AioRpcError as exc:
                reasons.append(error_details(exc).reason)
        allowed = replicas[0][0].settings.max_failures
        # One budget whatever names the portal gives: its free failures, then refusals.  The back-off doubles
        # after each checked failure (2 s, 4 s, ...), so however slowly this machine runs the loop, only a
        # few more guesses get checked; a budget per named person would have checked all 150.
        assert reasons[:allowed] == ["ACTIVATION_DENIED"] * allowed
        assert set(reasons) == {"ACTIVATION_DENIED", "ACTIVATION_RATE_LIMITED"} and len(reasons) == 150
        assert reasons.count("ACTIVATION_DENIED") <= allowed + 8
        for _app, acme in replicas:  # the owner's right code, on either replica, at once
            reply = await acme.Activate(activate_request(device.device_id, code, METADATA))
            assert reply.lifecycle == apb.LIFECYCLE_ACTIVATED and reply.owner_oem == "acme"


async def test_two_activation_replicas_count_wrong_codes_exactly_and_one_activation_wins(
    tmp_path, emulator, postgres_url
):
    tls = OemTls.create(tmp_path / "tls")
    extra = {"ACTIVATION_DATABASE_URL": postgres_url, "ACTIVATION_LIMITS_MAX_FAILURES": "3"}
    async with AsyncExitStack() as stack:
        factory, replicas, device, code = await activation_replicas(
            stack, tmp_path, emulator, postgres_url, tls, extra
        )

        # wrong codes from both replicas at once: exactly 3 checked (denied), the rest refused
        async def wrong(stub, attempt: str = "AAAA-AAAA-AAAA-AAAA") -> grpc.StatusCode:
            try:
                await stub.Activate(activate_request(device.device_id, attempt, METADATA))
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        codes = await asyncio.gather(*(wrong(replicas[i % 2][1]) for i in range(10)))
        assert sorted(c.name for c in codes) == ["PERMISSION_DENIED"] * 3 + ["RESOURCE_EXHAUSTED"] * 7
        for _app, stub in replicas:  # the back-off is the same on both: even the right code waits its turn
            assert await wrong(stub, code) is grpc.StatusCode.RESOURCE_EXHAUSTED

        # the same device activated from both replicas at once: one change wins, nothing is left half-done
        other = await mint(factory, str(uuid.uuid4()), tmp_path / "devices")
        enrolled = await factory.Enroll(
            fpb.EnrollRequest(device_id=other.device_id, certificate_pem=other.chain_pem)
        )
        wanted = [
            json.dumps({"tags": {"customer": "acme", "site": site}, "properties": {"desired": {}}})
            for site in ("north", "south")
        ]

        async def activate(stub, metadata: str) -> str:
            try:
                await stub.Activate(activate_request(other.device_id, enrolled.activation_code, metadata))
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
            return "OK"

        outcomes = await asyncio.gather(*(activate(replicas[i][1], wanted[i]) for i in range(2)))
        assert "OK" in outcomes and set(outcomes) <= {"OK", "ABORTED", "FAILED_PRECONDITION"}
        final = (await dps_enrollment(emulator, other.device_id))["initialTwin"]["tags"]
        assert final in ({"customer": "acme", "site": "north"}, {"customer": "acme", "site": "south"})
        audit = replicas[0][0].audit
        assert await audit.intents.open_intents(other.device_id) == []
        rows = [e.outcome for e in await audit.entries(other.device_id)]
        assert "pending" not in rows and rows.count("ok") == outcomes.count("OK")


@pytest.mark.faults
async def test_a_replica_killed_mid_activation_is_finished_by_the_other(tmp_path, emulator, postgres_url):
    """Replica A is killed (SIGKILL) right after its DPS write; once its hold on the intent has run out,
    replica B finishes the change on the next call for the device: written once, audited once."""
    from faults.test_activation_intents import activation_process

    tls = OemTls.create(tmp_path / "tls")
    extra = {
        "ACTIVATION_DATABASE_URL": postgres_url,
        "ACTIVATION_INTENTS_HOLD_SECONDS": "2",
        "ACTIVATION_REQUESTS_LEASE_SECONDS": "2",  # A's reservation of r-1 runs out as quickly
    }
    async with AsyncExitStack() as stack:
        factory = await factory_on(stack, tmp_path, emulator, postgres_url)
        device = await mint(factory, str(uuid.uuid4()), tmp_path / "devices")
        enroll = fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem)
        code = (await factory.Enroll(enroll)).activation_code
        env_a = activation_env(tmp_path / "a", emulator, tls, **extra)
        async with activation_process(env_a, tls, tmp_path / "a.log", crash_at="activate.after_dps") as (
            proc,
            stub_a,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as killed:
                await stub_a.Activate(activate_request(device.device_id, code, METADATA, request_id="r-1"))
            assert killed.value.code() is grpc.StatusCode.UNAVAILABLE
            assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGKILL
        app_b, stub_b = await stack.enter_async_context(
            running_activation(activation_env(tmp_path / "b", emulator, tls, **extra), tls)
        )
        written = await dps_enrollment(emulator, device.device_id)
        assert written["initialTwin"]["tags"] == {"customer": "acme"}  # A's write is in DPS
        (open_intent,) = await app_b.audit.intents.open_intents(device.device_id)  # held by dead A
        assert open_intent.request_id == "r-1"

        await asyncio.sleep(2.5)  # A's hold runs out (it never renews it: it is dead)
        status = await stub_b.GetDeviceStatus(
            apb.GetDeviceStatusRequest(device_id=device.device_id, activation_code=code)
        )
        assert status.owner_oem == "acme"
        assert await app_b.audit.intents.open_intents(device.device_id) == []
        rows = [(e.request_id, e.outcome) for e in await app_b.audit.entries(device.device_id)]
        assert rows.count(("r-1", "ok")) == 1 and ("r-1", "pending") not in rows
        assert (await dps_enrollment(emulator, device.device_id))["etag"] == written["etag"]  # not rewritten
        # the caller's retry (A never answered it) finds the change done: nothing written twice
        retry = await stub_b.Activate(activate_request(device.device_id, code, METADATA, request_id="r-1"))
        assert retry.path == apb.ACTIVATION_PATH_UNCHANGED


async def test_two_portal_replicas_count_wrong_codes_from_one_address_exactly(
    tmp_path, emulator, postgres_url
):
    """Two portals, each in front of its own activation replica, beside a service on PostgreSQL: wrong codes
    from one client address sent to both at once are checked exactly as often as the portal's per-address
    limit says, in all (the counts are rows in the service's database); the rest are refused by the
    portals (429) and never reach the service."""
    tls = OemTls.create(tmp_path / "tls")
    extra = {"ACTIVATION_DATABASE_URL": postgres_url, "ACTIVATION_LIMITS_MAX_FAILURES": "20"}
    async with AsyncExitStack() as stack:
        _factory, replicas, device, code = await activation_replicas(
            stack, tmp_path, emulator, postgres_url, tls, extra
        )
        portals = []
        for app, _stub in replicas:
            settings = load_portal_settings(
                env=portal_env(
                    app.grpc_address,
                    tls,
                    emulator,
                    ACTIVATION_DATABASE_URL=postgres_url,
                    ACTIVATION_PORTAL_MAX_FAILURES_PER_ADDRESS="3",
                )
            )
            assert settings.limits_database is not None
            portals.append(await stack.enter_async_context(TestClient(TestServer(create_app(settings)))))

        async def post(n: int, attempt: str) -> int:
            portal = portals[n % 2]
            hidden = hidden_fields(await (await portal.get("/")).text())
            form = activate_form(hidden, device.device_id, attempt, METADATA)
            return (await portal.post("/activate", data=form)).status

        statuses = await asyncio.gather(*(post(n, "AAAA-AAAA-AAAA-AAAA") for n in range(10)))
        assert sorted(statuses) == [403] * 3 + [429] * 7
        audit = replicas[0][0].audit
        assert [e.outcome for e in await audit.entries(device.device_id)].count("denied") == 3
        assert [await post(n, code) for n in range(2)] == [429, 429]  # this address waits, on both portals
