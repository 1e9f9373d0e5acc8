"""Production lots in the ledger database (``factory_svc.ledger``): ``lots`` (each lot's header fingerprint)
and ``lot_items`` (which certificate each item got; a server-generated key waits there until the client
acknowledges the lot).  One transaction per call on either backend; between replicas a lot's primary key
decides."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from dbstore import Conflict, Database, Tx
from factory_svc.lots.model import LotEntry, StoredLot
from factory_svc.mint.store import (
    COLUMNS,
    INSERT_CERTIFICATE,
    certificate_from_row,
    certificate_row,
    insert_rows,
)
from provkit.clock import to_us

_PREFIXED = ", ".join(f"c.{column.strip()}" for column in COLUMNS.split(","))
_INSERT_LOT_ITEM = (
    "INSERT INTO lot_items (lot_id, item_index, device_id, serial_number, private_key_pem) "
    "VALUES (?, ?, ?, ?, ?)"
)


class LotItemsTaken(Exception):
    """A lot's chunk was not recorded: another attempt of the lot committed one of its items first."""


class LotStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def open_lot(
        self, lot_id: str, fingerprint: str, item_count: int, caller: str, now: datetime
    ) -> tuple[StoredLot, dict[int, LotEntry]]:
        """The lot (created now if new) and the items it has issued so far.  Replicas opening one new lot
        at once: the primary key keeps the first, the others read it."""

        async def work(tx: Tx) -> tuple[StoredLot, dict[int, LotEntry]]:
            await tx.execute(
                "INSERT INTO lots (lot_id, fingerprint, item_count, caller, created_us) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (lot_id) DO NOTHING",
                (lot_id, fingerprint, item_count, caller, to_us(now)),
            )
            lot = await tx.fetchone(
                "SELECT fingerprint, item_count, acknowledged_us FROM lots WHERE lot_id = ?", (lot_id,)
            )
            assert lot is not None  # inserted above, or there before
            rows = await tx.fetchall(
                f"SELECT i.item_index, i.private_key_pem, {_PREFIXED} FROM lot_items i "  # noqa: S608
                "JOIN certificates c USING (serial_number) WHERE i.lot_id = ?",
                (lot_id,),
            )
            entries = {row[0]: LotEntry(row[0], certificate_from_row(row[2:]), row[1]) for row in rows}
            return StoredLot(lot[0], int(lot[1]), lot[2] is not None), entries

        return await self._db.transaction(work)

    async def record_lot_items(self, lot_id: str, entries: Sequence[LotEntry]) -> None:
        """Commit a chunk of a lot's certificates and their items together: all or none.  Raises
        ``LotItemsTaken`` (nothing written) when another attempt of the lot committed one of its items
        first (another replica's stream of the same lot)."""
        certificates = [certificate_row(e.certificate) for e in entries]
        items: list[tuple[object, ...]] = [  # in index order: two attempts of one lot that
            # insert the same items lock them in the same order, so the later waits and then conflicts
            # (LotItemsTaken) rather than deadlocking with the earlier
            (lot_id, e.index, e.certificate.device_id, e.certificate.serial_number, e.private_key_pem)
            for e in sorted(entries, key=lambda e: e.index)
        ]

        async def write(tx: Tx) -> None:
            await insert_rows(tx, INSERT_CERTIFICATE, certificates)  # a clash here stays a Conflict
            try:
                await insert_rows(tx, _INSERT_LOT_ITEM, items)
            except Conflict:  # an item's index is taken: the whole chunk is rolled back
                raise LotItemsTaken(lot_id) from None

        await self._db.transaction(write)

    async def acknowledge_lot(self, lot_id: str, now: datetime) -> None:
        """The client has the lot: forget its server-generated keys."""

        async def write(tx: Tx) -> None:
            await tx.execute("UPDATE lot_items SET private_key_pem = NULL WHERE lot_id = ?", (lot_id,))
            await tx.execute("UPDATE lots SET acknowledged_us = ? WHERE lot_id = ?", (to_us(now), lot_id))

        await self._db.transaction(write)
