"""What every enrollment RPC's request obeys: one answer per request id, and a bound on its items.

``OnceAnswered.run`` executes a request once per request id (``provkit.idempotency``): its answer is stored
in the outbox's database (``enroll_requests``) and a retry replays it; replicas reserve the id there before
the work.  ``check_count``: BATCH_EMPTY / BATCH_TOO_LARGE and their like, before anything is done.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from factory_svc.enrollment.outbox import Outbox
from provkit.errors import invalid_field
from provkit.idempotency import LOST_RACE, LostRace, RequestIds, Stored

R = TypeVar("R")  # an answer of a request


def check_count(field: str, count: int, limit: int, empty_reason: str, too_many_reason: str) -> None:
    if count == 0:
        raise invalid_field(field, empty_reason, f"{field} is empty")
    if count > limit:
        raise invalid_field(field, too_many_reason, f"at most {limit} {field} per call (got {count})")


class OnceAnswered:
    def __init__(self, outbox: Outbox, request_ids: RequestIds | None = None) -> None:
        self._outbox = outbox
        # one for every enrollment RPC (their ids share one answer table): reserved in the outbox's database
        self.request_ids = request_ids or RequestIds(outbox.reservations)

    async def _stored(self, request_id: str) -> Stored[dict[str, Any]] | None:
        found = await self._outbox.find_request(request_id)
        return None if found is None else Stored(found[0], found[1])

    async def run(
        self,
        request_id: str,
        request_fingerprint: str,
        work: Callable[[], Awaitable[R]],
        to_json: Callable[[R], dict[str, Any]],
        replay: Callable[[Mapping[str, Any]], Awaitable[R]],
    ) -> R:
        """``work`` once per request id: its answer is stored (outbox file) and a retry replays it."""

        async def execute() -> R | LostRace:
            result = await work()
            if request_id and not await self._outbox.remember_request(
                request_id, request_fingerprint, to_json(result)
            ):
                return LOST_RACE  # a replica that took the id over answered first: its answer stands
            return result

        return await self.request_ids.run(
            request_id,
            request_fingerprint,
            find=lambda: self._stored(request_id),
            replay=replay,
            execute=execute,
        )
