"""Production lots: the rules of MintCertificates.  Plain async Python.

A lot is a header (lot id, key source, key type, item count, validity, derived ids or not) and items
0..count-1.  ``LotService.open`` checks the header and loads (or creates) the lot in the ledger; the lot id
follows ``provkit.idempotency``'s rules: the same id with another header is REQUEST_ID_REUSED.  ``issue``
takes a chunk of items, answers those the lot already issued from the ledger (``replayed``), checks and
signs the others exactly as MintCertificate does, and commits the chunk's certificates together with the
lot's items in one transaction *before* returning them.  A crash between two chunks loses nothing the
client has seen and issues nothing twice: the resumed lot replays what was committed.

One attempt at a time per lot in this process (a resumed stream waits for the old one to wind down).
Across replicas on one database nothing makes attempts wait: two streams of one lot may sign the same
items at once, and the lot's primary key lets only one commit each item.  The losing chunk's transaction
is rolled back whole (nothing of it recorded, its certificates never answered) and its stream ends with
ABORTED / LOT_IN_PROGRESS and a retry delay; a resume then replays what the other attempt committed.
The ledger holds one certificate per item, and every certificate a client received is the recorded one.

Reasons: LOT_ID_MISSING, REQUEST_ID_INVALID / REQUEST_ID_REUSED (for the lot id), LOT_SIZE_INVALID,
LOT_KEY_SOURCE_INVALID, KEY_TYPE_UNSUPPORTED, VALIDITY_*; per item: LOT_INDEX_INVALID, LOT_ITEM_CHANGED
(a resumed lot sent another device at an index), DUPLICATE_IN_LOT, and MintCertificate's reasons; for the
stream: LOT_IN_PROGRESS (``Aborted``, another attempt of the lot committed one of the chunk's items).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from datetime import datetime
from typing import Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID

from factory_svc.errors import Reason
from factory_svc.lots.model import LotEntry, LotHeader, LotItem, LotItemError, LotItemResult, StoredLot
from factory_svc.lots.store import LotItemsTaken
from factory_svc.mint.keys import GENERATABLE, private_key_pem
from factory_svc.mint.model import CsrKey, MintRequest, ServerKey
from factory_svc.mint.service import MintingService
from provkit.clock import Clock
from provkit.device_id import DeviceIdPolicy, check_device_id
from provkit.errors import Aborted, DomainError, invalid_field
from provkit.faults import crash_point
from provkit.idempotency import RequestIdReused, check_request_id, fingerprint

MAX_LOT_ITEMS = 100_000
CHUNK = 64  # items signed, committed and answered together
MAX_BATCH = 1000  # items in one request message
LOT_RETRY_SECONDS = 1.0  # the retry delay of LOT_IN_PROGRESS
_LOT_NAMESPACE = uuid.UUID("5b1f2a0e-4c1d-4c55-9d2e-6a61f2f0c7a1")


class LotLedger(Protocol):
    async def open_lot(
        self, lot_id: str, fingerprint: str, item_count: int, caller: str, now: datetime
    ) -> tuple[StoredLot, dict[int, LotEntry]]: ...

    async def record_lot_items(self, lot_id: str, entries: Sequence[LotEntry]) -> None:
        """All or none; ``LotItemsTaken`` when another attempt committed one of the items first."""

    async def acknowledge_lot(self, lot_id: str, now: datetime) -> None: ...


@dataclass(frozen=True)
class Prepared:
    """A chunk checked and signed, not yet committed: each item's answer (None: new, see ``fresh``)."""

    items: list[LotItem]
    results: list[LotItemResult | None]
    fresh: list[LotEntry]


@dataclass
class Lot:
    header: LotHeader
    issued: dict[int, LotEntry]  # index -> what the ledger holds
    devices: dict[str, int] = field(default_factory=dict)  # device id -> index, this lot
    issued_now: int = 0
    replayed: int = 0
    failed: int = 0

    def __post_init__(self) -> None:
        self.devices = {entry.certificate.device_id: index for index, entry in self.issued.items()}

    def derived_item(self, index: int) -> LotItem:
        return LotItem(index, derived_device_id(self.header.lot_id, index))


class LotInProgress(Aborted):
    def __init__(self, lot_id: str) -> None:
        super().__init__(
            Reason.LOT_IN_PROGRESS,
            "another attempt of this lot is committing its items; resume the lot again",
            metadata={"lot_id": lot_id},
            retry_after=LOT_RETRY_SECONDS,
        )


def derived_device_id(lot_id: str, index: int) -> str:
    """The device id of item ``index`` of a lot whose ids the factory makes (stable across attempts)."""
    return str(uuid.uuid5(_LOT_NAMESPACE, f"{lot_id}/{index}"))


