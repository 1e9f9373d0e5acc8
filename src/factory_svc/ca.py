"""The issuing CA behind a small interface, so an HSM-backed signer can replace the local key.

``IssuingCA`` (Protocol): ``certificate`` (the issuing CA certificate), ``chain`` (issuing CA ... root,
in that order) and ``async sign(builder) -> Certificate`` (sets the issuer name and signs).  Minting only
uses this interface.

``LocalIssuingCA``: a key held in memory, loaded from PEM files.
``open_dev_ca(ca_dir, clock)``: the development CA kept in ``<data_dir>/ca`` — created on first start
(an ECDSA P-384 root and an ECDSA P-256 issuing CA, keys 0600), reused afterwards.
``load_configured_ca(chain_file, key_file, passphrase)``: an issuing CA chain (issuing CA first, ending
with the self-signed root) and its key (PEM, optionally encrypted with the passphrase).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from factory_svc.errors import CaConfigError
from provkit.devpki import CA_KEY_USAGE, write_private_file

Clock = Callable[[], datetime]

ROOT_CERT, ROOT_KEY = "root-ca.pem", "root-ca.key"
ISSUING_CERT, ISSUING_KEY = "issuing-ca.pem", "issuing-ca.key"
ROOT_LIFETIME = timedelta(days=20 * 365)
ISSUING_LIFETIME = timedelta(days=10 * 365)


class IssuingCA(Protocol):
    @property
    def certificate(self) -> x509.Certificate: ...

    @property
    def chain(self) -> tuple[x509.Certificate, ...]: ...

    async def sign(self, builder: x509.CertificateBuilder) -> x509.Certificate: ...


CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _hash_for(key: CaKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


@dataclass(frozen=True)
class LocalIssuingCA:
    certificate: x509.Certificate
    key: CaKey
    chain: tuple[x509.Certificate, ...]  # issuing CA first, root last

    def __post_init__(self) -> None:
        if self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != self.certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise CaConfigError("the issuing CA key does not match the issuing CA certificate")
        try:
            constraints = self.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            raise CaConfigError("the issuing CA certificate has no BasicConstraints extension") from None
        if not constraints.ca:
            raise CaConfigError("the issuing CA certificate is not a CA certificate")
        if not self.chain or self.chain[0] != self.certificate:
            raise CaConfigError("the chain must start with the issuing CA certificate")
        if self.chain[-1].subject != self.chain[-1].issuer:
            raise CaConfigError("the chain must end with the self-signed root certificate")

    async def sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return self.sign_now(builder)

    def sign_now(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """Synchronous signing (a local key needs no waiting); ``sign`` is the interface minting uses."""
        return builder.issuer_name(self.certificate.subject).sign(self.key, _hash_for(self.key))


# ---------------------------------------------------------------------------------------- development CA
def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "devprov development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_certificate(
    subject: x509.Name,
    key: CaKey,
    issuer: x509.Certificate | None,
    issuer_key: CaKey,
    now: datetime,
    lifetime: timedelta,
    path_length: int | None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            CA_KEY_USAGE,
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    return builder.sign(issuer_key, _hash_for(issuer_key))


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: CaKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _create_dev_ca(ca_dir: Path, now: datetime) -> None:
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = _ca_certificate(
        _name("devprov development root CA"), root_key, None, root_key, now, ROOT_LIFETIME, 1
    )
    issuing_key = ec.generate_private_key(ec.SECP256R1())
    issuing = _ca_certificate(
        _name("devprov development issuing CA"), issuing_key, root, root_key, now, ISSUING_LIFETIME, 0
    )
    ca_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ca-", dir=ca_dir.parent))
    try:
        (staging / ROOT_CERT).write_bytes(_pem(root))
        (staging / ISSUING_CERT).write_bytes(_pem(issuing))
        write_private_file(staging / ROOT_KEY, _key_pem(root_key))
        write_private_file(staging / ISSUING_KEY, _key_pem(issuing_key))
        os.chmod(staging, 0o700)
        os.rename(staging, ca_dir)  # all four files appear at once, or none
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def open_dev_ca(ca_dir: Path, clock: Clock) -> LocalIssuingCA:
    if not ca_dir.exists():
        _create_dev_ca(ca_dir, clock())
    try:
        root = x509.load_pem_x509_certificate((ca_dir / ROOT_CERT).read_bytes())
        issuing = x509.load_pem_x509_certificate((ca_dir / ISSUING_CERT).read_bytes())
        key = serialization.load_pem_private_key((ca_dir / ISSUING_KEY).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise CaConfigError(f"the development CA in {ca_dir} is unreadable: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaConfigError("the development issuing CA key is neither ECDSA nor RSA")
    return LocalIssuingCA(issuing, key, (issuing, root))


def load_configured_ca(chain_file: Path, key_file: Path, passphrase: str | None) -> LocalIssuingCA:
    try:
        chain = tuple(x509.load_pem_x509_certificates(chain_file.read_bytes()))
    except (OSError, ValueError) as exc:
        raise CaConfigError(f"cannot read the CA chain {chain_file}: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(
            key_file.read_bytes(), password=passphrase.encode() if passphrase else None
        )
    except TypeError as exc:
        raise CaConfigError(f"the CA key {key_file} needs a passphrase (or has none): {exc}") from exc
    except (OSError, ValueError) as exc:
        raise CaConfigError(f"cannot read the CA key {key_file} (wrong passphrase?)") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaConfigError("the issuing CA key must be ECDSA or RSA")
    if not chain:
        raise CaConfigError(f"{chain_file} holds no certificates")
    return LocalIssuingCA(chain[0], key, chain)


def now_utc() -> datetime:
    return datetime.now(UTC)
