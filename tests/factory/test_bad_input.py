"""Every bad MintCertificate input is refused with its own reason, and nothing reaches the ledger."""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from factory_env import factory_settings, make_csr, make_key, running_factory
from google.protobuf import duration_pb2

from devprov.v1 import factory_service_pb2 as pb
from provkit.device_id import DeviceIdPolicy
from provkit.grpc_errors import error_details

GOOD_ID = "good-device-1"


def _broken_signature_csr() -> str:
    csr = x509.load_pem_x509_csr(make_csr(make_key("p256"), GOOD_ID).encode())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x55  # inside the ECDSA signature's integers
    body = base64.encodebytes(bytes(der)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


def _unknown_key_algorithm_csr() -> str:
    """An Ed25519 CSR whose key names an algorithm no one defined (1.3.101.127 for 1.3.101.112)."""
    csr = x509.load_pem_x509_csr(make_csr(make_key("ed25519"), GOOD_ID).encode())
    der = csr.public_bytes(serialization.Encoding.DER)
    der = der.replace(b"\x06\x03\x2b\x65\x70", b"\x06\x03\x2b\x65\x7f", 1)  # the key's OID comes first
    body = base64.encodebytes(der).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


def _server_keygen(key_type: int) -> pb.MintCertificateRequest:
    request = pb.MintCertificateRequest(device_id=GOOD_ID)
    request.server_key_generation.key_type = key_type
    return request


def _cases() -> list[tuple[str, pb.MintCertificateRequest, str, str]]:
    p256 = make_key("p256")
    good_csr = make_csr(p256, None)
    return [
        (
            "malformed-pem",
            pb.MintCertificateRequest(device_id=GOOD_ID, csr_pem="not a CSR"),
            "CSR_MALFORMED",
            "csr_pem",
        ),
        (
            "pem-garbage-body",
            pb.MintCertificateRequest(
                device_id=GOOD_ID,
                csr_pem="-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            ),
            "CSR_MALFORMED",
            "csr_pem",
        ),
        (
            "broken-signature",
            pb.MintCertificateRequest(device_id=GOOD_ID, csr_pem=_broken_signature_csr()),
            "CSR_SIGNATURE_INVALID",
            "csr_pem",
        ),
        (
            "cn-mismatch",
            pb.MintCertificateRequest(device_id=GOOD_ID, csr_pem=make_csr(p256, "someone-else")),
            "CSR_SUBJECT_MISMATCH",
            "csr_pem",
        ),
        (
            "rsa-1024",
            pb.MintCertificateRequest(device_id=GOOD_ID, csr_pem=make_csr(make_key("rsa1024"), GOOD_ID)),
            "KEY_TOO_WEAK",
            "csr_pem",
        ),
        (
            "secp256k1",
            pb.MintCertificateRequest(device_id=GOOD_ID, csr_pem=make_csr(make_key("k256"), GOOD_ID)),
            "KEY_CURVE_UNSUPPORTED",
            "csr_pem",
        ),
        (
            "ed25519",
            pb.MintCertificateRequest(device_id=GOOD_ID, csr_pem=make_csr(make_key("ed25519"), GOOD_ID)),
            "KEY_ALGORITHM_UNSUPPORTED",
            "csr_pem",
        ),
        (
            "unknown-key-algorithm",
            pb.MintCertificateRequest(device_id=GOOD_ID, csr_pem=_unknown_key_algorithm_csr()),
            "KEY_ALGORITHM_UNSUPPORTED",
            "csr_pem",
        ),
        (
            "empty-id",
            pb.MintCertificateRequest(device_id="", csr_pem=good_csr),
            "DEVICE_ID_EMPTY",
            "device_id",
        ),
        (
            "long-id",
            pb.MintCertificateRequest(device_id="a" * 65, csr_pem=good_csr),
            "DEVICE_ID_TOO_LONG",
            "device_id",
        ),
        (
            "bad-characters",
            pb.MintCertificateRequest(device_id="dev ice/1", csr_pem=good_csr),
            "DEVICE_ID_INVALID_CHARACTERS",
            "device_id",
        ),
        (
            "non-ascii",
            pb.MintCertificateRequest(device_id="gerät-1", csr_pem=good_csr),
            "DEVICE_ID_INVALID_CHARACTERS",
            "device_id",
        ),
        (
            "bad-last-character",
            pb.MintCertificateRequest(device_id="device.", csr_pem=good_csr),
            "DEVICE_ID_INVALID_LAST_CHARACTER",
            "device_id",
        ),
        ("unknown-key-type", _server_keygen(99), "KEY_TYPE_UNSUPPORTED", "server_key_generation.key_type"),
        (
            "rsa-other-not-generatable",
            _server_keygen(pb.KEY_TYPE_RSA_OTHER),
            "KEY_TYPE_UNSUPPORTED",
            "server_key_generation.key_type",
        ),
        ("no-key-source", pb.MintCertificateRequest(device_id=GOOD_ID), "KEY_SOURCE_MISSING", "key_source"),
        (
            "validity-beyond-issuer",
            pb.MintCertificateRequest(
                device_id=GOOD_ID, csr_pem=good_csr, validity=duration_pb2.Duration(seconds=11 * 365 * 86400)
            ),
            "VALIDITY_EXCEEDS_ISSUER",
            "validity",
        ),
        (
            "validity-negative",
            pb.MintCertificateRequest(
                device_id=GOOD_ID, csr_pem=good_csr, validity=duration_pb2.Duration(seconds=-5)
            ),
            "VALIDITY_INVALID",
            "validity",
        ),
        (
            "request-id-with-spaces",
            pb.MintCertificateRequest(device_id=GOOD_ID, csr_pem=good_csr, request_id="has spaces"),
            "REQUEST_ID_INVALID",
            "request_id",
        ),
    ]


async def test_each_bad_input_has_its_own_reason_and_writes_nothing(tmp_path: Path) -> None:
    cases = _cases()
    async with running_factory(factory_settings(tmp_path)) as factory:
        for name, request, reason, field in cases:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await factory.stub.MintCertificate(request)
            details = error_details(caught.value)
            assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason), name
            assert [v.field for v in details.field_violations] == [field], name
            assert details.domain == "factory.devprov"
        listing = await factory.stub.ListCertificates(pb.ListCertificatesRequest())
        assert list(listing.certificates) == []
    with sqlite3.connect(tmp_path / "ledger.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM certificates").fetchone() == (0,)
        assert db.execute("SELECT COUNT(*) FROM mint_requests").fetchone() == (0,)


@pytest.mark.parametrize(
    "raw",
    [
        "not-a-guid",
        "3f2a9c1e-0000-4000-8000-00000000000",
        "3f2a9c1e00004000800000000000000a",
        "good-device-1",
    ],
)
async def test_by_default_only_a_guid_is_a_device_id(tmp_path: Path, raw: str) -> None:
    """A typo or a truncated GUID on a label must not become a device: the default policy refuses it at the
    service's boundary (INVALID_ARGUMENT, its reason, a field violation) and nothing is written."""
    good_csr = make_csr(make_key("p256"), raw)
    async with running_factory(factory_settings(tmp_path, device_ids=DeviceIdPolicy.GUID)) as factory:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await factory.stub.MintCertificate(pb.MintCertificateRequest(device_id=raw, csr_pem=good_csr))
        details = error_details(caught.value)
        assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "DEVICE_ID_NOT_A_GUID")
        assert [v.field for v in details.field_violations] == ["device_id"]
        assert raw in details.message
        guid = "3F2A9C1E-0000-4000-8000-00000000000A"
        minted = await factory.stub.MintCertificate(
            pb.MintCertificateRequest(device_id=guid, csr_pem=make_csr(make_key("p256"), guid.lower()))
        )
        assert minted.certificate.device_id == guid.lower()
    with sqlite3.connect(tmp_path / "ledger.sqlite3") as db:
        assert db.execute("SELECT device_id FROM certificates").fetchall() == [(guid.lower(),)]
