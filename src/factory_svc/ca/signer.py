"""CA signers: the only code that uses the issuing CA's private key.

``CaSigner`` (Protocol): ``public_key``, ``sign_certificate(builder)``, ``sign_crl(builder)`` (the builder
is complete, issuer name included), ``close()`` and ``thread``: None when signing is sub-millisecond work in
this process (asyncio code calls it inline), or the executor asyncio code must sign on so that a slow
device never stalls the event loop (``IssuingCA.sign`` does).  Backends, chosen by ``ca.backend``:

- ``FileSigner`` (``file``): a key held in memory, loaded from a PEM file (development, or a CA whose key
  lives on disk);
- ``factory_svc.ca.pkcs11_signer.Pkcs11Signer`` (``pkcs11``): a non-extractable key inside a PKCS#11 token,
  used by label.

A token signs bytes, not certificates: ``ExternalSignature`` builds the to-be-signed structure with a
throw-away key of the same algorithm (so the signature algorithm fields are the right ones), has the token
sign its DER and puts the token's signature in place of the throw-away one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
CaPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class CaSigner(Protocol):
    @property
    def public_key(self) -> CaPublicKey: ...

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate: ...

    def sign_crl(self, builder: x509.CertificateRevocationListBuilder) -> x509.CertificateRevocationList: ...

    def close(self) -> None: ...

    @property
    def thread(self) -> Executor | None: ...


HashChoice = hashes.SHA256 | hashes.SHA384


def hash_for(key: CaKey | CaPublicKey) -> HashChoice:
    """SHA-384 for P-384 (and larger curves), SHA-256 otherwise."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


@dataclass(frozen=True)
class FileSigner:
    key: CaKey

    @property
    def public_key(self) -> CaPublicKey:
        return self.key.public_key()

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return builder.sign(self.key, hash_for(self.key))

    def sign_crl(self, builder: x509.CertificateRevocationListBuilder) -> x509.CertificateRevocationList:
        return builder.sign(self.key, hash_for(self.key))

    def close(self) -> None:
        return None

    @property
    def thread(self) -> Executor | None:
        return None  # a key in memory signs in about 0.1 ms: inline, no thread hand-off


# ------------------------------------------------------------------------------------- external signing
def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    raw = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _der_element_end(data: bytes, offset: int) -> tuple[int, int]:
    """(start of the contents, end of the element) of the DER element at ``offset``."""
    first = data[offset + 1]
    start = offset + 2
    if first < 0x80:
        return start, start + first
    count = first & 0x7F
    length = int.from_bytes(data[start : start + count], "big")
    return start + count, start + count + length


def replace_signature(signed_der: bytes, signature: bytes) -> bytes:
    """``SEQUENCE {tbs, algorithm, BIT STRING}`` with the BIT STRING's signature replaced (X.509
    certificates and CRLs share this outer shape)."""
    contents, end = _der_element_end(signed_der, 0)
    if signed_der[0] != 0x30 or end != len(signed_der):
        raise ValueError("not a DER SEQUENCE")
    _, tbs_end = _der_element_end(signed_der, contents)
    _, algorithm_end = _der_element_end(signed_der, tbs_end)
    bit_string = b"\x00" + signature
    body = signed_der[contents:algorithm_end] + b"\x03" + _der_length(len(bit_string)) + bit_string
    return b"\x30" + _der_length(len(body)) + body


_CURVES: dict[int, ec.EllipticCurve] = {256: ec.SECP256R1(), 384: ec.SECP384R1()}


@dataclass
class ExternalSignature:
    """Certificates and CRLs signed by a function that signs a digest (an ECDSA key elsewhere).

    ``sign_digest(digest) -> raw r||s`` (PKCS#11's CKM_ECDSA output)."""

    public_key: ec.EllipticCurvePublicKey
    sign_digest: Callable[[bytes], bytes]
    _stand_in: ec.EllipticCurvePrivateKey = field(init=False)
    _hash: HashChoice = field(init=False)

    def __post_init__(self) -> None:
        curve = _CURVES.get(self.public_key.curve.key_size)
        if curve is None or self.public_key.curve.name != curve.name:
            name = self.public_key.curve.name
            raise ValueError(f"issuing keys on {name} are not supported; use P-256 or P-384")
        self._stand_in = ec.generate_private_key(curve)
        self._hash = hash_for(self.public_key)

    def _signature(self, tbs: bytes) -> bytes:
        digest = hashlib.new(self._hash.name, tbs).digest()
        raw = self.sign_digest(digest)
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        draft = builder.sign(self._stand_in, self._hash)
        signature = self._signature(draft.tbs_certificate_bytes)
        der = replace_signature(draft.public_bytes(Encoding.DER), signature)
        return x509.load_der_x509_certificate(der)

    def sign_crl(self, builder: x509.CertificateRevocationListBuilder) -> x509.CertificateRevocationList:
        draft = builder.sign(self._stand_in, self._hash)
        der = replace_signature(draft.public_bytes(Encoding.DER), self._signature(draft.tbs_certlist_bytes))
        return x509.load_der_x509_crl(der)
