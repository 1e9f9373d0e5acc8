"""Typed values of revocation: RFC 5280's reasons, a certificate's revocation mark, a revocation request, what
the ledger says of a certificate it holds."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime


class RevocationReason(enum.Enum):
    """RFC 5280 CRLReason, by its ASN.1 name (the CLI's spelling is the kebab-case of it)."""

    UNSPECIFIED = "unspecified"
    KEY_COMPROMISE = "keyCompromise"
    CA_COMPROMISE = "cACompromise"
    AFFILIATION_CHANGED = "affiliationChanged"
    SUPERSEDED = "superseded"
    CESSATION_OF_OPERATION = "cessationOfOperation"
    CERTIFICATE_HOLD = "certificateHold"
    PRIVILEGE_WITHDRAWN = "privilegeWithdrawn"
    AA_COMPROMISE = "aACompromise"


@dataclass(frozen=True)
class Revocation:
    time: datetime
    reason: RevocationReason


@dataclass(frozen=True)
class Standing:
    """What the ledger says of a certificate it holds (the factory issued it)."""

    revoked: bool
    issued_under: bool  # issued under one of the issuing CA certificates the question named


@dataclass(frozen=True)
class RevokeRequest:
    device_id: str = ""  # exactly one of device_id / serial_number
    serial_number: str = ""
    reason: RevocationReason = RevocationReason.UNSPECIFIED
    request_id: str = ""
    caller: str = "internal"
