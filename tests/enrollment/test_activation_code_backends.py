"""The activation-code hashes are the documented functions: scrypt gives the same bytes whichever
implementation computes it (libsodium via PyNaCl, or OpenSSL via hashlib), so a record written by one side
verifies on the other; the default record is HMAC-SHA-256 keyed with its salt."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

import pytest

from provkit import activation_code
from provkit.activation_code import CodeHash, hash_code, new_code, new_codes, normalise, verify_code


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
    record = hash_code(code, alg=CodeHash.SCRYPT, log2_n=8)
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


def test_codes_made_in_a_batch_are_distinct_salted_and_verify():
    batch = new_codes(50)
    codes = [code for code, _ in batch]
    assert len(set(codes)) == 50 and all(normalise(c) for c in codes)
    assert len({record["salt"] for _, record in batch}) == 50
    assert all(verify_code(code, record) for code, record in batch)
    assert not verify_code(codes[0], batch[1][1])


def test_the_default_record_is_hmac_sha256_keyed_with_its_salt():
    code = new_code()
    record = hash_code(code)
    salt = base64.b64decode(record["salt"])
    expected = hmac.new(salt, normalise(code).encode("ascii"), hashlib.sha256).digest()
    assert record["alg"] == "hmac-sha256" and len(salt) == 16
    assert base64.b64decode(record["hash"]) == expected
