"""The PostgreSQL backend: psycopg 3 (async) with a psycopg_pool connection pool.

Statements are written with ``?`` placeholders for both backends; here they become ``%s`` (a literal
``%`` is doubled first).  Connections are in autocommit mode; :meth:`PostgresDatabase.transaction` opens
one ``READ COMMITTED`` transaction per call and runs it again from the start (a few times) when
PostgreSQL aborted it for a deadlock or a serialization failure, both of which only a retry resolves.

Schema versions live in ``schema_versions`` (one row per store name).  :func:`migrate` brings a store's
tables to its version inside one transaction holding an advisory lock, so replicas migrating at once
take turns and the second finds nothing to do.  :meth:`PostgresDatabase.open` checks the version and,
unless asked to migrate, refuses any version but its own.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import psycopg
from psycopg import errors
from psycopg_pool import AsyncConnectionPool

from dbstore.grouped import TransactionGroups
from dbstore.port import Backend, Conflict, GroupWork, Params, Row, RunAgain, Work
from litestore import Schema, SchemaError, SchemaTooNew
from litestore.schema import statements

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - the item type of a group commit
R = TypeVar("R")

RETRIES = 8
POOL_SIZE = 8
WAIT = 30.0  # seconds a call waits for a pool connection (psycopg_pool's default)
# What PostgreSQL ends a transaction with that succeeds when run again (``RunAgain``).
_GIVEN_UP = (errors.DeadlockDetected, errors.SerializationFailure)
# pg_advisory_xact_lock key for migrations: any fixed number ("dbst" in ASCII).
MIGRATION_LOCK = 0x64627374


class SchemaBehind(SchemaError):
    """The database's tables for a store are older than this program's: run the service's migrate command."""

    def __init__(self, label: str, name: str, found: int, known: int) -> None:
        super().__init__(
            f"{label}: the {name} tables have schema version {found}, this program needs version {known}; "
            f"run this service's `migrate` command first (replicas of the older version must be stopped "
            f"or compatible)"
        )
        self.found = found
        self.known = known


