"""litestore: the one way this project's programs keep state in SQLite files.

Every store (the factory's certificate ledger and enrollment outbox, the activation audit, the device's
telemetry buffer, the emulator's database) opens its file through :func:`connect` or :meth:`Store.open`:
modes 0600 for the files and 0700 for directories it creates, WAL, a ``synchronous`` level the store
chooses, a busy timeout, foreign keys, and an explicit schema version (``PRAGMA user_version``) reached by
the store's ordered migrations, with a newer file refused.  Async code gets one dedicated thread per store
(:class:`Store`), whole-or-nothing transactions, and group commits (:class:`GroupCommit`).

Why a package of its own: the Azure emulator is a separate program that imports nothing from the suite
(it stands in for Azure, reached only over the wire), yet its database deserves the same care as the
suite's stores.  So this package depends on nothing but the standard library and on no other package of
the project, and both sides import it.  Keep it that way: no imports from provkit, the services, the
device client or the emulator here.
"""

from litestore.connection import Options, Synchronous, connect, transaction
from litestore.files import private_directory, private_file
from litestore.schema import Migration, Schema, SchemaError, SchemaTooNew, user_version
from litestore.store import Failed, GroupCommit, GroupedWrites, Store, StoreClosed, each_in_savepoint

__all__ = [
    "Failed",
    "GroupCommit",
    "GroupedWrites",
    "Migration",
    "Options",
    "Schema",
    "SchemaError",
    "SchemaTooNew",
    "Store",
    "StoreClosed",
    "Synchronous",
    "connect",
    "each_in_savepoint",
    "private_directory",
    "private_file",
    "transaction",
    "user_version",
]
