"""The activation-code hash gives the same bytes whichever scrypt implementation computes it (libsodium via
PyNaCl, or OpenSSL via hashlib), so a record written by one side verifies on the other."""

from __future__ import annotations

import base64
import hashlib
import secrets

import pytest

from provkit import activation_code
from provkit.activation_code import hash_code, new_code, normalise, verify_code


def test_the_fast_implementation_is_in_use():
    assert activation_code._SCRYPT is not activation_code._openssl_scrypt


@pytest.mark.parametrize("log2_n", [8, 10])
def test_libsodium_and_openssl_agree(log2_n):
    for _ in range(20):
        password, salt = secrets.token_bytes(16), secrets.token_bytes(16)
        assert activation_code._SCRYPT(password, salt, 1 << log2_n) == activation_code._openssl_scrypt(
            password, salt, 1 << log2_n
        )


def test_a_record_verifies_with_hashlib_alone(monkeypatch):
    code = new_code()
    record = hash_code(code, log2_n=8)
    expected = hashlib.scrypt(
        normalise(code).encode("ascii"),
        salt=base64.b64decode(record["salt"]),
        n=record["n"],
        r=record["r"],
        p=record["p"],
        dklen=32,
    )
    assert base64.b64decode(record["hash"]) == expected
    monkeypatch.setattr(activation_code, "_SCRYPT", activation_code._openssl_scrypt)
    assert verify_code(code, record)
    assert not verify_code(new_code(), record)
