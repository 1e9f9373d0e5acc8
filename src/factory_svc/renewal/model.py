"""Typed values of renewal: its policy, the recorded intent of one renewal (``Renewal``) and its states, a
refusal (``RenewalRefused``, with a stable reason), and what the ``expiring`` listing shows.

Reasons (the contract's; string literals until factory_svc has its own reason enum):
CLIENT_CERTIFICATE_REQUIRED, CERTIFICATE_UNTRUSTED, CERTIFICATE_REVOKED, CERTIFICATE_EXPIRED,
CERTIFICATE_SUPERSEDED, CSR_INVALID, CSR_SIGNATURE_INVALID, CSR_SUBJECT_MISMATCH, KEY_TOO_WEAK,
KEY_REUSED, RENEWAL_RATE_LIMITED, DEVICE_NOT_ENROLLED, DPS_UNAVAILABLE.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

REASONS = (
    "CLIENT_CERTIFICATE_REQUIRED",
    "CERTIFICATE_UNTRUSTED",
    "CERTIFICATE_REVOKED",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_SUPERSEDED",
    "CSR_INVALID",
    "CSR_SIGNATURE_INVALID",
    "CSR_SUBJECT_MISMATCH",
    "KEY_TOO_WEAK",
    "KEY_REUSED",
    "RENEWAL_RATE_LIMITED",
    "DEVICE_NOT_ENROLLED",
    "DPS_UNAVAILABLE",
)


@dataclass(frozen=True)
class RenewalPolicy:
    validity: timedelta = timedelta(days=365)  # of a renewed certificate
    expired_grace: timedelta = timedelta(0)  # 0: an expired certificate never renews
    max_per_day: int = 3  # renewals issued per device in any 24 hours


class RenewalState(enum.StrEnum):
    """Where a renewal's steps are.  ``issued``: the new certificate and this intent are in the ledger;
    ``secondary``: the enrollment holds it as its secondary certificate; ``promote``: the device used it
    (the promotion signal), the enrollment's primary is to become it; ``done``: primary = new, the old
    superseded; ``abandoned``: a later renewal of the device replaced this one before it was used."""

    ISSUED = "issued"
    SECONDARY = "secondary"
    PROMOTE = "promote"
    DONE = "done"
    ABANDONED = "abandoned"


OPEN_STATES = (RenewalState.ISSUED, RenewalState.SECONDARY, RenewalState.PROMOTE)


@dataclass(frozen=True)
class Renewal:
    """One renewal: the recorded intent of its DPS steps (the new certificate itself is in
    ``certificates``, with ``replaces`` = ``old_serial``)."""

    new_serial: str
    old_serial: str
    device_id: str
    key_sha256: str  # of the new public key (SubjectPublicKeyInfo DER): a retry with the same key replays
    requested_at: datetime
    state: RenewalState
    attempts: int = 0
    failure_reason: str = ""

    @property
    def open(self) -> bool:
        return self.state in OPEN_STATES


class RenewalRefused(Exception):
    """A renewal (or a request on the renewal listener) refused, with a stable ``reason``; nothing was
    written.  ``retry_after``: seconds after which the same request may succeed."""

    def __init__(self, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True)
class ExpiringCertificate:
    """A line of ``factory-svc expiring``: a device's certificate that expires within the window, and
    where its renewal is (``none``, ``pending`` with the new serial, or ``done`` superseded by it)."""

    device_id: str
    serial_number: str
    not_after: datetime
    renewal: str
    new_serial: str | None = None


@dataclass(frozen=True)
class RenewalSettings:
    """The renewal listener (``renewal.*``): where it listens (None: no listener), its TLS server
    certificate, and the policy."""

    listen: tuple[str, int] | None = None
    tls_cert_file: Path | None = None  # None: the gRPC server's
    tls_key_file: Path | None = None
    policy: RenewalPolicy = RenewalPolicy()
