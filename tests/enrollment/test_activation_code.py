"""Activation codes: human-typable, 80 bits, only a salted scrypt hash kept, constant-time checks."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from provkit.activation_code import (
    ALPHABET,
    CODE_LENGTH,
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
    first, second = hash_code(code, log2_n=8), hash_code(code, log2_n=8)
    text = json.dumps(first)
    assert code not in text and code.replace("-", "") not in text
    assert first["salt"] != second["salt"] and first["hash"] != second["hash"]
    assert first["alg"] == "scrypt" and first["n"] == 256


def test_wrong_malformed_and_missing():
    code = new_code()
    record = hash_code(code, log2_n=8)
    other = new_code()
    assert not verify_code(other, record)
    assert not verify_code("", record)
    assert not verify_code("ABCD-EFGH", record)
    assert not verify_code(code + "X", record)
    assert not verify_code("UUUU-UUUU-UUUU-UUUU", record)  # U is not in the alphabet
    assert not verify_code(code, None)
    assert not verify_code(code, {"alg": "md5", "hash": record["hash"]})
    assert not verify_code(code, {**record, "n": 3})
    assert not verify_code(code, {**record, "salt": "***"})
    tampered = dict(record)
    tampered["r"] = 1
    assert not verify_code(code, tampered)


@settings(max_examples=30, deadline=None)
@given(st.text(alphabet=ALPHABET, min_size=CODE_LENGTH, max_size=CODE_LENGTH))
def test_format_then_normalise_round_trips(raw):
    assert normalise(format_code(raw)) == raw
