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

Certificate renewal (``renewal.est_url`` set; ``device_client.renewal``): a side task looks at boot, every
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

from cryptography.hazmat.primitives import hashes

from device_client import abandoned, dps, renewal
from device_client.backoff import Backoff, first_attempt_delay
from device_client.buffer import TelemetryBuffer
from device_client.desired import DesiredOutcome, apply_document, apply_patch
from device_client.errors import CertificateRevokedError, CloudGaveUpError, DeviceClientError, Reason
from device_client.est_client import EstClient, EstEndpoint, EstError, EstRefused
from device_client.hub import HubRefused, HubSession, HubTarget, HubUnavailable
from device_client.identity import check_validity, key_to_pem, load_chain, load_key
from device_client.revocation import HttpCrlFetcher, RevocationStatus, check_with_deadline
from device_client.settings import Settings
from device_client.state import (
    Assignment,
    DesiredState,
    RenewalRecord,
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
_FAR = timedelta(days=36500)  # "not due by any interval": the next look is the plain check interval

# DPS answers a revoked device (its enrollment disabled by the factory) as one not activated yet.
_REFUSALS = frozenset(
    {
        dps.RegistrationOutcome.NOT_ACTIVATED,
        dps.RegistrationOutcome.NOT_ENROLLED,
        dps.RegistrationOutcome.CREDENTIALS_REFUSED,
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
        # Renewal: the identity of record, the one the next connection uses (the pending one between DPS
        # accepting it and its promotion), and the hand-offs between the side task and the loop.
        self._identity: StoredIdentity | None = None
        self._active: StoredIdentity | None = None
        self._promote_on_connect = False
        self._changeover_ready = False  # pending/ is there: the loop should change over
        self._changeover_failed = False  # the loop could not: the side task backs off before retrying
        self._report_due = False  # the twin's reported `certificate` should be sent again
        self._renewal_wake = asyncio.Event()
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
                identity = self.state_dir.load_identity(now=self._clock())
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

    def _log(self, level: int, msg: str, *args: Any, **extra: Any) -> None:
        log.log(level, msg, *args, extra={"device_id": self.guid, **extra})

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
        self._identity = self._active = identity
        self._show_certificate()
        if self.settings.renewal.enabled:
            self._renewer = asyncio.create_task(self._renewal_loop(), name=f"renewal-{self.guid}")
        else:
            self._log(logging.INFO, "certificate renewal off (renewal.est_url is not set)")
        if self.state_dir.has_pending():  # "received" before a kill -9: change over first
            self._log(logging.INFO, "a renewed certificate is pending: changing over to it")
            self._changeover_ready = True
        try:
            backoff = self._hub_backoff
            assignment = self.state_dir.read_assignment()
            fresh = False
            # A fleet that boots together spreads its first knock on DPS / the hub over a small window.
            self.first_delay_s = first_attempt_delay(rt.first_attempt_window_s)
            await self._wait(self.first_delay_s)
            while not self._stop.is_set():
                if self._changeover_ready:
                    self._changeover_ready = False
                    moved = await self._register_pending(cloud.require_scope(), ca_pem)
                    if moved is not None:
                        assignment, fresh = moved, True
                if assignment is None:
                    assignment = await self._register(self._active, cloud.require_scope(), ca_pem)
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
                    await self._serve(self._active, assignment, ca_pem)
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
                    if self._promote_on_connect:  # the new certificate cannot be used: back to the old
                        self._fall_back(renewal.FAILED, "HUB_REFUSED", str(exc))
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
            except _Stopped:
                return None
            except dps.RegistrationRefused as refused:
                if refused.outcome in _REFUSALS:
                    try:
                        await self._look_for_revocation(identity)
                    except _Stopped:
                        return None
                if refused.outcome in (
                    dps.RegistrationOutcome.NOT_ACTIVATED,
                    dps.RegistrationOutcome.NOT_ENROLLED,
                ):
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

    async def _register_once(self, identity: StoredIdentity, target: dps.DpsTarget) -> Assignment:
        """One DPS registration attempt with ``identity`` (raises RegistrationRefused, _Stopped)."""
        return await self._unless_stopped(
            dps.register(
                guid=self.guid,
                chain_path=identity.chain_path,
                key_path=identity.key_path,
                target=target,
                timeout_s=self.settings.runtime.sdk_timeout_s * 3,
            )
        )

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
            self.state_dir.write_revocation(check.revoked)
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
            if self._promote_on_connect:
                self._promote()
            await self._apply_desired(session, apply_document(desired, self._desired_interval))
            self._report_due = False
            await session.report(self._certificate_report())
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
            if self._changeover_ready:
                raise _ChangeOver
            if self._report_due:
                self._report_due = False
                await session.report(self._certificate_report())
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

    async def _shutdown(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
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

    # -- certificate renewal: the change-over (the connection loop's part) -----------------------------------
    async def _register_pending(self, id_scope: str, ca_pem: str | None) -> Assignment | None:
        """Register with DPS once with the pending identity; its assignment, or None (then the device stays
        on the old identity and the side task retries with back-off)."""
        try:
            pending = self.state_dir.load_pending()
            check_validity(pending.info, now=self._clock(), source=str(self.state_dir.pending_path))
        except DeviceClientError as exc:
            self.state_dir.drop_pending()
            self._fall_back(renewal.FAILED, "PENDING_UNUSABLE", exc.message)
            return None
        self._update(state=DeviceState.REGISTERING)
        target = dps.DpsTarget(self.settings.cloud.global_endpoint, id_scope, ca_pem)
        try:
            assignment = await self._register_once(pending, target)
        except _Stopped:
            self._changeover_ready = True  # (the run ends; the next start resumes from pending/)
            return None
        except dps.RegistrationRefused as refused:
            if refused.outcome in (
                dps.RegistrationOutcome.CREDENTIALS_REFUSED,
                dps.RegistrationOutcome.NOT_ENROLLED,
            ):  # DPS will not take this certificate: the next attempt asks the factory again
                self.state_dir.drop_pending()
            self._fall_back(renewal.FAILED, f"DPS_{refused.outcome.value.upper()}", refused.detail)
            return None
        crash_point("renewal.registered")  # DPS knows only the new certificate now; pending/ still holds it
        self.state_dir.write_assignment(assignment)
        self._active = pending
        self._promote_on_connect = True
        self._record(renewal.REGISTERED, serial=pending.info.serial_hex)
        self._log(
            logging.INFO,
            "registered with DPS with the renewed certificate (serial %s): hub %s",
            pending.info.serial_hex,
            assignment.assigned_hub,
            hub=assignment.assigned_hub,
        )
        self._update(registrations=self._snapshot.registrations + 1, last_error=None)
        return assignment

    def _fall_back(self, state: str, reason: str, detail: str) -> None:
        """The change-over failed: the old identity goes on; the side task retries after a back-off."""
        self._log(
            logging.WARNING,
            "certificate change-over failed (%s: %s); staying on the current one",
            reason,
            detail,
            reason=reason,
        )
        self._active = self._identity
        self._promote_on_connect = False
        self._changeover_failed = True
        self._record(state, reason=reason, detail=detail)

    def _promote(self) -> None:
        """The hub took the new certificate: it becomes the identity (the old kept in previous/)."""
        crash_point("renewal.before_promote")
        self.state_dir.promote_pending()
        crash_point("renewal.promoted")
        self._identity = self._active = self.state_dir.load_identity()
        self._promote_on_connect = False
        info = self._identity.info
        self._log(
            logging.INFO,
            "renewed certificate in use: serial %s, valid until %s",
            info.serial_hex,
            info.not_after.isoformat(),
            serial=info.serial_hex,
        )
        self._update(renewals=self._snapshot.renewals + 1)
        self._record(renewal.PROMOTED, serial=info.serial_hex)
        self._show_certificate()

    # -- certificate renewal: the side task ---------------------------------------------------------------
    def _record(
        self, state: str, *, reason: str | None = None, detail: str | None = None, serial: str | None = None
    ) -> None:
        self.state_dir.write_renewal(RenewalRecord(state, self._clock(), reason, detail, serial))
        self._update(renewal_state=state)
        self._report_due = True
        self._wake_sender.set()
        self._renewal_wake.set()

    def _show_certificate(self) -> None:
        if self._identity is not None:
            info = self._identity.info
            record = self.state_dir.read_renewal()
            self._update(
                certificate_serial=info.serial_hex,
                certificate_not_after=info.not_after,
                renewal_state=record.state if record else None,
            )

    def _certificate_report(self) -> dict[str, Any]:
        assert self._identity is not None
        return renewal.CertificateReport(self._identity.info, self.state_dir.read_renewal()).to_twin()

    def _est(self, identity: StoredIdentity) -> EstClient:
        rs = self.settings.renewal
        assert rs.est_url is not None
        endpoint = EstEndpoint(
            rs.est_url, rs.trusted_ca_pem(self.settings.factory.ca_file), self.settings.runtime.sdk_timeout_s
        )
        return EstClient(endpoint, chain_path=identity.chain_path, key_path=identity.key_path)

    async def _renewal_loop(self) -> None:
        rt, rs = self.settings.runtime, self.settings.renewal
        backoff = Backoff(rt.backoff_initial_s, max(rt.backoff_initial_s, min(rs.check_interval_s, 3600.0)))
        while not self._stop.is_set():
            self._renewal_wake.clear()
            try:
                delay = await self._renewal_step(backoff)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a disk that fails, say: the device keeps running on what it has
                log.exception("certificate renewal failed", extra={"device_id": self.guid})
                self._record(renewal.FAILED, reason="RENEWAL_ERROR", detail=str(exc))
                delay = backoff.next_delay()
            waits = [
                asyncio.ensure_future(self._stop.wait()),
                asyncio.ensure_future(self._renewal_wake.wait()),
            ]
            try:
                await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waits:
                    waiter.cancel()

    async def _renewal_step(self, backoff: Backoff) -> float | None:
        """One look; the seconds until the next one (None: until the connection loop wakes us)."""
        if self._changeover_ready or self._promote_on_connect:
            return None  # the connection loop is changing over
        if self._changeover_failed:
            self._changeover_failed = False
            return backoff.next_delay()
        if self.state_dir.has_previous():
            return await self._confirm(backoff)
        if self.state_dir.has_pending():
            self._changeover_ready = True
            self._wake_sender.set()
            return None
        assert self._identity is not None
        info, rs, now = self._identity.info, self.settings.renewal, self._clock()
        due = renewal.due_at(
            info.not_before, info.not_after, fraction=rs.fraction, days_before=rs.days_before
        )
        if now < due:
            return renewal.next_check_in(rs.check_interval_s, now=now, due=due, jitter=rs.jitter)
        return await self._request_renewal(self._identity, backoff)

    async def _request_renewal(self, identity: StoredIdentity, backoff: Backoff) -> float | None:
        rs = self.settings.renewal
        self._log(
            logging.INFO,
            "certificate serial %s is due for renewal: asking %s",
            identity.info.serial_hex,
            rs.est_url,
        )
        self._record(renewal.REQUESTED)
        current_key = load_key(identity.key_path.read_bytes(), source=str(identity.key_path))
        current_chain = load_chain(identity.chain_path.read_bytes(), source=str(identity.chain_path))
        key = await asyncio.to_thread(renewal.new_key_like, current_key)  # RSA keys take a while
        csr = renewal.renewal_request(current_chain[0], key)
        try:
            issued = await self._est(identity).simplereenroll(csr)
            chain = renewal.accept_issued(issued, key=key, current_chain=current_chain, now=self._clock())
        except EstRefused as refused:
            self._log(logging.WARNING, "certificate renewal refused: %s", refused, reason=refused.reason)
            self._record(renewal.REFUSED, reason=refused.reason, detail=refused.detail)
            if refused.retryable:
                return backoff.next_delay(refused.retry_after_s)
            backoff.reset()  # final for this certificate until something changes: look again next interval
            return renewal.next_check_in(
                rs.check_interval_s, now=self._clock(), due=self._clock() + _FAR, jitter=rs.jitter
            )
        except EstError as exc:
            self._log(logging.WARNING, "certificate renewal failed: %s", exc.detail, reason="EST_UNAVAILABLE")
            self._record(renewal.FAILED, reason="EST_UNAVAILABLE", detail=exc.detail)
            return backoff.next_delay(exc.retry_after_s)
        except renewal.IssuedRejected as exc:
            self._log(
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
        self._log(
            logging.INFO, "renewed certificate received: serial %s; changing over", serial, serial=serial
        )
        backoff.reset()
        self._changeover_ready = True
        self._wake_sender.set()
        return None

    async def _confirm(self, backoff: Backoff) -> float | None:
        """Tell the listener the new certificate is in use (a request authenticated with it) and drop the
        previous identity."""
        assert self._identity is not None
        try:
            await self._est(self._identity).cacerts()
        except EstError as exc:
            self._log(logging.INFO, "renewal confirmation not delivered yet (%s); retrying", exc)
            return backoff.next_delay(exc.retry_after_s)
        self.state_dir.drop_previous()
        backoff.reset()
        self._record(renewal.CONFIRMED, serial=self._identity.info.serial_hex)
        self._log(logging.INFO, "certificate renewal confirmed; the previous identity is dropped")
        return 0.0
