"""PKCS#10 CSR checks (mode A): parse, signature, subject CN, key type."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from factory_svc.errors import Reason, invalid_field
from factory_svc.mint.keys import KeyType, PublicKey, classify_public_key

FIELD = "csr_pem"
MAX_CSR_BYTES = 64 * 1024


@dataclass(frozen=True)
class CheckedCsr:
    public_key: PublicKey
    key_type: KeyType
    csr: x509.CertificateSigningRequest

    @property
    def der(self) -> bytes:
        """The CSR's DER (only idempotent requests need it, to fingerprint what was asked)."""
        return self.csr.public_bytes(Encoding.DER)


def check_csr(pem: bytes, device_id: str) -> CheckedCsr:
    if len(pem) > MAX_CSR_BYTES:
        raise invalid_field(FIELD, Reason.CSR_MALFORMED, f"the CSR is larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(pem)
        public_key = csr.public_key()
    except (ValueError, TypeError):
        raise invalid_field(
            FIELD, Reason.CSR_MALFORMED, "csr_pem is not a PEM-encoded PKCS#10 request"
        ) from None
    except UnsupportedAlgorithm:
        raise invalid_field(
            FIELD, Reason.KEY_ALGORITHM_UNSUPPORTED, "the CSR's key algorithm is not supported"
        ) from None
    key_type, public_key = classify_public_key(public_key, FIELD)
    try:
        signature_ok = csr.is_signature_valid
    except UnsupportedAlgorithm:
        signature_ok = False
    if not signature_ok:
        raise invalid_field(FIELD, Reason.CSR_SIGNATURE_INVALID, "the CSR's signature does not verify")
    try:
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        raise invalid_field(FIELD, Reason.CSR_MALFORMED, "the CSR's subject cannot be read") from None
    for name in names:
        common_name = str(name.value)
        if common_name.lower() != device_id:
            raise invalid_field(
                FIELD,
                Reason.CSR_SUBJECT_MISMATCH,
                f"the CSR's subject CN {common_name!r} differs from the device id {device_id!r}",
                csr_common_name=common_name,
            )
    return CheckedCsr(public_key, key_type, csr)
