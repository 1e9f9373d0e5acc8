"""MintCertificate over gRPC against a real factory server on loopback: both modes, each key type, the
leaf's profile, idempotency, re-issue, list/get, the ledger."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from factory_env import factory_settings, make_csr, make_key, public_der, running_factory, verify_chain
from google.protobuf import duration_pb2
from support.parties import FACTORY_URI

from devprov.v1 import factory_service_pb2 as pb
from provkit.grpc_errors import error_details


def _ledger_rows(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "ledger.sqlite3") as db:
        return db.execute("SELECT COUNT(*) FROM certificates").fetchone()[0]


def _check_leaf(leaf: x509.Certificate, device_id: str, issuing: x509.Certificate) -> None:
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id
    ext = leaf.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ext.get_extension_for_class(x509.BasicConstraints).critical
    usage = ext.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign and not usage.key_encipherment
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key())
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    issuer_ski = issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == issuer_ski.digest


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("p256", pb.KEY_TYPE_EC_P256),
        ("p384", pb.KEY_TYPE_EC_P384),
        ("rsa2048", pb.KEY_TYPE_RSA_2048),
        ("rsa3072", pb.KEY_TYPE_RSA_3072),
    ],
)
async def test_csr_mode_issues_a_verifiable_client_certificate(
    tmp_path: Path, kind: str, expected: int
) -> None:
    key = make_key(kind)
    device_id = f"guid-{kind}-0001"
    async with running_factory(factory_settings(tmp_path)) as factory:
        reply = await factory.stub.MintCertificate(
            pb.MintCertificateRequest(device_id=device_id.upper(), csr_pem=make_csr(key, device_id.upper()))
        )
    cert = reply.certificate
    leaf, issuing, _root = verify_chain(cert.certificate_chain_pem)
    assert cert.device_id == device_id  # normalised to lowercase
    _check_leaf(leaf, device_id, issuing)
    assert public_der(leaf.public_key()) == public_der(key.public_key())
    der = leaf.public_bytes(serialization.Encoding.DER)
    assert cert.sha256_thumbprint == hashlib.sha256(der).hexdigest().upper()
    assert cert.sha1_thumbprint == hashlib.sha1(der).hexdigest().upper()
    assert int(cert.serial_number, 16) == leaf.serial_number
    assert cert.certificate_pem == leaf.public_bytes(serialization.Encoding.PEM).decode()
    assert cert.not_after.ToDatetime(tzinfo=leaf.not_valid_after_utc.tzinfo) == leaf.not_valid_after_utc
    assert (cert.key_type, cert.key_source) == (expected, pb.KEY_SOURCE_CSR)
    assert reply.private_key_pem == "" and reply.unexpired_certificate_count == 1 and not reply.replayed
    assert cert.caller_identity.startswith(f"{FACTORY_URI} insecure:")


async def test_csr_without_common_name_is_accepted(tmp_path: Path) -> None:
    async with running_factory(factory_settings(tmp_path)) as factory:
        reply = await factory.stub.MintCertificate(
            pb.MintCertificateRequest(device_id="no-cn-device", csr_pem=make_csr(make_key("p256"), None))
        )
    leaf, issuing, _ = verify_chain(reply.certificate.certificate_chain_pem)
    _check_leaf(leaf, "no-cn-device", issuing)


@pytest.mark.parametrize(
    ("key_type", "expected"),
    [
        (pb.KEY_TYPE_UNSPECIFIED, pb.KEY_TYPE_EC_P256),
        (pb.KEY_TYPE_EC_P384, pb.KEY_TYPE_EC_P384),
        (pb.KEY_TYPE_RSA_2048, pb.KEY_TYPE_RSA_2048),
        (pb.KEY_TYPE_RSA_3072, pb.KEY_TYPE_RSA_3072),
    ],
)
async def test_server_keygen_returns_the_key_once_and_never_stores_it(
    tmp_path: Path, key_type: int, expected: int
) -> None:
    request = pb.MintCertificateRequest(device_id="jig-device-7", request_id="jig-7-mint")
    request.server_key_generation.key_type = key_type
    async with running_factory(factory_settings(tmp_path)) as factory:
        reply = await factory.stub.MintCertificate(request)
        replay = await factory.stub.MintCertificate(request)
    key = serialization.load_pem_private_key(reply.private_key_pem.encode(), password=None)
    assert reply.private_key_pem.startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8
    leaf, issuing, _ = verify_chain(reply.certificate.certificate_chain_pem)
    _check_leaf(leaf, "jig-device-7", issuing)
    assert public_der(leaf.public_key()) == public_der(key.public_key())
    assert (reply.certificate.key_type, reply.certificate.key_source) == (
        expected,
        pb.KEY_SOURCE_SERVER_GENERATED,
    )
    # A replay returns the same certificate but cannot return the key again: it was never stored.
    assert replay.replayed and replay.certificate.serial_number == reply.certificate.serial_number
    assert replay.private_key_pem == ""
    body = reply.private_key_pem.splitlines()[1]
    for stored in tmp_path.rglob("ledger.sqlite3*"):
        assert body.encode() not in stored.read_bytes()


async def test_same_request_id_replays_and_a_different_request_is_refused(tmp_path: Path) -> None:
    key = make_key("p256")
    request = pb.MintCertificateRequest(
        device_id="idem-1", csr_pem=make_csr(key, "idem-1"), request_id="mes-42"
    )
    async with running_factory(factory_settings(tmp_path)) as factory:
        first = await factory.stub.MintCertificate(request)
        again = await factory.stub.MintCertificate(request)
        assert again.replayed and not first.replayed
        assert again.certificate == first.certificate
        assert again.unexpired_certificate_count == 1

        different = pb.MintCertificateRequest()
        different.CopyFrom(request)
        different.csr_pem = make_csr(make_key("p256"), "idem-1")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await factory.stub.MintCertificate(different)
        details = error_details(caught.value)
        assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED")
        assert details.domain == "factory.devprov"

        concurrent = pb.MintCertificateRequest(
            device_id="idem-2", csr_pem=make_csr(key, None), request_id="mes-43"
        )
        replies = await asyncio.gather(*(factory.stub.MintCertificate(concurrent) for _ in range(6)))
        assert len({r.certificate.serial_number for r in replies}) == 1
        assert sum(not r.replayed for r in replies) == 1
    assert _ledger_rows(tmp_path) == 2


async def test_reissue_counts_unexpired_certificates_and_list_get_page(tmp_path: Path) -> None:
    key = make_key("p256")
    async with running_factory(factory_settings(tmp_path)) as factory:
        counts, serials = [], []
        for _ in range(3):
            reply = await factory.stub.MintCertificate(
                pb.MintCertificateRequest(device_id="rma-device", csr_pem=make_csr(key, "rma-device"))
            )
            counts.append(reply.unexpired_certificate_count)
            serials.append(reply.certificate.serial_number)
        await factory.stub.MintCertificate(
            pb.MintCertificateRequest(device_id="other-device", csr_pem=make_csr(key, None))
        )
        assert counts == [1, 2, 3]

        seen, token = [], ""
        while True:
            page = await factory.stub.ListCertificates(
                pb.ListCertificatesRequest(device_id="RMA-device", page_size=2, page_token=token)
            )
            seen += [c.serial_number for c in page.certificates]
            token = page.next_page_token
            if not token:
                break
        assert seen == serials[::-1]  # newest first
        everything = await factory.stub.ListCertificates(pb.ListCertificatesRequest())
        assert len(everything.certificates) == 4

        colon_lower = ":".join(serials[0][i : i + 2] for i in range(0, len(serials[0]), 2)).lower()
        got = await factory.stub.GetCertificate(pb.GetCertificateRequest(serial_number=colon_lower))
        assert got.certificate.serial_number == serials[0]

        for call, reason, code in (
            (
                factory.stub.GetCertificate(pb.GetCertificateRequest(serial_number="0ABC")),
                "CERTIFICATE_NOT_FOUND",
                grpc.StatusCode.NOT_FOUND,
            ),
            (
                factory.stub.GetCertificate(pb.GetCertificateRequest(serial_number="xyz")),
                "SERIAL_NUMBER_INVALID",
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            (
                factory.stub.ListCertificates(pb.ListCertificatesRequest(page_token="garbage!")),
                "PAGE_TOKEN_INVALID",
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            (
                factory.stub.ListCertificates(pb.ListCertificatesRequest(page_size=-1)),
                "PAGE_SIZE_INVALID",
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            details = error_details(caught.value)
            assert (details.code, details.reason) == (code, reason)


async def test_requested_validity_is_honoured(tmp_path: Path) -> None:
    request = pb.MintCertificateRequest(
        device_id="short-lived",
        csr_pem=make_csr(make_key("p256"), None),
        validity=duration_pb2.Duration(seconds=7200),
    )
    async with running_factory(factory_settings(tmp_path)) as factory:
        reply = await factory.stub.MintCertificate(request)
    cert = reply.certificate
    lifetime = cert.not_after.ToDatetime() - cert.not_before.ToDatetime()
    assert timedelta(hours=2) <= lifetime <= timedelta(hours=2, minutes=5)
