"""The renewals in the ledger (version 6) on SQLite and PostgreSQL: a version 5 ledger gains them, a renewal
and its certificate are one write, a second request for the same old certificate and key meets the first,
the rate limit is checked in the write, completion supersedes the old certificate, and the operator's
listing and gauge buckets read them."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from support.stores import stored_version, write_at_version

from factory_svc.ledger import FILE, MIGRATIONS, Ledger
from factory_svc.mint.keys import KeyType
from factory_svc.mint.model import IssuedCertificate, KeySource
from factory_svc.renewal.model import Renewal, RenewalState
from factory_svc.renewal.store import RateLimited
from provkit.clock import to_us

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def _certificate(serial: str, days: int) -> IssuedCertificate:
    return IssuedCertificate(
        serial, "dev-1", "pem", "chain", "sha1-" + serial, "SHA256-" + serial, NOW - timedelta(days=1),
        NOW + timedelta(days=days), NOW, KeyType.EC_P256, KeySource.CSR, "renewal", "",
    )  # fmt: skip


async def test_a_version_5_ledger_gains_renewals(database_url) -> None:
    old_row = (
        "INSERT INTO certificates (serial_number, device_id, certificate_pem, chain_pem, sha1_thumbprint, "
        "sha256_thumbprint, not_before_us, not_after_us, issued_at_us, key_type, key_source, caller, "
        "request_id) "
        f"VALUES ('0A', 'dev-1', 'pem', 'chain', 's1', 'S256', 0, {to_us(NOW + timedelta(days=20))}, 1, "
        "'ec-p256', 'csr', 'caller', '')"
    )
    await write_at_version(database_url, FILE, "ledger", MIGRATIONS[:5], [old_row])
    ledger = await Ledger.open(database_url, migrate=True)
    store = ledger.renewals
    try:
        (listed,) = await store.expiring(NOW, NOW + timedelta(days=30))
        assert (listed.serial_number, listed.renewal) == ("0A", "none")

        renewal = Renewal("0B", "0A", "dev-1", "key-1", NOW, RenewalState.ISSUED)
        assert await store.record(_certificate("0B", 365), renewal) == renewal
        # a second request for the same old certificate and key: the first renewal, nothing more written
        assert await store.record(_certificate("0C", 365), replace(renewal, new_serial="0C")) == renewal
        assert await store.certificate("0C") is None
        holder, prior = await store.holder_and_prior("0A", "key-1", NOW - timedelta(days=1))
        assert (prior.found, prior.recent) == (renewal, [NOW])
        assert holder is not None and holder.superseded_by is None
        assert [r.new_serial for r in holder.open_renewals] == ["0B"]
        assert [r.new_serial for r in await store.open_renewals("dev-1")] == ["0B"]
        # at the limit: nothing written, when the device's renewals of the last day were requested answered
        limited = Renewal("0D", "0A", "dev-1", "key-2", NOW + timedelta(hours=1), RenewalState.ISSUED)
        assert await store.record(_certificate("0D", 365), limited, max_per_day=1) == RateLimited([NOW])
        assert await store.certificate("0D") is None
        # a retry of the renewal already recorded is answered whatever the limit
        assert await store.record(_certificate("0E", 365), replace(renewal, new_serial="0E"), 1) == renewal
        (pending,) = await store.expiring(NOW, NOW + timedelta(days=30))
        assert (pending.renewal, pending.new_serial) == ("pending", "0B")  # 0B itself is not listed (unused)
        buckets = await store.expiry_buckets(NOW)
        assert (buckets["30d"], buckets["365d"]) == (1, 1)

        assert await store.advance(renewal, (RenewalState.ISSUED,), RenewalState.SECONDARY, NOW)
        assert not await store.advance(renewal, (RenewalState.ISSUED,), RenewalState.SECONDARY, NOW)
        assert await store.advance(renewal, (RenewalState.SECONDARY,), RenewalState.PROMOTE, NOW)
        assert await store.complete(replace(renewal, state=RenewalState.PROMOTE), NOW)
        holder = await store.holder("0A")
        assert holder is not None and holder.superseded_by == "0B" and holder.open_renewals == []
        assert await store.open_renewals() == []
        (done,) = await store.expiring(NOW, NOW + timedelta(days=30))
        assert (done.renewal, done.new_serial) == ("done", "0B")
        buckets = await store.expiry_buckets(NOW)
        assert (buckets["30d"], buckets["365d"]) == (0, 1)  # the superseded one is no longer in use
    finally:
        await ledger.close()
    assert stored_version(database_url, FILE, "ledger") == len(MIGRATIONS) == 7
