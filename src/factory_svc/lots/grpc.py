"""The MintCertificates RPC: the lot stream <-> ``factory_svc.lots.service``, no business rules.

``LotRpcs`` is one part of ``factory_svc.app.FactoryServicer``, which sets ``_lots`` (a ``LotService``) and
``_metrics``.  The stream: a header first, then (unless the ids are derived) ``item_count`` items; the
results go out a chunk at a time as soon as the chunk is committed, then the summary; then an optional
LotAck, after which the lot's server-generated keys are forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta

from devprov.v1 import factory_service_pb2 as pb
from factory_svc.errors import Reason, invalid_field
from factory_svc.lots.model import LotHeader, LotItem, LotItemResult
from factory_svc.lots.service import CHUNK, MAX_BATCH, Lot, LotService
from factory_svc.mint.grpc import KEY_TYPE_FROM_PROTO, certificate_to_proto
from factory_svc.mint.keys import KeyType
from provkit.context import current_caller
from provkit.grpc_server import Context
from provkit.metrics import SuiteMetrics


def header_from_proto(message: pb.MintCertificatesRequest, caller: str) -> LotHeader:
    if message.WhichOneof("part") != "header":
        raise invalid_field("header", Reason.LOT_HEADER_MISSING, "the first message of a lot is its header")
    header = message.header
    if header.key_source not in (pb.KEY_SOURCE_CSR, pb.KEY_SOURCE_SERVER_GENERATED):
        raise invalid_field(
            "header.key_source", Reason.LOT_KEY_SOURCE_INVALID, "choose CSRs or server-side keys"
        )
    key_type = KeyType.EC_P256
    if header.key_type != pb.KEY_TYPE_UNSPECIFIED:
        if header.key_type not in KEY_TYPE_FROM_PROTO:
            raise invalid_field(
                "header.key_type", Reason.KEY_TYPE_UNSUPPORTED, f"unknown key type {header.key_type}"
            )
        key_type = KEY_TYPE_FROM_PROTO[header.key_type]
    validity = None
    if header.HasField("validity"):
        validity = timedelta(seconds=header.validity.seconds, microseconds=header.validity.nanos // 1000)
    return LotHeader(
        lot_id=header.lot_id,
        server_keys=header.key_source == pb.KEY_SOURCE_SERVER_GENERATED,
        key_type=key_type,
        item_count=header.item_count,
        derive_device_ids=header.derive_device_ids,
        validity=validity,
        caller=caller,
    )


def result_to_proto(result: LotItemResult) -> pb.LotItemResult:
    message = pb.LotItemResult(
        index=result.index,
        device_id=result.device_id,
        private_key_pem=result.private_key_pem or "",
        replayed=result.replayed,
    )
    if result.certificate is not None:
        message.certificate.CopyFrom(certificate_to_proto(result.certificate))
    if result.error is not None:
        message.error.CopyFrom(
            pb.LotItemError(
                code=result.error.kind.name, reason=result.error.reason, message=result.error.message
            )
        )
    return message


def results_to_proto(results: list[LotItemResult]) -> pb.MintCertificatesResponse:
    return pb.MintCertificatesResponse(
        results=pb.LotItemResults(results=[result_to_proto(r) for r in results])
    )


def _summary(lot: Lot) -> pb.MintCertificatesResponse:
    return pb.MintCertificatesResponse(
        summary=pb.LotSummary(
            lot_id=lot.header.lot_id,
            item_count=lot.header.item_count,
            issued_count=lot.issued_now,
            replayed_count=lot.replayed,
            failed_count=lot.failed,
        )
    )


async def _chunks(
    header: LotHeader, lot: Lot, requests: AsyncIterator[pb.MintCertificatesRequest]
) -> AsyncIterator[list[LotItem]]:
    """The lot's items, CHUNK at a time: derived here, or read from the stream's batches."""
    if header.derive_device_ids:
        for start in range(0, header.item_count, CHUNK):
            yield [lot.derived_item(i) for i in range(start, min(start + CHUNK, header.item_count))]
        return
    pending: list[LotItem] = []
    received = 0
    async for message in requests:
        if message.WhichOneof("part") != "items":
            raise invalid_field("items", Reason.LOT_ITEM_EXPECTED, "items follow the header, then the ack")
        batch = message.items.items
        if len(batch) > MAX_BATCH or received + len(batch) > header.item_count:
            raise invalid_field(
                "items",
                Reason.LOT_BATCH_INVALID,
                f"at most {MAX_BATCH} items a batch, {header.item_count} in all",
            )
        pending.extend(LotItem(i.index, i.device_id, i.csr_pem.encode("utf-8", "replace")) for i in batch)
        received += len(batch)
        while len(pending) >= CHUNK or (pending and received == header.item_count):
            chunk, pending = pending[:CHUNK], pending[CHUNK:]
            yield chunk
        if received == header.item_count:
            return
    raise invalid_field(
        "items", Reason.LOT_INCOMPLETE, f"the stream ended after {received} of {header.item_count} items"
    )


class LotRpcs:
    _lots: LotService
    _metrics: SuiteMetrics

    def _answer(self, results: list[LotItemResult]) -> pb.MintCertificatesResponse:
        """A committed chunk's answers (certificates issued now are counted as minted)."""
        for result in results:
            if result.certificate is not None and not result.replayed:
                self._metrics.minted(result.certificate.key_source.value, result.certificate.key_type.value)
        return results_to_proto(results)

    async def MintCertificates(
        self, requests: AsyncIterator[pb.MintCertificatesRequest], context: Context
    ) -> AsyncIterator[pb.MintCertificatesResponse]:
        """Chunk N+1 is checked and signed while chunk N's commit waits for the disk; a chunk's answers
        go out once it is committed; the lot is let go only when no commit is in flight."""
        first = await anext(aiter(requests), None)
        if first is None:
            raise invalid_field(
                "header", Reason.LOT_HEADER_MISSING, "the first message of a lot is its header"
            )
        header = header_from_proto(first, str(current_caller()))
        async with self._lots.open(header) as lot:
            committing: asyncio.Future[list[LotItemResult]] | None = None
            try:
                async for chunk in _chunks(header, lot, requests):
                    prepared = await self._lots.prepare(lot, chunk)
                    if committing is not None:
                        yield self._answer(await committing)
                    committing = asyncio.ensure_future(self._lots.commit(lot, prepared))
                if committing is not None:
                    done, committing = committing, None
                    yield self._answer(await done)
            finally:
                if committing is not None:  # the stream broke off: the chunk in flight still lands whole
                    with contextlib.suppress(Exception):
                        await asyncio.shield(committing)
            yield _summary(lot)
            async for message in requests:
                if message.WhichOneof("part") == "ack":
                    await self._lots.acknowledge(lot)
                break
