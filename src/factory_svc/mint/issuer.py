"""The one place a device certificate is built and signed: minting and renewal both issue through it.

``LeafIssuer(ca, crl_url)``: ``async issue(device_id, public_key, not_before, not_after, ...) ->
IssuedCertificate`` builds the leaf (``leaf_builder``: subject CN = the device id, not a CA, digital
signature, client auth, key identifiers, the CRL distribution point when a CRL URL is set), has the
issuing CA sign it through its ``CaSigner`` (file or PKCS#11) and answers it as the ledger will hold it
(not yet recorded).  ``thumbprints``, ``serial_hex``: the ledger's spellings of a certificate's identity.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from factory_svc.ca.issuing import IssuingCA
from factory_svc.mint.keys import KeyType, PublicKey
from factory_svc.mint.model import IssuedCertificate, KeySource
from factory_svc.revocation.crl import distribution_points
from provkit.devpki import SIGNATURE_KEY_USAGE

# The leaf's fixed extensions, built once.
_NOT_A_CA = x509.BasicConstraints(ca=False, path_length=None)
_CLIENT_AUTH = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])


def leaf_builder(
    device_id: str,
    public_key: PublicKey,
    not_before: datetime,
    not_after: datetime,
    authority_key_id: x509.AuthorityKeyIdentifier,
    crl_points: x509.CRLDistributionPoints | None = None,
) -> x509.CertificateBuilder:
    """The device certificate, unsigned and without issuer name (the CA sets both)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(_NOT_A_CA, critical=True)
        .add_extension(SIGNATURE_KEY_USAGE, critical=True)
        .add_extension(_CLIENT_AUTH, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(authority_key_id, critical=False)
    )
    return builder if crl_points is None else builder.add_extension(crl_points, critical=False)


def thumbprints(cert: x509.Certificate) -> tuple[str, str]:
    der = cert.public_bytes(serialization.Encoding.DER)
    return hashlib.sha1(der, usedforsecurity=False).hexdigest().upper(), hashlib.sha256(
        der
    ).hexdigest().upper()


def serial_hex(serial: int) -> str:
    text = f"{serial:X}"
    return text if len(text) % 2 == 0 else "0" + text


class LeafIssuer:
    """Builds and signs device certificates for one issuing CA (its key identifier, the CRL distribution
    point and the chain's PEM computed once)."""

    def __init__(self, ca: IssuingCA, crl_url: str = "") -> None:
        self.ca = ca
        ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        self._crl_points = distribution_points(crl_url)  # built once, shared by every leaf
        self.chain_pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in ca.chain)

    def builder(
        self, device_id: str, public_key: PublicKey, not_before: datetime, not_after: datetime
    ) -> x509.CertificateBuilder:
        return leaf_builder(device_id, public_key, not_before, not_after, self._aki, self._crl_points)

    async def issue(
        self,
        device_id: str,
        public_key: PublicKey,
        not_before: datetime,
        not_after: datetime,
        *,
        key_type: KeyType,
        key_source: KeySource,
        issued_at: datetime,
        caller: str,
        request_id: str = "",
    ) -> IssuedCertificate:
        """Sign a leaf for ``public_key`` through the CA's signer: the certificate as the ledger keeps it."""
        leaf = await self.ca.sign(self.builder(device_id, public_key, not_before, not_after))
        sha1, sha256 = thumbprints(leaf)
        leaf_pem = leaf.public_bytes(serialization.Encoding.PEM).decode()
        return IssuedCertificate(
            serial_number=serial_hex(leaf.serial_number),
            device_id=device_id,
            certificate_pem=leaf_pem,
            chain_pem=leaf_pem + self.chain_pem,
            sha1_thumbprint=sha1,
            sha256_thumbprint=sha256,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            issued_at=issued_at,
            key_type=key_type,
            key_source=key_source,
            caller=caller,
            request_id=request_id,
        )
