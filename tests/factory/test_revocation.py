"""Revocation against a real emulator process, real factory_svc and activation_svc gRPC servers, and
Microsoft's SDKs as the device: a revoked device can neither register nor connect, the CRL (file and HTTP)
lists it and verifies against the issuing CA, Enroll refuses the certificate, status says REVOKED, the OEM
cannot activate it again, and the revocation is audited."""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from enrollment.provisioning_env import (
    OemTls,
    activate_request,
    activation_env,
    assert_locked_out,
    connect_to_hub,
    dps_enrollment,
    factory_env,
    failure,
    mint,
    register,
    running_activation,
    running_factory,
)
from support.cli_process import run_module

from devprov.v1 import factory_service_pb2 as fpb
from factory_svc.mint.service import serial_hex
from factory_svc.revocation.crl import DER_NAME, PEM_NAME

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]
META = {"tags": {"line": 3}, "properties": {"desired": {"interval_s": 5}}}


def new_id() -> str:
    return str(uuid.uuid4())


async def _fetch(url: str) -> tuple[str, bytes]:
    def get() -> tuple[str, bytes]:
        with urllib.request.urlopen(url, timeout=10) as reply:  # loopback only
            return reply.headers["Content-Type"], reply.read()

    return await asyncio.to_thread(get)


async def test_revoking_an_active_device(tmp_path: Path, emulator) -> None:
    tls = OemTls.create(tmp_path / "oem-tls")
    env = factory_env(tmp_path, emulator, FACTORY_CRL_HTTP_PORT="0")
    async with (
        running_factory(env) as (factory_app, factory),
        running_activation(activation_env(tmp_path, emulator, tls), tls) as (_activation_app, activation),
    ):
        device = await mint(factory, new_id(), tmp_path / "devices")
        other = await mint(factory, new_id(), tmp_path / "devices")
        enrolled = await factory.Enroll(
            fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem)
        )
        code = enrolled.activation_code
        await activation.Activate(activate_request(device.device_id, code, json.dumps(META)))
        hub = (await register(emulator, device)).registration_state.assigned_hub
        await connect_to_hub(emulator, device, hub)

        reply = await factory.RevokeCertificate(
            fpb.RevokeCertificateRequest(
                device_id=device.device_id, reason=fpb.REVOCATION_REASON_KEY_COMPROMISE, request_id="rev-1"
            )
        )
        assert reply.device_id == device.device_id
        assert [c.sha1_thumbprint for c in reply.certificates] == [device.sha1]
        assert reply.newly_revoked_count == 1
        assert reply.enrollment_disabled and reply.hub_identity_disabled
        revoked = reply.certificates[0]
        assert revoked.revoked and revoked.revocation_reason == fpb.REVOCATION_REASON_KEY_COMPROMISE

        # the device can neither register nor connect any more; the OEM cannot enable it again
        await assert_locked_out(emulator, device, hub, activation, code, json.dumps(META))
        assert (await dps_enrollment(emulator, device.device_id))["provisioningStatus"] == "disabled"

        # Enroll refuses the certificate; status and the ledger say REVOKED
        refused = await failure(
            factory.Enroll(
                fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem, replace=True)
            )
        )
        assert refused.code == grpc.StatusCode.FAILED_PRECONDITION and refused.reason == "CERTIFICATE_REVOKED"
        status = await factory.GetEnrollmentStatus(fpb.GetEnrollmentStatusRequest(device_id=device.device_id))
        assert status.state == fpb.ENROLLMENT_STATE_REVOKED
        got = await factory.GetCertificate(fpb.GetCertificateRequest(serial_number=revoked.serial_number))
        assert got.certificate.revoked and got.certificate.revocation_time == revoked.revocation_time

        # the CRL: a file and over HTTP, signed by the issuing CA, listing exactly the revoked certificate
        issuing = factory_app.ca.certificate
        crl_dir = tmp_path / "factory" / "crl"
        from_file = x509.load_der_x509_crl((crl_dir / DER_NAME).read_bytes())
        assert x509.load_pem_x509_crl((crl_dir / PEM_NAME).read_bytes()) == from_file
        assert factory_app.crl_http is not None
        content_type, body = await _fetch(factory_app.crl_http.url)
        assert content_type == "application/pkix-crl"
        crl = x509.load_der_x509_crl(body)
        assert crl == from_file
        assert crl.is_signature_valid(issuing.public_key())
        assert crl.issuer == issuing.subject
        assert crl.next_update_utc is not None and crl.next_update_utc - crl.last_update_utc == timedelta(
            days=7
        )
        entry = crl.get_revoked_certificate_by_serial_number(int(revoked.serial_number, 16))
        assert entry is not None
        assert (
            entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
            == x509.ReasonFlags.key_compromise
        )
        assert len(crl) == 1
        assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == reply.crl_number

        # the other device is untouched and still enrolls
        fine = await factory.Enroll(
            fpb.EnrollRequest(device_id=other.device_id, certificate_pem=other.chain_pem)
        )
        assert fine.outcome == fpb.ENROLL_OUTCOME_CREATED

        # the command line: a serial number it finds in the ledger, then the status it shows
        client = ("--target", factory_app.grpc_address, "--insecure")
        serial = x509.load_pem_x509_certificate(other.chain_pem.encode()).serial_number
        code_, out, err = await run_module(
            "factory_svc", "revoke", f"{serial:X}", "--reason", "cessation-of-operation", *client
        )
        assert code_ == 0, err
        assert f"revoked     {serial_hex(serial)}  cessation-of-operation" in out
        assert "enrollment  disabled now" in out
        code_, out, err = await run_module("factory_svc", "enrollment-status", other.device_id, *client)
        assert code_ == 0, err
        assert "REVOKED" in out

        # revoking again changes nothing in the ledger; the audit holds the one revocation
        again = await factory.RevokeCertificate(
            fpb.RevokeCertificateRequest(
                serial_number=revoked.serial_number, reason=fpb.REVOCATION_REASON_SUPERSEDED
            )
        )
        assert (
            again.newly_revoked_count == 0
            and not again.enrollment_disabled
            and not again.hub_identity_disabled
        )
        assert again.certificates[0].revocation_reason == fpb.REVOCATION_REASON_KEY_COMPROMISE
        assert again.crl_number > reply.crl_number
        audit = await factory_app.ledger.revocations.revocation_audit()
        assert [(a[1], a[2], a[3]) for a in audit] == [
            (revoked.serial_number, device.device_id, "keyCompromise"),
            (serial_hex(serial), other.device_id, "cessationOfOperation"),
        ]
        assert audit[0][5] == "rev-1"
        assert all(entry[4].startswith("urn:devprov:factory:") for entry in audit)  # who revoked
