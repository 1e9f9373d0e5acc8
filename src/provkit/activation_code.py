"""One-time activation codes: made by factory_svc at enrollment, checked by activation_svc.

A code is 16 Crockford base32 characters (80 bits from ``secrets``), printed in four groups:
``7K3M-Q9XD-2HPA-W4RT``.  Typing is forgiving: case, spaces and dashes are ignored, ``O`` reads as ``0``
and ``I``/``L`` as ``1``.  Only a salted hash is kept -- in the DPS enrollment's ``optionalDeviceInformation``
under ``activationCode`` -- so activation_svc needs no database shared with the factory.  Verification
recomputes the hash with the stored parameters and compares in constant time.

Two kinds of record, told apart by ``alg``; both verify whatever the factory makes now:

- ``hmac-sha256`` (the default): HMAC-SHA-256 of the canonical code keyed with a 16-byte random salt
  (``{"alg", "salt", "hash"}``), about a microsecond.  The code is 80 random bits made by the machine,
  not a password: guessing it offline from a stolen record is bounded by the 2^80 codes, not by the
  hash's cost (the README's "Why guessing stays infeasible" has the numbers).
- ``scrypt`` (the default before; still made when configured): ``{"alg", "n", "r", "p", "salt",
  "hash"}``, N = 2^log2_n, r = 8, p = 1.  scrypt runs in libsodium (PyNaCl) when it is there -- the same
  function, parameters and bytes as ``hashlib.scrypt`` (OpenSSL), with a vectorised core -- and in
  ``hashlib`` otherwise.  Both release the GIL, so hashing in worker threads uses the other cores.

API
---
``new_code() -> str``                         a fresh code (formatted).
``new_codes(count, *, alg, log2_n) -> list``  fresh codes with their records (batches).
``normalise(code) -> str | None``             the 16 canonical characters, or None if it cannot be a code.
``hash_code(code, *, alg=DEFAULT_HASH, log2_n=DEFAULT_LOG2_N) -> dict``   the JSON record to store.
``CodeHash``                                  the kinds of record (``hmac-sha256``, ``scrypt``).
``verify_code(code, record) -> bool``         constant-time check against a stored record.
``CODE_RECORD_KEY``                           the key in optionalDeviceInformation.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping
from typing import Any

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_LENGTH = 16  # 16 x 5 bits = 80 bits
GROUP = 4
CODE_RECORD_KEY = "activationCode"
DEFAULT_LOG2_N = 8  # scrypt (when chosen): N = 256, r = 8, 256 KiB of memory per guess
_R, _P, _DKLEN = 8, 1, 32
_MIN_LOG2_N, _MAX_LOG2_N = 8, 20
_ALIASES = {"O": "0", "I": "1", "L": "1"}


_CODE_BYTES = CODE_LENGTH * 5 // 8  # exactly 80 random bits
_SALT_BYTES = 16


def _canonical_from(random: bytes) -> str:
    value = int.from_bytes(random, "big")
    return "".join([ALPHABET[(value >> (5 * i)) & 31] for i in range(CODE_LENGTH)])


def _code_from(random: bytes) -> str:
    return format_code(_canonical_from(random))


def new_code() -> str:
    return _code_from(secrets.token_bytes(_CODE_BYTES))


def format_code(canonical: str) -> str:
    return "-".join(canonical[i : i + GROUP] for i in range(0, len(canonical), GROUP))


def normalise(code: str) -> str | None:
    chars = []
    for c in code.upper():
        if c in " -\t":
            continue
        c = _ALIASES.get(c, c)
        if c not in ALPHABET:
            return None
        chars.append(c)
    if len(chars) != CODE_LENGTH:
        return None
    return "".join(chars)


def _openssl_scrypt(password: bytes, salt: bytes, n: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=_R, p=_P, dklen=_DKLEN, maxmem=256 << 20)


def _sodium() -> Callable[[bytes, bytes, int], bytes] | None:
    try:
        from nacl import bindings
    except ImportError:  # pragma: no cover - PyNaCl is a dependency; hashlib still gives the same bytes
        return None
    if not getattr(bindings, "has_crypto_pwhash_scryptsalsa208sha256", False):  # pragma: no cover
        return None
    low_level = bindings.crypto_pwhash_scryptsalsa208sha256_ll

    def scrypt(password: bytes, salt: bytes, n: int) -> bytes:
        return low_level(password, salt, n, _R, _P, dklen=_DKLEN, maxmem=256 << 20)

    return scrypt


_SCRYPT = _sodium() or _openssl_scrypt


def _scrypt_derive(canonical: str, salt: bytes, log2_n: int) -> bytes:
    return _SCRYPT(canonical.encode("ascii"), salt, 1 << log2_n)


def _hmac_derive(canonical: str, salt: bytes) -> bytes:
    # hmac.new, not hmac.digest: the one-shot function lets go of the GIL for every call, and taking it back
    # behind busy worker threads (the lint's signature checks) cost ~30x the hash itself in a busy service.
    return hmac.new(salt, canonical.encode("ascii"), "sha256").digest()


class CodeHash(enum.Enum):
    """How a new code's record is made (every kind verifies, whatever the setting)."""

    HMAC_SHA256 = "hmac-sha256"  # the default: one keyed SHA-256, the salt as the key
    SCRYPT = "scrypt"  # memory-hard, cost ``log2_n``; the default before the fast hash


