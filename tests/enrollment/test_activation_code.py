"""Activation codes: human-typable, 80 bits, only a salted hash kept (HMAC-SHA-256 by default, scrypt records
of earlier versions still verify), constant-time checks."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provkit.activation_code import (
    ALPHABET,
    CODE_LENGTH,
    CodeHash,
    format_code,
    hash_code,
    new_code,
    normalise,
    verify_code,
)


def test_code_shape_and_entropy():
    code = new_code()
    groups = code.split("-")
    assert [len(g) for g in groups] == [4, 4, 4, 4]
    assert all(c in ALPHABET for c in code.replace("-", ""))
    assert len(ALPHABET) == 32 and CODE_LENGTH * 5 >= 50
    assert len({new_code() for _ in range(200)}) == 200


def test_typing_is_forgiving():
    code = new_code()
    sloppy = code.lower().replace("-", " ").replace("0", "o").replace("1", "l")
    assert normalise(sloppy) == code.replace("-", "")
    record = hash_code(code, log2_n=8)
    assert verify_code(sloppy, record)


def test_record_holds_no_code_and_is_salted():
    code = new_code()
    first, second = hash_code(code), hash_code(code)
    text = json.dumps(first)
    assert code not in text and code.replace("-", "") not in text
    assert first["salt"] != second["salt"] and first["hash"] != second["hash"]
    assert set(first) == {"alg", "salt", "hash"} and first["alg"] == "hmac-sha256"
    scrypt = hash_code(code, alg=CodeHash.SCRYPT, log2_n=8)
    assert scrypt["alg"] == "scrypt" and scrypt["n"] == 256 and verify_code(code, scrypt)


# A record made by the factory before the fast hash (its hash_code, scrypt N = 2^8, r = 8, p = 1; the salt
# fixed), with its code.
OLD_CODE = "7K3M-Q9XD-2HPA-W4RT"
OLD_RECORD = {
    "alg": "scrypt",
    "n": 256,
    "r": 8,
    "p": 1,
    "salt": "3q2+7wABAgMEBQYHCAkKCw==",
    "hash": "aZHCXJoW4Uid4Nd1Cntu91y+pU61YdYcwJXlNTJwX8E=",
}


def test_a_record_of_the_old_scrypt_kind_still_verifies():
    assert verify_code(OLD_CODE, OLD_RECORD)
    assert verify_code(OLD_CODE.lower().replace("-", " "), OLD_RECORD)
    assert not verify_code(new_code(), OLD_RECORD)
    assert not verify_code(OLD_CODE, {**OLD_RECORD, "alg": "hmac-sha256"})  # the kind is not interchangeable


@pytest.mark.parametrize("alg", list(CodeHash))
def test_wrong_malformed_and_missing(alg):
    code = new_code()
    record = hash_code(code, alg=alg, log2_n=8)
    other = new_code()
    assert not verify_code(other, record)
    assert not verify_code("", record)
    assert not verify_code("ABCD-EFGH", record)
    assert not verify_code(code + "X", record)
    assert not verify_code("UUUU-UUUU-UUUU-UUUU", record)  # U is not in the alphabet
    assert not verify_code(code, None)
    assert not verify_code(code, {"alg": "md5", "hash": record["hash"]})
    assert not verify_code(code, {**record, "salt": "***"})
    assert not verify_code(code, {**record, "salt": ""})
    assert not verify_code(code, {k: v for k, v in record.items() if k != "hash"})
    if alg is CodeHash.SCRYPT:
        assert not verify_code(code, {**record, "n": 3})
        assert not verify_code(code, {**record, "r": 1})


@settings(max_examples=30, deadline=None)
@given(st.text(alphabet=ALPHABET, min_size=CODE_LENGTH, max_size=CODE_LENGTH))
def test_format_then_normalise_round_trips(raw):
    assert normalise(format_code(raw)) == raw
