"""Device identity crypto: the hardware GUID, local key generation, the CSR, and checks on a stored
key + certificate chain.  Pure functions over bytes; the state directory does the file handling."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID

from device_client.errors import IdentityError, Reason, UsageError
from provkit.device_id import DeviceIdPolicy, check_device_id
from provkit.errors import InvalidArgument
from provkit.errors import Reason as SharedReason


class KeyType(StrEnum):
    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"


PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def normalise_guid(raw: str, policy: DeviceIdPolicy = DeviceIdPolicy.GUID) -> str:
    """The hardware GUID as DPS registration id and hub device id (lower case) under the suite's device id
    policy (``provkit.device_id``); raises ``UsageError`` on bad input."""
    try:
        return check_device_id(raw, policy)
    except InvalidArgument as exc:
        raise UsageError(exc.message, exc.reason) from None


def generate_key(key_type: KeyType = KeyType.EC_P256) -> PrivateKey:
    if key_type is KeyType.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if key_type is KeyType.EC_P384:
        return ec.generate_private_key(ec.SECP384R1())
    if key_type is KeyType.RSA_2048:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


def key_to_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def build_csr_pem(key: PrivateKey, guid: str) -> bytes:
    algorithm = (
        hashes.SHA384()
        if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256
        else hashes.SHA256()
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, guid)]))
        .sign(key, algorithm)
    )
    return csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class IdentityInfo:
    """What a person (and `status`) needs to know about a stored identity."""

    guid: str
    serial_hex: str
    thumbprint_sha1: str
    thumbprint_sha256: str
    not_before: datetime
    not_after: datetime
    issuer: str
    key_type: str
    chain_length: int


def load_key(pem: bytes, *, source: str) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(
            f"{source}: not a readable unencrypted PEM private key",
            Reason.KEY_CORRUPTED,
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise IdentityError(f"{source}: unsupported key algorithm", Reason.KEY_UNSUPPORTED)
    return key


def load_chain(pem: bytes, *, source: str) -> list[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise IdentityError(
            f"{source}: not a readable PEM certificate chain", Reason.CERTIFICATE_CORRUPTED
        ) from exc
    if not chain:
        raise IdentityError(f"{source}: contains no certificate", Reason.CERTIFICATE_CORRUPTED)
    return chain


def describe_key(key: PrivateKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"ec-{key.curve.name}"
    return f"rsa-{key.key_size}"


def _public_der(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def serial_hex_of(serial: int) -> str:
    """Upper-case hex of the serial's bytes (an even number of digits, as factory_svc reports it)."""
    text = f"{serial:X}"
    return text if len(text) % 2 == 0 else "0" + text


def inspect_identity(
    guid: str, key: PrivateKey, chain: list[x509.Certificate], *, source: str
) -> IdentityInfo:
    """Check that ``key`` + ``chain`` belong together and to device ``guid`` (validity is not checked)."""
    leaf = chain[0]
    if _public_der(key.public_key()) != _public_der(leaf.public_key()):
        raise IdentityError(
            f"{source}: the private key does not match the device certificate (re-provision with --force)",
            Reason.KEY_CERTIFICATE_MISMATCH,
        )
    cns = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value).lower() if cns else ""
    if cn != guid:
        raise IdentityError(
            f"{source}: the certificate is for {cn or '(no CN)'!r}, not for device {guid!r}",
            SharedReason.CERTIFICATE_SUBJECT_MISMATCH,
        )
    info = IdentityInfo(
        guid=guid,
        serial_hex=serial_hex_of(leaf.serial_number),
        thumbprint_sha1=leaf.fingerprint(hashes.SHA1()).hex().upper(),  # noqa: S303 - Azure's thumbprint
        thumbprint_sha256=leaf.fingerprint(hashes.SHA256()).hex().upper(),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        issuer=leaf.issuer.rfc4514_string(),
        key_type=describe_key(key),
        chain_length=len(chain),
    )
    return info


def check_validity(info: IdentityInfo, *, now: datetime, source: str) -> None:
    """Raise when the certificate cannot be used at ``now``."""
    if now >= info.not_after:
        raise IdentityError(
            f"{source}: the device certificate expired at {info.not_after.isoformat()} "
            f"(serial {info.serial_hex}); re-provision the device",
            SharedReason.CERTIFICATE_EXPIRED,
            {"not_after": info.not_after.isoformat()},
        )
    if now < info.not_before:
        raise IdentityError(
            f"{source}: the device certificate is not valid before {info.not_before.isoformat()}; "
            "check the device clock",
            SharedReason.CERTIFICATE_NOT_YET_VALID,
            {"not_before": info.not_before.isoformat()},
        )