def _csr_common_name(pem: bytes) -> str:
    try:
        names = x509.load_pem_x509_csr(pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return ""
    return str(names[0].value) if names else ""


def _item_error(item: LotItem, device_id: str, exc: DomainError) -> LotItemResult:
    return LotItemResult(item.index, device_id, None, error=LotItemError(exc.kind, exc.reason, exc.message))


class LotService:
    def __init__(
        self,
        minting: MintingService,
        ledger: LotLedger,
        clock: Clock,
        device_ids: DeviceIdPolicy = DeviceIdPolicy.GUID,
    ) -> None:
        self._device_ids = device_ids  # the id policy, item by item (a CSR item's id may come from its CN)
        self._minting = minting
        self._ledger = ledger
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}

    def _check_header(self, header: LotHeader) -> str:
        if not header.lot_id:
            raise invalid_field(
                "header.lot_id", Reason.LOT_ID_MISSING, "a lot needs a lot_id (to resume it by)"
            )
        check_request_id(header.lot_id, "header.lot_id")
        if not 1 <= header.item_count <= MAX_LOT_ITEMS:
            raise invalid_field(
                "header.item_count", Reason.LOT_SIZE_INVALID, f"a lot has 1 to {MAX_LOT_ITEMS} items"
            )
        if header.derive_device_ids and not header.server_keys:
            raise invalid_field(
                "header.derive_device_ids",
                Reason.LOT_KEY_SOURCE_INVALID,
                "derived device ids need server-side key generation (there is no CSR to send)",
            )
        if header.server_keys and header.key_type not in GENERATABLE:
            raise invalid_field(
                "header.key_type",
                Reason.KEY_TYPE_UNSUPPORTED,
                f"the factory cannot generate {header.key_type.value} keys",
            )
        # the validity rules of MintCertificate, once for the whole lot
        self._minting.check(MintRequest("lot-probe", ServerKey(), header.validity), self._clock())
        return fingerprint(
            {
                "server_keys": header.server_keys,
                "key_type": header.key_type.value if header.server_keys else None,
                "item_count": header.item_count,
                "derive_device_ids": header.derive_device_ids,
                "validity": None if header.validity is None else header.validity.total_seconds(),
            }
        )

    @contextlib.asynccontextmanager
    async def open(self, header: LotHeader) -> AsyncIterator[Lot]:
        """The lot, for one attempt at a time (the lock is held while the caller works on it)."""
        lot_fingerprint = self._check_header(header)
        lock = self._locks.setdefault(header.lot_id, asyncio.Lock())
        async with lock:
            stored, issued = await self._ledger.open_lot(
                header.lot_id, lot_fingerprint, header.item_count, header.caller, self._clock()
            )
            if stored.fingerprint != lot_fingerprint:
                raise RequestIdReused(header.lot_id)
            yield Lot(header, issued)

    async def issue(self, lot: Lot, items: Sequence[LotItem]) -> list[LotItemResult]:
        """Answer a chunk of items: replays from the ledger, new certificates committed before returning."""
        return await self.commit(lot, await self.prepare(lot, items))

    async def prepare(self, lot: Lot, items: Sequence[LotItem]) -> Prepared:
        """Check and sign a chunk (nothing written yet).  The next chunk may be prepared while this one's
        ``commit`` waits for the disk; chunks must be committed in the order they were prepared."""
        now = self._clock()
        results: list[LotItemResult | None] = []
        fresh: list[LotEntry] = []
        for item in items:
            result, entry = await self._one(lot, item, now)
            results.append(result)
            if entry is not None:
                fresh.append(entry)
        return Prepared(list(items), results, fresh)

    async def commit(self, lot: Lot, prepared: Prepared) -> list[LotItemResult]:
        """Commit a prepared chunk's new certificates with the lot's items; then (only then) its answers."""
        if prepared.fresh:
            try:
                await self._ledger.record_lot_items(lot.header.lot_id, prepared.fresh)
            except LotItemsTaken:
                raise LotInProgress(lot.header.lot_id) from None
            crash_point("lot.after_commit")  # committed, not answered: the resumed lot replays it
            for entry in prepared.fresh:
                lot.issued[entry.index] = entry
        answered: list[LotItemResult] = []
        fresh_by_index = {entry.index: entry for entry in prepared.fresh}
        for item, result in zip(prepared.items, prepared.results, strict=True):
            if result is None:
                entry = fresh_by_index[item.index]
                result = LotItemResult(
                    item.index, entry.certificate.device_id, entry.certificate, entry.private_key_pem
                )
                lot.issued_now += 1
            elif result.error is not None:
                lot.failed += 1
            else:
                lot.replayed += 1
            answered.append(result)
        return answered

    async def _one(
        self, lot: Lot, item: LotItem, now: datetime
    ) -> tuple[LotItemResult | None, LotEntry | None]:
        """(the answer, None) for a replay or a refusal; (None, the entry to commit) for a new certificate."""
        header = lot.header
        device_id = item.device_id or (_csr_common_name(item.csr_pem) if not header.server_keys else "")
        try:
            if not 0 <= item.index < header.item_count:
                raise invalid_field(
                    "item.index",
                    Reason.LOT_INDEX_INVALID,
                    f"the index must be within 0..{header.item_count - 1}",
                )
            device_id = check_device_id(device_id, self._device_ids, "item.device_id")
            key: CsrKey | ServerKey = (
                ServerKey(header.key_type) if header.server_keys else CsrKey(item.csr_pem)
            )
            request = MintRequest(device_id, key, header.validity, "", header.caller)
            checked = self._minting.check(request, now)  # no per-item request id: the lot is the unit
            earlier = lot.issued.get(item.index)
            if earlier is not None:
                if earlier.certificate.device_id != checked.device_id:
                    raise invalid_field(
                        "item.device_id",
                        Reason.LOT_ITEM_CHANGED,
                        f"item {item.index} of this lot was {earlier.certificate.device_id}",
                    )
                return LotItemResult(
                    item.index, checked.device_id, earlier.certificate, earlier.private_key_pem, replayed=True
                ), None
            if lot.devices.setdefault(checked.device_id, item.index) != item.index:
                raise invalid_field(
                    "item.device_id",
                    Reason.DUPLICATE_IN_LOT,
                    f"{checked.device_id} is item {lot.devices[checked.device_id]} of this lot",
                )
            certificate, private_key = await self._minting.make_certificate(
                dc_replace(request, request_id=header.lot_id), checked, now
            )
        except DomainError as exc:
            return _item_error(item, device_id, exc), None
        key_pem = private_key_pem(private_key).decode() if private_key is not None else None
        return None, LotEntry(item.index, certificate, key_pem)

    async def acknowledge(self, lot: Lot) -> None:
        await self._ledger.acknowledge_lot(lot.header.lot_id, self._clock())
