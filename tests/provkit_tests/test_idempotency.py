"""provkit.idempotency under concurrency: real asyncio tasks, an in-memory answer store."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from provkit.errors import InvalidArgument
from provkit.idempotency import LOST_RACE, LostRace, RequestIdReused, RequestIds, Stored, fingerprint


@dataclass(frozen=True)
class Answer:
    value: int
    replayed: bool = False


class Service:
    """A service that remembers its answers by request id, as the ledger or the outbox file do."""

    def __init__(self) -> None:
        self.request_ids = RequestIds()
        self.answers: dict[str, Stored[int]] = {}
        self.executions = 0

    async def find(self, request_id: str) -> Stored[int] | None:
        await asyncio.sleep(0)  # a store answers later, as a database thread does
        return self.answers.get(request_id)

    async def call(self, request_id: str, body: str) -> Answer:
        body_fingerprint = fingerprint({"body": body})

        async def execute() -> Answer:
            self.executions += 1
            await asyncio.sleep(0.01)  # the work; other calls with the same id arrive meanwhile
            value = self.executions
            if request_id:
                self.answers[request_id] = Stored(body_fingerprint, value)
            return Answer(value)

        async def replay(value: int) -> Answer:
            return Answer(value, replayed=True)

        return await self.request_ids.run(
            request_id, body_fingerprint, find=lambda: self.find(request_id), replay=replay, execute=execute
        )


async def test_concurrent_calls_with_one_id_execute_once_and_get_the_same_answer() -> None:
    service = Service()
    answers = await asyncio.gather(*(asyncio.create_task(service.call("req-1", "A")) for _ in range(20)))
    assert service.executions == 1
    assert {a.value for a in answers} == {1}
    assert sum(1 for a in answers if not a.replayed) == 1
    assert service.request_ids._locks == {}  # nothing left behind once everyone is through


async def test_same_id_with_another_body_is_refused_even_while_the_first_runs() -> None:
    service = Service()
    first = asyncio.create_task(service.call("req-2", "A"))
    await asyncio.sleep(0)
    with pytest.raises(RequestIdReused) as refused:
        await service.call("req-2", "B")
    assert refused.value.reason == "REQUEST_ID_REUSED"
    assert refused.value.kind.value == "invalid_argument"
    assert refused.value.metadata == {"request_id": "req-2"}
    assert (await first).value == 1 and service.executions == 1


async def test_different_ids_and_no_id_run_independently() -> None:
    service = Service()
    answers = await asyncio.gather(
        service.call("a", "A"), service.call("b", "A"), service.call("", "A"), service.call("", "A")
    )
    assert service.executions == 4 and not any(a.replayed for a in answers)


async def test_a_race_lost_to_another_process_replays_its_answer_or_refuses() -> None:
    request_ids = RequestIds()
    stored: dict[str, Stored[int]] = {}

    async def find() -> Stored[int] | None:
        return stored.get("r")

    async def replay(value: int) -> Answer:
        return Answer(value, replayed=True)

    async def lose(fingerprint_of_winner: str) -> Answer | LostRace:
        stored["r"] = Stored(fingerprint_of_winner, 7)  # the other process committed first
        return LOST_RACE

    same = fingerprint({"body": "A"})
    assert await request_ids.run("r", same, find=find, replay=replay, execute=lambda: lose(same)) == Answer(
        7, replayed=True
    )
    stored.clear()
    with pytest.raises(RequestIdReused):
        await request_ids.run(
            "r", same, find=find, replay=replay, execute=lambda: lose(fingerprint({"body": "B"}))
        )


async def test_a_malformed_request_id_is_refused_before_any_work() -> None:
    service = Service()
    with pytest.raises(InvalidArgument) as refused:
        await service.call("has space", "A")
    assert refused.value.reason == "REQUEST_ID_INVALID" and service.executions == 0


async def test_without_a_first_look_the_store_refusing_the_id_replays_its_answer() -> None:
    """``look_first=False``: a new id executes without a look; a repeat executes, the store refuses the id
    (LOST_RACE) and the stored answer is replayed, or refused when the body differs."""
    request_ids = RequestIds()
    stored: dict[str, Stored[int]] = {}
    looks: list[str] = []
    executions: list[str] = []

    async def find() -> Stored[int] | None:
        looks.append("r")
        return stored.get("r")

    async def replay(value: int) -> Answer:
        return Answer(value, replayed=True)

    def execute(body_fingerprint: str):
        async def work() -> Answer | LostRace:
            executions.append(body_fingerprint)
            if "r" in stored:  # the store's unique key: the id is taken
                return LOST_RACE
            stored["r"] = Stored(body_fingerprint, len(executions))
            return Answer(len(executions))

        return work

    same, other = fingerprint({"body": "A"}), fingerprint({"body": "B"})
    run = request_ids.run
    first = await run("r", same, find=find, replay=replay, execute=execute(same), look_first=False)
    assert first == Answer(1)
    assert looks == []  # no look for a new id
    again = await run("r", same, find=find, replay=replay, execute=execute(same), look_first=False)
    assert again == Answer(1, replayed=True)
    with pytest.raises(RequestIdReused):
        await run("r", other, find=find, replay=replay, execute=execute(other), look_first=False)
    assert len(executions) == 3 and len(looks) == 2 and stored["r"] == Stored(same, 1)
