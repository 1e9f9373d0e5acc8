"""Revocations in the ledger database (``factory_svc.ledger``): the marks on ``certificates``, the
``revocations`` audit, the revocation intents and the CRL state.

A revocation is one transaction on either backend; between replicas an UPDATE's row lock decides.  Its intent
(the device's cloud steps still owed, ``revocation_intents``) is written in the revocation's transaction, and
``crl_state`` holds what replicas share about the CRL: the last number handed out (a CRL number is taken
under the row's lock, in the transaction that reads the revoked certificates, so a higher number never lists
less) and a generation each revocation increments (a cheap read tells a replica its CRL is stale).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from dbstore import Database, Tx
from dbstore.port import Row, Work
from factory_svc.mint.model import IssuedCertificate
from factory_svc.mint.store import COLUMNS, ROWS_PER_INSERT, SELECT_BY_SERIAL, certificate_from_row, chunks
from factory_svc.revocation.model import Revocation, RevocationReason, Standing
from provkit.clock import from_us, to_us

# A recorded chain (leaf, issuing CA, ...) whose issuing CA part starts with the given PEM (its length, it)
_ISSUED_UNDER = "substr(chain_pem, length(certificate_pem) + 1, CAST(? AS INTEGER)) = ?"
_AUDIT_REVOCATION = (
    "INSERT INTO revocations (time_us, serial_number, device_id, reason, caller, request_id) "
    "SELECT ?, serial_number, device_id, ?, ?, ? FROM certificates WHERE serial_number = ?"
)


@dataclass(frozen=True)
class CrlContent:
    """What one CRL is made of: its number, the generation it reflects, the revoked certificates."""

    number: int
    generation: int
    revoked: list[IssuedCertificate]


@dataclass(frozen=True)
class RevocationIntent:
    """A device's revocation steps in the cloud, owed since ``requested_us`` (until ``completed``)."""

    device_id: str
    requested_us: int
    attempts: int = 0
    failure_reason: str = ""
    completed: bool = False


async def _open_intent(tx: Tx, device_id: str, at_us: int) -> None:
    await tx.execute(
        "INSERT INTO revocation_intents (device_id, requested_us) VALUES (?, ?) "
        "ON CONFLICT (device_id) DO UPDATE SET requested_us = CASE WHEN revocation_intents.requested_us "
        ">= excluded.requested_us THEN revocation_intents.requested_us + 1 ELSE excluded.requested_us END, "
        "completed_us = NULL",
        (device_id, at_us),
    )


def _fetch_all(sql: str, params: Sequence[object]) -> Work[list[Row]]:
    async def work(tx: Tx) -> list[Row]:
        return await tx.fetchall(sql, params)

    return work


async def _revoked(tx: Tx, now_us: int) -> list[IssuedCertificate]:
    rows = await tx.fetchall(
        f"SELECT {COLUMNS} FROM certificates "  # noqa: S608 - fixed fragments only
        "WHERE revoked_at_us IS NOT NULL AND not_after_us > ? ORDER BY revoked_at_us, serial_number",
        (now_us,),
    )
    return [certificate_from_row(r) for r in rows]


