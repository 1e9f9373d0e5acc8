"""Edges of renewal through the real listener and a real emulator: a retry of a renewal that a later one
replaced is refused and not reopened (the later one keeps the enrollment's secondary slot); revoking the
pending new certificate takes it out of the secondary slot (the enrollment stays enabled) and it can no
longer be promoted; revoking a device with a pending renewal disables the enrollment as before and the
pending certificate can no longer be promoted either."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from cryptography import x509
from enrollment.provisioning_env import dps_enrollment, mint
from renewal_env import EstClient, ServerTls, as_device, csr_for, new_key, renewal_env, running_factory
from test_renewal_est import _leaf, _sha256, _slots

from devprov.v1 import factory_service_pb2 as fpb
from factory_svc.mint.issuer import serial_hex
from factory_svc.renewal.model import RenewalState

pytestmark = pytest.mark.timeout(240)


async def _renewing(factory, tls: ServerTls, folder: Path):
    """A device minted and enrolled, its EST client, and one renewal answered (not yet promoted)."""
    device = await mint(factory.stub, str(uuid.uuid4()), folder)
    await factory.stub.Enroll(fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem))
    client = EstClient(factory.est_url, tls, device.cert_path, device.key_path)
    key = new_key()
    answer = await client.renew(csr_for(device.device_id, key))
    assert answer.status == 200
    return device, client, key, answer


async def test_a_retry_of_a_replaced_renewal_is_refused_and_not_reopened(tmp_path, module_emulator) -> None:
    tls = ServerTls.create(tmp_path / "tls")
    async with running_factory(renewal_env(tmp_path, module_emulator, tls)) as factory:
        device, client, first_key, first = await _renewing(factory, tls, tmp_path / "devices")
        later = await client.renew(csr_for(device.device_id, new_key()))  # the device lost the first answer
        later_leaf = _leaf(later.certificates)
        assert _leaf(first.certificates) != later_leaf

        retried = await client.renew(csr_for(device.device_id, first_key))
        assert (retried.status, retried.reason) == (409, "RENEWAL_REPLACED")
        slots = _slots(await dps_enrollment(module_emulator, device.device_id))
        assert slots["secondary"]["info"]["sha256Thumbprint"] == _sha256(later_leaf)
        renewals = await factory.app.ledger.renewals.open_renewals(device.device_id)
        assert [r.new_serial for r in renewals] == [serial_hex(later_leaf.serial_number)]


async def test_revoking_the_pending_certificate_empties_the_secondary_slot(tmp_path, module_emulator) -> None:
    tls = ServerTls.create(tmp_path / "tls")
    async with running_factory(renewal_env(tmp_path, module_emulator, tls)) as factory:
        device, _client, key, answer = await _renewing(factory, tls, tmp_path / "devices")
        new = _leaf(answer.certificates)
        before = await dps_enrollment(module_emulator, device.device_id)
        await factory.stub.RevokeCertificate(
            fpb.RevokeCertificateRequest(
                serial_number=serial_hex(new.serial_number), request_id=str(uuid.uuid4())
            )
        )
        enrollment = await dps_enrollment(module_emulator, device.device_id)
        assert set(_slots(enrollment)) == {"primary"}
        old = x509.load_pem_x509_certificates(device.chain_pem.encode())[0]
        assert _slots(enrollment)["primary"]["info"]["sha256Thumbprint"] == _sha256(old)
        # the device's own certificate is fine: the enrollment is otherwise as it was (not disabled further)
        for field in ("provisioningStatus", "initialTwin", "iotHubs", "optionalDeviceInformation"):
            assert enrollment.get(field) == before.get(field), field

        renewed = as_device(device, key, answer.certificates, tmp_path / "renewed")
        signal = await EstClient(factory.est_url, tls, renewed.cert_path, renewed.key_path).cacerts()
        assert signal.status == 200  # cacerts answers anyone; no promotion
        after = await dps_enrollment(module_emulator, device.device_id)
        assert _slots(after)["primary"]["info"]["sha256Thumbprint"] == _sha256(old)
        await factory.app.renewal.finish_open()  # the worker's pass: the renewal is given up, not promoted
        assert await factory.app.ledger.renewals.open_renewals(device.device_id) == []
        assert await factory.app.ledger.renewals.superseded_by(serial_hex(old.serial_number)) is None


async def test_revoking_a_device_with_a_pending_renewal_disables_it_and_nothing_is_promoted(
    tmp_path, module_emulator
) -> None:
    tls = ServerTls.create(tmp_path / "tls")
    async with running_factory(renewal_env(tmp_path, module_emulator, tls)) as factory:
        device, _client, key, answer = await _renewing(factory, tls, tmp_path / "devices")
        reply = await factory.stub.RevokeCertificate(
            fpb.RevokeCertificateRequest(device_id=device.device_id, request_id=str(uuid.uuid4()))
        )
        assert len(reply.certificates) == 2  # the old one and the pending new one
        enrollment = await dps_enrollment(module_emulator, device.device_id)
        assert enrollment["provisioningStatus"] == "disabled"
        assert "secondary" not in _slots(enrollment)
        old = x509.load_pem_x509_certificates(device.chain_pem.encode())[0]

        renewed = as_device(device, key, answer.certificates, tmp_path / "renewed")
        await EstClient(factory.est_url, tls, renewed.cert_path, renewed.key_path).cacerts()
        await factory.app.renewal.finish_open()
        after = await dps_enrollment(module_emulator, device.device_id)
        assert _slots(after)["primary"]["info"]["sha256Thumbprint"] == _sha256(old)
        assert after["provisioningStatus"] == "disabled"
        renewals = await factory.app.ledger.renewals.open_renewals(device.device_id)
        assert [r for r in renewals if r.state is RenewalState.PROMOTE] == []
        assert await factory.app.ledger.renewals.superseded_by(serial_hex(old.serial_number)) is None
