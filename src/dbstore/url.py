"""Database URLs: ``sqlite:///<directory>`` or ``postgresql://...`` (``postgres://`` too)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from dbstore.port import Backend, Database
from litestore import Options, Schema


class UrlError(ValueError):
    """A database URL this program cannot use."""


@dataclass(frozen=True)
class DatabaseUrl:
    backend: Backend
    directory: Path | None = None  # SQLite: where the store files are
    dsn: str = ""  # PostgreSQL: the libpq URL

    @classmethod
    def parse(cls, text: str) -> DatabaseUrl:
        scheme = text.split(":", 1)[0].lower()
        if scheme == "sqlite":
            if not text.startswith("sqlite:///") or len(text) <= len("sqlite:///"):
                raise UrlError("a SQLite database URL is sqlite:///<directory> (an absolute path)")
            return cls(Backend.SQLITE, directory=Path(text[len("sqlite://") :]))
        if scheme in ("postgresql", "postgres"):
            parts = urlsplit(text)
            if not parts.hostname or not parts.path.strip("/"):
                raise UrlError("a PostgreSQL database URL names a host and a database: postgresql://host/db")
            return cls(Backend.POSTGRESQL, dsn=text)
        raise UrlError(f"unknown database URL scheme {scheme!r}: use sqlite:///<directory> or postgresql://...")

    @property
    def shared(self) -> bool:
        """Whether several processes (replicas) can use this database at once (``Database.shared``)."""
        return self.backend is Backend.POSTGRESQL

    @classmethod
    def sqlite(cls, directory: Path) -> DatabaseUrl:
        return cls(Backend.SQLITE, directory=directory.absolute())

    def redacted(self) -> str:
        """The URL without its password (for logs and messages)."""
        if self.backend is Backend.SQLITE:
            return f"sqlite://{self.directory}"
        parts = urlsplit(self.dsn)
        if parts.password is None:
            return self.dsn
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()


async def open_database(
    where: DatabaseUrl | Path,
    file: str,
    schema: Schema,
    options: Options,
    *,
    migrate: bool = False,
    wait: float | None = None,
) -> Database:
    """One store's database: SQLite ``<directory>/<file>`` (migrated when opened, as always), or the
    PostgreSQL database (migrated only with ``migrate=True``, else its version checked).  A ``Path`` is
    the SQLite file itself (whatever its name).  ``wait`` (PostgreSQL): how long a call waits for a
    connection while the server cannot be reached before it fails (default ``postgres.WAIT``)."""
    url = DatabaseUrl.sqlite(where.parent) if isinstance(where, Path) else where
    if isinstance(where, Path):
        file = where.name
    if url.backend is Backend.SQLITE:
        from dbstore.sqlite import SqliteDatabase

        assert url.directory is not None
        return await SqliteDatabase.open(url.directory / file, schema, options)
    from dbstore.postgres import WAIT, PostgresDatabase

    return await PostgresDatabase.open(
        url.dsn, schema, migrate=migrate, label=url.redacted(), wait=WAIT if wait is None else wait
    )
