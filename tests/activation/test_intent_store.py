"""The activation intents in the audit store (both backends): a version-1 audit store is migrated (its rows
kept), an intent and its audit row are written together, marked step by step and closed with the row's
outcome."""

from __future__ import annotations

from datetime import UTC, datetime

from support.stores import stored_version, write_at_version

from activation_svc.audit import FILE, MIGRATIONS, SCHEMA, AuditEntry, AuditLog
from activation_svc.intents import HOLD, ActivationIntent, IntentLog
from dbstore import DatabaseUrl
from provkit.cloud import InitialTwin

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


async def test_a_version_1_audit_store_gains_intents_and_an_intent_lives_its_life(database_url):
    row = (
        "INSERT INTO audit (time_us, action, device_id, caller, request_id, outcome, detail) "
        "VALUES (1, 'activate', 'dev', 'urn:devprov:oem:acme', '', 'ok', 'path=enrollment')"
    )
    await write_at_version(database_url, FILE, "audit", [SCHEMA], [row])
    assert stored_version(database_url, FILE, "audit") == 1
    audit = await AuditLog.open(database_url, migrate=True)
    try:
        before = InitialTwin({"line": 3, "customer": "acme"}, {"mode": "eco"})
        after = InitialTwin({"customer": "acme"}, {})
        intent = await audit.begin_intent(
            ActivationIntent(
                "dev", "urn:devprov:oem:acme", "r-1", "hub.example", before, after, "acme", "e1", "s"
            ),
            AuditEntry(NOW, "activate", "dev", "urn:devprov:oem:acme", "r-1", "pending", "intent s"),
        )
        (stored,) = await audit.intents.open_intents("dev")
        assert (stored.id, stored.before, stored.after, stored.dps_done) == (intent.id, before, after, False)
        intent = await audit.intents.mark_dps(intent, "e2")
        (stored,) = await audit.intents.open_intents()
        assert stored.dps_etag == "e2" and not stored.hub_done
        await audit.intents.mark_hub(intent)
        await audit.intents.finish(intent, True, "ok", "path=enrollment+hub-twin s")
        assert await audit.intents.open_intents() == []
        rows = [(e.request_id, e.outcome, e.detail) for e in await audit.entries("dev")]
        assert rows == [("", "ok", "path=enrollment"), ("r-1", "ok", "path=enrollment+hub-twin s")]
    finally:
        await audit.close()
    assert stored_version(database_url, FILE, "audit") == len(MIGRATIONS)


async def test_replicas_hold_open_intents_and_take_over_a_dead_one_s_when_its_hold_runs_out(postgres_url):
    url = DatabaseUrl.parse(postgres_url)
    first, second = await AuditLog.open(url, migrate=True), await AuditLog.open(url)
    now = [1_800_000_000.0]
    try:
        mine = IntentLog(first.db, clock=lambda: now[0])
        theirs = IntentLog(second.db, clock=lambda: now[0])
        twin = InitialTwin({"customer": "acme"}, {})
        row = (1, "activate", "dev", "urn:devprov:oem:acme", "r-1", "pending", "intent s")
        wanted = ActivationIntent("dev", "oem", "r-1", "hub", None, twin, "", "e1", "s")
        intent = await mine.begin(wanted, row)
        assert await mine.hold(intent)  # renewing one's own hold
        assert not await theirs.hold(intent)  # the first replica carries it out
        now[0] += HOLD.total_seconds()  # ... and died: its hold ran out
        assert await theirs.hold(intent)
        assert not await mine.hold(intent)
        await theirs.let_go(intent)  # left open after a failure: anyone may try next
        assert await mine.hold(intent)
        await mine.finish(intent, True, "ok", "done")
        assert not await theirs.hold(intent)  # closed
    finally:
        await first.close()
        await second.close()
