"""Request-id reservations (provkit.idempotency over dbstore.reservations) on a real database: two
``RequestIds`` (two replicas' holders) on one PostgreSQL store take turns on an id, refuse another body at
once, give up waiting at the caller's deadline, take over a holder that stopped renewing, and start over
after a failure.  On SQLite nothing is written (one process: the per-process lock is the reservation)."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
from support.waiting import ended, until

from dbstore import Backend, Database, Tx, open_database, reservations
from litestore import Options, Schema, Synchronous
from provkit.context import deadline_scope
from provkit.idempotency import LOST_RACE, LostRace, RequestIdReused, RequestIds, RequestInProgress, Stored

ANSWERS = """
CREATE TABLE answers (request_id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, value INTEGER NOT NULL);
CREATE TABLE effects (id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL);
"""
SCHEMA = Schema("toy", (ANSWERS, reservations.migration("toy_reservations")))


class Replica:
    """A service on the shared store: its work writes one effect row, and its answer with the reservation's
    end in one transaction (as the ledger does)."""

    def __init__(
        self, db: Database, lease: float = 30.0, work_seconds: float = 0.3, gate: asyncio.Event | None = None
    ) -> None:
        self.db = db
        self.reservations = reservations.Reservations(db, "toy_reservations", "answers")
        self.request_ids = RequestIds(self.reservations, lease=timedelta(seconds=lease))
        self.work_seconds = work_seconds
        self.gate = gate  # when given, the work lasts until the test opens it (instead of work_seconds)
        self.fail = False

    async def find(self, request_id: str) -> Stored[int] | None:
        sql = "SELECT fingerprint, value FROM answers WHERE request_id = ?"
        row = await self.db.read(lambda tx: tx.fetchone(sql, (request_id,)))
        return None if row is None else Stored(row[0], int(row[1]))

    async def call(self, request_id: str, fingerprint: str) -> tuple[int, bool]:
        async def execute() -> tuple[int, bool] | LostRace:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await asyncio.sleep(self.work_seconds)
            if self.fail:
                raise RuntimeError("the work failed")

            async def commit(tx: Tx) -> int | None:
                effect = await tx.insert("INSERT INTO effects (request_id) VALUES (?)", (request_id,), "id")
                stored = await tx.execute(
                    "INSERT INTO answers (request_id, fingerprint, value) VALUES (?, ?, ?) "
                    "ON CONFLICT (request_id) DO NOTHING",
                    (request_id, fingerprint, effect),
                )
                if not stored:
                    return None
                await reservations.settle(tx, "toy_reservations", request_id)
                return effect

            value = await self.db.transaction(commit)
            return LOST_RACE if value is None else (value, False)

        async def replay(value: int) -> tuple[int, bool]:
            return value, True

        return await self.request_ids.run(
            request_id, fingerprint, find=lambda: self.find(request_id), replay=replay, execute=execute
        )


async def effects(db: Database) -> int:
    row = await db.read(lambda tx: tx.fetchone("SELECT count(*) FROM effects"))
    assert row is not None
    return int(row[0])


async def reservation_rows(db: Database) -> int:
    row = await db.read(lambda tx: tx.fetchone("SELECT count(*) FROM toy_reservations"))
    assert row is not None
    return int(row[0])


async def reserved(db: Database, first: asyncio.Task) -> None:
    """Until the first call holds its reservation."""
    await until(lambda: reservation_rows(db), "the first call's reservation", fail_if=ended(first))


@pytest.fixture
async def shared(postgres_url):
    from dbstore import DatabaseUrl

    url = DatabaseUrl.parse(postgres_url)
    db = await open_database(url, "toy.sqlite3", SCHEMA, Options(Synchronous.NORMAL), migrate=True)
    yield db
    await db.close()


async def test_two_holders_take_turns_the_second_waits_and_replays(shared):
    a, b = Replica(shared), Replica(shared)
    answers = await asyncio.gather(*(r.call("req-1", "fp") for r in (a, b, a, b)))
    assert await effects(shared) == 1
    assert {value for value, _ in answers} == {1}
    assert sorted(replayed for _, replayed in answers) == [False, True, True, True]
    assert await reservation_rows(shared) == 0  # ended with the answer


async def test_another_body_is_refused_at_once_while_the_first_runs(shared):
    work = asyncio.Event()
    a, b = Replica(shared, gate=work), Replica(shared)
    first = asyncio.create_task(a.call("req-2", "fp-a"))
    await reserved(shared, first)
    with pytest.raises(RequestIdReused):
        await asyncio.wait_for(b.call("req-2", "fp-b"), 30)  # refused without waiting for the work
    assert not first.done()
    work.set()
    assert (await first)[0] == 1 and await effects(shared) == 1


async def test_a_caller_whose_deadline_comes_first_gets_request_in_progress(shared):
    work = asyncio.Event()
    a, b = Replica(shared, gate=work), Replica(shared)
    first = asyncio.create_task(a.call("req-3", "fp"))
    await reserved(shared, first)
    deadline = time.monotonic() + 0.5
    with deadline_scope(deadline), pytest.raises(RequestInProgress) as busy:
        await b.call("req-3", "fp")
    assert busy.value.reason == "REQUEST_IN_PROGRESS" and busy.value.kind.value == "aborted"
    assert busy.value.retry_after and busy.value.metadata == {"request_id": "req-3"}
    assert not first.done()  # never executed twice: the holder is still at it
    work.set()
    assert (await first)[1] is False
    assert await b.call("req-3", "fp") == (1, True) and await effects(shared) == 1


@pytest.mark.slow
async def test_a_holder_that_stopped_renewing_is_taken_over_after_its_lease(shared):
    dead = reservations.Reservations(shared, "toy_reservations", "answers")
    now_us = int(time.time() * 1_000_000)
    claimed = await dead.claim("req-4", "fp", "dead-replica", now_us, now_us + 3_000_000)
    assert claimed.kind is reservations.ClaimKind.RESERVED
    b = Replica(shared, work_seconds=0.0)
    deadline = time.monotonic() + 0.4
    with deadline_scope(deadline), pytest.raises(RequestInProgress):
        await b.call("req-4", "fp")  # the lease still runs: not taken over yet
    assert await dead.holder_of("req-4") == "dead-replica" and await effects(shared) == 0
    assert await b.call("req-4", "fp") == (1, False)  # waits for the lease to run out, then runs it
    assert await effects(shared) == 1 and await reservation_rows(shared) == 0


@pytest.mark.slow
async def test_a_long_run_renews_its_lease_and_is_not_taken_over(shared):
    a, b = Replica(shared, lease=0.6, work_seconds=1.5), Replica(shared, lease=0.6)
    first = asyncio.create_task(a.call("req-5", "fp"))
    await reserved(shared, first)
    assert await b.call("req-5", "fp") == (1, True)  # waited through several leases, then replayed
    assert await first == (1, False) and await effects(shared) == 1


async def test_a_failed_run_releases_the_id_and_the_next_caller_runs_it(shared):
    a, b = Replica(shared, work_seconds=0.3), Replica(shared, work_seconds=0.0)
    a.fail = True
    first = asyncio.create_task(a.call("req-6", "fp"))
    await reserved(shared, first)
    second = asyncio.create_task(b.call("req-6", "fp"))
    with pytest.raises(RuntimeError):
        await first
    assert await second == (1, False) and await effects(shared) == 1


async def test_claims_arriving_together_each_get_their_own_answer(shared):
    store = reservations.Reservations(shared, "toy_reservations", "answers")
    await shared.transaction(
        lambda tx: tx.execute("INSERT INTO answers (request_id, fingerprint, value) VALUES ('done', 'fp', 7)")
    )
    assert (await store.claim("held", "fp", "other", 1, 2**60)).kind is reservations.ClaimKind.RESERVED
    claims = [
        ("new-1", "fp", "me"),
        ("done", "fp", "me"),  # answered: the claim's row is ended at once
        ("held", "fp", "me"),  # another holder's, lease running: claimed alone, HELD
        ("held", "other-fp", "me"),  # another body for a held id
        ("new-2", "fp", "me"),
        ("new-2", "fp", "me"),  # the same id twice in one group: the second finds the first's
    ]
    got = await asyncio.gather(*(store.claim(r, f, h, 1, 2**50) for r, f, h in claims))
    kinds = [c.kind.value for c in got]
    assert kinds == ["reserved", "answered", "held", "reused", "reserved", "taken-over"]
    assert await store.holder_of("done") is None and await store.holder_of("held") == "other"
    assert await store.holder_of("new-1") == "me" and await store.holder_of("new-2") == "me"


async def test_sqlite_writes_no_reservation(tmp_path):
    from dbstore import DatabaseUrl

    url = DatabaseUrl.sqlite(tmp_path)
    db = await open_database(url, "toy.sqlite3", SCHEMA, Options(Synchronous.NORMAL))
    try:
        assert db.backend is Backend.SQLITE
        replica = Replica(db, work_seconds=0.05)
        assert not replica.reservations.shared
        answers = await asyncio.gather(*(replica.call("req-7", "fp") for _ in range(3)))
        assert sorted(answers) == [(1, False), (1, True), (1, True)]
        assert await effects(db) == 1 and await reservation_rows(db) == 0
    finally:
        await db.close()


def _stores():
    """(store class, file, schema name, migrations, answer table, a previous version's answered id)."""
    from activation_svc import audit
    from factory_svc import ledger
    from factory_svc.enrollment import outbox

    certificate = (
        "INSERT INTO certificates (serial_number, device_id, certificate_pem, chain_pem, sha1_thumbprint, "
        "sha256_thumbprint, not_before_us, not_after_us, issued_at_us, key_type, key_source, caller, "
        "request_id) VALUES ('0A', 'dev', 'pem', 'pem', 'S1', 'S256', 1, 2, 1, 'ec-p256', 'csr', 'c', 'old')"
    )
    return [
        (
            ledger.Ledger.open,
            ledger.FILE,
            "ledger",
            ledger.MIGRATIONS[:4],  # up to version 4, the reservations (later versions follow it)
            [certificate, "INSERT INTO mint_requests VALUES ('old', 'fp', '0A')"],
        ),
        (
            outbox.Outbox.open,
            outbox.FILE,
            "enrollment outbox",
            outbox.MIGRATIONS,
            ["INSERT INTO enroll_requests VALUES ('old', 'fp', '{}')"],
        ),
        (
            audit.AuditLog.open,
            audit.FILE,
            "audit",
            audit.MIGRATIONS,
            ["INSERT INTO activation_requests VALUES ('old', 'fp', '{}')"],
        ),
    ]


@pytest.mark.parametrize("store", range(3), ids=["ledger", "outbox", "audit"])
async def test_each_store_migrates_from_its_previous_version_to_reservations(database_url, store):
    from support.stores import stored_version, write_at_version

    open_store, file, name, migrations, rows = _stores()[store]
    await write_at_version(database_url, file, name, migrations[:-1], rows)
    assert stored_version(database_url, file, name) == len(migrations) - 1
    opened = await open_store(database_url, migrate=True)
    try:
        now_us = int(time.time() * 1_000_000)
        mine = getattr(opened, "certificates", opened).reservations  # the ledger's: its certificate store's
        assert mine.shared is (database_url.backend is Backend.POSTGRESQL)
        kinds = [
            (await mine.claim(request_id, "fp", "me", now_us, now_us + 10**6)).kind
            for request_id in ("old", "new")
        ]
        assert kinds == [reservations.ClaimKind.ANSWERED, reservations.ClaimKind.RESERVED]  # old answer kept
        assert await mine.holder_of("new") == "me" and await mine.holder_of("old") is None
    finally:
        await opened.close()
    assert stored_version(database_url, file, name) >= len(migrations)  # and any later version
