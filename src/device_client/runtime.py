"""DeviceRuntime: the field run loop of one device, as an importable async API.

    runtime = DeviceRuntime(guid, settings, on_change=print)
    task = asyncio.create_task(runtime.run())   # returns after stop(); raises DeviceClientError on a
    ...                                         # fatal problem (bad state dir, expired certificate, ...)
    runtime.stop()                              # graceful: flush what can be flushed, disconnect
    await task

What it does: with no cached assignment it registers with DPS (X.509) and caches assignedHub/deviceId;
while the enrollment is disabled it logs "waiting for activation" and retries with capped exponential
backoff; when DPS refuses it, it also looks at the CRL its certificate names
(``device_client.revocation``: at the first refusal, then at most every ``crl_check_interval_s``): a
verified CRL that lists it ends the run with :class:`CertificateRevokedError` (recorded in the state
directory, so the next run and `status` know without asking); an unreachable or unverifiable CRL changes
nothing. It connects to the hub with a fresh SDK client per connection; when the hub refuses a cached
assignment (device deleted, disabled, moved, new certificate) it registers through DPS again; telemetry is
produced every interval into the persisted outbox and sent strictly in order, so messages produced during
an outage leave after reconnecting; desired properties (initial twin included) are applied and
acknowledged as reported properties; ``telemetryIntervalSeconds`` changes the interval at once.

Certificate renewal (``renewal.est_url`` set; the rules are ``device_client.renewal``; the change-over's
steps and state are ``device_client.changeover``, whose :class:`Changeover` the runtime creates and calls,
giving it its state directory, settings, clock and :class:`RuntimeHooks`): a side task looks at boot, every
check interval and when the certificate falls due; when due it asks the factory's EST listener for a new
certificate (new key of the same kind, same subject, mTLS with the current identity) and keeps the answer
in ``pending/`` ("received").  The connection loop then changes over between two messages: it closes the
hub session, registers with DPS using the new certificate, connects a new hub session with it, promotes
``pending/`` to the identity (the old kept in ``previous/``) and goes on sending from the persisted outbox
(nothing acknowledged is skipped or acknowledged twice).  The side task confirms with ``GET cacerts`` under
the new certificate and drops ``previous/``.  Anything failing before DPS accepted the new certificate
leaves the device on the old one, retried with back-off; a refusal is logged with its reason.  The state
of the renewal is in ``renewal.json`` and in the twin's reported ``certificate`` property.  A ``pending/``
found at start (a kill -9 after "received") resumes the change-over first.

Several runtimes can run in one event loop (one per device); each reports through ``on_change`` with a
:class:`RuntimeSnapshot` whenever its lifecycle state changes or a message is acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar

from device_client import abandoned, dps, renewal
from device_client.backoff import Backoff, first_attempt_delay
from device_client.buffer import TelemetryBuffer
from device_client.changeover import Changeover, RuntimeHooks
from device_client.desired import DesiredOutcome, apply_document, apply_patch
from device_client.errors import (
    CertificateRevokedError,
    CloudGaveUpError,
    DeviceClientError,
    IdentityError,
    Reason,
)
from device_client.hub import HubRefused, HubSession, HubTarget, HubUnavailable
from device_client.identity import check_validity, load_chain
from device_client.revocation import HttpCrlFetcher, RevocationStatus, check_with_deadline
from device_client.settings import Settings
from device_client.state import (
    Assignment,
    DesiredState,
    Revoked,
    StateDir,
    StoredIdentity,
)
from device_client.telemetry import build_body, message_id
from provkit.clock import Clock
from provkit.errors import Reason as SharedReason
from provkit.faults import crash_point

log = logging.getLogger(__name__)
T = TypeVar("T")
_RENEWAL_GRACE_S = 10.0  # how long a stopping run waits for an EST exchange under way (see _end_renewal)
_FAR = timedelta(days=36500)  # "not due by any interval": the next look is the plain check interval

# DPS answers a revoked device (its enrollment disabled by the factory) as one not activated yet; in group
# mode the allocation webhook's refusal is a failed allocation (NOT_ALLOCATED), which looks the same.
_REFUSALS = frozenset(
    {
        dps.RegistrationOutcome.NOT_ACTIVATED,
        dps.RegistrationOutcome.NOT_ENROLLED,
        dps.RegistrationOutcome.NOT_ALLOCATED,
        dps.RegistrationOutcome.CREDENTIALS_REFUSED,
    }
)
_WAITING = frozenset(
    {
        dps.RegistrationOutcome.NOT_ACTIVATED,
        dps.RegistrationOutcome.NOT_ENROLLED,
        dps.RegistrationOutcome.NOT_ALLOCATED,
    }
)


def revoked_error(record: Revoked) -> CertificateRevokedError:
    return CertificateRevokedError(
        f"the device certificate (serial {record.serial}) was {record.sentence()}, as the factory's CRL "
        f"{record.crl_url} says: this device cannot come online with it; the factory must give it a new "
        "certificate (device-client provision --force)",
        SharedReason.CERTIFICATE_REVOKED,
        {"serial": record.serial, "revoked_at": record.revoked_at.isoformat(), "reason": record.reason or ""},
    )


class DeviceState(StrEnum):
    IDLE = "IDLE"
    REGISTERING = "REGISTERING"
    WAITING_FOR_ACTIVATION = "WAITING_FOR_ACTIVATION"
    REGISTERED = "REGISTERED"  # has an assignment, not (yet / any more) connected to its hub
    CONNECTED = "CONNECTED"  # connected, outbox empty
    SENDING = "SENDING"  # connected, flushing the outbox
    STOPPED = "STOPPED"
    FAILED = "FAILED"


@dataclass(frozen=True)
class RuntimeSnapshot:
    guid: str
    state: DeviceState
    assigned_hub: str | None = None
    device_id: str | None = None
    telemetry_sent: int = 0  # acknowledged by the hub during this run
    last_seq_sent: int | None = None
    last_message: dict[str, Any] | None = None  # body of the last acknowledged message
    last_sent_at: datetime | None = None
    pending: int = 0  # in the outbox
    dropped: int = 0  # ever dropped because the outbox was full
    interval_s: float = 5.0
    registrations: int = 0  # successful DPS registrations during this run
    last_error: str | None = None
    backing_off: bool = False  # waiting before the next DPS / hub attempt (or the spread first one)
    certificate_serial: str | None = None  # of the identity in use
    certificate_not_after: datetime | None = None
    renewal_state: str | None = None  # renewal.json's state (device_client.renewal's constants)
    renewals: int = 0  # certificates promoted during this run


Listener = Callable[[RuntimeSnapshot], None]


class _Stopped(Exception):
    """stop() was requested while an SDK call was in flight."""


class _ChangeOver(Exception):
    """A renewed identity waits in ``pending/``: leave the hub session (between two messages) to use it."""


class DeviceRuntime:
    def __init__(
        self,
        guid: str,
        settings: Settings,
        *,
        on_change: Listener | None = None,
        clock: Clock = lambda: datetime.now(UTC),
    ) -> None:
        self.guid = guid
        self.settings = settings
        self.state_dir = StateDir(settings.state_root, guid)
        self._listeners: list[Listener] = [on_change] if on_change else []
        self._clock = clock
        rt = settings.runtime
        self._snapshot = RuntimeSnapshot(
            guid=guid, state=DeviceState.IDLE, interval_s=rt.telemetry_interval_s
        )
        self._stop = asyncio.Event()
        self._wake_sender = asyncio.Event()
        self._interval_changed = asyncio.Event()
        self._link_lost = asyncio.Event()
        self._patches: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._desired_interval: float | None = None
        self._desired = DesiredState(0, {})
        self._buffer: TelemetryBuffer | None = None
        self._session: HubSession | None = None
        self._producer: asyncio.Task[None] | None = None
        self._trouble_since: float | None = None
        self._hub_backoff = Backoff(rt.backoff_initial_s, rt.backoff_max_s)
        self._fatal: Exception | None = None
        self._crl_checked: float | None = None  # monotonic time of this run's last CRL check
        # Renewal: the change-over keeps the identity of record and the one the next connection uses.
        self._changeover = Changeover(
            self.state_dir,
            settings,
            clock,
            RuntimeHooks(
                update=self._update,
                log=self._log,
                registering=lambda: self._update(state=DeviceState.REGISTERING),
                registered=lambda: self._update(
                    registrations=self._snapshot.registrations + 1, last_error=None
                ),
                promoted=lambda: self._update(renewals=self._snapshot.renewals + 1),
                register_once=self._register_once,
            ),
            stop=self._stop,
            wake_sender=self._wake_sender,
        )
        self._renewer: asyncio.Task[None] | None = None
        self.first_delay_s = 0.0  # the spread first attempt this run waited (see first_attempt_window_s)

    # -- public API ----------------------------------------------------------------------------------
    @property
    def snapshot(self) -> RuntimeSnapshot:
        return self._snapshot

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def stop(self) -> None:
        """Ask the runtime to stop gracefully (idempotent; call from the runtime's event loop)."""
        self._stop.set()
        self._wake_sender.set()

    @property
    def interval_s(self) -> float:
        return self._desired_interval or self.settings.runtime.telemetry_interval_s

    async def run(self) -> None:
        """Run until :meth:`stop`; raises :class:`DeviceClientError` for fatal, expected problems."""
        abandoned.install(asyncio.get_running_loop())  # SDK calls it cancels may fail later, unheard
        try:
            self.state_dir.require_present()
            with self.state_dir.locked():
                self.state_dir.finish_promotion()  # one a kill -9 interrupted
                identity = self._identity_to_start_with()
                recorded = self.state_dir.read_revocation(identity.info.serial_hex)
                if recorded is not None:  # revocation is final: no need to knock on DPS again
                    raise revoked_error(recorded)
                await self._run_locked(identity)
            if self._fatal is not None:
                raise self._fatal
        except Exception as exc:
            self._update(state=DeviceState.FAILED, last_error=str(exc))
            raise
        self._update(state=DeviceState.STOPPED)

    # -- internals -------------------------------------------------------------------------------------
    def _identity_to_start_with(self) -> StoredIdentity:
        """The identity, valid now; or, when it has expired while a renewed one valid now waits in
        ``pending/`` (the device was off past its old certificate's end), the expired one: the run
        changes over to the pending one first (DPS already holds it as the secondary certificate)."""
        now = self._clock()
        try:
            return self.state_dir.load_identity(now=now)
        except IdentityError as exc:
            if exc.reason != SharedReason.CERTIFICATE_EXPIRED or not self.state_dir.has_pending():
                raise
            try:
                pending = self.state_dir.load_pending()
                check_validity(pending.info, now=now, source=str(self.state_dir.pending_path))
            except DeviceClientError:
                raise exc from None
        self._log(logging.WARNING, "the certificate expired; changing over to the renewed one in pending/")
        return self.state_dir.load_identity()

    def _update(self, **changes: Any) -> None:
        new = replace(self._snapshot, **changes)
        if new == self._snapshot:
            return
        self._snapshot = new
        for listener in self._listeners:
            try:
                listener(new)
            except Exception:
                log.exception("state listener failed")

    async def _refresh_buffer_stats(self) -> None:
        if self._buffer is not None:
            stats = await self._buffer.stats()
            self._update(pending=stats.pending, dropped=stats.dropped)

    def _log(self, level: int, msg: str, *args: Any, exc_info: bool = False, **extra: Any) -> None:
        log.log(level, msg, *args, exc_info=exc_info, extra={"device_id": self.guid, **extra})

    async def _run_locked(self, identity: StoredIdentity) -> None:
        cloud = self.settings.cloud
        rt = self.settings.runtime
        ca_pem = cloud.trusted_ca_pem()
        self._buffer = await TelemetryBuffer.open(self.state_dir.buffer_path, rt.buffer_max_messages)
        stored = self.state_dir.read_desired()
        if stored is not None:
            self._desired = stored
            self._desired_interval = apply_document(
                {**stored.properties, "$version": stored.version}, None
            ).interval_s
        self._update(interval_s=self.interval_s)
        await self._refresh_buffer_stats()
        changeover = self._changeover
        changeover.identity = changeover.active = identity
        changeover.show_certificate()
        if self.settings.renewal.enabled:
            self._renewer = asyncio.create_task(changeover.renewal_loop(), name=f"renewal-{self.guid}")
        else:
            self._log(logging.INFO, "certificate renewal off (renewal.est_url is not set)")
        if self.state_dir.has_pending():  # "received" before a kill -9: change over first
            self._log(logging.INFO, "a renewed certificate is pending: changing over to it")
            changeover.ready = True
        try:
            backoff = self._hub_backoff
            assignment = self.state_dir.read_assignment()
            fresh = False
            # A fleet that boots together spreads its first knock on DPS / the hub over a small window.
            self.first_delay_s = first_attempt_delay(rt.first_attempt_window_s)
            await self._wait(self.first_delay_s)
            while not self._stop.is_set():
                if changeover.ready:
                    changeover.ready = False
                    moved = await changeover.register_pending(cloud.require_scope(), ca_pem)
                    if moved is not None:
                        assignment, fresh = moved, True
                if assignment is None:
                    assignment = await self._register(changeover.active, cloud.require_scope(), ca_pem)
                    if assignment is None:
                        break  # stopped while registering
                    fresh = True
                self._start_producer()
                self._update(
                    state=DeviceState.REGISTERED,
                    assigned_hub=assignment.assigned_hub,
                    device_id=assignment.device_id,
                )
                try:
                    await self._serve(changeover.active, assignment, ca_pem)
                except _ChangeOver:
                    continue
                except HubRefused as exc:
                    self._log(
                        logging.WARNING,
                        "hub %s refused the device (%s); registering with DPS again",
                        assignment.assigned_hub,
                        exc,
                        hub=assignment.assigned_hub,
                    )
                    self._update(last_error=str(exc))
                    self.state_dir.clear_assignment()
                    if changeover.promote_on_connect:  # the new certificate cannot be used: back to the old
                        changeover.fall_back(renewal.FAILED, "HUB_REFUSED", str(exc))
                    if fresh:  # refused right after DPS put us there: do not hammer DPS
                        await self._pause(backoff, "hub refused a fresh assignment")
                    assignment, fresh = None, False
                except HubUnavailable as exc:
                    self._update(last_error=str(exc))
                    await self._pause(backoff, f"hub {assignment.assigned_hub} unavailable: {exc}")
        finally:
            await self._shutdown()

    async def _unless_stopped(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` unless stop() comes first (then cancel it and raise _Stopped)."""
        task = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise _Stopped
        return task.result()

    async def _pause(self, backoff: Backoff, why: str) -> None:
        now = time.monotonic()
        if self._trouble_since is None:
            self._trouble_since = now
        give_up = self.settings.runtime.give_up_after_s
        if give_up and now - self._trouble_since >= give_up:
            raise CloudGaveUpError(f"giving up after {give_up:g} s: {why}", Reason.CLOUD_UNAVAILABLE)
        delay = backoff.next_delay()
        self._log(logging.INFO, "%s; retrying in %.1f s", why, delay, delay_s=round(delay, 2))
        await self._wait(delay)

    async def _wait(self, delay: float) -> None:
        """Back off for ``delay`` seconds (shown as ``backing_off``), or less if stop() comes first."""
        if delay <= 0 or self._stop.is_set():
            return
        self._update(backing_off=True)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
        finally:
            self._update(backing_off=False)

    async def _register(
        self, identity: StoredIdentity | None, id_scope: str, ca_pem: str | None
    ) -> Assignment | None:
        assert identity is not None
        rt = self.settings.runtime
        # DPS allows a device 5 polls per 10 s.  One attempt is a register request plus polls 2 s apart
        # (the SDK's pace); attempts are spaced by capped exponential backoff starting at
        # backoff_initial_s (2 s by default), which keeps a waiting device well inside that limit.
        backoff = Backoff(rt.backoff_initial_s, rt.backoff_max_s)
        target = dps.DpsTarget(self.settings.cloud.global_endpoint, id_scope, ca_pem)
        waiting_logged = False
        while not self._stop.is_set():
            # A certificate that expired during a long wait is fatal, not a reason to keep knocking.
            check_validity(identity.info, now=self._clock(), source=str(self.state_dir.path))
            if not waiting_logged:  # while waiting for activation, retries do not flap the state
                self._update(state=DeviceState.REGISTERING)
            try:
                assignment = await self._register_once(identity, target)
            except dps.RegistrationRefused as refused:
                if refused.outcome in _REFUSALS:
                    try:
                        await self._look_for_revocation(identity)
                    except _Stopped:
                        return None
                if refused.outcome in _WAITING:
                    self._update(state=DeviceState.WAITING_FOR_ACTIVATION, last_error=str(refused))
                    if not waiting_logged:
                        self._log(
                            logging.WARNING,
                            "waiting for activation (%s)",
                            refused.detail,
                            reason=refused.outcome.value,
                        )
                        waiting_logged = True
                    # Waiting for a person is not an outage: no give-up deadline here.
                    delay = backoff.next_delay()
                    self._log(logging.DEBUG, "next registration attempt in %.1f s", delay)
                    await self._wait(delay)
                else:
                    self._update(last_error=str(refused))
                    await self._pause(backoff, f"registration with DPS failed ({refused})")
                continue
            if assignment is None:  # stop() came first
                return None
            self.state_dir.write_assignment(assignment)
            self._trouble_since = None
            self._log(
                logging.INFO,
                "registered with DPS: hub %s, device id %s",
                assignment.assigned_hub,
                assignment.device_id,
                hub=assignment.assigned_hub,
            )
            self._update(registrations=self._snapshot.registrations + 1, last_error=None)
            return assignment
        return None

    async def _register_once(self, identity: StoredIdentity, target: dps.DpsTarget) -> Assignment | None:
        """One DPS registration attempt with ``identity``: its assignment, or None when stop() came first
        (raises RegistrationRefused)."""
        try:
            return await self._unless_stopped(
                dps.register(
                    guid=self.guid,
                    chain_path=identity.chain_path,
                    key_path=identity.key_path,
                    target=target,
                    timeout_s=self.settings.runtime.sdk_timeout_s * 3,
                )
            )
        except _Stopped:
            return None

    async def _look_for_revocation(self, identity: StoredIdentity) -> None:
        """Raise :class:`CertificateRevokedError` when a verified CRL lists the certificate (checked at the
        first refusal of this run, then at most every ``crl_check_interval_s``)."""
        now = time.monotonic()
        interval = self.settings.runtime.crl_check_interval_s
        if self._crl_checked is not None and now - self._crl_checked < interval:
            return
        self._crl_checked = now
        timeout = self.settings.runtime.sdk_timeout_s
        chain = load_chain(identity.chain_path.read_bytes(), source=str(identity.chain_path))
        check = await self._unless_stopped(
            check_with_deadline(chain, HttpCrlFetcher(timeout), self._clock(), timeout)
        )
        if check.status is RevocationStatus.REVOKED and check.revoked is not None:
            # The recorded revocation ends this run and every later one before it asks anything: a renewal
            # under way gets its answer and records it first (the listener's refusal, with its reason), as
            # long as its own deadline allows, and only then is the revocation written.
            await self._end_renewal(self.settings.runtime.sdk_timeout_s + _RENEWAL_GRACE_S)
            self.state_dir.write_revocation(check.revoked)
            crash_point("revocation.recorded")
            self._log(
                logging.ERROR,
                "certificate serial %s %s (%s)",
                check.revoked.serial,
                check.revoked.sentence(),
                check.detail,
                reason="revoked",
            )
            raise revoked_error(check.revoked)
        if check.status is RevocationStatus.UNKNOWN:
            self._log(logging.WARNING, "revocation status unknown: %s", check.detail, reason="crl_unknown")
        else:
            self._log(logging.INFO, "certificate not revoked: %s", check.detail, reason="crl_not_revoked")

    # -- one hub connection ------------------------------------------------------------------------------
    async def _serve(
        self, identity: StoredIdentity | None, assignment: Assignment, ca_pem: str | None
    ) -> None:
        """Connect and run until stop (returns), the link is lost (raises HubUnavailable/HubRefused) or a
        renewed identity waits (raises _ChangeOver)."""
        assert identity is not None
        self._link_lost.clear()
        self._patches = asyncio.Queue()
        session = HubSession(
            HubTarget(assignment.assigned_hub, assignment.device_id, ca_pem),
            chain_path=identity.chain_path,
            key_path=identity.key_path,
            timeout_s=self.settings.runtime.sdk_timeout_s,
            on_desired_patch=self._on_desired_patch,
            on_disconnected=self._on_link_lost,
        )
        self._session = session
        try:
            try:
                desired = await self._unless_stopped(session.open())
            except _Stopped:
                return
            self._log(
                logging.INFO, "connected to hub %s", assignment.assigned_hub, hub=assignment.assigned_hub
            )
            self._update(state=DeviceState.CONNECTED, last_error=None)
            self._hub_backoff.reset()
            self._trouble_since = None
            changeover = self._changeover
            if changeover.promote_on_connect:
                changeover.promote()
            await self._apply_desired(session, apply_document(desired, self._desired_interval))
            changeover.report_due = False
            await session.report(changeover.certificate_report())
            await self._pump(session)
        finally:
            self._session = None
            if self._stop.is_set():
                await self._flush_on_stop(session)
            await session.close()

    def _on_desired_patch(self, patch: dict[str, Any]) -> None:
        self._patches.put_nowait(patch)
        self._wake_sender.set()

    def _on_link_lost(self) -> None:
        self._link_lost.set()
        self._wake_sender.set()

    async def _pump(self, session: HubSession) -> None:
        """Send the outbox in order and apply desired patches until stop or link loss."""
        assert self._buffer is not None
        while not self._stop.is_set():
            # Cleared before looking: a wake-up that comes while we look (the buffer is read off the loop)
            # is kept for the wait below, not lost.
            self._wake_sender.clear()
            if self._link_lost.is_set() or not session.connected:
                raise HubUnavailable("connection to the hub lost")
            if self._changeover.ready:
                raise _ChangeOver
            if self._changeover.report_due:
                self._changeover.report_due = False
                await session.report(self._changeover.certificate_report())
            while not self._patches.empty():
                patch = self._patches.get_nowait()
                await self._apply_desired(
                    session, apply_patch(self._desired.properties, patch, self._desired_interval)
                )
            pending = await self._buffer.peek(1)
            if not pending:
                self._update(state=DeviceState.CONNECTED)
                await self._wake_sender.wait()
                continue
            self._update(state=DeviceState.SENDING)
            await self._send_one(session)

    async def _send_one(self, session: HubSession) -> None:
        assert self._buffer is not None
        (message,) = await self._buffer.peek(1)
        try:
            await session.send(message.seq, message.message_id, message.body)
        except (HubUnavailable, HubRefused) as exc:
            self._log(
                logging.INFO,
                "message %d not acknowledged by the hub (%s); kept to send again",
                message.seq,
                exc,
                seq=message.seq,
            )
            raise
        crash_point("telemetry.before_commit")  # the hub has it, the outbox still does: resent, same id
        await self._buffer.acknowledge(message.seq)
        try:
            body = json.loads(message.body)
        except ValueError:
            body = None
        stats = await self._buffer.stats()
        self._update(
            telemetry_sent=self._snapshot.telemetry_sent + 1,
            last_seq_sent=message.seq,
            last_message=body,
            last_sent_at=self._clock(),
            pending=stats.pending,
            dropped=stats.dropped,
        )

    async def _apply_desired(self, session: HubSession, outcome: DesiredOutcome) -> None:
        self._desired = DesiredState(outcome.version, outcome.properties)
        self.state_dir.write_desired(self._desired)
        if outcome.interval_s != self._desired_interval:
            self._desired_interval = outcome.interval_s
            self._log(logging.INFO, "telemetry interval now %.3g s", self.interval_s)
            self._update(interval_s=self.interval_s)
            self._interval_changed.set()
        await session.report(outcome.reported_patch)

    async def _flush_on_stop(self, session: HubSession) -> None:
        """Best effort: send what is buffered within one SDK deadline, then let go."""
        assert self._buffer is not None
        deadline = time.monotonic() + self.settings.runtime.sdk_timeout_s
        with contextlib.suppress(HubUnavailable, HubRefused):
            while session.connected and await self._buffer.peek(1) and time.monotonic() < deadline:
                await self._send_one(session)

    # -- telemetry production ------------------------------------------------------------------------------
    def _start_producer(self) -> None:
        if self._producer is None:
            self._producer = asyncio.create_task(self._produce(), name=f"telemetry-{self.guid}")

    async def _produce(self) -> None:
        try:
            await self._produce_forever()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # e.g. the outbox's disk failed: stop rather than run without telemetry
            log.exception("telemetry production failed", extra={"device_id": self.guid})
            self._fatal = exc
            self.stop()

    async def _produce_forever(self) -> None:
        assert self._buffer is not None
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            now = self._clock()

            def message(seq: int, now: datetime = now) -> tuple[str, datetime, bytes]:
                return message_id(self.guid, seq), now, build_body(self.guid, seq, now)

            await self._buffer.append(message)
            produced_at = loop.time()
            await self._refresh_buffer_stats()
            self._wake_sender.set()
            # The next message is due one interval after this one.  A new interval (from the twin) moves
            # that moment at once, so a long old interval is not waited out; it does not send early.
            while not self._stop.is_set():
                self._interval_changed.clear()
                wait = produced_at + self.interval_s - loop.time()
                if wait <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._interval_or_stop(), wait)

    async def _interval_or_stop(self) -> None:
        stop = asyncio.ensure_future(self._stop.wait())
        changed = asyncio.ensure_future(self._interval_changed.wait())
        try:
            await asyncio.wait({stop, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            changed.cancel()

    async def _end_renewal(self, grace_s: float) -> None:
        """End the renewal side task (the run is ending): a step under way (an EST exchange) is let finish
        for up to ``grace_s`` so that its answer is recorded, not lost; past that it is cancelled, and the
        renewal is recorded as cut short rather than left "requested"."""
        if self._renewer is None:
            return
        self._stop.set()
        await asyncio.wait({self._renewer}, timeout=grace_s)
        self._renewer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._renewer
        self._renewer = None

    async def _shutdown(self) -> None:
        await self._end_renewal(_RENEWAL_GRACE_S)
        if self._producer is not None:
            self._producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._producer
            self._producer = None
        if self._session is not None:
            await self._session.close()
        if self._buffer is not None:
            await self._refresh_buffer_stats()
            await self._buffer.close()
            self._buffer = None
