"""litestore's schema versions and file modes, on real files: an old file is migrated, a newer one is refused
untouched, a failed migration leaves the file as it was, and files and directories are private."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from litestore import Options, Schema, SchemaTooNew, Synchronous, connect, private_directory, user_version

OPTIONS = Options(synchronous=Synchronous.NORMAL)

V1 = """
CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS notes_not_empty BEFORE INSERT ON notes WHEN new.text = ''
BEGIN SELECT RAISE(ABORT, 'empty; refused'); END;
"""
V2 = "ALTER TABLE notes ADD COLUMN words INTEGER NOT NULL DEFAULT 0;"


def count_words(conn: sqlite3.Connection) -> None:
    for note_id, text in conn.execute("SELECT id, text FROM notes").fetchall():
        conn.execute("UPDATE notes SET words = ? WHERE id = ?", (len(text.split()), note_id))


V3 = "CREATE INDEX notes_by_words ON notes (words);"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_an_old_file_is_migrated_in_order(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    old = connect(path, Schema("notes", (V1,)), OPTIONS)
    old.execute("INSERT INTO notes (text) VALUES ('two words'), ('three short words')")
    old.close()

    db = connect(path, Schema("notes", (V1, V2, count_words, V3)), OPTIONS)
    try:
        assert user_version(db) == 4
        assert db.execute("SELECT text, words FROM notes ORDER BY id").fetchall() == [
            ("two words", 2),
            ("three short words", 3),
        ]
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'notes_by_words'").fetchone()
        with pytest.raises(sqlite3.IntegrityError, match="empty; refused"):  # the trigger came through whole
            db.execute("INSERT INTO notes (text) VALUES ('')")
    finally:
        db.close()


def test_a_file_from_before_versions_takes_its_first_migration(tmp_path: Path) -> None:
    """Stores started with ``CREATE TABLE IF NOT EXISTS`` scripts and no version: such a file is version 0
    with the tables already there; the same script as migration 1 keeps its rows."""
    path = tmp_path / "notes.db"
    with sqlite3.connect(path) as unversioned:
        unversioned.executescript(V1)
        unversioned.execute("INSERT INTO notes (text) VALUES ('kept')")
    db = connect(path, Schema("notes", (V1, V2)), OPTIONS)
    try:
        assert user_version(db) == 2
        assert db.execute("SELECT text, words FROM notes").fetchall() == [("kept", 0)]
    finally:
        db.close()


def test_a_failing_migration_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    connect(path, Schema("notes", (V1,)), OPTIONS).close()

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO notes (text) VALUES ('half done')")
        raise RuntimeError("migration bug")

    with pytest.raises(RuntimeError, match="migration bug"):
        connect(path, Schema("notes", (V1, V2, broken)), OPTIONS)
    with sqlite3.connect(path) as fresh:
        assert fresh.execute("PRAGMA user_version").fetchone() == (1,)
        columns = [row[1] for row in fresh.execute("PRAGMA table_info(notes)")]
        assert columns == ["id", "text"]  # V2 ran in the same transaction and was rolled back with it
        assert fresh.execute("SELECT COUNT(*) FROM notes").fetchone() == (0,)


def test_a_newer_file_is_refused_naming_both_versions(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    connect(path, Schema("notes", (V1, V2, V3)), OPTIONS).close()
    with pytest.raises(SchemaTooNew) as refused:
        connect(path, Schema("notes", (V1,)), OPTIONS)
    assert (refused.value.found, refused.value.known) == (3, 1)
    message = str(refused.value)
    assert "notes" in message and "version 3" in message and "version 1" in message
    with sqlite3.connect(path) as fresh:
        assert fresh.execute("PRAGMA user_version").fetchone() == (3,)


def test_new_files_and_directories_are_private_whatever_the_umask(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    path = shared / "a" / "b" / "notes.db"
    previous = os.umask(0)  # the most permissive umask: the modes must not depend on it
    try:
        db = connect(path, Schema("notes", (V1,)), OPTIONS)
        db.execute("INSERT INTO notes (text) VALUES ('secret')")  # WAL mode: -wal and -shm exist now
        try:
            assert mode(shared) == 0o755  # an existing directory keeps its mode
            assert mode(shared / "a") == 0o700
            assert mode(shared / "a" / "b") == 0o700
            for name in ("notes.db", "notes.db-wal", "notes.db-shm"):
                assert mode(path.with_name(name)) == 0o600, name
        finally:
            db.close()
    finally:
        os.umask(previous)


def test_an_existing_readable_file_is_narrowed(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    connect(path, Schema("notes", (V1,)), OPTIONS).close()
    os.chmod(path, 0o644)
    connect(path, Schema("notes", (V1,)), OPTIONS).close()
    assert mode(path) == 0o600


def test_private_directory_alone(tmp_path: Path) -> None:
    private_directory(tmp_path / "x" / "y")
    private_directory(tmp_path / "x" / "y")  # again: nothing to do
    assert mode(tmp_path / "x") == mode(tmp_path / "x" / "y") == 0o700
