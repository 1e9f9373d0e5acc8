"""Revocation without a cloud: bad input is refused and writes nothing, the CRL is regenerated on a
schedule, and a ledger of schema version 1 (on either backend) gains the revocation columns when migrated."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from factory_env import factory_settings, make_csr, make_key, running_factory
from support.stores import stored_version, write_at_version
from support.waiting import until

from devprov.v1 import factory_service_pb2 as pb
from factory_svc.ledger import FILE, MIGRATIONS, Ledger
from factory_svc.revocation.crl import DER_NAME, CrlSettings
from factory_svc.revocation.model import Revocation, RevocationReason
from provkit.grpc_errors import error_details


async def _mint(stub, device_id: str) -> pb.IssuedCertificate:
    reply = await stub.MintCertificate(
        pb.MintCertificateRequest(device_id=device_id, csr_pem=make_csr(make_key("p256"), device_id))
    )
    return reply.certificate


@pytest.mark.parametrize(
    ("request_", "code", "reason"),
    [
        (pb.RevokeCertificateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "REVOCATION_TARGET_MISSING"),
        (
            pb.RevokeCertificateRequest(serial_number="XYZ"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "SERIAL_NUMBER_INVALID",
        ),
        (
            pb.RevokeCertificateRequest(serial_number="0ABC"),
            grpc.StatusCode.NOT_FOUND,
            "CERTIFICATE_NOT_FOUND",
        ),
        (pb.RevokeCertificateRequest(device_id="nobody"), grpc.StatusCode.NOT_FOUND, "CERTIFICATE_NOT_FOUND"),
        (pb.RevokeCertificateRequest(device_id="bad id!"), grpc.StatusCode.INVALID_ARGUMENT, None),
        (
            pb.RevokeCertificateRequest(device_id="rev-a", reason=7),
            grpc.StatusCode.INVALID_ARGUMENT,
            "REVOCATION_REASON_INVALID",
        ),
        (
            pb.RevokeCertificateRequest(device_id="rev-a", request_id="\x01"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "REQUEST_ID_INVALID",
        ),
    ],
)
async def test_bad_revocations_are_refused_and_change_nothing(
    tmp_path: Path, request_: pb.RevokeCertificateRequest, code: grpc.StatusCode, reason: str | None
) -> None:
    async with running_factory(factory_settings(tmp_path)) as factory:
        issued = await _mint(factory.stub, "rev-a")
        first_crl = factory.app.crl.current
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await factory.stub.RevokeCertificate(request_)
        assert caught.value.code() == code
        if reason is not None:
            assert error_details(caught.value).reason == reason
        got = await factory.stub.GetCertificate(pb.GetCertificateRequest(serial_number=issued.serial_number))
        assert not got.certificate.revoked
        assert await factory.app.ledger.revocations.revocation_audit() == []
        assert factory.app.crl.current is first_crl


async def test_a_device_target_revokes_each_unexpired_certificate_once(tmp_path: Path) -> None:
    async with running_factory(factory_settings(tmp_path)) as factory:
        first, second = await _mint(factory.stub, "rev-b"), await _mint(factory.stub, "rev-b")
        await factory.stub.RevokeCertificate(pb.RevokeCertificateRequest(serial_number=first.serial_number))
        reply = await factory.stub.RevokeCertificate(
            pb.RevokeCertificateRequest(device_id="REV-B", reason=pb.REVOCATION_REASON_SUPERSEDED)
        )
        assert {c.serial_number for c in reply.certificates} == {first.serial_number, second.serial_number}
        assert reply.newly_revoked_count == 1
        assert not reply.enrollment_disabled and not reply.hub_identity_disabled  # no cloud configured
        reasons = {c.serial_number: c.revocation_reason for c in reply.certificates}
        assert reasons == {
            first.serial_number: pb.REVOCATION_REASON_UNSPECIFIED,
            second.serial_number: pb.REVOCATION_REASON_SUPERSEDED,
        }
        crl = x509.load_der_x509_crl((tmp_path / "crl" / DER_NAME).read_bytes())
        entry = crl.get_revoked_certificate_by_serial_number(int(first.serial_number, 16))
        assert entry is not None and len(entry.extensions) == 0  # "unspecified": no reason code
        assert len(crl) == 2


async def test_the_crl_is_published_again_on_schedule(tmp_path: Path) -> None:
    settings = replace(
        factory_settings(tmp_path),
        crl=CrlSettings(validity=timedelta(hours=1), refresh=timedelta(seconds=0.2)),
    )
    async with running_factory(settings) as factory:
        first = factory.app.crl.current
        assert first is not None
        current = await until(
            lambda: (c := factory.app.crl.current) is not None and c.number > first.number and c,
            "a CRL published after the first",
            timeout=15,
        )
        on_disk = x509.load_der_x509_crl((tmp_path / "crl" / DER_NAME).read_bytes())
        assert on_disk.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number >= current.number
        assert on_disk.next_update_utc - on_disk.last_update_utc == timedelta(hours=1)
    # a restart goes on from the last number
    async with running_factory(settings) as factory:
        assert factory.app.crl.current is not None and factory.app.crl.current.number > current.number


async def test_a_version_1_ledger_gains_revocation(database_url) -> None:
    old_row = (
        "INSERT INTO certificates VALUES ('0A', 'old-dev', 'pem', 'chain', 'sha1', 'AB', 0, "
        "9000000000000000, 1, 'ec-p256', 'csr', 'caller', '')"
    )
    await write_at_version(database_url, FILE, "ledger", MIGRATIONS[:1], [old_row])
    ledger = await Ledger.open(database_url, migrate=True)
    store = ledger.revocations
    try:
        assert await store.revocation_audit() == []
        assert await store.revocation_of("AB") is None
        now = datetime.now(UTC)
        revocation = Revocation(now, RevocationReason.CESSATION_OF_OPERATION)
        revoked, newly = await store.revoke(["0A"], revocation, "caller", "req")
        assert newly == 1 and [c.revocation for c in revoked] == [revocation]
        assert await store.revocation_of("ab") == revocation
        # version 5: the CRL state replicas share (one generation step per revoking call, numbers that grow)
        assert await store.crl_generation() == 1
        first = await store.next_crl(now, 5)
        assert (first.number, first.generation, [c.serial_number for c in first.revoked]) == (5, 1, ["0A"])
        assert (await store.next_crl(now, 0)).number == 6
        await store.revoke(["0A"], revocation, "caller", "again", intent_for="old-dev")
        assert await store.crl_generation() == 1  # nothing newly revoked
        intent = await store.revocation_intent("old-dev")
        assert intent is not None and not intent.completed
        assert await store.open_revocation_intents() == [intent]
        await store.open_revocation_intent("old-dev", now)  # reopened: the earlier read no longer closes it
        assert not await store.close_revocation_intent(intent, now)
        assert await store.close_revocation_intent((await store.open_revocation_intents())[0], now)
        assert await store.open_revocation_intents() == []
    finally:
        await ledger.close()
    assert stored_version(database_url, FILE, "ledger") == len(MIGRATIONS)
