"""Wiring of the enrollment part of factory_svc: settings, the DPS adapter, the outbox and its delivery.

Settings (TOML / environment, prefix FACTORY):

| key                                 | environment                                | default |
|-------------------------------------|--------------------------------------------|---------|
| enroll.enabled                      | FACTORY_ENROLL_ENABLED                     | true    |
| enroll.min_remaining_validity_days  | FACTORY_ENROLL_MIN_REMAINING_VALIDITY_DAYS | 30      |
| enroll.code_hash                    | FACTORY_ENROLL_CODE_HASH                   | hmac-sha256 (or scrypt) |
| enroll.code_hash_log2_n             | FACTORY_ENROLL_CODE_HASH_LOG2_N            | 8 (scrypt's cost) |
| enroll.max_batch                    | FACTORY_ENROLL_MAX_BATCH                   | 1000    |
| enroll.delivery_backoff_max         | FACTORY_ENROLL_DELIVERY_BACKOFF_MAX        | 30 (s)  |
| enroll.code_retention_hours         | FACTORY_ENROLL_CODE_RETENTION_HOURS        | 168 (7 days) |
| cloud.*                             | FACTORY_CLOUD_*                            | see provkit.cloud |
| mode                                | FACTORY_MODE                               | individual (or group) |
| registry.database_url               | FACTORY_REGISTRY_DATABASE_URL (or _FILE)   | - (group: required) |

``mode``: ``individual`` writes each device's disabled individual enrollment to DPS; ``group`` writes the
very same record to the device registry activation_svc reads (``provkit.registry``, at
``registry.database_url``: the URL activation_svc's ``registry.database_url`` names) and nothing to DPS per
device; DPS then holds one enrollment group (``factory-svc enrollment-group apply``).  Everything else
(the outbox, codes, revocation, renewal) is the same in both modes: only the store behind the
``EnrollmentPort`` differs.

The outbox lives in the service's database (``database_url``; by default ``<data_dir>/enrollments.sqlite3``),
and so do the activation codes not yet acknowledged, encrypted with the key in ``<data_dir>/codes.key``
(0600; every replica of a service on PostgreSQL needs the same key file).  Codes older than the retention
window are purged at start-up and then every ``min(retention / 4, 1 h)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography import x509

from dbstore import DatabaseUrl
from factory_svc.enrollment.delivery import OutboxDelivery
from factory_svc.enrollment.lint import lint_policy_from_chain
from factory_svc.enrollment.model import EnrollPolicy
from factory_svc.enrollment.outbox import Outbox
from factory_svc.enrollment.records import RevocationCheck
from factory_svc.enrollment.retained import KEY_FILE, RetainedCodes
from factory_svc.enrollment.service import EnrollmentService
from provkit.activation_code import DEFAULT_HASH, DEFAULT_LOG2_N, CodeHash
from provkit.clock import Clock
from provkit.cloud import (
    CloudNotConfigured,
    CloudSettings,
    EnrollmentPort,
    HubTwinPort,
    load_cloud_settings,
)
from provkit.cloud_calls import CallObserver
from provkit.idempotency import LEASE, RequestIds
from provkit.registry import DeviceRegistry, ProvisioningMode, provisioning_mode, registry_url
from provkit.settings import SettingsError, SettingsSource

log = logging.getLogger("factory_svc.enrollment")


@dataclass(frozen=True)
class EnrollSettings:
    cloud: CloudSettings
    policy: EnrollPolicy
    mode: ProvisioningMode = ProvisioningMode.INDIVIDUAL
    registry: DatabaseUrl | None = None  # group mode: the device registry activation_svc reads


def load_enroll_settings(source: SettingsSource) -> EnrollSettings | None:
    """None when enrollment is switched off (``enroll.enabled = false``) or no cloud is configured at all
    (no DPS connection string, no emulator connection file set, and none at the default place)."""
    if not source.flag("enroll.enabled", True):
        return None
    try:
        cloud = load_cloud_settings(source)
    except CloudNotConfigured:
        return None
    days = source.integer("enroll.min_remaining_validity_days", 30)
    log2_n = source.integer("enroll.code_hash_log2_n", DEFAULT_LOG2_N)
    alg_name = (source.text("enroll.code_hash") or DEFAULT_HASH.value).strip().lower()
    try:
        alg = CodeHash(alg_name)
    except ValueError:
        choices = ", ".join(kind.value for kind in CodeHash)
        raise SettingsError(
            f"{source.describe('enroll.code_hash')} must be one of {choices}, got {alg_name!r}"
        ) from None
    if days < 0:
        raise SettingsError("FACTORY_ENROLL_MIN_REMAINING_VALIDITY_DAYS must not be negative")
    if not 8 <= log2_n <= 20:
        raise SettingsError("FACTORY_ENROLL_CODE_HASH_LOG2_N must be within 8..20")
    retention_hours = source.number("enroll.code_retention_hours", 168.0)
    if retention_hours <= 0:
        raise SettingsError("FACTORY_ENROLL_CODE_RETENTION_HOURS must be positive")
    policy = EnrollPolicy(
        min_remaining_validity=timedelta(days=days),
        code_hash=alg,
        code_hash_log2_n=log2_n,
        max_batch=source.integer("enroll.max_batch", 1000),
        delivery_backoff_max=source.number("enroll.delivery_backoff_max", 30.0),
        code_retention=timedelta(hours=retention_hours),
    )
    mode = provisioning_mode(source)
    registry = registry_url(source, None)
    if mode is ProvisioningMode.GROUP and registry is None:
        raise SettingsError(
            f"group mode writes each device's record to the device registry: set "
            f"{source.env_name('registry.database_url')} to the URL activation_svc's registry is at"
        )
    return EnrollSettings(cloud, policy, mode, registry)


@dataclass
class EnrollmentApp:
    service: EnrollmentService
    delivery: OutboxDelivery
    outbox: Outbox
    codes: RetainedCodes
    dps: EnrollmentPort
    _close_dps: Callable[[], object]
    _purger: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        settings: EnrollSettings,
        ca_chain: Sequence[x509.Certificate],
        data_dir: Path,
        database: DatabaseUrl,
        clock: Clock,
        *,
        observer: CallObserver | None = None,
        revocations: RevocationCheck | None = None,
        request_lease: timedelta = LEASE,
        hubs: HubTwinPort | None = None,
    ) -> EnrollmentApp:
        from provkit.dps import DpsEnrollments

        outbox = await Outbox.open(database)  # first: a database at another schema version stops here
        dps: DpsEnrollments | DeviceRegistry
        if settings.mode is ProvisioningMode.GROUP and settings.registry is not None:
            dps = await DeviceRegistry.open(settings.registry, clock=clock)
        else:
            dps = await DpsEnrollments.open(settings.cloud.dps, observer=observer)
        codes = await RetainedCodes.on(outbox.database, data_dir / KEY_FILE)
        lint = lint_policy_from_chain(ca_chain, settings.policy.min_remaining_validity)
        request_ids = RequestIds(outbox.reservations, lease=request_lease)
        service = EnrollmentService(
            dps, outbox, codes, lint, settings.policy, clock, revocations, request_ids, hubs
        )
        await service.codes.purge()
        delivery = OutboxDelivery(
            dps,
            outbox,
            clock,
            backoff_initial=settings.policy.delivery_backoff_initial,
            backoff_max=settings.policy.delivery_backoff_max,
            revocations=revocations,
        )
        delivery.start()
        runtime = cls(service, delivery, outbox, codes, dps, dps.close)
        period = min(settings.policy.code_retention.total_seconds() / 4, 3600.0)
        runtime._purger = asyncio.create_task(_purge_every(service, period), name="code-purge")
        return runtime

    async def close(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger
        await self.delivery.stop()
        self.service.close()
        await self.outbox.close()
        result = self._close_dps()
        if inspect.isawaitable(result):
            await result


async def _purge_every(service: EnrollmentService, period: float) -> None:
    while True:
        await asyncio.sleep(period)
        try:
            await service.codes.purge()
        except Exception:  # a failed purge is retried next period; it must not stop the service
            log.exception("purging retained activation codes failed")
