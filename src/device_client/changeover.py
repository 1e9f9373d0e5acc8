"""The certificate change-over of one running device: renewing its certificate and changing over to it.

A collaborator of :class:`device_client.runtime.DeviceRuntime`, which creates one per run and calls it; the
runtime keeps the connection loop, the change-over keeps the renewal's state and the steps of both sides
(the pure rules - when, what request, what answer is accepted - are ``device_client.renewal``):

* the side task (:meth:`Changeover.renewal_loop`): looks at boot, every check interval and when the
  certificate falls due; when due it asks the factory's EST listener for a new certificate (mTLS with the
  current identity) and keeps the answer in ``pending/`` ("received"), then sets :attr:`Changeover.ready`
  and wakes the sender; after the promotion it confirms with ``GET cacerts`` under the new certificate and
  drops ``previous/``;
* the connection loop's part: between two messages the runtime leaves its hub session and calls
  :meth:`Changeover.register_pending` (DPS with the new certificate); the next hub session it connects
  uses :attr:`Changeover.active`, and once connected the runtime calls :meth:`Changeover.promote`
  (``pending/`` becomes the identity, the old kept in ``previous/``); a failure before that calls
  :meth:`Changeover.fall_back` (the old identity goes on; the side task retries after a back-off).

The state of the renewal is in ``renewal.json``, in the runtime's snapshot and in the twin's reported
``certificate`` property (:meth:`Changeover.certificate_report`, sent again when :attr:`report_due`).

It knows the runtime only through :class:`RuntimeHooks` (its snapshot, its log, one DPS registration) and
the two events it is given (stop, wake the sender); it imports nothing of ``device_client.runtime``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from cryptography.hazmat.primitives import hashes

from device_client import dps, renewal
from device_client.backoff import Backoff
from device_client.errors import DeviceClientError
from device_client.est_client import EstClient, EstEndpoint, EstError, EstRefused
from device_client.identity import check_validity, key_to_pem, load_chain, load_key
from device_client.settings import Settings
from device_client.state import Assignment, RenewalRecord, StateDir, StoredIdentity
from provkit.clock import Clock
from provkit.faults import crash_point

_FAR = timedelta(days=36500)  # "not due by any interval": the next look is the plain check interval


class _Log(Protocol):
    def __call__(self, level: int, msg: str, *args: Any, exc_info: bool = False, **extra: Any) -> None: ...


@dataclass(frozen=True)
class RuntimeHooks:
    """What the change-over may do to the runtime that runs it."""

    update: Callable[..., None]  # change fields of the runtime's snapshot (renewal_state, certificate_*)
    log: _Log  # log as the runtime does (its logger, the device's id)
    registering: Callable[[], None]  # the runtime's state becomes REGISTERING
    registered: Callable[[], None]  # one more successful DPS registration this run (and no last error)
    promoted: Callable[[], None]  # one more certificate promoted this run
    # One DPS registration attempt with an identity: its assignment, or None when stop() came first
    # (raises dps.RegistrationRefused).
    register_once: Callable[[StoredIdentity, dps.DpsTarget], Awaitable[Assignment | None]]


class Changeover:
    """The certificate change-over of one runtime run (see the module's docstring)."""

    def __init__(
        self,
        state_dir: StateDir,
        settings: Settings,
        clock: Clock,
        hooks: RuntimeHooks,
        *,
        stop: asyncio.Event,
        wake_sender: asyncio.Event,
    ) -> None:
        self.state_dir = state_dir
        self.settings = settings
        self._clock = clock
        self._hooks = hooks
        self._stop = stop
        self._wake_sender = wake_sender
        # The identity of record, the one the next connection uses (the pending one between DPS accepting
        # it and its promotion), and the hand-offs between the side task and the connection loop.
        self.identity: StoredIdentity | None = None
        self.active: StoredIdentity | None = None
        self.promote_on_connect = False
        self.ready = False  # pending/ is there: the loop should change over
        self._failed = False  # the loop could not: the side task backs off before retrying
        self.report_due = False  # the twin's reported `certificate` should be sent again
        self._wake = asyncio.Event()

    # -- certificate renewal: the change-over (the connection loop's part) -----------------------------------
    async def register_pending(self, id_scope: str, ca_pem: str | None) -> Assignment | None:
        """Register with DPS once with the pending identity; its assignment, or None (then the device stays
        on the old identity and the side task retries with back-off)."""
        try:
            pending = self.state_dir.load_pending()
            check_validity(pending.info, now=self._clock(), source=str(self.state_dir.pending_path))
        except DeviceClientError as exc:
            self.state_dir.drop_pending()
            self.fall_back(renewal.FAILED, "PENDING_UNUSABLE", exc.message)
            return None
        self._hooks.registering()
        target = dps.DpsTarget(self.settings.cloud.global_endpoint, id_scope, ca_pem)
        try:
            assignment = await self._hooks.register_once(pending, target)
        except dps.RegistrationRefused as refused:
            if refused.outcome in (
                dps.RegistrationOutcome.CREDENTIALS_REFUSED,
                dps.RegistrationOutcome.NOT_ENROLLED,
            ):  # DPS will not take this certificate: the next attempt asks the factory again
                self.state_dir.drop_pending()
            self.fall_back(renewal.FAILED, f"DPS_{refused.outcome.value.upper()}", refused.detail)
            return None
        if assignment is None:  # stop() came first
            self.ready = True  # (the run ends; the next start resumes from pending/)
            return None
        crash_point("renewal.registered")  # DPS knows only the new certificate now; pending/ still holds it
        self.state_dir.write_assignment(assignment)
        self.active = pending
        self.promote_on_connect = True
        self._record(renewal.REGISTERED, serial=pending.info.serial_hex)
        self._hooks.log(
            logging.INFO,
            "registered with DPS with the renewed certificate (serial %s): hub %s",
            pending.info.serial_hex,
            assignment.assigned_hub,
            hub=assignment.assigned_hub,
        )
        self._hooks.registered()
        return assignment

    def fall_back(self, state: str, reason: str, detail: str) -> None:
        """The change-over failed: the old identity goes on; the side task retries after a back-off."""
        self._hooks.log(
            logging.WARNING,
            "certificate change-over failed (%s: %s); staying on the current one",
            reason,
            detail,
            reason=reason,
        )
        self.active = self.identity
        self.promote_on_connect = False
        self._failed = True
        self._record(state, reason=reason, detail=detail)
        self._hand_back()

    def promote(self) -> None:
        """The hub took the new certificate: it becomes the identity (the old kept in previous/)."""
        crash_point("renewal.before_promote")
        self.state_dir.promote_pending()
        crash_point("renewal.promoted")
        self.identity = self.active = self.state_dir.load_identity()
        self.promote_on_connect = False
        info = self.identity.info
        self._hooks.log(
            logging.INFO,
            "renewed certificate in use: serial %s, valid until %s",
            info.serial_hex,
            info.not_after.isoformat(),
            serial=info.serial_hex,
        )
        self._hooks.promoted()
        self._record(renewal.PROMOTED, serial=info.serial_hex)
        self.show_certificate()
        self._hand_back()  # to confirm it

    # -- certificate renewal: the side task ---------------------------------------------------------------
    def _record(
        self, state: str, *, reason: str | None = None, detail: str | None = None, serial: str | None = None
    ) -> None:
        """Write the renewal's state and have the twin told.  It does not wake the side task: a record the
        side task writes itself must not cut short the wait it returns (the check interval after a final
        refusal, a back-off, a Retry-After); the connection loop's hand-backs wake it (:meth:`_hand_back`)."""
        self.state_dir.write_renewal(RenewalRecord(state, self._clock(), reason, detail, serial))
        self._hooks.update(renewal_state=state)
        self.report_due = True
        self._wake_sender.set()

    def _hand_back(self) -> None:
        """The connection loop is done with a change-over (promoted, or fell back): the side task, which
        waits without a deadline while one is under way, takes over again."""
        self._wake.set()

    def show_certificate(self) -> None:
        if self.identity is not None:
            info = self.identity.info
            record = self.state_dir.read_renewal()
            self._hooks.update(
                certificate_serial=info.serial_hex,
                certificate_not_after=info.not_after,
                renewal_state=record.state if record else None,
            )

    def certificate_report(self) -> dict[str, Any]:
        assert self.identity is not None
        return renewal.CertificateReport(self.identity.info, self.state_dir.read_renewal()).to_twin()

    def _est(self, identity: StoredIdentity) -> EstClient:
        rs = self.settings.renewal
        assert rs.est_url is not None
        endpoint = EstEndpoint(
            rs.est_url, rs.trusted_ca_pem(self.settings.factory.ca_file), self.settings.runtime.sdk_timeout_s
        )
        return EstClient(endpoint, chain_path=identity.chain_path, key_path=identity.key_path)

    async def renewal_loop(self) -> None:
        rt, rs = self.settings.runtime, self.settings.renewal
        backoff = Backoff(rt.backoff_initial_s, max(rt.backoff_initial_s, min(rs.check_interval_s, 3600.0)))
        while not self._stop.is_set():
            self._wake.clear()
            try:
                delay = await self._renewal_step(backoff)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a disk that fails, say: the device keeps running on what it has
                self._hooks.log(logging.ERROR, "certificate renewal failed", exc_info=True)
                self._record(renewal.FAILED, reason="RENEWAL_ERROR", detail=str(exc))
                delay = backoff.next_delay()
            waits = [
                asyncio.ensure_future(self._stop.wait()),
                asyncio.ensure_future(self._wake.wait()),
            ]
            try:
                await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waits:
                    waiter.cancel()

    async def _renewal_step(self, backoff: Backoff) -> float | None:
        """One look; the seconds until the next one (None: until the connection loop wakes us)."""
        if self.ready or self.promote_on_connect:
            return None  # the connection loop is changing over
        if self._failed:
            self._failed = False
            return backoff.next_delay()
        if self.state_dir.has_previous():
            return await self._confirm(backoff)
        if self.state_dir.has_pending():
            self.ready = True
            self._wake_sender.set()
            return None
        assert self.identity is not None
        info, rs, now = self.identity.info, self.settings.renewal, self._clock()
        due = renewal.due_at(
            info.not_before, info.not_after, fraction=rs.fraction, days_before=rs.days_before
        )
        if now < due:
            return renewal.next_check_in(rs.check_interval_s, now=now, due=due, jitter=rs.jitter)
        return await self._request_renewal(self.identity, backoff)

    async def _request_renewal(self, identity: StoredIdentity, backoff: Backoff) -> float | None:
        rs = self.settings.renewal
        self._hooks.log(
            logging.INFO,
            "certificate serial %s is due for renewal: asking %s",
            identity.info.serial_hex,
            rs.est_url,
        )
        self._record(renewal.REQUESTED)
        current_key = load_key(identity.key_path.read_bytes(), source=str(identity.key_path))
        current_chain = load_chain(identity.chain_path.read_bytes(), source=str(identity.chain_path))
        try:
            key = await asyncio.to_thread(renewal.new_key_like, current_key)  # RSA keys take a while
            csr = renewal.renewal_request(current_chain[0], key)
            issued = await self._est(identity).simplereenroll(csr)
            chain = renewal.accept_issued(issued, key=key, current_chain=current_chain, now=self._clock())
        except asyncio.CancelledError:  # the run ended first: the record no longer says "requested"
            self._record(
                renewal.FAILED, reason="STOPPED", detail="the run ended before the listener answered"
            )
            raise
        except EstRefused as refused:
            self._hooks.log(
                logging.WARNING, "certificate renewal refused: %s", refused, reason=refused.reason
            )
            self._record(renewal.REFUSED, reason=refused.reason, detail=refused.detail)
            if refused.retryable:
                return backoff.next_delay(refused.retry_after_s)
            backoff.reset()  # final for this certificate until something changes: look again next interval
            return renewal.next_check_in(
                rs.check_interval_s, now=self._clock(), due=self._clock() + _FAR, jitter=rs.jitter
            )
        except EstError as exc:
            self._hooks.log(
                logging.WARNING, "certificate renewal failed: %s", exc.detail, reason="EST_UNAVAILABLE"
            )
            self._record(renewal.FAILED, reason="EST_UNAVAILABLE", detail=exc.detail)
            return backoff.next_delay(exc.retry_after_s)
        except renewal.IssuedRejected as exc:
            self._hooks.log(
                logging.WARNING, "certificate renewal: unusable answer: %s", exc, reason="ISSUED_REJECTED"
            )
            self._record(renewal.FAILED, reason="ISSUED_REJECTED", detail=str(exc))
            return backoff.next_delay()
        serial = renewal.serial_of(chain[0])
        metadata = dict(
            identity.metadata,
            serial=serial,
            thumbprint_sha1=chain[0].fingerprint(hashes.SHA1()).hex().upper(),  # noqa: S303 - Azure's
            thumbprint_sha256=chain[0].fingerprint(hashes.SHA256()).hex().upper(),
            not_after=chain[0].not_valid_after_utc.isoformat(),
            renewed_at=self._clock().isoformat(),
            replaces=identity.info.serial_hex,
        )
        self.state_dir.write_pending(
            key_pem=key_to_pem(key), chain_pem=renewal.chain_pem(chain), metadata=metadata
        )
        self._record(renewal.RECEIVED, serial=serial)
        crash_point("renewal.received")  # pending/ holds the new identity; nothing else changed yet
        self._hooks.log(
            logging.INFO, "renewed certificate received: serial %s; changing over", serial, serial=serial
        )
        backoff.reset()
        self.ready = True
        self._wake_sender.set()
        return None

    async def _confirm(self, backoff: Backoff) -> float | None:
        """Tell the listener the new certificate is in use (a request authenticated with it) and drop the
        previous identity."""
        assert self.identity is not None
        try:
            await self._est(self.identity).cacerts()
        except EstError as exc:
            self._hooks.log(logging.INFO, "renewal confirmation not delivered yet (%s); retrying", exc)
            return backoff.next_delay(exc.retry_after_s)
        self.state_dir.drop_previous()
        backoff.reset()
        self._record(renewal.CONFIRMED, serial=self.identity.info.serial_hex)
        self._hooks.log(logging.INFO, "certificate renewal confirmed; the previous identity is dropped")
        return 0.0
