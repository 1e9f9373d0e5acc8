"""The device reports its certificate's serial as factory_svc does: upper-case hex of whole bytes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_client.identity import inspect_identity
from factory_svc.mint.service import serial_hex


def _self_signed(guid: str, serial: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, guid)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return key, cert


@pytest.mark.parametrize("serial", [0xABC, 0x0F, 0x1234, 0x0ABCDEF0123456789])
def test_serial_hex_matches_the_factory_ledger(serial):
    key, cert = _self_signed("gw-serial", serial)
    info = inspect_identity("gw-serial", key, [cert], source="test")
    assert info.serial_hex == serial_hex(serial)
    assert len(info.serial_hex) % 2 == 0 and int(info.serial_hex, 16) == serial
