"""Key types a device certificate may carry: classification of public keys and server-side generation."""

from __future__ import annotations

import enum

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from factory_svc.errors import Reason, invalid_field

MIN_RSA_BITS = 2048

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class KeyType(enum.Enum):
    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_OTHER = "rsa-other"  # RSA >= 2048 of another size, accepted from CSRs only


GENERATABLE = (KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048, KeyType.RSA_3072)
_CURVES = {"secp256r1": KeyType.EC_P256, "secp384r1": KeyType.EC_P384}


def classify_public_key(key: object, field: str = "csr_pem") -> tuple[KeyType, PublicKey]:
    if isinstance(key, ec.EllipticCurvePublicKey):
        kind = _CURVES.get(key.curve.name)
        if kind is None:
            raise invalid_field(
                field,
                Reason.KEY_CURVE_UNSUPPORTED,
                f"elliptic curve {key.curve.name} is not supported; use P-256 or P-384",
                curve=key.curve.name,
            )
        return kind, key
    if isinstance(key, rsa.RSAPublicKey):
        bits = key.key_size
        if bits < MIN_RSA_BITS:
            raise invalid_field(
                field,
                Reason.KEY_TOO_WEAK,
                f"RSA keys need at least {MIN_RSA_BITS} bits; this one has {bits}",
                key_bits=str(bits),
            )
        return {2048: KeyType.RSA_2048, 3072: KeyType.RSA_3072}.get(bits, KeyType.RSA_OTHER), key
    raise invalid_field(
        field,
        Reason.KEY_ALGORITHM_UNSUPPORTED,
        f"{type(key).__name__.lstrip('_')} keys are not supported; use ECDSA P-256/P-384 or RSA >= 2048",
    )


def generate_private_key(kind: KeyType) -> PrivateKey:
    if kind is KeyType.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if kind is KeyType.EC_P384:
        return ec.generate_private_key(ec.SECP384R1())
    if kind is KeyType.RSA_2048:
        return rsa.generate_private_key(65537, 2048)
    if kind is KeyType.RSA_3072:
        return rsa.generate_private_key(65537, 3072)
    raise invalid_field(
        "server_key_generation.key_type", Reason.KEY_TYPE_UNSUPPORTED, f"cannot generate {kind.value} keys"
    )


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
