"""Renewal: the rules of EST ``simplereenroll`` and the enrollment's change-over.  Plain async Python (no
HTTP here: ``factory_svc.renewal.http`` carries requests in and answers out).

Who asks is the certificate the device presented at the TLS handshake (the listener verified its chain
to the device CA, not its dates).  ``authenticate`` checks it against the ledger: a certificate the
factory issued (serial and SHA-256 thumbprint), CN = the device id under the id policy, not revoked, not
superseded by a renewal the device already uses, and within its validity or the grace window.

Order of work for ``renew``: authenticate -> finish the device's open renewal steps (the next request for a
device completes what a crash left) -> the CSR: PKCS#10, key (EC P-256/P-384 or RSA >= 2048), signature,
subject and SAN identical to the current certificate's (RFC 7030 4.2.2), not the current key -> a retry
(same current certificate, same new key) answers the certificate issued for it -> the enrollment exists in
DPS -> rate limit -> sign (``LeafIssuer``: the same builder and ``CaSigner`` as minting) -> the new
certificate and the renewal intent in the ledger, one transaction (the rate limit checked again in it) ->
DPS: the new certificate in the enrollment's secondary slot (etag-guarded, everything else kept; concurrent
renewals' writes go out as one DPS bulk operation, ``factory_svc.renewal.bulk``) -> answer, while the step
mark is committed (it records what DPS holds: when a crash loses it, the worker finds the certificate in the
slot and marks it).  Nothing is written for a refused request.

The CSR is checked against the presented certificate before the ledger is read, so that the ledger is read
once per request (``holder_and_prior``: the presented certificate's record, its successor, its device's
open renewals, a renewal already issued for the same key, the device's renewals of the last day); its
refusal is given after the certificate's, in the order above.  The ledger is written twice (the record,
the step mark), each write grouped with concurrent renewals' into one commit where the ledger has one
writer.

The promotion signal (``signal``): a request authenticated with the new certificate of an open renewal
(the device registered with DPS and connected to its hub with it) moves the renewal to ``promote``; then
DPS: primary = the new certificate, secondary removed (etag-guarded), and the ledger: the old certificate
``superseded_by`` the new one, the renewal ``done``.

Every step is recorded before the next; a kill -9 anywhere leaves a state the worker completes at
start-up (and every few seconds while a step fails) and the next request for the device completes too.
Crash points (tests): ``renewal.after_ledger``, ``renewal.after_dps_secondary`` (DPS written, step not
marked), ``renewal.after_dps_primary`` (DPS promoted, ledger not).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from factory_svc.errors import Reason
from factory_svc.mint.issuer import LeafIssuer, serial_hex
from factory_svc.mint.keys import KeyType, PublicKey, classify_public_key
from factory_svc.mint.model import IssuedCertificate, KeySource
from factory_svc.mint.service import BACKDATE
from factory_svc.renewal.bulk import GroupedWrites
from factory_svc.renewal.model import (
    OPEN_STATES,
    ExpiringCertificate,
    Renewal,
    RenewalPolicy,
    RenewalRefused,
    RenewalState,
)
from factory_svc.renewal.store import Holder, Prior, RateLimited
from provkit.clock import Clock
from provkit.cloud import (
    CloudError,
    CloudEtagMismatch,
    CloudUnavailable,
    Enrollment,
    EnrollmentPort,
    X509Attestation,
)
from provkit.context import bind_device_id
from provkit.device_id import DeviceIdPolicy, check_device_id
from provkit.errors import InvalidArgument
from provkit.errors import Reason as SharedReason
from provkit.est import EstFormatError, decode_csr
from provkit.faults import crash_point
from provkit.metrics import NO_METRICS, RenewalMetrics

log = logging.getLogger("factory_svc.renewal.service")

DAY = timedelta(days=1)
_ATTEMPTS = 5  # etag-guarded writes: reads and re-applies on a concurrent change
_RETRY, _SWEEP = 5.0, 30.0  # seconds between two passes of the worker: while a step fails / otherwise
_DPS_RETRY_AFTER = 30.0  # Retry-After of DPS_UNAVAILABLE when DPS named none


class RenewalLedger(Protocol):
    """Where renewals are kept (``factory_svc.renewal.store.RenewalStore``)."""

    async def certificate(self, serial_number: str) -> IssuedCertificate | None: ...

    async def holder(self, serial_number: str) -> Holder | None: ...

    async def holder_and_prior(
        self, serial_number: str, key_sha256: str, since: datetime
    ) -> tuple[Holder | None, Prior]: ...

    async def record(
        self, certificate: IssuedCertificate, renewal: Renewal, max_per_day: int | None = None
    ) -> Renewal | RateLimited: ...

    async def of_new(self, new_serial: str) -> Renewal | None: ...

    async def open_renewals(self, device_id: str | None = None) -> list[Renewal]: ...

    async def advance(
        self, renewal: Renewal, states: tuple[RenewalState, ...], to: RenewalState, now: datetime
    ) -> bool: ...

    async def complete(self, renewal: Renewal, now: datetime) -> bool: ...

    async def failed(self, renewal: Renewal, reason: str) -> None: ...

    async def expiring(self, now: datetime, until: datetime) -> list[ExpiringCertificate]: ...

    async def expiry_buckets(self, now: datetime) -> dict[str, int]: ...


@dataclass(frozen=True)
class Renewed:
    """A ``simplereenroll`` answer: the new certificate and its chain (leaf first)."""

    certificate: IssuedCertificate
    chain: tuple[x509.Certificate, ...]
    replayed: bool


def _spki(key: object) -> bytes:
    assert hasattr(key, "public_bytes")
    der: bytes = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return der


def _sans(extensions: x509.Extensions) -> set[x509.GeneralName]:
    try:
        names = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return set(names)


def _holds(pem: str | None, sha256: str | None, certificate: IssuedCertificate) -> bool:
    """Whether an enrollment slot (its PEM, or the thumbprint DPS reports) holds ``certificate``.  The
    thumbprint DPS reports is the slot's certificate's: when there is one, it answers alone (the PEM is
    parsed only for a slot DPS reported without one)."""
    if sha256:
        return sha256.upper() == certificate.sha256_thumbprint
    if not pem or "BEGIN CERTIFICATE" not in pem:
        return False
    try:
        held = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        return False
    return held.fingerprint(hashes.SHA256()).hex().upper() == certificate.sha256_thumbprint


class NotEnrolled(Exception):
    """The device has no DPS enrollment (any more)."""


class RenewalService:
    def __init__(
        self,
        issuer: LeafIssuer,
        ledger: RenewalLedger,
        dps: EnrollmentPort,
        policy: RenewalPolicy,
        clock: Clock,
        device_ids: DeviceIdPolicy = DeviceIdPolicy.GUID,
        metrics: RenewalMetrics = NO_METRICS,
    ) -> None:
        self._issuer = issuer
        self._ledger = ledger
        self._dps = dps
        self._writes = GroupedWrites(dps)  # concurrent renewals' writes: one DPS bulk operation
        self._policy = policy
        self._clock = clock
        self._device_ids = device_ids
        self._metrics = metrics
        self._worker: asyncio.Task[None] | None = None
        self._marks: set[asyncio.Task[bool]] = set()  # step marks on their way (``_mark_later``)
        self.wake = asyncio.Event()

    @property
    def ca_chain(self) -> tuple[x509.Certificate, ...]:
        return self._issuer.ca.chain

    # --------------------------------------------------------------------------------- authentication
    async def authenticate(self, peer_der: bytes | None) -> IssuedCertificate:
        """The ledger's record of the presented certificate, if it may renew (else ``RenewalRefused``)."""
        presented, device_id = self._presented(peer_der)
        holder = await self._ledger.holder(serial_hex(presented.serial_number))
        return self._admit(presented, device_id, holder)

    def _presented(self, peer_der: bytes | None) -> tuple[x509.Certificate, str]:
        """The certificate of the TLS handshake, issued by the device CA, and the device id of its CN."""
        if not peer_der:
            raise RenewalRefused(
                SharedReason.CLIENT_CERTIFICATE_REQUIRED,
                "present the device certificate at the TLS handshake",
            )
        # The TLS handshake verified the chain; the proof that the factory issued this very certificate is
        # its SHA-256 thumbprint in the ledger (``_admit``): here only the issuer's name, to refuse another
        # CA's certificate before the ledger is read (a signature check again would cost a verification).
        try:
            presented = x509.load_der_x509_certificate(peer_der)
            issued_here = presented.issuer == self._issuer.ca.certificate.subject
        except ValueError:
            issued_here = False
        if not issued_here:
            raise RenewalRefused(
                Reason.CERTIFICATE_UNTRUSTED, "the certificate was not issued by this factory's device CA"
            )
        names = presented.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        try:
            device_id = check_device_id(str(names[0].value) if len(names) == 1 else "", self._device_ids)
        except InvalidArgument:
            raise RenewalRefused(
                Reason.CERTIFICATE_UNTRUSTED, "the certificate's CN is not a device id"
            ) from None
        return presented, device_id

    def _admit(self, presented: x509.Certificate, device_id: str, holder: Holder | None) -> IssuedCertificate:
        """The presented certificate's record (``holder``, as the ledger holds it), if it may renew: the
        very certificate the factory issued (thumbprint), for this device, not revoked, not superseded,
        within its validity or the grace window."""
        record = None if holder is None else holder.certificate
        sha256 = presented.fingerprint(hashes.SHA256()).hex().upper()
        if (
            holder is None
            or record is None
            or record.sha256_thumbprint != sha256
            or record.device_id != device_id
        ):
            raise RenewalRefused(
                Reason.CERTIFICATE_UNTRUSTED, "the factory has no record of this certificate"
            )
        if record.revocation is not None:
            raise RenewalRefused(
                SharedReason.CERTIFICATE_REVOKED,
                f"certificate {record.serial_number} was revoked ({record.revocation.reason.value}); "
                "the device needs a new factory certificate",
            )
        newer = holder.superseded_by
        if newer is not None:
            raise RenewalRefused(
                Reason.CERTIFICATE_SUPERSEDED,
                f"certificate {record.serial_number} was replaced by {newer}, which the device uses; "
                "renew with that one",
            )
        now = self._clock()
        if now > record.not_after + self._policy.expired_grace:
            grace = self._policy.expired_grace.days
            window = f"the grace window of {grace} days" if grace else "no grace window"
            raise RenewalRefused(
                SharedReason.CERTIFICATE_EXPIRED,
                f"certificate {record.serial_number} expired at {record.not_after.isoformat()} ({window}); "
                "the device needs a new factory certificate",
            )
        if now < record.not_before - BACKDATE:
            raise RenewalRefused(Reason.CERTIFICATE_UNTRUSTED, "the certificate is not valid yet")
        return record

    # ----------------------------------------------------------------------------------------- renew
    def _check_csr(self, body: bytes, cert: x509.Certificate) -> tuple[PublicKey, KeyType, str]:
        """The CSR's rules against the current certificate ``cert`` (the one presented: byte for byte the
        ledger's, its thumbprint checked)."""
        try:
            csr = decode_csr(body)
        except EstFormatError as exc:
            raise RenewalRefused(Reason.CSR_INVALID, str(exc)) from None
        try:
            key_type, public_key = classify_public_key(csr.public_key())
        except (InvalidArgument, UnsupportedAlgorithm, ValueError):
            raise RenewalRefused(
                Reason.KEY_TOO_WEAK, "the key must be ECDSA P-256 or P-384, or RSA of at least 2048 bits"
            ) from None
        try:
            signature_ok = csr.is_signature_valid
        except UnsupportedAlgorithm:
            signature_ok = False
        if not signature_ok:
            raise RenewalRefused(Reason.CSR_SIGNATURE_INVALID, "the request's signature does not verify")
        try:
            same = csr.subject == cert.subject and _sans(csr.extensions) == _sans(cert.extensions)
        except (ValueError, x509.DuplicateExtension):
            same = False
        if not same:
            raise RenewalRefused(
                Reason.CSR_SUBJECT_MISMATCH,
                f"the request's subject must be the current certificate's ({cert.subject.rfc4514_string()}), "
                "with the same subject alternative names",
            )
        spki = _spki(public_key)
        if spki == _spki(cert.public_key()):
            raise RenewalRefused(
                Reason.KEY_REUSED, "the request carries the current certificate's key; make a new one"
            )
        return public_key, key_type, hashlib.sha256(spki).hexdigest()

    async def renew(self, peer_der: bytes | None, body: bytes) -> Renewed:
        try:
            renewed = await self._renew(peer_der, body)
        except RenewalRefused as refused:
            self._metrics.renewed(refused.reason)
            raise
        self._metrics.renewed("replayed" if renewed.replayed else "issued")
        return renewed

    async def _renew(self, peer_der: bytes | None, body: bytes) -> Renewed:
        presented, device_id = self._presented(peer_der)
        # The CSR is checked against the presented certificate before the ledger is read, so that one read
        # brings everything; a refusal of the certificate still comes first.
        try:
            public_key, key_type, key_sha256 = self._check_csr(body, presented)
            refused = None
        except RenewalRefused as exc:
            refused, key_sha256 = exc, ""
        now = self._clock()
        holder, prior = await self._ledger.holder_and_prior(
            serial_hex(presented.serial_number), key_sha256, now - DAY
        )
        current = self._admit(presented, device_id, holder)
        assert holder is not None  # admitted
        with bind_device_id(current.device_id):
            await self._finish_device(holder.open_renewals)
            if refused is not None:
                raise refused
            if prior.found is not None:
                return await self._replay(prior.found, current)
            enrollment = await self._enrolled(current.device_id)
            if len(prior.recent) >= self._policy.max_per_day:
                raise self._rate_limited(prior.recent, now)
            not_before, not_after = self._validity(now)
            issued = await self._issuer.issue(
                current.device_id,
                public_key,
                not_before,
                not_after,
                key_type=key_type,
                key_source=KeySource.CSR,
                issued_at=now,
                caller=f"renewal:{current.serial_number}",
            )
            intent = Renewal(
                issued.serial_number,
                current.serial_number,
                current.device_id,
                key_sha256,
                now,
                RenewalState.ISSUED,
            )
            recorded = await self._ledger.record(issued, intent, self._policy.max_per_day)
            if isinstance(recorded, RateLimited):  # concurrent requests of the device came first
                raise self._rate_limited(recorded.recent, now)
            crash_point("renewal.after_ledger")
            if recorded.new_serial != issued.serial_number:  # another request for it came first
                return await self._replay(recorded, current)
            log.info(
                "certificate renewed",
                extra={
                    "serial": issued.serial_number,
                    "replaces": current.serial_number,
                    "sha256_thumbprint": issued.sha256_thumbprint,
                    "not_after": issued.not_after.isoformat(),
                },
            )
            return await self._answer(recorded, issued, enrollment)

    async def _replay(self, found: Renewal, current: IssuedCertificate) -> Renewed:
        """A retry of a renewal already issued (same current certificate, same new key): its certificate,
        once its DPS step is done; never one that was abandoned."""
        if found.state is RenewalState.ABANDONED:  # never reopened: two would race for the slot
            raise RenewalRefused(
                Reason.RENEWAL_REPLACED,
                f"the renewal that issued {found.new_serial} was replaced by a later request of "
                f"certificate {current.serial_number} (or its certificate was revoked); "
                "renew again with a new key",
            )
        certificate = await self._ledger.certificate(found.new_serial)
        assert certificate is not None  # written with the renewal
        return await self._answer(found, certificate, replayed=True)

    async def _answer(
        self,
        renewal: Renewal,
        certificate: IssuedCertificate,
        enrollment: Enrollment | None = None,
        replayed: bool = False,
    ) -> Renewed:
        """Complete the renewal's DPS step (the answer waits for it: a device never holds a certificate DPS
        would refuse) and answer ``certificate``, the renewal's new one.  ``enrollment``: as read just
        before issuing (its etag guards the write; a concurrent change is read again)."""
        try:
            await self._advance(renewal, enrollment, certificate, answering=True)
        except NotEnrolled:
            await self._ledger.failed(renewal, Reason.DEVICE_NOT_ENROLLED)
            raise RenewalRefused(
                Reason.DEVICE_NOT_ENROLLED,
                "the device's DPS enrollment is gone; the renewal stays recorded and completes if it returns",
            ) from None
        except CloudError as exc:
            await self._ledger.failed(renewal, f"DPS: {exc}")
            self.wake.set()
            raise RenewalRefused(
                SharedReason.DPS_UNAVAILABLE,
                "the renewal is recorded but DPS could not be updated; retry with the same request",
                retry_after=exc.retry_after or _DPS_RETRY_AFTER,
            ) from None
        leaf = x509.load_pem_x509_certificate(certificate.certificate_pem.encode())
        return Renewed(certificate, (leaf, *self.ca_chain), replayed)

    def _validity(self, now: datetime) -> tuple[datetime, datetime]:
        issuer = self._issuer.ca.certificate
        end = issuer.not_valid_after_utc
        if not issuer.not_valid_before_utc <= now < end:
            raise RenewalRefused(Reason.ISSUER_EXPIRED, "the issuing CA is not valid now", retry_after=3600.0)
        return max(now - BACKDATE, issuer.not_valid_before_utc), min(now + self._policy.validity, end)

    async def _enrolled(self, device_id: str) -> Enrollment:
        try:
            enrollment = await self._dps.get(device_id)
        except CloudError as exc:
            raise RenewalRefused(
                SharedReason.DPS_UNAVAILABLE,
                f"DPS could not be asked for the device's enrollment ({exc}); nothing was issued",
                retry_after=exc.retry_after or _DPS_RETRY_AFTER,
            ) from None
        if enrollment is None:
            raise RenewalRefused(Reason.DEVICE_NOT_ENROLLED, "the device has no DPS enrollment to renew")
        return enrollment

    def _rate_limited(self, recent: list[datetime], now: datetime) -> RenewalRefused:
        """The refusal of a device whose renewals of the 24 hours before ``now`` (``recent``, oldest first,
        at least the limit) reached the limit."""
        limit = self._policy.max_per_day
        free_at = recent[-limit] + DAY
        return RenewalRefused(
            Reason.RENEWAL_RATE_LIMITED,
            f"the device renewed {len(recent)} times in 24 hours (at most {limit})",
            retry_after=max(1.0, (free_at - now).total_seconds()),
        )

    # -------------------------------------------------------------------------- the promotion signal
    async def signal(self, peer_der: bytes | None) -> bool:
        """A request authenticated with ``peer_der``: when it is the new certificate of an open renewal,
        the device uses it, and the renewal is completed.  True when this request promoted one."""
        if not peer_der:
            return False
        try:
            current = await self.authenticate(peer_der)
        except RenewalRefused:
            return False
        renewal = await self._ledger.of_new(current.serial_number)
        if renewal is None or not renewal.open:
            return False
        with bind_device_id(renewal.device_id):
            if renewal.state is not RenewalState.PROMOTE:
                moved = await self._ledger.advance(
                    renewal,
                    (RenewalState.ISSUED, RenewalState.SECONDARY),
                    RenewalState.PROMOTE,
                    self._clock(),
                )
                if not moved:
                    return False
                renewal = dc_replace(renewal, state=RenewalState.PROMOTE)
            try:
                await self._advance(renewal)
            except CloudError as exc:  # recorded: the worker finishes it
                await self._ledger.failed(renewal, f"DPS: {exc}")
                self.wake.set()
                log.warning("renewal promotion left to the worker", extra={"error": str(exc)})
            return True

    # ------------------------------------------------------------------------------------ the steps
    async def _advance(
        self,
        renewal: Renewal,
        enrollment: Enrollment | None = None,
        issued: IssuedCertificate | None = None,
        answering: bool = False,
    ) -> None:
        """Carry out the renewal's next DPS step and record it; CloudError when DPS could not be updated,
        NotEnrolled when the enrollment is gone before the secondary was written.  A renewal whose new
        certificate was revoked is abandoned: it never goes into the enrollment nor becomes its primary
        (revocation takes it out of the secondary slot).  ``issued``: the new certificate as this request
        just recorded or read it (else read from the ledger, with its revocation).  ``answering``: a
        request waits for the answer, not for the ``secondary`` mark to be committed (``_mark_later``)."""
        new = issued or await self._ledger.certificate(renewal.new_serial)
        assert new is not None
        now = self._clock()
        if new.revocation is not None:
            if await self._ledger.advance(renewal, OPEN_STATES, RenewalState.ABANDONED, now):
                log.info(
                    "renewal abandoned: its certificate was revoked", extra={"serial": renewal.new_serial}
                )
            return
        if renewal.state is RenewalState.ISSUED:
            await self._write(renewal.device_id, lambda a: self._with_secondary(a, new), enrollment)
            crash_point("renewal.after_dps_secondary")
            mark = self._ledger.advance(renewal, (RenewalState.ISSUED,), RenewalState.SECONDARY, now)
            if answering:
                self._mark_later(mark)
            else:
                await mark
        elif renewal.state is RenewalState.PROMOTE:
            with contextlib.suppress(NotEnrolled):  # no enrollment to change: the ledger still follows
                await self._write(renewal.device_id, lambda a: self._promoted(a, new))
            crash_point("renewal.after_dps_primary")
            if await self._ledger.complete(renewal, now):
                log.info(
                    "renewal completed",
                    extra={"serial": renewal.new_serial, "superseded": renewal.old_serial},
                )

    def _mark_later(self, mark: Coroutine[Any, Any, bool]) -> None:
        """Commit a step mark without making the answer wait for it.  The mark only records what DPS already
        holds: when it is lost (a crash before its commit, a failed write), the renewal stays ``issued`` and
        the worker (at start-up, or woken now) finds the certificate in the slot and marks it; ``stop``
        waits for the marks still on their way."""
        task = asyncio.create_task(mark, name="renewal-step-mark")
        self._marks.add(task)
        task.add_done_callback(self._marked)

    def _marked(self, task: asyncio.Task[bool]) -> None:
        self._marks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("renewal step mark failed; the worker marks it", exc_info=task.exception())
            self.wake.set()

    @staticmethod
    def _with_secondary(attestation: X509Attestation, new: IssuedCertificate) -> X509Attestation | None:
        if _holds(attestation.secondary_pem, attestation.secondary_sha256_thumbprint, new) or _holds(
            attestation.certificate_pem, attestation.sha256_thumbprint, new
        ):
            return None  # there already (or promoted already)
        return dc_replace(attestation, secondary_pem=new.certificate_pem, secondary_sha256_thumbprint=None)

    @staticmethod
    def _promoted(attestation: X509Attestation, new: IssuedCertificate) -> X509Attestation | None:
        primary = _holds(attestation.certificate_pem, attestation.sha256_thumbprint, new)
        if primary and not (attestation.secondary_pem or attestation.secondary_sha256_thumbprint):
            return None
        return X509Attestation(new.certificate_pem)

    async def _write(
        self,
        device_id: str,
        change: Callable[[X509Attestation], X509Attestation | None],
        enrollment: Enrollment | None = None,
    ) -> None:
        """Apply ``change`` to the enrollment's attestation, etag-guarded (grouped with other renewals'
        writes into one DPS bulk operation): a concurrent change is read again and ``change`` re-applied
        to it (never overwritten blindly); None from ``change``: nothing to write.  ``enrollment``: a read
        just made (its etag guards the first write: one call saved)."""
        for _ in range(_ATTEMPTS):
            if enrollment is None:
                enrollment = await self._dps.get(device_id)
            if enrollment is None:
                raise NotEnrolled(device_id)
            target = change(enrollment.attestation)
            if target is None:
                return
            try:
                await self._writes.update(dc_replace(enrollment, attestation=target))
            except CloudEtagMismatch:
                enrollment = None  # read again
                continue
            return
        raise CloudUnavailable("the enrollment kept changing under the renewal; tried again later")

    async def _finish_device(self, open_renewals: list[Renewal]) -> None:
        """The device's open renewal steps a crash left (best effort: a failure stays for the worker)."""
        for renewal in open_renewals:
            if renewal.open:  # (a secondary one: only abandoned, if its certificate was revoked)
                try:
                    await self._advance(renewal)
                except NotEnrolled:
                    await self._ledger.failed(renewal, Reason.DEVICE_NOT_ENROLLED)
                except CloudError as exc:
                    await self._ledger.failed(renewal, f"DPS: {exc}")

    async def finish_open(self) -> int:
        """Carry out every open renewal's next step; how many could not be finished now."""
        failed = 0
        for renewal in await self._ledger.open_renewals():
            if not renewal.open:  # (a secondary one: only abandoned, if its certificate was revoked)
                continue
            with bind_device_id(renewal.device_id):
                try:
                    await self._advance(renewal)
                except NotEnrolled:  # nothing to retry soon: the sweep looks again
                    await self._ledger.failed(renewal, Reason.DEVICE_NOT_ENROLLED)
                except CloudError as exc:
                    failed += 1
                    await self._ledger.failed(renewal, f"DPS: {exc}")
                    log.warning("renewal step failed; retried later", extra={"error": str(exc)})
        return failed

    # ------------------------------------------------------------------------------------ the worker
    def start(self) -> None:
        """The worker: open renewals are carried out now (what a crash left), then again while a step
        fails and every ``_SWEEP`` seconds (another replica's, if it died)."""
        self._worker = asyncio.create_task(self._work(), name="renewal-intents")

    async def _work(self) -> None:
        while True:
            try:
                failed = await self.finish_open()
            except Exception:  # the database is away: the next pass tries again
                log.exception("renewal worker pass failed")
                failed = 1
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), _RETRY if failed else _SWEEP)

    async def stop(self) -> None:
        await asyncio.gather(*self._marks, return_exceptions=True)
        await self._writes.close()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    # ---------------------------------------------------------------------------------- the operator
    async def expiring(self, within: timedelta) -> list[ExpiringCertificate]:
        now = self._clock()
        return await self._ledger.expiring(now, now + within)

    async def refresh_gauges(self) -> None:
        self._metrics.certificate_expiry(await self._ledger.expiry_buckets(self._clock()))
