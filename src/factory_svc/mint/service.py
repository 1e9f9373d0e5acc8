"""Minting: the rules of MintCertificate, and the read side (get / list).  Plain async Python.

Order of work for ``mint``: validate everything (id, key source, CSR, validity) -> idempotency look-up
(``provkit.idempotency``; the ledger keeps the answers) -> make the key (mode B) -> sign -> commit to the
ledger -> answer.  Nothing is written for bad input.  In CSR mode the look-up is left to the commit, on
both backends: the ledger refuses a request id it holds (its key on ``mint_requests``, which on PostgreSQL
decides between replicas too), and the certificate just signed for it is dropped (never recorded nor
answered) and the stored answer replayed; a new id so costs one group commit and nothing more (on
PostgreSQL no reservation either: two round trips fewer).  A server-generated key (seconds for RSA) is made
only for an id the ledger does not hold, and replicas take turns on it through a reservation.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from factory_svc.ca.issuing import IssuingCA
from factory_svc.errors import FailedPrecondition, NotFound, Reason, invalid_field
from factory_svc.mint.csr import check_csr
from factory_svc.mint.issuer import LeafIssuer, leaf_builder, serial_hex, thumbprints
from factory_svc.mint.keys import (
    GENERATABLE,
    KeyType,
    PrivateKey,
    PublicKey,
    generate_private_key,
    private_key_pem,
)
from factory_svc.mint.model import (
    CertificatePage,
    CsrKey,
    IssuedCertificate,
    KeySource,
    MintRequest,
    MintResult,
    ServerKey,
)
from factory_svc.mint.store import Cursor, Recorded, RequestIdTaken, StoredRequest, cursor_of
from provkit.clock import Clock
from provkit.context import bind_device_id
from provkit.device_id import normalise_device_id
from provkit.idempotency import LOST_RACE, LostRace, RequestIds, Stored, check_request_id
from provkit.idempotency import fingerprint as request_fingerprint

log = logging.getLogger("factory_svc.mint.service")

__all__ = ["leaf_builder", "serial_hex", "thumbprints"]  # moved to factory_svc.mint.issuer; kept importable

BACKDATE = timedelta(minutes=5)  # tolerate clock skew on devices
MIN_VALIDITY = timedelta(hours=1)  # the default shortest validity a caller may ask for
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 50, 500
_SERIAL = re.compile(r"^[0-9A-F]{1,40}$")


class CertificateRecords(Protocol):
    """Where issued certificates are recorded (``factory_svc.mint.store.CertificateStore``)."""

    async def record(
        self, certificate: IssuedCertificate, fingerprint: str | None, now: datetime
    ) -> Recorded | RequestIdTaken: ...

    async def find_request(self, request_id: str) -> StoredRequest | None: ...

    async def count_unexpired(self, device_id: str, now: datetime) -> int: ...


class CertificateReader(Protocol):
    async def get(self, serial_number: str) -> IssuedCertificate | None: ...

    async def page(
        self, device_id: str | None, limit: int, after: Cursor | None
    ) -> list[IssuedCertificate]: ...


@dataclass(frozen=True)
class MintPolicy:
    default_validity: timedelta = timedelta(days=730)  # shelf time plus the first renewal
    crl_url: str = ""  # set: every leaf names it in a CRL Distribution Points extension
    min_validity: timedelta = MIN_VALIDITY  # mint.min_validity_minutes (a demo of renewal lowers it)


@dataclass(frozen=True)
class Checked:
    device_id: str
    key_type: KeyType
    public_key: PublicKey | None  # None: generated later (mode B)
    not_before: datetime
    not_after: datetime
    fingerprint: str


def normalise_serial(raw: str) -> str:
    serial = raw.strip().replace(":", "").upper()
    if not _SERIAL.match(serial):
        raise invalid_field(
            "serial_number", Reason.SERIAL_NUMBER_INVALID, "the serial number must be 1-40 hex digits"
        )
    serial = serial.lstrip("0") or "0"
    return serial if len(serial) % 2 == 0 else "0" + serial


class MintingService:
    def __init__(
        self,
        ca: IssuingCA,
        ledger: CertificateRecords,
        policy: MintPolicy,
        clock: Clock,
        request_ids: RequestIds | None = None,  # the ledger's reservations, for replicas
    ) -> None:
        self._ca = ca
        self._ledger = ledger
        self._policy = policy
        self._clock = clock
        self._request_ids = request_ids or RequestIds()
        self.issuer = LeafIssuer(ca, policy.crl_url)  # the one certificate builder (renewal uses it too)

    # ------------------------------------------------------------------------------------- validation
    def _validity(self, requested: timedelta | None, now: datetime) -> tuple[datetime, datetime]:
        issuer = self._ca.certificate
        issuer_end = issuer.not_valid_after_utc
        if not issuer.not_valid_before_utc <= now < issuer_end:
            raise FailedPrecondition(
                Reason.ISSUER_EXPIRED,
                "the issuing CA is not valid now; the factory cannot issue certificates",
                metadata={"issuer_not_after": issuer_end.isoformat()},
            )
        not_before = max(now - BACKDATE, issuer.not_valid_before_utc)
        if requested is None:
            return not_before, min(now + self._policy.default_validity, issuer_end)
        shortest = self._policy.min_validity
        if requested < shortest:
            raise invalid_field(
                "validity", Reason.VALIDITY_INVALID, f"the validity must be at least {shortest}"
            )
        not_after = now + requested
        if not_after > issuer_end:
            raise invalid_field(
                "validity",
                Reason.VALIDITY_EXCEEDS_ISSUER,
                f"the requested validity ends after the issuing CA ({issuer_end.isoformat()})",
                issuer_not_after=issuer_end.isoformat(),
            )
        return not_before, not_after

    def check(self, request: MintRequest, now: datetime) -> Checked:
        """Every rule of a mint request (id, request id, key source, CSR, validity); nothing is written."""
        device_id = normalise_device_id(request.device_id)
        check_request_id(request.request_id)
        public_key: PublicKey | None = None
        if isinstance(request.key, CsrKey):
            checked = check_csr(request.key.csr_pem, device_id)
            key_type, public_key = checked.key_type, checked.public_key
            key_part = (
                {"mode": "csr", "csr_sha256": hashlib.sha256(checked.der).hexdigest()}
                if request.request_id
                else {}
            )
        elif isinstance(request.key, ServerKey):
            key_type = request.key.key_type
            if key_type not in GENERATABLE:
                raise invalid_field(
                    "server_key_generation.key_type",
                    Reason.KEY_TYPE_UNSUPPORTED,
                    f"the factory cannot generate {key_type.value} keys",
                )
            key_part = {"mode": "server", "key_type": key_type.value}
        else:
            raise invalid_field(
                "key_source", Reason.KEY_SOURCE_MISSING, "give a CSR or ask for server-side generation"
            )
        not_before, not_after = self._validity(request.validity, now)
        fingerprint = ""
        if request.request_id:  # only idempotent requests need a fingerprint of what was asked
            validity = None if request.validity is None else request.validity.total_seconds()
            fingerprint = request_fingerprint({"device_id": device_id, "validity": validity, **key_part})
        return Checked(device_id, key_type, public_key, not_before, not_after, fingerprint)

    # ------------------------------------------------------------------------------------------- mint
    async def _stored(self, request_id: str) -> Stored[IssuedCertificate] | None:
        stored = await self._ledger.find_request(request_id)
        return None if stored is None else Stored(stored.fingerprint, stored.certificate)

    async def _replay(self, certificate: IssuedCertificate, now: datetime) -> MintResult:
        count = await self._ledger.count_unexpired(certificate.device_id, now)
        log.info("replayed mint", extra={"serial": certificate.serial_number})
        return MintResult(certificate, None, count, replayed=True)

    async def mint(self, request: MintRequest) -> MintResult:
        now = self._clock()
        checked = self.check(request, now)
        with bind_device_id(checked.device_id):
            return await self._request_ids.run(
                request.request_id,
                checked.fingerprint,
                find=lambda: self._stored(request.request_id),
                replay=lambda certificate: self._replay(certificate, now),
                execute=lambda: self._issue(request, checked, now),
                # CSR mode does not look first (see the module's description); a server key (RSA: seconds)
                # is made only for an id the ledger does not hold
                look_first=isinstance(request.key, ServerKey),
            )

    async def _issue(self, request: MintRequest, checked: Checked, now: datetime) -> MintResult | LostRace:
        issued, private_key = await self.make_certificate(request, checked, now)
        outcome = await self._ledger.record(issued, checked.fingerprint or None, now)
        if isinstance(outcome, RequestIdTaken):
            return LOST_RACE
        if log.isEnabledFor(logging.INFO):
            log.info(
                "certificate issued",
                extra={
                    "serial": issued.serial_number,
                    "sha256_thumbprint": issued.sha256_thumbprint,
                    "not_after": issued.not_after.isoformat(),
                    "key_type": checked.key_type.value,
                    "key_source": issued.key_source.value,
                    "caller": request.caller,
                },
            )
        key_pem = private_key_pem(private_key) if private_key is not None else None
        return MintResult(issued, key_pem, outcome.unexpired_count, replayed=False)

    async def make_certificate(
        self, request: MintRequest, checked: Checked, now: datetime
    ) -> tuple[IssuedCertificate, PrivateKey | None]:
        """Make the key (mode B) and sign: the certificate as the ledger will hold it, not yet recorded."""
        private_key = None
        public_key = checked.public_key
        if public_key is None:
            if checked.key_type in (KeyType.RSA_2048, KeyType.RSA_3072):
                private_key = await asyncio.to_thread(
                    generate_private_key, checked.key_type
                )  # seconds of CPU
            else:
                private_key = generate_private_key(checked.key_type)
            public_key = private_key.public_key()
        issued = await self.issuer.issue(
            checked.device_id,
            public_key,
            checked.not_before,
            checked.not_after,
            key_type=checked.key_type,
            key_source=KeySource.SERVER_GENERATED if private_key is not None else KeySource.CSR,
            issued_at=now,
            caller=request.caller,
            request_id=request.request_id,
        )
        return issued, private_key


# ------------------------------------------------------------------------------------------- read side
def _encode_token(cursor: Cursor, device_id: str) -> str:
    raw = json.dumps([1, cursor.issued_at_us, cursor.serial_number, device_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str, device_id: str) -> Cursor:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        version, issued_at_us, serial, token_device = json.loads(raw)
        if version != 1 or not isinstance(issued_at_us, int) or not isinstance(serial, str):
            raise ValueError("bad token")
    except (ValueError, TypeError, binascii.Error):
        raise invalid_field("page_token", Reason.PAGE_TOKEN_INVALID, "the page token is not valid") from None
    if token_device != device_id:
        raise invalid_field(
            "page_token", Reason.PAGE_TOKEN_INVALID, "the page token belongs to another listing"
        )
    return Cursor(issued_at_us, serial)


class CertificateCatalog:
    def __init__(self, ledger: CertificateReader) -> None:
        self._ledger = ledger

    async def get(self, serial_number: str) -> IssuedCertificate:
        serial = normalise_serial(serial_number)
        found = await self._ledger.get(serial)
        if found is None:
            raise NotFound(
                Reason.CERTIFICATE_NOT_FOUND,
                f"no certificate with serial {serial}",
                metadata={"serial_number": serial},
            )
        return found

    async def page(self, device_id: str, page_size: int, page_token: str) -> CertificatePage:
        wanted = normalise_device_id(device_id) if device_id.strip() else ""
        if page_size < 0:
            raise invalid_field("page_size", Reason.PAGE_SIZE_INVALID, "page_size must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_token(page_token, wanted) if page_token else None
        rows = await self._ledger.page(wanted or None, size + 1, after)
        page, more = rows[:size], len(rows) > size
        token = ""
        if more and page:
            token = _encode_token(cursor_of(page[-1]), wanted)
        return CertificatePage(tuple(page), token)
