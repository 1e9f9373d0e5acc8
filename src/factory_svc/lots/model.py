"""Typed values of production lots: a lot's header and items, each item's answer, and what the ledger keeps
of a lot (``StoredLot``, ``LotEntry``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from factory_svc.mint.keys import KeyType
from factory_svc.mint.model import IssuedCertificate
from provkit.errors import ErrorKind


@dataclass(frozen=True)
class LotHeader:
    lot_id: str
    server_keys: bool  # False: each item carries a CSR
    key_type: KeyType = KeyType.EC_P256
    item_count: int = 0
    derive_device_ids: bool = False
    validity: timedelta | None = None
    caller: str = "internal"


@dataclass(frozen=True)
class LotItem:
    index: int
    device_id: str = ""
    csr_pem: bytes = b""


@dataclass(frozen=True)
class LotItemError:
    kind: ErrorKind
    reason: str
    message: str


@dataclass(frozen=True)
class LotItemResult:
    index: int
    device_id: str
    certificate: IssuedCertificate | None
    private_key_pem: str | None = None
    replayed: bool = False
    error: LotItemError | None = None


@dataclass(frozen=True)
class StoredLot:
    fingerprint: str
    item_count: int
    acknowledged: bool


@dataclass(frozen=True)
class LotEntry:
    """One issued item of a lot, as the ledger keeps it."""

    index: int
    certificate: IssuedCertificate
    private_key_pem: str | None  # server-generated, until the lot is acknowledged