@functools.lru_cache(maxsize=1024)
def pg_sql(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


def postgres_dialect(script: str) -> str:
    """A store's migration script (written for SQLite) in PostgreSQL's words: generated keys become
    ``BIGSERIAL``, integers ``BIGINT`` (microsecond times do not fit 32 bits), blobs ``BYTEA``."""
    script = re.sub(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b", "BIGSERIAL PRIMARY KEY", script, flags=re.I)
    script = re.sub(r"\bBLOB\b", "BYTEA", script)
    return re.sub(r"\bINTEGER\b", "BIGINT", script)


class PostgresTx:
    backend = Backend.POSTGRESQL

    def __init__(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        self.conn = conn

    async def _run(self, sql: str, params: Params) -> psycopg.AsyncCursor[tuple[object, ...]]:
        try:
            return await self.conn.execute(pg_sql(sql), tuple(params))
        except errors.IntegrityError as exc:
            raise Conflict(str(exc)) from exc
        except _GIVEN_UP as exc:
            raise RunAgain(str(exc)) from exc

    async def execute(self, sql: str, params: Params = ()) -> int:
        return (await self._run(sql, params)).rowcount

    async def fetchone(self, sql: str, params: Params = ()) -> Row | None:
        return await (await self._run(sql, params)).fetchone()

    async def fetchall(self, sql: str, params: Params = ()) -> list[Row]:
        return await (await self._run(sql, params)).fetchall()

    async def insert(self, sql: str, params: Params, key: str) -> int:
        row = await (await self._run(f"{sql} RETURNING {key}", params)).fetchone()
        assert row is not None and isinstance(row[0], int)
        return row[0]

    @contextlib.asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        async with self.conn.transaction():
            yield


async def _version(conn: psycopg.AsyncConnection[tuple[object, ...]], name: str) -> int:
    exists = await (await conn.execute("SELECT to_regclass('schema_versions') IS NOT NULL")).fetchone()
    if not exists or not exists[0]:
        return 0
    cursor = await conn.execute("SELECT version FROM schema_versions WHERE store = %s", (name,))
    row = await cursor.fetchone()
    return int(row[0]) if row else 0  # type: ignore[call-overload]


async def migrate(conn: psycopg.AsyncConnection[tuple[object, ...]], schema: Schema, label: str) -> int:
    """Bring ``schema``'s tables to its version; answer the version found.  ``conn`` is in autocommit."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_versions (store TEXT PRIMARY KEY, version BIGINT NOT NULL)"
        )
        found = await _version(conn, schema.name)
        if found > schema.version:
            raise SchemaTooNew(label, schema.name, found, schema.version)
        for step in schema.migrations[found:]:
            if not isinstance(step, str):
                raise SchemaError(f"the {schema.name} schema has a migration only SQLite can run")
            for statement in statements(postgres_dialect(step)):
                await conn.execute(statement.encode())  # bytes: not a query template, no parameters
        await conn.execute(
            "INSERT INTO schema_versions (store, version) VALUES (%s, %s) "
            "ON CONFLICT (store) DO UPDATE SET version = EXCLUDED.version",
            (schema.name, schema.version),
        )
    return found


class PostgresDatabase:
    backend = Backend.POSTGRESQL
    shared = True  # replicas: every store claims with row locks

    def __init__(self, pool: AsyncConnectionPool, name: str) -> None:
        self.pool = pool
        self.name = name
        self._groups: list[TransactionGroups[Any, Any]] = []

    @classmethod
    async def open(
        cls,
        dsn: str,
        schema: Schema,
        *,
        migrate: bool = False,
        label: str = "",
        pool_size: int = POOL_SIZE,
        wait: float = WAIT,
    ) -> PostgresDatabase:
        """``wait``: how long a call waits for a connection (the server away: then ``PoolTimeout``)."""
        pool = AsyncConnectionPool(
            dsn,
            min_size=1,
            max_size=pool_size,
            open=False,
            kwargs={"autocommit": True},
            name=schema.name,
            timeout=wait,
        )
        await pool.open(wait=True, timeout=30)
        try:
            async with pool.connection() as conn:
                await _migrate_or_check(conn, schema, label or schema.name, migrate)
        except BaseException:
            await pool.close()
            raise
        return cls(pool, schema.name)

    async def transaction(self, work: Work[T]) -> T:
        for attempt in range(RETRIES):
            try:
                async with self.pool.connection() as conn, conn.transaction():
                    return await work(PostgresTx(conn))
            except (RunAgain, *_GIVEN_UP):  # (at COMMIT the driver's own error comes through)
                if attempt == RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    async def read(self, work: Work[T]) -> T:
        async with self.pool.connection() as conn:
            return await work(PostgresTx(conn))

    def group_commit(self, work: GroupWork[I, R], *, gather: float = 0.0) -> TransactionGroups[I, R]:
        """Writes of this process that arrive together share one transaction (``dbstore.grouped``): one
        BEGIN / COMMIT and one WAL flush for the group instead of one each.  Between replicas the database
        decides as for any transaction (keys, row locks)."""
        groups: TransactionGroups[I, R] = TransactionGroups(self.transaction, work, gather=gather)
        self._groups.append(groups)
        return groups

    async def compact_log(self) -> None:
        """Nothing to do: the server recycles its own write-ahead log."""

    async def close(self) -> None:
        for groups in self._groups:
            await groups.drain()
        await self.pool.close()


async def _migrate_or_check(
    conn: psycopg.AsyncConnection[tuple[object, ...]], schema: Schema, label: str, apply: bool
) -> int:
    if apply:
        return await migrate(conn, schema, label)
    found = await _version(conn, schema.name)
    if found > schema.version:
        raise SchemaTooNew(label, schema.name, found, schema.version)
    if found < schema.version:
        raise SchemaBehind(label, schema.name, found, schema.version)
    return found
