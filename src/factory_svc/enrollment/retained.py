"""Activation codes kept, encrypted, until the label is printed: ``RetainedCodes`` (SQLite + AES-GCM).

A code is handed out once, but an answer can be lost (a crash between the DPS write and the reply, a CLI
killed before it wrote its file).  So every code is stored here, encrypted, *before* its hash is written to
DPS, and found again by (device id, code id) -- the code id is the salt of its hash record, which is also in
the enrollment and in the stored answer of a request id.  A row goes when the MES acknowledges that the
label is printed (``acknowledge``), when a newer code of the device supersedes it (``supersede``), or when
the retention window has passed (``purge``); after that only the hash in DPS remains.

Encryption: AES-256-GCM with a fresh 96-bit nonce per code; the associated data binds a ciphertext to its
device id and code id.  The key is 32 random bytes in ``<data_dir>/codes.key``, created 0600 on first
start; it is never logged.  Anyone holding both the key and the database can read the retained codes:
that is the price of being able to answer a retry, bounded by the retention window.

The tables live in the enrollment file (``<data_dir>/enrollments.sqlite3``, beside the request ids whose
answers name the code ids), added by its schema migration 3 (``MIGRATION``, through litestore), and use
its store (its thread, synchronous=FULL).  Rotations and acknowledgements are audited by the service in
the file's enrollment audit (who, when, which code id -- never the code).

API: ``async RetainedCodes.on(database, key_file)``, ``.retain(items, now)``, ``.find(device_id, code_id)``,
``.find_many(keys)``, ``.supersede(device_id, keep_code_id)``, ``.acknowledge(device_ids)``,
``.purge(older_than)``, ``.count()``; ``code_id(record)``, ``MIGRATION``, ``KEY_FILE``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dbstore import Database, Tx
from litestore import private_directory
from provkit.clock import to_us
from provkit.errors import InputError

KEY_FILE = "codes.key"
_KEY_BYTES = 32
_NONCE_BYTES = 12
# Migration 3 of the enrollment file (see enrollment.outbox.MIGRATIONS); never edit it, add another.
MIGRATION = """
CREATE TABLE retained_codes (
    device_id TEXT NOT NULL,
    code_id TEXT NOT NULL,
    nonce BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    created_us INTEGER NOT NULL,
    PRIMARY KEY (device_id, code_id)
);
CREATE INDEX retained_by_age ON retained_codes (created_us);
"""


def code_id(record: Mapping[str, Any] | None) -> str:
    """The public id of a code: the salt of its hash record ('' for none)."""
    return str(record.get("salt", "")) if isinstance(record, Mapping) else ""


def _load_key(path: Path) -> bytes:
    """The AES key, made 0600 on first start (O_EXCL: two starting processes cannot both write one)."""
    private_directory(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) != _KEY_BYTES:
            raise InputError(f"{path} is not a {_KEY_BYTES}-byte key") from None
        return key
    key = secrets.token_bytes(_KEY_BYTES)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def _aad(device_id: str, cid: str) -> bytes:
    return f"{device_id}\n{cid}".encode()


class RetainedCodes:
    def __init__(self, db: Database, key: bytes) -> None:
        self._db = db
        self._aead = AESGCM(key)

    @classmethod
    async def on(cls, db: Database, key_file: Path) -> RetainedCodes:
        """The retained codes in ``db`` (the enrollment store), sealed with the key in ``key_file`` (every
        replica of a service on PostgreSQL needs the same key file).  On SQLite deleted rows are
        overwritten (the enrollment store opens its file with ``secure_delete``), and the log is compacted
        after acknowledgements and purges, so a forgotten ciphertext is not left in free pages for the key
        to open later."""
        return cls(db, _load_key(key_file))

    async def _truncate_log(self) -> None:
        await self._db.compact_log()

    # ------------------------------------------------------------------------------------------ writes
    async def retain(self, items: Sequence[tuple[str, str, Mapping[str, Any]]], now: datetime) -> None:
        """Keep (device id, code, hash record) triples, encrypted, in one committed transaction."""
        rows = []
        # one call to the random source for every nonce: each call lets go of the GIL (behind busy threads,
        # taking it back costs more than the call)
        nonces = secrets.token_bytes(_NONCE_BYTES * len(items))
        for k, (device_id, code, record) in enumerate(items):
            cid = code_id(record)
            nonce = nonces[k * _NONCE_BYTES : (k + 1) * _NONCE_BYTES]
            rows.append(
                (device_id, cid, nonce, self._aead.encrypt(nonce, code.encode(), _aad(device_id, cid)))
            )

        async def go(tx: Tx) -> None:
            for row in rows:
                await tx.execute(
                    "INSERT INTO retained_codes (device_id, code_id, nonce, ciphertext, created_us) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (device_id, code_id) DO UPDATE SET "
                    "nonce = excluded.nonce, ciphertext = excluded.ciphertext, "
                    "created_us = excluded.created_us",
                    (*row, to_us(now)),
                )

        if rows:
            await self._db.transaction(go)

    async def supersede(self, device_id: str, keep_code_id: str) -> None:
        """Forget the device's other codes (they no longer open anything)."""
        await self._db.transaction(
            lambda tx: tx.execute(
                "DELETE FROM retained_codes WHERE device_id = ? AND code_id != ?", (device_id, keep_code_id)
            )
        )

    async def acknowledge(self, device_ids: Iterable[str]) -> list[tuple[str, str]]:
        """The labels of these devices are printed: drop their codes.  Returns the (device id, code id)
        pairs that went."""
        ids = sorted(set(device_ids))

        async def go(tx: Tx) -> list[tuple[str, str]]:
            gone: list[tuple[str, str]] = []
            for device_id in ids:
                rows = await tx.fetchall(
                    "SELECT code_id FROM retained_codes WHERE device_id = ?", (device_id,)
                )
                await tx.execute("DELETE FROM retained_codes WHERE device_id = ?", (device_id,))
                gone.extend((device_id, str(row[0])) for row in rows)
            return gone

        gone = await self._db.transaction(go)
        if gone:
            await self._truncate_log()
        return gone

    async def purge(self, older_than: datetime) -> int:
        """Drop codes retained before ``older_than`` (the retention window); returns how many."""
        gone = await self._db.transaction(
            lambda tx: tx.execute("DELETE FROM retained_codes WHERE created_us < ?", (to_us(older_than),))
        )
        if gone:
            await self._truncate_log()
        return int(gone)

    # ------------------------------------------------------------------------------------------- reads
    def _open(self, device_id: str, cid: str, nonce: bytes, ciphertext: bytes) -> str | None:
        try:
            return self._aead.decrypt(nonce, ciphertext, _aad(device_id, cid)).decode()
        except InvalidTag:
            return None  # another key, or a row moved between devices: not a code we can vouch for

    async def find(self, device_id: str, cid: str) -> str | None:
        return (await self.find_many([(device_id, cid)])).get((device_id, cid))

    async def find_many(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
        wanted = [k for k in keys if k[1]]

        async def go(tx: Tx) -> list[tuple[str, str, bytes, bytes]]:
            found = []
            for device_id, cid in wanted:
                row = await tx.fetchone(
                    "SELECT nonce, ciphertext FROM retained_codes WHERE device_id = ? AND code_id = ?",
                    (device_id, cid),
                )
                if row:
                    found.append((device_id, cid, bytes(row[0]), bytes(row[1])))
            return found

        rows = await self._db.read(go) if wanted else []
        out = {}
        for device_id, cid, nonce, ciphertext in rows:
            code = self._open(device_id, cid, nonce, ciphertext)
            if code is not None:
                out[(device_id, cid)] = code
        return out

    async def count(self) -> int:
        row = await self._db.read(lambda tx: tx.fetchone("SELECT count(*) FROM retained_codes"))
        return int(row[0]) if row else 0
