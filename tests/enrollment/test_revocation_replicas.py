"""Two factory_svc replica processes on one PostgreSQL database, each publishing the CRL over HTTP: a
revocation made at one replica is in the other's CRL at the next request, and CRL numbers grow across both
(one counter in the database), every CRL signed by the shared issuing CA."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from factory.factory_env import make_csr, make_key
from support.emulator import free_port
from support.factory_process import FactoryProcess
from support.parties import FACTORY_URI
from support.waiting import until

from dbstore import DatabaseUrl
from devprov.v1 import factory_service_pb2 as fpb
from factory_svc.ledger import Ledger
from factory_svc.revocation.crl import DER_NAME

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


def _replica(tmp_path: Path, name: str, postgres_url: str) -> tuple[FactoryProcess, str]:
    """A replica sharing the data directory (the development CA) with the other, its own CRL directory and
    HTTP port; the generation poll is slow on purpose, so what is seen comes from the request-time check."""
    port = free_port("127.0.0.1")
    env = {
        "FACTORY_DATA_DIR": str(tmp_path / "factory"),
        "FACTORY_DATABASE_URL": postgres_url,
        "FACTORY_SERVER_INSECURE": "true",
        "FACTORY_SERVER_INSECURE_IDENTITY": FACTORY_URI,
        "FACTORY_DEVICE_IDS": "registration-id",
        "FACTORY_ENROLL_ENABLED": "false",
        "FACTORY_CRL_DIR": str(tmp_path / f"crl-{name}"),
        "FACTORY_CRL_HTTP_PORT": str(port),
        "FACTORY_CRL_CHECK_SECONDS": "3600",
    }
    return FactoryProcess(env, tmp_path / f"{name}.log"), f"http://127.0.0.1:{port}/crl/{DER_NAME}"


async def _crl(url: str) -> x509.CertificateRevocationList:
    def get() -> bytes:
        with urllib.request.urlopen(url, timeout=10) as reply:  # loopback only
            return reply.read()

    return x509.load_der_x509_crl(await asyncio.to_thread(get))


def _number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


async def _mint_and_revoke(replica: FactoryProcess, device_id: str) -> tuple[int, int]:
    """(serial, the CRL number the revoking replica published)."""
    async with replica.stub() as stub:
        minted = await stub.MintCertificate(
            fpb.MintCertificateRequest(device_id=device_id, csr_pem=make_csr(make_key("p256"), device_id))
        )
        revoked = await stub.RevokeCertificate(
            fpb.RevokeCertificateRequest(serial_number=minted.certificate.serial_number)
        )
    return int(minted.certificate.serial_number, 16), revoked.crl_number


async def test_a_revocation_at_one_replica_is_in_the_other_replicas_crl(tmp_path, postgres_url):
    await (await Ledger.open(DatabaseUrl.parse(postgres_url), migrate=True)).close()
    (a, a_url), (b, b_url) = (_replica(tmp_path, name, postgres_url) for name in ("a", "b"))
    try:
        await a.start()  # first: creates the development CA both use
        await b.start()
        issuing = x509.load_pem_x509_certificate(
            (tmp_path / "factory" / "ca" / "issuing-ca.pem").read_bytes()
        )
        before = await _crl(b_url)
        assert len(before) == 0

        serial_a, number_a = await _mint_and_revoke(a, "replica-a-dev")
        assert number_a > _number(before)

        async def b_lists_it() -> bool:
            return (await _crl(b_url)).get_revoked_certificate_by_serial_number(serial_a) is not None

        await until(b_lists_it, "replica b's CRL lists the revocation made at replica a", timeout=30)
        from_b = await _crl(b_url)
        assert from_b.is_signature_valid(issuing.public_key()) and from_b.issuer == issuing.subject
        assert _number(from_b) > number_a  # one counter for both: b's newer CRL has the higher number
        on_disk = x509.load_der_x509_crl((tmp_path / "crl-b" / DER_NAME).read_bytes())
        assert on_disk.get_revoked_certificate_by_serial_number(serial_a) is not None

        # and the other way round: both revocations, at a, under a number above b's
        serial_b, number_b = await _mint_and_revoke(b, "replica-b-dev")
        assert number_b > _number(from_b)

        async def a_lists_both() -> bool:
            crl = await _crl(a_url)
            return all(
                crl.get_revoked_certificate_by_serial_number(s) is not None for s in (serial_a, serial_b)
            )

        await until(a_lists_both, "replica a's CRL lists both revocations", timeout=30)
        from_a = await _crl(a_url)
        assert from_a.is_signature_valid(issuing.public_key())
        assert _number(from_a) > number_b and len(from_a) == 2
    finally:
        await a.stop()
        await b.stop()
