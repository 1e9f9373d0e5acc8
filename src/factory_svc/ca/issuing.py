"""The issuing CA: its certificate, its chain and the signer that holds its key.

``IssuingCA``: ``certificate`` (the issuing CA certificate), ``chain`` (issuing CA ... root, in that
order), ``signer`` (``factory_svc.ca.signer.CaSigner``: the only code that uses the key), ``async
sign(builder) -> Certificate`` (sets the issuer name and signs) and ``sign_crl(builder)``.  Minting and
revocation only use this object.

``open_dev_ca(ca_dir, clock)``: the development CA kept in ``<data_dir>/ca`` — created on first start
(an ECDSA P-384 root and an ECDSA P-256 issuing CA, keys 0600), reused afterwards.
``load_configured_ca(chain_file, key_file, passphrase)``: an issuing CA chain (issuing CA first, ending
with the self-signed root) and its key (PEM, optionally encrypted with the passphrase).
``load_chain(chain_file)``: such a chain alone (the ``pkcs11`` backend keeps the key in the token).
``issuing_ca_certificate(...)``: the certificate ``factory-svc ca init`` makes for a new issuing key.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from factory_svc.ca.signer import CaKey, CaPublicKey, CaSigner, FileSigner
from factory_svc.errors import CaConfigError
from litestore import private_directory
from provkit.clock import Clock
from provkit.devpki import CA_KEY_USAGE, write_private_file

ROOT_CERT, ROOT_KEY = "root-ca.pem", "root-ca.key"
ISSUING_CERT, ISSUING_KEY = "issuing-ca.pem", "issuing-ca.key"
ROOT_LIFETIME = timedelta(days=20 * 365)
ISSUING_LIFETIME = timedelta(days=10 * 365)


def _spki(key: CaPublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class IssuingCA:
    certificate: x509.Certificate
    signer: CaSigner
    chain: tuple[x509.Certificate, ...]  # issuing CA first, root last

    def __post_init__(self) -> None:
        if _spki(self.signer.public_key) != _spki(self.certificate.public_key()):  # type: ignore[arg-type]
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
        """What asyncio code awaits: inline for a key in memory, on the signer's thread for a token."""
        thread = self.signer.thread
        if thread is None:
            return self.sign_now(builder)
        return await asyncio.get_running_loop().run_in_executor(thread, self.sign_now, builder)

    def sign_now(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """Synchronous signing on the caller's thread (the CLI, benchmarks; ``sign`` for asyncio code)."""
        return self.signer.sign_certificate(builder.issuer_name(self.certificate.subject))

    def sign_crl(self, builder: x509.CertificateRevocationListBuilder) -> x509.CertificateRevocationList:
        return self.signer.sign_crl(builder.issuer_name(self.certificate.subject))

    def close(self) -> None:
        self.signer.close()


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
    public_key: CaPublicKey,
    issuer: x509.Certificate | None,
    issuer_signer: CaSigner,
    now: datetime,
    lifetime: timedelta,
    path_length: int | None,
) -> x509.Certificate:
    """A CA certificate for ``public_key``, signed by ``issuer_signer`` (self-signed when no issuer)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_signer.public_key), critical=False
        )
    return issuer_signer.sign_certificate(builder)


def issuing_ca_certificate(
    common_name: str,
    organization: str,
    signer: CaSigner,
    parent: IssuingCA | None,
    now: datetime,
    lifetime: timedelta = ISSUING_LIFETIME,
) -> x509.Certificate:
    """The certificate of a new issuing CA whose key ``signer`` holds: signed by ``parent`` (a root or
    intermediate), or self-signed when there is none.  Issues end-entity certificates only."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    if parent is None:
        return _ca_certificate(subject, signer.public_key, None, signer, now, lifetime, 0)
    end = min(now + lifetime, parent.certificate.not_valid_after_utc)
    return _ca_certificate(
        subject, signer.public_key, parent.certificate, parent.signer, now, end - now, 0
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: CaKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _create_dev_ca(ca_dir: Path, now: datetime) -> None:
    root_key = ec.generate_private_key(ec.SECP384R1())
    root_signer = FileSigner(root_key)
    root = _ca_certificate(
        _name("devprov development root CA"), root_key.public_key(), None, root_signer, now, ROOT_LIFETIME, 1
    )
    issuing_key = ec.generate_private_key(ec.SECP256R1())
    issuing = _ca_certificate(
        _name("devprov development issuing CA"),
        issuing_key.public_key(),
        root,
        root_signer,
        now,
        ISSUING_LIFETIME,
        0,
    )
    private_directory(ca_dir.parent)
    staging = Path(tempfile.mkdtemp(prefix=".ca-", dir=ca_dir.parent))
    try:
        (staging / ROOT_CERT).write_bytes(_pem(root))
        (staging / ISSUING_CERT).write_bytes(_pem(issuing))
        write_private_file(staging / ROOT_KEY, _key_pem(root_key))
        write_private_file(staging / ISSUING_KEY, _key_pem(issuing_key))
        os.chmod(staging, 0o700)
        try:
            os.rename(staging, ca_dir)  # all four files appear at once, or none
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # Another process (a replica started at the same moment on the same data directory) created
            # the CA between our look and our rename; its rename was just as whole, so it is the CA.
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def open_dev_ca(ca_dir: Path, clock: Clock) -> IssuingCA:
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
    return IssuingCA(issuing, FileSigner(key), (issuing, root))


def load_chain(chain_file: Path) -> tuple[x509.Certificate, ...]:
    try:
        chain = tuple(x509.load_pem_x509_certificates(chain_file.read_bytes()))
    except (OSError, ValueError) as exc:
        raise CaConfigError(f"cannot read the CA chain {chain_file}: {exc}") from exc
    if not chain:
        raise CaConfigError(f"{chain_file} holds no certificates")
    return chain


def load_key_file(key_file: Path, passphrase: str | None) -> CaKey:
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
    return key


def load_configured_ca(chain_file: Path, key_file: Path, passphrase: str | None) -> IssuingCA:
    chain = load_chain(chain_file)
    key = load_key_file(key_file, passphrase)
    return IssuingCA(chain[0], FileSigner(key), chain)


def certificate_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()

