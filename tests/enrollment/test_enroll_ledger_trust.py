"""Which certificates Enroll trusts, through factory_svc (gRPC, its ledger) into a real emulator: one the
ledger holds is enrolled without its signature checked again, one signed by the factory's CA beside the
ledger is enrolled after the check, and neither a forgery that names the factory's CA and key id nor a
certificate of an issuing CA the factory no longer has gets in - alone in a batch, or on its own."""

from __future__ import annotations

import shutil
import uuid
from datetime import UTC, datetime

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from provisioning_env import dps_enrollment, factory_env, failure, mint, running_factory
from support.shipment import device_certificate

from devprov.v1 import factory_service_pb2 as pb

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


def device_leaf(ca_certificate: x509.Certificate, device_id: str) -> x509.CertificateBuilder:
    """A device certificate as the factory makes them, naming ``ca_certificate`` as issuer and its key id."""
    key = ec.generate_private_key(ec.SECP256R1())
    return device_certificate(ca_certificate, device_id, key.public_key(), datetime.now(UTC))


def pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def public_der(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def batch(*items: tuple[str, str]) -> pb.EnrollBatchRequest:
    return pb.EnrollBatchRequest(items=[pb.EnrollBatchItem(device_id=d, certificate_pem=c) for d, c in items])


async def test_the_ledger_vouches_only_for_what_the_factory_issued(tmp_path, module_emulator):
    async with running_factory(factory_env(tmp_path, module_emulator)) as (app, stub):
        minted = await mint(stub, str(uuid.uuid4()), tmp_path / "devices")
        beside_id, forged_id = str(uuid.uuid4()), str(uuid.uuid4())
        # signed by the factory's issuing CA, never recorded in its ledger (the full check applies)
        beside = app.ca.signer.sign_certificate(device_leaf(app.ca.certificate, beside_id))
        # the factory's CA name and key id, someone else's signature
        stranger = ec.generate_private_key(ec.SECP256R1())
        forged = device_leaf(app.ca.certificate, forged_id).sign(stranger, hashes.SHA256())

        reply = await stub.EnrollBatch(
            batch((minted.device_id, minted.chain_pem), (beside_id, pem(beside)), (forged_id, pem(forged)))
        )
        outcomes = [r.response.outcome if r.HasField("response") else r.error.reason for r in reply.results]
        assert outcomes == [pb.ENROLL_OUTCOME_CREATED, pb.ENROLL_OUTCOME_CREATED, "CERTIFICATE_UNTRUSTED"]
        alone = await failure(stub.Enroll(pb.EnrollRequest(device_id=forged_id, certificate_pem=pem(forged))))
        assert alone.code == grpc.StatusCode.INVALID_ARGUMENT and alone.reason == "CERTIFICATE_UNTRUSTED"
        assert await dps_enrollment(module_emulator, forged_id) is None
        for device_id in (minted.device_id, beside_id):
            assert await dps_enrollment(module_emulator, device_id) is not None


async def test_a_recorded_certificate_of_an_earlier_issuing_ca_is_refused(tmp_path, module_emulator):
    env = factory_env(tmp_path, module_emulator)
    async with running_factory(env) as (_app, stub):
        earlier = [await mint(stub, str(uuid.uuid4()), tmp_path / "devices") for _ in range(2)]
    # the development CA made anew (same names, new keys); the ledger keeps what the earlier one issued
    shutil.rmtree(tmp_path / "factory" / "ca")
    async with running_factory(env) as (app, stub):
        old_ca = x509.load_pem_x509_certificates(earlier[0].chain_pem.encode())[1]
        assert old_ca.subject == app.ca.certificate.subject
        assert public_der(old_ca) != public_der(app.ca.certificate)
        old = pb.EnrollRequest(device_id=earlier[0].device_id, certificate_pem=earlier[0].chain_pem)
        alone = await failure(stub.Enroll(old))
        assert alone.code == grpc.StatusCode.INVALID_ARGUMENT and alone.reason == "CERTIFICATE_UNTRUSTED"
        fresh = await mint(stub, str(uuid.uuid4()), tmp_path / "devices")
        reply = await stub.EnrollBatch(
            batch((earlier[1].device_id, earlier[1].chain_pem), (fresh.device_id, fresh.chain_pem))
        )
        assert reply.results[0].error.reason == "CERTIFICATE_UNTRUSTED"
        assert reply.results[1].response.outcome == pb.ENROLL_OUTCOME_CREATED
        for device in earlier:
            assert await dps_enrollment(module_emulator, device.device_id) is None
