"""The outbox store: ordered, durable across reopen, states and request ids."""

from __future__ import annotations

from datetime import UTC, datetime

from factory_svc.enrollment.outbox import NewEntry, Outbox, OutboxMode, OutboxState

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


async def test_order_states_and_reopen(tmp_path):
    path = tmp_path / "enrollments.sqlite3"
    box = await Outbox.open(path)
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


async def test_entries_written_before_entries_had_their_own_shape_still_read(tmp_path):
    """Older outbox files hold the DPS enrollment body of each entry; the certificate and the code hash are
    read from it."""
    import json
    import sqlite3

    path = tmp_path / "enrollments.sqlite3"
    await (await Outbox.open(path)).close()
    body = {
        "registrationId": "dev-old",
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": "PEM"}}}},
        "optionalDeviceInformation": {"activationCode": {"alg": "scrypt", "hash": "h"}},
    }
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO outbox (device_id, mode, body, sha256_thumbprint, state, queued_us) "
            "VALUES ('dev-old', 'replace', ?, 'T', 'pending', 0)",
            (json.dumps(body),),
        )
    box = await Outbox.open(path)
    try:
        entry = await box.oldest_pending()
        assert entry is not None and entry.mode is OutboxMode.REPLACE
        assert (entry.certificate_pem, entry.code_hash) == ("PEM", {"alg": "scrypt", "hash": "h"})
    finally:
        await box.close()


async def test_a_version_1_file_gains_the_enrollment_audit_and_keeps_its_entries(tmp_path):
    import sqlite3

    from factory_svc.enrollment.outbox import MIGRATIONS, SCHEMA, AuditRecord

    path = tmp_path / "enrollments.sqlite3"
    with sqlite3.connect(path) as db:  # a file as the version-1 program left it
        db.executescript(SCHEMA)
        db.execute(
            "INSERT INTO outbox (device_id, mode, body, sha256_thumbprint, state, queued_us) "
            "VALUES ('dev-old', 'create', ?, 'T', 'pending', 1)",
            ('{"certificatePem": "PEM", "codeHash": {"hash": "x"}}',),
        )
        db.execute("PRAGMA user_version = 1")
    box = await Outbox.open(path)
    try:
        (old,) = await box.entries()
        assert (old.device_id, old.intent.owner, old.intent.replace_reason) == ("dev-old", "", "")
        await box.record_audit(AuditRecord(NOW, "transfer", "dev-old", "urn:devprov:factory:p", "r", "why"))
        assert [(a.action, a.detail) for a in await box.audit("dev-old")] == [("transfer", "why")]
    finally:
        await box.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)  # and every later one
