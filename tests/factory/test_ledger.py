"""The ledger: group commit on both backends (concurrent records share one transaction, everything answered
is committed, read back by a fresh connection); on PostgreSQL a group ends its request ids' reservations; on
both backends a conflicting record is refused alone and
counts are per id, a certificate is revoked once (its first time and reason kept, one audit row, also when
two ledgers revoke it at once), a lot keeps its items and their keys until it is acknowledged, and a
refusals row of an older ledger reads as one refusal beside the summaries of version 7."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support.stores import stored_version, write_at_version

from dbstore import Conflict, DatabaseUrl
from dbstore.reservations import ClaimKind
from factory_svc.ledger import FILE, MIGRATIONS, Ledger
from factory_svc.lots.model import LotEntry, StoredLot
from factory_svc.mint.keys import KeyType
from factory_svc.mint.model import IssuedCertificate, KeySource
from factory_svc.mint.store import Recorded, RequestIdTaken
from factory_svc.revocation.model import Revocation, RevocationReason, Standing
from provkit.authz import Refusal

NOW = datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)


def certificate(serial: int, device_id: str, request_id: str = "", days: int = 365) -> IssuedCertificate:
    pem = f"-----BEGIN CERTIFICATE-----\n{serial:064X}\n-----END CERTIFICATE-----\n"
    return IssuedCertificate(
        serial_number=f"{serial:04X}",
        device_id=device_id,
        certificate_pem=pem,
        chain_pem=pem * 3,
        sha1_thumbprint=f"{serial:040X}",
        sha256_thumbprint=f"{serial:064X}",
        not_before=NOW - timedelta(minutes=5),
        not_after=NOW + timedelta(days=days),
        issued_at=NOW,
        key_type=KeyType.EC_P256,
        key_source=KeySource.CSR,
        caller="insecure:test",
        request_id=request_id,
    )


def stored_serials(path: Path) -> list[str]:
    with sqlite3.connect(path) as fresh:  # another connection sees only what was committed
        return [r[0] for r in fresh.execute("SELECT serial_number FROM certificates ORDER BY serial_number")]


async def test_concurrent_records_commit_together_and_each_gets_its_ids_count(database_url) -> None:
    ledger = await Ledger.open(database_url, migrate=True)
    try:
        expired = certificate(1, "dev-a", days=-1)
        results = await asyncio.gather(
            ledger.certificates.record(expired, None, NOW),
            ledger.certificates.record(certificate(2, "dev-a"), None, NOW),
            ledger.certificates.record(certificate(3, "dev-a"), None, NOW),
            ledger.certificates.record(certificate(4, "dev-b", "req-4"), "fp-4", NOW),
        )
        assert ledger.certificates.group_commits == 1  # one transaction for the four
        # dev-a holds two unexpired certificates once the batch is in; dev-b one
        assert results == [Recorded(2), Recorded(2), Recorded(2), Recorded(1)]
        fresh = await Ledger.open(database_url)  # another connection sees only what was committed
        try:
            listed = await fresh.certificates.page(None, 10, None)
        finally:
            await fresh.close()
        assert sorted(c.serial_number for c in listed) == ["0001", "0002", "0003", "0004"]
        stored = await ledger.certificates.find_request("req-4")
        assert stored is not None and stored.fingerprint == "fp-4"
        assert stored.certificate == certificate(4, "dev-b", "req-4")
    finally:
        await ledger.close()


async def test_a_conflicting_record_is_refused_alone(database_url) -> None:
    ledger = await Ledger.open(database_url, migrate=True)
    certificates = ledger.certificates
    try:
        assert await certificates.record(certificate(10, "dev-c", "taken"), "fp", NOW) == Recorded(1)
        results = await asyncio.gather(
            certificates.record(certificate(11, "dev-c"), None, NOW),
            certificates.record(certificate(12, "dev-d", "taken"), "other-fp", NOW),  # request id taken
            certificates.record(certificate(13, "dev-d", "fresh"), "fp-13", NOW),
            certificates.record(certificate(10, "dev-e"), None, NOW),  # duplicate serial
        )
        assert results == [Recorded(2), RequestIdTaken(), Recorded(1), RequestIdTaken()]
        listed = await certificates.page(None, 10, None)
        assert sorted(c.serial_number for c in listed) == ["000A", "000B", "000D"]
        stored = await certificates.find_request("taken")
        assert stored is not None and stored.certificate.serial_number == "000A"
    finally:
        await ledger.close()


async def test_a_group_ends_the_reservations_of_its_request_ids(postgres_url) -> None:
    ledger = await Ledger.open(DatabaseUrl.parse(postgres_url), migrate=True)
    certificates = ledger.certificates
    try:
        for k in range(3):
            claimed = await certificates.reservations.claim(f"req-{k}", f"fp-{k}", "me", 1, 2**60)
            assert claimed.kind is ClaimKind.RESERVED
        await asyncio.gather(
            *(certificates.record(certificate(40 + k, "dev-g", f"req-{k}"), f"fp-{k}", NOW) for k in range(3))
        )
        assert certificates.group_commits == 1
        assert [await certificates.reservations.holder_of(f"req-{k}") for k in range(3)] == [None] * 3
        again = await certificates.reservations.claim("req-1", "fp-1", "me", 1, 2**60)
        assert again.kind is ClaimKind.ANSWERED
    finally:
        await ledger.close()


async def test_records_arriving_during_a_commit_form_the_next_batch(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = await Ledger.open(path)
    try:
        first = asyncio.ensure_future(ledger.certificates.record(certificate(20, "dev-f"), None, NOW))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the first batch has been handed to the ledger thread
        rest = [ledger.certificates.record(certificate(21 + i, "dev-f"), None, NOW) for i in range(5)]
        results = [await first, *await asyncio.gather(*rest)]
        assert all(isinstance(r, Recorded) for r in results)
        assert results[-1] == Recorded(6)
        assert len(stored_serials(path)) == 6
    finally:
        await ledger.close()
    reopened = await Ledger.open(path)
    try:
        assert len(await reopened.certificates.page("dev-f", 10, None)) == 6
    finally:
        await reopened.close()


async def test_a_certificate_is_revoked_once_and_each_revocation_audited(database_url) -> None:
    ledger = await Ledger.open(database_url, migrate=True)
    other = await Ledger.open(database_url)  # another replica's ledger on the same database
    try:
        for serial, days in ((30, 365), (31, 365), (32, -1), (33, 365)):
            await ledger.certificates.record(certificate(serial, "dev-r", days=days), None, NOW)
        assert [c.serial_number for c in await ledger.certificates.certificates_of("dev-r", NOW)] == [
            "001E",
            "001F",
            "0021",
        ]
        first = Revocation(NOW + timedelta(minutes=1), RevocationReason.KEY_COMPROMISE)
        second = Revocation(NOW + timedelta(minutes=2), RevocationReason.SUPERSEDED)
        revoked, newly = await ledger.revocations.revoke(["001E"], first, "caller-a", "req-1")
        assert newly == 1 and [c.revocation for c in revoked] == [first]
        revoked, newly = await other.revocations.revoke(["001E", "001F"], second, "caller-b", "req-2")
        assert newly == 1 and [c.revocation for c in revoked] == [first, second]  # the first one is kept
        both = await asyncio.gather(
            ledger.revocations.revoke(["0021"], second, "caller-c", "req-3"),
            other.revocations.revoke(["0021"], second, "caller-d", "req-4"),
        )
        assert sorted(n for _, n in both) == [0, 1]
        assert [c.serial_number for c in await other.revocations.revoked(NOW)] == ["001E", "001F", "0021"]
        assert await ledger.revocations.revocation_of(f"{30:064x}") == first  # either case of the thumbprint
        assert await ledger.revocations.revocation_of(f"{32:064X}") is None  # not revoked
        # the ledger's word on some thumbprints (either case): held or not, revoked or not, and whether the
        # recorded chain names the given issuing CA certificate right after the leaf
        issuer = certificate(30, "dev-r").certificate_pem  # the fake chains repeat the leaf
        held = await other.revocations.recorded_among([f"{30:064x}", f"{32:064X}", f"{99:064X}"], [issuer])
        assert held == {f"{30:064X}": Standing(True, True), f"{32:064X}": Standing(False, False)}
        no_issuer = await ledger.revocations.recorded_among([f"{30:064X}"], [])
        assert no_issuer == {f"{30:064X}": Standing(True, False)}
        audit = await other.revocations.revocation_audit()
        assert audit[:2] == [
            (first.time, "001E", "dev-r", "keyCompromise", "caller-a", "req-1"),
            (second.time, "001F", "dev-r", "superseded", "caller-b", "req-2"),
        ]
        assert [row[1] for row in audit[2:]] == ["0021"]
    finally:
        await other.close()
        await ledger.close()


async def test_a_lot_keeps_its_items_and_their_keys_until_acknowledged(database_url) -> None:
    ledger = await Ledger.open(database_url, migrate=True)
    other = await Ledger.open(database_url)
    try:
        assert await ledger.lots.open_lot("lot-1", "fp", 3, "caller", NOW) == (StoredLot("fp", 3, False), {})
        issued = [LotEntry(0, certificate(40, "lot-0"), "KEY-0"), LotEntry(1, certificate(41, "lot-1"), None)]
        await ledger.lots.record_lot_items("lot-1", issued)
        # a chunk with a duplicate serial is refused whole
        with pytest.raises(Conflict):
            clash = [
                LotEntry(2, certificate(42, "lot-2"), "KEY-2"),
                LotEntry(3, certificate(40, "lot-3"), None),
            ]
            await other.lots.record_lot_items("lot-1", clash)
        # the lot as first opened, whoever opens it again and with whatever header
        lot, entries = await other.lots.open_lot("lot-1", "other-fp", 5, "someone", NOW)
        assert lot == StoredLot("fp", 3, False)
        assert entries == {entry.index: entry for entry in issued}
        assert len(await ledger.certificates.page(None, 10, None)) == 2
        await other.lots.acknowledge_lot("lot-1", NOW)
        lot, entries = await ledger.lots.open_lot("lot-1", "fp", 3, "caller", NOW)
        assert lot == StoredLot("fp", 3, True)
        assert [(e.certificate, e.private_key_pem) for e in entries.values()] == [
            (certificate(40, "lot-0"), None),
            (certificate(41, "lot-1"), None),
        ]
    finally:
        await other.close()
        await ledger.close()


async def test_a_version_6_ledger_keeps_its_refusals_and_gains_their_summaries(database_url) -> None:
    """Version 7: a refusals row may stand for many (``provkit.refusal_audit``); an older row is one."""
    old = (
        "INSERT INTO refusals (time_us, method, caller, role, device_id, request_id, reason) "
        "VALUES (1000000, '/devprov.v1.FactoryService/Enroll', 'tls-anonymous', '', 'd-1', 'r-1', "
        "'CLIENT_CERTIFICATE_REQUIRED')"
    )
    await write_at_version(database_url, FILE, "ledger", MIGRATIONS[:6], [old])
    ledger = await Ledger.open(database_url, migrate=True)
    try:
        summary = Refusal(
            NOW, "/devprov.v1.FactoryService/Enroll", "tls-anonymous:ipv4:127.0.0.1:50000", "", "", "",
            "CLIENT_CERTIFICATE_REQUIRED", repeats=1234, until=NOW + timedelta(seconds=59),
        )  # fmt: skip
        await ledger.refusals.record_refusal(summary)
        before, after = await ledger.refusals.recorded()
    finally:
        await ledger.close()
    assert (before.caller, before.device_id) == ("tls-anonymous", "d-1")
    assert (before.repeats, before.until) == (0, None)
    assert after == summary
    assert stored_version(database_url, FILE, "ledger") == len(MIGRATIONS) == 7
