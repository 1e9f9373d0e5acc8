"""One-time activation codes: made by factory_svc at enrollment, checked by activation_svc.

A code is 16 Crockford base32 characters (80 bits from ``secrets``), printed in four groups:
``7K3M-Q9XD-2HPA-W4RT``.  Typing is forgiving: case, spaces and dashes are ignored, ``O`` reads as ``0``
and ``I``/``L`` as ``1``.  Only a salted scrypt hash is kept -- in the DPS enrollment's
``optionalDeviceInformation`` under ``activationCode`` -- so activation_svc needs no database shared with
the factory.  Verification recomputes the hash with the stored parameters and compares in constant time.

scrypt runs in libsodium (PyNaCl) when it is there -- the same function, parameters and bytes as
``hashlib.scrypt`` (OpenSSL), with a vectorised core that needs well under half the instructions -- and in
``hashlib`` otherwise.  Both release the GIL, so hashing in worker threads uses the other cores.

API
---
``new_code() -> str``                         a fresh code (formatted).
``new_codes(count, *, log2_n) -> list``       fresh codes with their records (batches, worker threads).
``normalise(code) -> str | None``             the 16 canonical characters, or None if it cannot be a code.
``hash_code(code, *, log2_n=DEFAULT_LOG2_N) -> dict``   the JSON record to store.
``verify_code(code, record) -> bool``         constant-time check against a stored record.
``CODE_RECORD_KEY``                           the key in optionalDeviceInformation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping
from typing import Any

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_LENGTH = 16  # 16 x 5 bits = 80 bits
GROUP = 4
CODE_RECORD_KEY = "activationCode"
DEFAULT_LOG2_N = 8  # scrypt N = 256, r = 8: 256 KiB of memory per guess (80-bit codes: ample)
_R, _P, _DKLEN = 8, 1, 32
_MIN_LOG2_N, _MAX_LOG2_N = 8, 20
_ALIASES = {"O": "0", "I": "1", "L": "1"}


_CODE_BYTES = CODE_LENGTH * 5 // 8  # exactly 80 random bits
_SALT_BYTES = 16


def _code_from(random: bytes) -> str:
    value = int.from_bytes(random, "big")
    return format_code("".join(ALPHABET[(value >> (5 * i)) & 31] for i in range(CODE_LENGTH)))


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


def _derive(canonical: str, salt: bytes, log2_n: int) -> bytes:
    return _SCRYPT(canonical.encode("ascii"), salt, 1 << log2_n)


def hash_code(code: str, *, log2_n: int = DEFAULT_LOG2_N) -> dict[str, Any]:
    return _record(code, secrets.token_bytes(_SALT_BYTES), log2_n)


def new_codes(count: int, *, log2_n: int = DEFAULT_LOG2_N) -> list[tuple[str, dict[str, Any]]]:
    """``count`` fresh codes with their records, as ``new_code`` + ``hash_code`` make them.  All the
    randomness comes from one ``secrets`` call: in a worker thread every call that releases the GIL
    (the random source does, as scrypt does) means queueing for it again behind the event loop."""
    random = secrets.token_bytes(count * (_CODE_BYTES + _SALT_BYTES))
    out = []
    for k in range(count):
        chunk = random[k * (_CODE_BYTES + _SALT_BYTES) : (k + 1) * (_CODE_BYTES + _SALT_BYTES)]
        code = _code_from(chunk[:_CODE_BYTES])
        out.append((code, _record(code, chunk[_CODE_BYTES:], log2_n)))
    return out


def _record(code: str, salt: bytes, log2_n: int) -> dict[str, Any]:
    canonical = normalise(code)
    if canonical is None:
        raise ValueError("not an activation code")
    if not _MIN_LOG2_N <= log2_n <= _MAX_LOG2_N:
        raise ValueError(f"scrypt cost log2(N) must be within {_MIN_LOG2_N}..{_MAX_LOG2_N}")
    return {
        "alg": "scrypt",
        "n": 1 << log2_n,
        "r": _R,
        "p": _P,
        "salt": base64.b64encode(salt).decode(),
        "hash": base64.b64encode(_derive(canonical, salt, log2_n)).decode(),
    }


def verify_code(code: str, record: Mapping[str, Any] | None) -> bool:
    """True when ``code`` matches ``record``.  Malformed input or records are simply False."""
    dummy = record is None or not isinstance(record, Mapping) or record.get("alg") != "scrypt"
    try:
        n = int(record["n"]) if not dummy and record is not None else 1 << DEFAULT_LOG2_N
        salt = base64.b64decode(record["salt"]) if not dummy and record is not None else b"\0" * 16
        expected = base64.b64decode(record["hash"]) if not dummy and record is not None else b""
        valid_params = (
            not dummy
            and record is not None
            and int(record.get("r", 0)) == _R
            and int(record.get("p", 0)) == _P
        )
    except (KeyError, TypeError, ValueError):
        return False
    log2_n = n.bit_length() - 1
    if n != 1 << log2_n or not _MIN_LOG2_N <= log2_n <= _MAX_LOG2_N:
        return False
    canonical = normalise(code) if isinstance(code, str) else None
    # Spend the same work whether or not the code or the record is well formed.
    actual = _derive(canonical or "0" * CODE_LENGTH, salt, log2_n)
    return hmac.compare_digest(actual, expected) and canonical is not None and valid_params
