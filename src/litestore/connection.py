"""Opening a database file the one way every store does, and explicit transactions on it.

Every connection gets: the file (0600) in its directory (created 0700 when missing), WAL journaling
(readers never block the writer), the ``synchronous`` level its store chose, a busy timeout (another
process holding the write lock is waited for, not failed on at once), foreign keys enforced, temporary
data (statement journals of multi-row writes, sorts) kept in memory rather than in files created and
deleted under /var/tmp, and the store's schema version reached by its migrations.  Connections are in
autocommit mode (``isolation_level=None``): a transaction exists only where :func:`transaction` (or an
explicit ``BEGIN``) opens one, never implicitly.
"""

from __future__ import annotations

import contextlib
import enum
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from litestore.files import database_files, narrow, private_directory, private_file
from litestore.schema import Schema, migrate


class Synchronous(enum.Enum):
    """How hard a commit waits for the disk (``PRAGMA synchronous``), in WAL mode.

    FULL: a committed transaction survives a power cut (each commit syncs the WAL).  NORMAL: it survives a
    crash of the process, but the last commits may be lost with power (the WAL is synced at checkpoints
    only); much cheaper per commit.  Each store picks one and says why next to its schema.
    """

    FULL = "FULL"
    NORMAL = "NORMAL"


@dataclass(frozen=True)
class Options:
    synchronous: Synchronous
    busy_timeout_ms: int = 5000
    cached_statements: int = 128
    row_factory: type | None = None  # e.g. sqlite3.Row
    secure_delete: bool = False  # overwrite deleted rows (a store that deletes secrets)


def connect(path: Path, schema: Schema, options: Options) -> sqlite3.Connection:
    """Open (creating if needed) and migrate the database at ``path``; raises
    :class:`litestore.SchemaTooNew` for a file from a newer program, :class:`sqlite3.DatabaseError` for a
    file that is not a database."""
    private_directory(path.parent)
    private_file(path)
    for companion in database_files(path)[1:]:
        narrow(companion)
    conn = sqlite3.connect(
        path,
        isolation_level=None,
        check_same_thread=False,  # used from one thread at a time, not always the opening one
        timeout=options.busy_timeout_ms / 1000,
        cached_statements=options.cached_statements,
    )
    try:
        if options.row_factory is not None:
            conn.row_factory = options.row_factory
        conn.execute(f"PRAGMA busy_timeout = {int(options.busy_timeout_ms)}")
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"{path}: cannot use WAL journaling (journal mode stays {mode})")
        conn.execute(f"PRAGMA synchronous = {options.synchronous.value}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA temp_store = MEMORY")
        if options.secure_delete:
            conn.execute("PRAGMA secure_delete = ON").fetchall()
        migrate(conn, schema, path)
    except BaseException:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` as a whole, or ``ROLLBACK`` on any exception (the exception goes
    on).  Inside a transaction already open on ``conn`` it joins that one, so a function that writes can be
    used both alone and as part of a bigger write; the outermost one commits or rolls back."""
    if conn.in_transaction:
        yield conn
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")  # may fail too (a deferred constraint, a full disk): then nothing stays
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
