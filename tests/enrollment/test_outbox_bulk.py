"""The outbox delivers in DPS bulk creates (of ten, several at once), against the real emulator, on both
backends: a bulk answer that refuses some of its records settles each on its own -- an id enrolled with
another certificate fails ENROLLMENT_EXISTS and stays as it was, an id holding this very write (a crash
between the bulk write and the marks) is recognised, not written again, a record DPS refuses fails
DPS_REFUSED -- while the rest of the bulk is delivered; a device's second entry waits for its first."""

from __future__ import annotations

import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from provisioning_env import connection_file, dps_enrollment
from support.certs import TestCa
from support.waiting import until

from factory_svc.enrollment.delivery import OutboxDelivery
from factory_svc.enrollment.outbox import NewEntry, Outbox, OutboxMode, OutboxState
from factory_svc.enrollment.records import new_enrollment_of
from provkit.activation_code import hash_code, new_code, verify_code
from provkit.cloud import load_cloud_settings
from provkit.cloud_calls import CallObserver
from provkit.dps import DpsEnrollments
from provkit.settings import SettingsSource

NOW = datetime.now(UTC)


@dataclass
class CountedCalls:
    """The DPS calls the delivery made, by operation (``provkit.metrics.CloudMetrics``)."""

    calls: Counter[str] = field(default_factory=Counter)

    def cloud_call(self, service: str, operation: str, outcome: str, seconds: float) -> None:
        self.calls[operation] += 1

    def throttled(self, service: str) -> None:
        pass


@contextlib.asynccontextmanager
async def _dps(emulator, metrics: CountedCalls | None = None) -> AsyncIterator[DpsEnrollments]:
    source = SettingsSource("T", env={"T_CLOUD_EMULATOR_CONNECTION_FILE": str(connection_file(emulator))})
    observer = CallObserver("dps", metrics) if metrics is not None else None
    dps = await DpsEnrollments.open(load_cloud_settings(source).dps, observer=observer)
    try:
        yield dps
    finally:
        await dps.close()


def _device(ca: TestCa, device_id: str) -> tuple[str, str]:
    """(certificate PEM, SHA-256 thumbprint) of a new device certificate."""
    cert = ca.leaf(
        device_id, ec.generate_private_key(ec.SECP256R1()), not_before=NOW - timedelta(minutes=5),
        not_after=NOW + timedelta(days=365),
    )  # fmt: skip
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    return pem, cert.fingerprint(hashes.SHA256()).hex().upper()


def _entry(device_id: str, pem: str, sha256: str, code: str) -> NewEntry:
    return NewEntry(device_id, OutboxMode.CREATE, pem, hash_code(code), sha256)


async def test_a_bulk_answer_with_refused_records_settles_each_and_delivers_the_rest(
    module_emulator, database_url
):
    ca, tag = TestCa(), uuid.uuid4().hex[:8]
    ids = [f"bulk-{tag}-{k:02d}" for k in range(14)]
    devices = {d: _device(ca, d) for d in ids}
    codes = {d: new_code() for d in ids}
    taken, applied, broken = ids[3], ids[7], ids[11]
    entries = [_entry(d, *devices[d], codes[d]) for d in ids]
    broken_index = ids.index(broken)
    entries[broken_index] = NewEntry(
        broken, OutboxMode.CREATE, "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n"
        "-----END CERTIFICATE-----\n", hash_code(codes[broken]), "0" * 64,
    )  # fmt: skip
    second_pem, second_sha = _device(ca, ids[0])  # a later entry of the first device: after its first
    entries.append(NewEntry(ids[0], OutboxMode.REPLACE, second_pem, hash_code(new_code()), second_sha))
    codes_after = {**codes, ids[0]: entries[-1].code_hash}

    outbox = await Outbox.open(database_url, migrate=True)
    metrics = CountedCalls()
    try:
        async with _dps(module_emulator) as dps:
            other_pem, _ = _device(ca, taken)  # enrolled with another certificate before the outbox delivers
            await dps.create(new_enrollment_of(taken, other_pem, hash_code(new_code())))
            applied_entry = entries[ids.index(applied)]  # this very write, made before a crash lost its mark
            await dps.create(new_enrollment_of(applied, devices[applied][0], applied_entry.code_hash))
        await outbox.enqueue(entries, NOW)
        async with _dps(module_emulator, metrics) as dps:
            delivery = OutboxDelivery(dps, outbox, lambda: datetime.now(UTC), backoff_max=0.5)
            delivery.start()
            try:
                await until(lambda: _none_pending(outbox), "the outbox delivered", timeout=60)
            finally:
                await delivery.stop()
        states = {(e.device_id, e.mode): e for e in await outbox.entries()}
    finally:
        await outbox.close()

    outcome = {d: (states[d, OutboxMode.CREATE].state, states[d, OutboxMode.CREATE].outcome) for d in ids}
    refused = {d: states[d, OutboxMode.CREATE].failure_reason for d in ids}
    assert outcome[taken][0] is OutboxState.FAILED and refused[taken] == "ENROLLMENT_EXISTS"
    assert outcome[broken][0] is OutboxState.FAILED and refused[broken] == "DPS_REFUSED"
    assert outcome[applied] == (OutboxState.DELIVERED, "already-applied")
    delivered = [d for d in ids if d not in (taken, broken, applied)]
    assert {outcome[d] for d in delivered} == {(OutboxState.DELIVERED, "created")}
    replaced = states[ids[0], OutboxMode.REPLACE]
    assert (replaced.state, replaced.outcome) == (OutboxState.DELIVERED, "replaced")
    assert replaced.delivered_at is not None and outcome[ids[0]][0] is OutboxState.DELIVERED
    assert states[ids[0], OutboxMode.CREATE].delivered_at <= replaced.delivered_at  # type: ignore[operator]

    # in bulk: two bulk creates for the 14 new entries; a GET only for the two ids DPS held and for the
    # replacement (which updates once)
    assert metrics.calls["bulk_create_enrollments"] == 2
    assert metrics.calls["get_enrollment"] == 2 + 1 and metrics.calls["update_enrollment"] == 1
    assert metrics.calls["create_enrollment"] == 0

    for device_id in [*delivered, applied]:
        enrollment = await dps_enrollment(module_emulator, device_id)
        record = enrollment["optionalDeviceInformation"]["activationCode"]
        assert enrollment["provisioningStatus"] == "disabled"
        if device_id == ids[0]:  # replaced: the second entry's code hash
            assert record == codes_after[device_id] and not verify_code(codes[device_id], record)
        else:
            assert verify_code(codes[device_id], record)
    untouched = await dps_enrollment(module_emulator, taken)
    assert not verify_code(codes[taken], untouched["optionalDeviceInformation"]["activationCode"])
    assert await dps_enrollment(module_emulator, broken) is None


async def _none_pending(outbox: Outbox) -> bool:
    return await outbox.pending_count() == 0