class RevocationStore:
    """Mark certificates revoked and audit it; answer what is revoked; the CRL's number and generation; the
    revocation intents."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def revoke(
        self,
        serials: Sequence[str],
        revocation: Revocation,
        caller: str,
        request_id: str,
        intent_for: str | None = None,
    ) -> tuple[list[IssuedCertificate], int]:
        """Mark the certificates revoked (those revoked before keep their first time and reason) and audit
        the ones this call revoked, in one transaction: (the certificates as they are now, newly revoked).
        Between replicas the row lock decides: a certificate another call revoked meanwhile is not counted.
        ``intent_for``: the device whose cloud steps this revocation owes (its intent is opened in the same
        transaction).  A call that revoked something increments the CRL generation."""
        at_us = to_us(revocation.time)

        async def write(tx: Tx) -> tuple[list[IssuedCertificate], int]:
            newly = 0
            for serial in serials:
                changed = await tx.execute(
                    "UPDATE certificates SET revoked_at_us = ?, revocation_reason = ? "
                    "WHERE serial_number = ? AND revoked_at_us IS NULL",
                    (at_us, revocation.reason.value, serial),
                )
                if changed:
                    newly += 1
                    await tx.execute(
                        _AUDIT_REVOCATION, (at_us, revocation.reason.value, caller, request_id, serial)
                    )
            if newly:
                await tx.execute("UPDATE crl_state SET generation = generation + 1 WHERE id = 1")
            if intent_for is not None:
                await _open_intent(tx, intent_for, at_us)
            rows = [await tx.fetchone(SELECT_BY_SERIAL, (serial,)) for serial in serials]
            return [certificate_from_row(r) for r in rows if r is not None], newly

        return await self._db.transaction(write)

    async def revoked(self, now: datetime) -> list[IssuedCertificate]:
        """Revoked certificates that have not expired yet (what the CRL lists), in revocation order."""
        return await self._db.read(lambda tx: _revoked(tx, to_us(now)))

    async def revoked_among(self, sha256_thumbprints: Sequence[str]) -> set[str]:
        """Those of the SHA-256 thumbprints (upper case) whose certificate is revoked."""
        rows = await self._by_sha256(sha256_thumbprints, "sha256_thumbprint", "AND revoked_at_us IS NOT NULL")
        return {str(r[0]) for r in rows}

    async def recorded_among(
        self, sha256_thumbprints: Sequence[str], issuer_pems: Sequence[str]
    ) -> dict[str, Standing]:
        """Those of the SHA-256 thumbprints (any case; answered upper case) whose certificate the ledger
        holds: revoked or not, and whether it was issued under one of the issuing CA certificates
        ``issuer_pems`` (PEM, as the ledger keeps them: a recorded chain is the leaf, then its issuing CA).
        One look; the chains are compared in the database."""
        under = " OR ".join([_ISSUED_UNDER] * len(issuer_pems)) or "1 = 0"
        rows = await self._by_sha256(
            sha256_thumbprints,
            f"sha256_thumbprint, revoked_at_us IS NOT NULL, ({under})",
            "",
            [value for pem in issuer_pems for value in (len(pem), pem)],
        )
        return {str(r[0]): Standing(revoked=bool(r[1]), issued_under=bool(r[2])) for r in rows}

    async def _by_sha256(
        self,
        sha256_thumbprints: Sequence[str],
        columns: str,
        condition: str,
        column_params: Sequence[object] = (),
    ) -> list[Row]:
        """``columns`` (their parameters ``column_params``) of the certificates with these SHA-256
        thumbprints (any case) that meet ``condition``; fixed SQL fragments only."""
        wanted = sorted({t.upper() for t in sha256_thumbprints})
        found: list[Row] = []
        for chunk in chunks(wanted, ROWS_PER_INSERT):
            marks = ", ".join("?" * len(chunk))
            sql = f"SELECT {columns} FROM certificates WHERE sha256_thumbprint IN ({marks}) {condition}"  # noqa: S608
            found.extend(await self._db.read(_fetch_all(sql, [*column_params, *chunk])))
        return found

    async def revocation_of(self, sha256_thumbprint: str) -> Revocation | None:
        """The revocation of the certificate with this SHA-256 thumbprint (None: not revoked, or unknown)."""
        row = await self._db.read(
            lambda tx: tx.fetchone(
                "SELECT revoked_at_us, revocation_reason FROM certificates "
                "WHERE sha256_thumbprint = ? AND revoked_at_us IS NOT NULL LIMIT 1",
                (sha256_thumbprint.upper(),),
            )
        )
        return None if row is None else Revocation(from_us(row[0]), RevocationReason(row[1]))

    async def revocation_audit(self) -> list[tuple[datetime, str, str, str, str, str]]:
        """Every revocation call's effect: (time, serial, device id, reason, caller, request id)."""
        rows = await self._db.read(
            lambda tx: tx.fetchall(
                "SELECT time_us, serial_number, device_id, reason, caller, request_id "
                "FROM revocations ORDER BY id"
            )
        )
        return [(from_us(r[0]), *r[1:]) for r in rows]

    # ------------------------------------------------------------------------------------------ CRL
    async def next_crl(self, now: datetime, at_least: int) -> CrlContent:
        """A new CRL number (above every one handed out before, by any replica, and at least ``at_least``),
        the generation and the revoked certificates, read in one transaction after the number was taken."""

        async def work(tx: Tx) -> CrlContent:
            await tx.execute(
                "UPDATE crl_state SET crl_number = "
                "CASE WHEN crl_number + 1 > ? THEN crl_number + 1 ELSE ? END WHERE id = 1",
                (at_least, at_least),
            )
            row = await tx.fetchone("SELECT crl_number, generation FROM crl_state WHERE id = 1")
            assert row is not None  # written by the migration
            return CrlContent(int(row[0]), int(row[1]), await _revoked(tx, to_us(now)))

        return await self._db.transaction(work)

    async def crl_generation(self) -> int:
        """How many revocation calls changed the ledger (all replicas): a CRL of an older one is stale."""
        row = await self._db.read(lambda tx: tx.fetchone("SELECT generation FROM crl_state WHERE id = 1"))
        return int(row[0]) if row else 0

    # ------------------------------------------------------------------------------ revocation intents
    async def open_revocation_intent(self, device_id: str, now: datetime) -> None:
        """The device's revocation steps are owed (again): its intent is open from now."""
        await self._db.transaction(lambda tx: _open_intent(tx, device_id, to_us(now)))

    async def open_revocation_intents(self) -> list[RevocationIntent]:
        """The open intents, oldest first."""
        rows = await self._db.read(
            lambda tx: tx.fetchall(
                "SELECT device_id, requested_us, attempts, failure_reason FROM revocation_intents "
                "WHERE completed_us IS NULL ORDER BY requested_us, device_id"
            )
        )
        return [RevocationIntent(r[0], int(r[1]), int(r[2]), r[3]) for r in rows]

    async def revocation_intent(self, device_id: str) -> RevocationIntent | None:
        """The device's intent (open or completed; None: never revoked with a cloud configured)."""
        row = await self._db.read(
            lambda tx: tx.fetchone(
                "SELECT device_id, requested_us, attempts, failure_reason, completed_us "
                "FROM revocation_intents WHERE device_id = ?",
                (device_id,),
            )
        )
        if row is None:
            return None
        return RevocationIntent(row[0], int(row[1]), int(row[2]), row[3], row[4] is not None)

    async def close_revocation_intent(self, intent: RevocationIntent, now: datetime) -> bool:
        """The intent's steps are done: closed unless a newer revocation reopened it meanwhile."""
        return bool(
            await self._db.transaction(
                lambda tx: tx.execute(
                    "UPDATE revocation_intents SET completed_us = ?, failure_reason = '' "
                    "WHERE device_id = ? AND requested_us = ? AND completed_us IS NULL",
                    (to_us(now), intent.device_id, intent.requested_us),
                )
            )
        )

    async def revocation_intent_failed(self, intent: RevocationIntent, reason: str) -> None:
        """One more attempt that could not finish (the intent stays open)."""
        await self._db.transaction(
            lambda tx: tx.execute(
                "UPDATE revocation_intents SET attempts = attempts + 1, failure_reason = ? "
                "WHERE device_id = ? AND completed_us IS NULL",
                (reason, intent.device_id),
            )
        )
