"""The outbox store on both backends: ordered, durable across reopen, states and request ids; on
PostgreSQL, replicas' claims never hold one entry twice and keep a device's entries in order."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

from support.stores import stored_version, write_at_version

from dbstore import DatabaseUrl
from factory_svc.enrollment.outbox import (
    FILE,
    MIGRATIONS,
    SCHEMA,
    AuditRecord,
    Claimed,
    NewEntry,
    Outbox,
    OutboxMode,
    OutboxState,
)

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


async def test_order_states_and_reopen(database_url):
    path = database_url
    box = await Outbox.open(path, migrate=True)
    seqs = await box.enqueue(
        [NewEntry(f"dev-{i}", OutboxMode.CREATE, f"PEM{i}", {"hash": str(i)}, f"T{i}") for i in range(3)], NOW
    )
    assert seqs == sorted(seqs)
    assert box.changed.is_set()
    first = await box.oldest_pending()
    assert first is not None and first.device_id == "dev-0"
    assert (first.certificate_pem, first.code_hash, first.mode) == ("PEM0", {"hash": "0"}, OutboxMode.CREATE)
    await box.record_attempt(first.seq, "DPS_UNAVAILABLE", "down")
    await box.mark_delivered(first.seq, "created", NOW)
    second = await box.oldest_pending()
    assert second is not None and second.device_id == "dev-1"
    await box.mark_failed(second.seq, "ENROLLMENT_EXISTS", "other certificate")
    await box.remember_request("req-1", "fp", {"a": 1})
    await box.close()

    box = await Outbox.open(path)
    assert await box.pending_count() == 1
    entries = {e.device_id: e for e in await box.entries()}
    assert entries["dev-0"].state is OutboxState.DELIVERED and entries["dev-0"].attempts == 2
    assert entries["dev-0"].delivered_at == NOW and entries["dev-0"].failure_reason == ""
    assert (
        entries["dev-1"].state is OutboxState.FAILED
        and entries["dev-1"].failure_reason == "ENROLLMENT_EXISTS"
    )
    assert (await box.latest_for("dev-2")).state is OutboxState.PENDING
    assert await box.find_request("req-1") == ("fp", {"a": 1})
    assert await box.find_request("req-2") is None
    # A delivered entry cannot be failed afterwards (updates only apply to pending entries).
    await box.mark_failed(entries["dev-0"].seq, "X", "y")
    assert (await box.latest_for("dev-0")).state is OutboxState.DELIVERED
    await box.close()


async def test_entries_written_before_entries_had_their_own_shape_still_read(database_url):
    """Older outbox files hold the DPS enrollment body of each entry; the certificate and the code hash are
    read from it."""
    body = {
        "registrationId": "dev-old",
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": "PEM"}}}},
        "optionalDeviceInformation": {"activationCode": {"alg": "scrypt", "hash": "h"}},
    }
    row = (
        "INSERT INTO outbox (device_id, mode, body, sha256_thumbprint, state, queued_us) "
        f"VALUES ('dev-old', 'replace', '{json.dumps(body)}', 'T', 'pending', 0)"
    )
    await write_at_version(database_url, FILE, "enrollment outbox", MIGRATIONS, [row])
    box = await Outbox.open(database_url)
    try:
        entry = await box.oldest_pending()
        assert entry is not None and entry.mode is OutboxMode.REPLACE
        assert (entry.certificate_pem, entry.code_hash) == ("PEM", {"alg": "scrypt", "hash": "h"})
    finally:
        await box.close()


async def test_a_version_1_store_gains_the_enrollment_audit_and_keeps_its_entries(database_url):
    row = (  # a store as the version-1 program left it
        "INSERT INTO outbox (device_id, mode, body, sha256_thumbprint, state, queued_us) "
        """VALUES ('dev-old', 'create', '{"certificatePem": "PEM", "codeHash": {"hash": "x"}}', """
        "'T', 'pending', 1)"
    )
    await write_at_version(database_url, FILE, "enrollment outbox", [SCHEMA], [row])
    box = await Outbox.open(database_url, migrate=True)
    try:
        (old,) = await box.entries()
        assert (old.device_id, old.intent.owner, old.intent.replace_reason) == ("dev-old", "", "")
        await box.record_audit(AuditRecord(NOW, "transfer", "dev-old", "urn:devprov:factory:p", "r", "why"))
        assert [(a.action, a.detail) for a in await box.audit("dev-old")] == [("transfer", "why")]
    finally:
        await box.close()
    assert stored_version(database_url, FILE, "enrollment outbox") == len(MIGRATIONS)  # and every later one


async def test_replicas_claim_different_entries_and_a_device_s_entries_in_order(postgres_url):
    url = DatabaseUrl.parse(postgres_url)
    first, second = await Outbox.open(url, migrate=True), await Outbox.open(url)
    try:
        await first.enqueue(
            [
                NewEntry("dev-a", OutboxMode.CREATE, "A1", {"h": "a1"}, "TA1"),
                NewEntry("dev-a", OutboxMode.REPLACE, "A2", {"h": "a2"}, "TA2"),
                NewEntry("dev-b", OutboxMode.CREATE, "B1", {"h": "b1"}, "TB1"),
            ],
            NOW,
        )
        held, release = asyncio.Event(), asyncio.Event()

        async def hold(claim: Claimed) -> str:
            held.set()
            await release.wait()
            await claim.mark_delivered("created", NOW)
            return claim.entry.certificate_pem

        async def take(claim: Claimed) -> str:
            await claim.mark_delivered("created", NOW)
            return claim.entry.certificate_pem

        holding = asyncio.create_task(first.with_next(hold))
        await held.wait()
        # dev-a's first entry is held: the other replica gets dev-b's, never dev-a's second entry.
        assert await second.with_next(take) == "B1"
        assert await second.with_next(take) is None
        release.set()
        assert await holding == "A1"
        assert await second.with_next(take) == "A2"
        assert await first.with_next(take) is None
        states = [(e.certificate_pem, e.state, e.attempts) for e in await first.entries()]
        assert states == [(pem, OutboxState.DELIVERED, 1) for pem in ("A1", "A2", "B1")]
    finally:
        await first.close()
        await second.close()


async def test_retained_codes_on_both_backends(database_url, tmp_path):
    from factory_svc.enrollment.retained import KEY_FILE, RetainedCodes

    box = await Outbox.open(database_url, migrate=True)
    try:
        codes = await RetainedCodes.on(box.database, tmp_path / KEY_FILE)
        first = [("dev-a", "AAAA-1111", {"salt": "s1"}), ("dev-b", "BBBB-2222", {"salt": "s2"})]
        await codes.retain(first, NOW)
        await codes.retain([("dev-a", "AAAA-3333", {"salt": "s3"})], NOW + timedelta(hours=2))
        assert await codes.find("dev-a", "s1") == "AAAA-1111" and await codes.count() == 3
        await codes.supersede("dev-a", "s3")
        assert await codes.find("dev-a", "s1") is None and await codes.find("dev-a", "s3") == "AAAA-3333"
        assert await codes.acknowledge(["dev-b", "dev-c"]) == [("dev-b", "s2")]
        assert await codes.purge(NOW + timedelta(hours=1)) == 0  # dev-a's code is younger
        assert await codes.purge(NOW + timedelta(hours=3)) == 1 and await codes.count() == 0
    finally:
        await box.close()
