"""dbstore: the services' storage port, with SQLite (embedded default) and PostgreSQL (several replicas).

A service names its database with one URL (``database_url`` in its settings): ``sqlite:///<directory>``
(the default, ``sqlite:///<data_dir>``: one file per store in that directory, through litestore, as
before) or ``postgresql://user:password@host:port/database`` (one database for all the service's stores,
through psycopg 3 and a psycopg_pool connection pool).

A store writes its SQL once, in the subset both databases speak (``?`` placeholders, ``ON CONFLICT``,
``RETURNING`` through :meth:`Tx.insert`).  It asks the database what it can do, never which backend it is:
:attr:`Database.shared` (replicas use it at once: claim with row locks, hold work with leases) and
:meth:`Database.compact_log`; only the SQL of a row lock differs by :attr:`Tx.backend`.  Its work is an
``async`` function of a :class:`Tx`, run as one
transaction by :meth:`Database.transaction` (or without one by :meth:`Database.read`):

- on SQLite the function runs on the store's own thread (litestore), all of it in one hand-off: it may
  await only the :class:`Tx` (which never suspends there), so one transaction costs what it did before;
- on PostgreSQL it runs on the event loop with a pooled connection, ``READ COMMITTED``; a deadlock or
  serialization failure (:class:`dbstore.port.RunAgain`) is retried (the function runs again from the
  start, so it must only touch the database).

Writes of concurrent calls that may share a commit go through :class:`dbstore.grouped.GroupedTransactions`
(each still all or nothing; one commit for those that arrive together, on either backend).

Schemas: each store declares its ordered migrations once (:class:`litestore.Schema`); PostgreSQL runs them
translated (:func:`postgres_dialect`) and keeps the versions in a ``schema_versions`` table, one row per
store.  On SQLite a store migrates its file when opened (as before); on PostgreSQL a service migrates only
by its ``migrate`` command, and refuses to start on any version but its own (:class:`SchemaBehind`,
:class:`litestore.SchemaTooNew`).
"""

from dbstore.port import Backend, Conflict, Database, Tx
from dbstore.url import DatabaseUrl, UrlError, open_database

__all__ = ["Backend", "Conflict", "Database", "DatabaseUrl", "Tx", "UrlError", "open_database"]
