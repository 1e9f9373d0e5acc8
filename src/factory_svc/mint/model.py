"""Typed values of the minting domain: what is asked (``MintRequest``), what the ledger keeps of an issued
certificate (``IssuedCertificate``, with its revocation mark) and what is answered."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

from factory_svc.mint.keys import KeyType
from factory_svc.revocation.model import Revocation


class KeySource(enum.Enum):
    CSR = "csr"
    SERVER_GENERATED = "server-generated"


@dataclass(frozen=True)
class CsrKey:
    """Mode A: the device made its key and sends a PKCS#10 CSR (PEM)."""

    csr_pem: bytes


@dataclass(frozen=True)
class ServerKey:
    """Mode B: the factory makes the key (returned once, never stored)."""

    key_type: KeyType = KeyType.EC_P256


@dataclass(frozen=True)
class MintRequest:
    device_id: str
    key: CsrKey | ServerKey
    validity: timedelta | None = None  # None: the service default
    request_id: str = ""
    caller: str = "internal"  # who asks (recorded in the ledger)


@dataclass(frozen=True)
class IssuedCertificate:
    serial_number: str  # upper-case hex
    device_id: str
    certificate_pem: str
    chain_pem: str  # leaf, issuing CA, root
    sha1_thumbprint: str
    sha256_thumbprint: str
    not_before: datetime
    not_after: datetime
    issued_at: datetime
    key_type: KeyType
    key_source: KeySource
    caller: str
    request_id: str
    revocation: Revocation | None = None  # set once revoked


@dataclass(frozen=True)
class MintResult:
    certificate: IssuedCertificate
    private_key_pem: bytes | None  # mode B on first issue only
    unexpired_count: int
    replayed: bool


@dataclass(frozen=True)
class CertificatePage:
    certificates: tuple[IssuedCertificate, ...]
    next_page_token: str
