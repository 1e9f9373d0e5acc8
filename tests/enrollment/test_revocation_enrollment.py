"""Revocation meeting enrollment, against a real emulator and real factory_svc servers: a queued enrollment of
a revoked certificate is completed as refused (CERTIFICATE_REVOKED), never written to DPS; a revocation that
slips in between the delivery's check and its DPS write still ends with the enrollment disabled; the
revocation's intent is carried out once DPS is back."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from provisioning_env import dps_enrollment, factory_env, failure, mint, running_factory
from support.waiting import until
from test_enroll_outbox_emulator import stopped_emulator

from devprov.v1 import factory_service_pb2 as pb
from factory_svc.enrollment.delivery import OutboxDelivery
from factory_svc.enrollment.lint import lint_policy_from_chain
from factory_svc.enrollment.model import EnrollOutcome, EnrollRequest
from factory_svc.enrollment.outbox import EntryIntent, NewEntry, Outbox, OutboxMode, OutboxState
from factory_svc.enrollment.service import EnrollmentService
from factory_svc.revocation.model import RevokeRequest
from provkit.activation_code import hash_code, new_code
from provkit.cloud import BulkItemError, Enrollment, EnrollmentPort
from provkit.errors import DomainError

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


def sha256_of(chain_pem: str) -> str:
    return x509.load_pem_x509_certificates(chain_pem.encode())[0].fingerprint(hashes.SHA256()).hex().upper()


async def test_a_queued_enrollment_of_a_revoked_certificate_is_refused_not_delivered(tmp_path):
    emulator, env = stopped_emulator(tmp_path)
    try:
        async with running_factory(env) as (app, stub):
            revoked, kept = [await mint(stub, str(uuid.uuid4()), tmp_path / "devices") for _ in range(2)]
            for device in (revoked, kept):
                queued = await stub.Enroll(
                    pb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem)
                )
                assert queued.outcome == pb.ENROLL_OUTCOME_QUEUED and queued.activation_code

            # DPS is down: the revocation is recorded (ledger, CRL, intent) and says the cloud is unreachable
            down = await failure(
                stub.RevokeCertificate(
                    pb.RevokeCertificateRequest(
                        device_id=revoked.device_id, reason=pb.REVOCATION_REASON_KEY_COMPROMISE
                    )
                )
            )
            assert down.code == grpc.StatusCode.UNAVAILABLE and down.reason == "DPS_UNAVAILABLE"
            intent = await app.ledger.revocations.revocation_intent(revoked.device_id)
            assert intent is not None and not intent.completed
            assert app.crl.current is not None and len(app.crl.current.crl) == 1

            emulator.start()
            outbox = app.enrollment.outbox

            async def settled() -> bool:
                states = {e.device_id: e.state for e in await outbox.entries()}
                return OutboxState.PENDING not in states.values()

            await until(settled, "both queued entries completed", timeout=60)
            entries = {e.device_id: e for e in await outbox.entries()}
            refused = entries[revoked.device_id]
            assert refused.state is OutboxState.FAILED and refused.failure_reason == "CERTIFICATE_REVOKED"
            assert entries[kept.device_id].state is OutboxState.DELIVERED
            assert await dps_enrollment(emulator, revoked.device_id) is None  # never written
            assert await dps_enrollment(emulator, kept.device_id) is not None

            status = await stub.GetEnrollmentStatus(
                pb.GetEnrollmentStatusRequest(device_id=revoked.device_id)
            )
            assert status.state == pb.ENROLLMENT_STATE_REVOKED
            assert status.failure_reason == "CERTIFICATE_REVOKED"
            audit = await outbox.audit(revoked.device_id)
            assert [a.action for a in audit] == ["refuse-revoked"]
            assert refused.sha256_thumbprint in audit[0].detail and "not written" in audit[0].detail

            async def intent_done() -> bool:
                found = await app.ledger.revocations.revocation_intent(revoked.device_id)
                return found is not None and found.completed

            await until(intent_done, "the revocation intent carried out once DPS is back", timeout=60)
    finally:
        emulator.stop()


class RevokedBeforeTheWrite:
    """The real DPS adapter, with a revocation let in right before the first enrollment is created: the
    revocation's own DPS step then finds nothing to disable, and the write lands after it."""

    def __init__(self, dps: EnrollmentPort, revoke: Callable[[], Awaitable[object]]) -> None:
        self._dps = dps
        self._revoke: Callable[[], Awaitable[object]] | None = revoke

    async def get(self, registration_id: str) -> Enrollment | None:
        return await self._dps.get(registration_id)

    async def create(self, enrollment: Enrollment) -> Enrollment:
        if self._revoke is not None:
            revoke, self._revoke = self._revoke, None
            await revoke()
        return await self._dps.create(enrollment)

    async def update(self, enrollment: Enrollment) -> Enrollment:
        return await self._dps.update(enrollment)

    async def bulk_create(self, enrollments: Sequence[Enrollment]) -> list[BulkItemError]:
        if self._revoke is not None:
            revoke, self._revoke = self._revoke, None
            await revoke()
        return await self._dps.bulk_create(enrollments)

    async def bulk_update(self, enrollments: Sequence[Enrollment]) -> list[BulkItemError]:
        return await self._dps.bulk_update(enrollments)


