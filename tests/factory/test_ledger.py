"""The ledger: on SQLite, group commit (concurrent records share one transaction, everything answered is
on disk, read back by a fresh connection); on both backends a conflicting record is refused alone and
counts are per id."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from factory_svc.keys import KeyType
from factory_svc.ledger import Ledger, Recorded, RequestIdTaken
from factory_svc.model import IssuedCertificate, KeySource

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


async def test_concurrent_records_commit_together_and_each_gets_its_ids_count(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = await Ledger.open(path)
    try:
        expired = certificate(1, "dev-a", days=-1)
        results = await asyncio.gather(
            ledger.record(expired, None, NOW),
            ledger.record(certificate(2, "dev-a"), None, NOW),
            ledger.record(certificate(3, "dev-a"), None, NOW),
            ledger.record(certificate(4, "dev-b", "req-4"), "fp-4", NOW),
        )
        assert ledger._writes.commits == 1  # one transaction for the four
        # dev-a holds two unexpired certificates once the batch is in; dev-b one
        assert results == [Recorded(2), Recorded(2), Recorded(2), Recorded(1)]
        assert stored_serials(path) == ["0001", "0002", "0003", "0004"]
        stored = await ledger.find_request("req-4")
        assert stored is not None and stored.fingerprint == "fp-4"
        assert stored.certificate == certificate(4, "dev-b", "req-4")
    finally:
        await ledger.close()


async def test_a_conflicting_record_is_refused_alone(database_url) -> None:
    ledger = await Ledger.open(database_url, migrate=True)
    try:
        assert await ledger.record(certificate(10, "dev-c", "taken"), "fp", NOW) == Recorded(1)
        results = await asyncio.gather(
            ledger.record(certificate(11, "dev-c"), None, NOW),
            ledger.record(certificate(12, "dev-d", "taken"), "other-fp", NOW),  # request id already used
            ledger.record(certificate(13, "dev-d", "fresh"), "fp-13", NOW),
            ledger.record(certificate(10, "dev-e"), None, NOW),  # duplicate serial
        )
        assert results == [Recorded(2), RequestIdTaken(), Recorded(1), RequestIdTaken()]
        assert sorted(c.serial_number for c in await ledger.list(None, 10, None)) == ["000A", "000B", "000D"]
        stored = await ledger.find_request("taken")
        assert stored is not None and stored.certificate.serial_number == "000A"
    finally:
        await ledger.close()


async def test_records_arriving_during_a_commit_form_the_next_batch(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = await Ledger.open(path)
    try:
        first = asyncio.ensure_future(ledger.record(certificate(20, "dev-f"), None, NOW))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the first batch has been handed to the ledger thread
        rest = [ledger.record(certificate(21 + i, "dev-f"), None, NOW) for i in range(5)]
        results = [await first, *await asyncio.gather(*rest)]
        assert all(isinstance(r, Recorded) for r in results)
        assert results[-1] == Recorded(6)
        assert len(stored_serials(path)) == 6
    finally:
        await ledger.close()
    reopened = await Ledger.open(path)
    try:
        assert len(await reopened.list("dev-f", 10, None)) == 6
    finally:
        await reopened.close()