DEFAULT_HASH = CodeHash.HMAC_SHA256


def hash_code(code: str, *, alg: CodeHash = DEFAULT_HASH, log2_n: int = DEFAULT_LOG2_N) -> dict[str, Any]:
    return _record(code, secrets.token_bytes(_SALT_BYTES), alg, log2_n)


def new_codes(
    count: int, *, alg: CodeHash = DEFAULT_HASH, log2_n: int = DEFAULT_LOG2_N
) -> list[tuple[str, dict[str, Any]]]:
    """``count`` fresh codes with their records, as ``new_code`` + ``hash_code`` make them.  All the
    randomness comes from one ``secrets`` call: in a worker thread every call that releases the GIL
    (the random source does, as scrypt does) means queueing for it again behind the event loop."""
    random = secrets.token_bytes(count * (_CODE_BYTES + _SALT_BYTES))
    out = []
    for k in range(count):
        chunk = random[k * (_CODE_BYTES + _SALT_BYTES) : (k + 1) * (_CODE_BYTES + _SALT_BYTES)]
        canonical = _canonical_from(chunk[:_CODE_BYTES])
        out.append((format_code(canonical), _canonical_record(canonical, chunk[_CODE_BYTES:], alg, log2_n)))
    return out


def _record(code: str, salt: bytes, alg: CodeHash, log2_n: int) -> dict[str, Any]:
    canonical = normalise(code)
    if canonical is None:
        raise ValueError("not an activation code")
    return _canonical_record(canonical, salt, alg, log2_n)


def _canonical_record(canonical: str, salt: bytes, alg: CodeHash, log2_n: int) -> dict[str, Any]:
    salt_text = base64.b64encode(salt).decode()
    if alg is CodeHash.HMAC_SHA256:
        digest = base64.b64encode(_hmac_derive(canonical, salt)).decode()
        return {"alg": alg.value, "salt": salt_text, "hash": digest}
    if not _MIN_LOG2_N <= log2_n <= _MAX_LOG2_N:
        raise ValueError(f"scrypt cost log2(N) must be within {_MIN_LOG2_N}..{_MAX_LOG2_N}")
    return {
        "alg": alg.value,
        "n": 1 << log2_n,
        "r": _R,
        "p": _P,
        "salt": salt_text,
        "hash": base64.b64encode(_scrypt_derive(canonical, salt, log2_n)).decode(),
    }


def verify_code(code: str, record: Mapping[str, Any] | None) -> bool:
    """True when ``code`` matches ``record`` (either kind of record).  Malformed input or records are simply
    False.  The work does not depend on the code: a malformed code is hashed like a well-formed one, with
    the record's own parameters; a missing record or one of an unknown kind costs one default hash (a new
    record's), and the comparison is constant-time."""
    canonical = normalise(code) if isinstance(code, str) else None
    candidate = canonical or "0" * CODE_LENGTH
    alg = record.get("alg") if isinstance(record, Mapping) else None
    try:
        if alg == CodeHash.SCRYPT.value and record is not None:
            return _verify_scrypt(candidate, record) and canonical is not None
        if alg == CodeHash.HMAC_SHA256.value and record is not None:
            salt = base64.b64decode(record["salt"], validate=True)
            expected = base64.b64decode(record["hash"], validate=True)
            actual = _hmac_derive(candidate, salt)
            return hmac.compare_digest(actual, expected) and canonical is not None and len(salt) > 0
    except (KeyError, TypeError, ValueError):
        return False
    hmac.compare_digest(_hmac_derive(candidate, b"\0" * _SALT_BYTES), b"")  # no record: the same work
    return False


def _verify_scrypt(candidate: str, record: Mapping[str, Any]) -> bool:
    """A record of the scrypt kind (written before the fast hash was the default, or by choice)."""
    n = int(record["n"])
    salt = base64.b64decode(record["salt"])
    expected = base64.b64decode(record["hash"])
    valid_params = int(record.get("r", 0)) == _R and int(record.get("p", 0)) == _P
    log2_n = n.bit_length() - 1
    if n != 1 << log2_n or not _MIN_LOG2_N <= log2_n <= _MAX_LOG2_N:
        return False
    actual = _scrypt_derive(candidate, salt, log2_n)
    return hmac.compare_digest(actual, expected) and valid_params