def _disabled_without_code(emulator, device_id: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        found = await dps_enrollment(emulator, device_id)
        return (
            found is not None
            and found["provisioningStatus"] == "disabled"
            and not (found.get("optionalDeviceInformation") or {}).get("activationCode")
        )

    return check


async def test_a_revocation_during_a_live_enroll_ends_with_the_enrollment_disabled(tmp_path, emulator):
    """Enroll checked the certificate, then the revocation ran (finding nothing in DPS), then Enroll wrote:
    the call answers CERTIFICATE_REVOKED and the device's revocation is carried out again.  Both the
    single-record path and a batch's bulk write."""
    async with running_factory(factory_env(tmp_path, emulator)) as (app, stub):
        single, batched, fine = [await mint(stub, str(uuid.uuid4()), tmp_path / "devices") for _ in range(3)]
        runtime = app.enrollment
        policy = app.settings.enroll.policy

        def racing_service(device_id: str) -> EnrollmentService:
            async def revoke() -> None:
                await app.revocation.revoke(RevokeRequest(device_id=device_id))

            return EnrollmentService(
                RevokedBeforeTheWrite(runtime.dps, revoke),
                runtime.outbox,
                runtime.codes,
                lint_policy_from_chain(app.ca.chain, policy.min_remaining_validity),
                policy,
                lambda: datetime.now(UTC),
                app.revocation.intents,
            )

        service = racing_service(single.device_id)
        try:
            with pytest.raises(DomainError) as refused:
                await service.enroll(EnrollRequest(single.device_id, single.chain_pem))
            assert refused.value.reason == "CERTIFICATE_REVOKED"
        finally:
            service.close()

        service = racing_service(batched.device_id)
        try:
            batch = await service.batch.enroll(
                [
                    EnrollRequest(batched.device_id, batched.chain_pem),
                    EnrollRequest(fine.device_id, fine.chain_pem),
                ]
            )
        finally:
            service.close()
        first, second = batch.items
        assert first.error is not None and first.error.reason == "CERTIFICATE_REVOKED"
        assert second.result is not None and second.result.outcome is EnrollOutcome.CREATED

        for device in (single, batched):
            await until(
                _disabled_without_code(emulator, device.device_id),
                "the enrollment written after the revocation",
                timeout=60,
            )
        assert (await dps_enrollment(emulator, fine.device_id))["optionalDeviceInformation"]["activationCode"]


async def test_a_revocation_racing_with_delivery_ends_with_the_enrollment_disabled(tmp_path, emulator):
    async with running_factory(factory_env(tmp_path, emulator)) as (app, stub):
        device = await mint(stub, str(uuid.uuid4()), tmp_path / "devices")
        sha256 = sha256_of(device.chain_pem)
        leaf_pem = device.chain_pem.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
        revocation = app.revocation

        async def revoke() -> None:
            result = await revocation.revoke(RevokeRequest(device_id=device.device_id))
            assert not result.enrollment_disabled  # nothing in DPS yet: its step had nothing to do
            intent = await app.ledger.revocations.revocation_intent(device.device_id)
            assert intent is not None and intent.completed

        # an outbox of its own (the server's delivery never sees it), delivered through the racing adapter
        outbox = await Outbox.open(tmp_path / "race" / "enrollments.sqlite3")
        try:
            entry = NewEntry(
                device.device_id,
                OutboxMode.CREATE,
                leaf_pem,
                hash_code(new_code(), log2_n=8),
                sha256,
                EntryIntent(caller="urn:devprov:factory:test", request_id="race-1"),
            )
            await outbox.enqueue([entry], datetime.now(UTC))
            delivery = OutboxDelivery(
                RevokedBeforeTheWrite(app.enrollment.dps, revoke),
                outbox,
                lambda: datetime.now(UTC),
                revocations=revocation.intents,
            )
            delivery.start()
            try:

                async def completed() -> bool:
                    return (await outbox.entries())[0].state is not OutboxState.PENDING

                await until(completed, "the entry completed", timeout=60)
            finally:
                await delivery.stop()
            (done,) = await outbox.entries()
            assert done.state is OutboxState.FAILED and done.failure_reason == "CERTIFICATE_REVOKED"
            (audited,) = await outbox.audit(device.device_id)
            assert audited.action == "refuse-revoked" and "after it was written" in audited.detail
        finally:
            await outbox.close()

        # the write landed after the revocation looked: the reopened intent disables it (no code hash left)
        async def disabled() -> bool:
            found = await dps_enrollment(emulator, device.device_id)
            return (
                found is not None
                and found["provisioningStatus"] == "disabled"
                and not (found.get("optionalDeviceInformation") or {}).get("activationCode")
            )

        await until(disabled, "the enrollment written with the revoked certificate is disabled", timeout=60)
        intent = await app.ledger.revocations.revocation_intent(device.device_id)
        assert intent is not None and intent.completed
