"""The built-in endpoint's tables, beside the hub's telemetry (``hub_messages``) in the emulator's database.

- ``hub_event_hubs``: one row per hub: its partition count, fixed when the hub's endpoint is first
  created (as on Azure), and the creation time the ``$management`` node reports.
- ``hub_event_positions``: each stored message's partition and sequence number in it.  Rows are written
  by :meth:`EventHubStore.record` inside the very transaction that stores the messages (the telemetry
  store's hook), so a message is never readable without its position nor the reverse, whatever a crash
  interrupts.  Only what the hub's routes send to the built-in endpoint gets a row (device messages no
  route takes stay in ``hub_messages`` without one).  Messages stored before this table existed are given
  positions once, when the table is created (:meth:`EventHubStore.index_unpositioned`).
- ``hub_consumer_groups``: the consumer groups created through the REST API (``$Default`` always exists).

Retention is enforced on every read: events enqueued longer ago than the retention are not served and
no longer count in a partition's ``begin_sequence_number``; :meth:`EventHubStore.prune` deletes them.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

from azure_iot_emulator.hub.eventhub.model import (
    DEFAULT_CONSUMER_GROUP,
    Event,
    PartitionInfo,
    Position,
    parse_enqueued,
    partition_of,
)
from azure_iot_emulator.hub.timefmt import azure_time
from azure_iot_emulator.store import Database

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS hub_event_hubs (
        hub TEXT PRIMARY KEY,
        partition_count INTEGER NOT NULL,
        created TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS hub_event_positions (
        hub TEXT NOT NULL,
        partition INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        message_seq INTEGER NOT NULL,
        PRIMARY KEY (hub, partition, seq)
    ) WITHOUT ROWID""",
    """CREATE INDEX IF NOT EXISTS hub_event_positions_offset
       ON hub_event_positions (hub, partition, message_seq)""",
    """CREATE TABLE IF NOT EXISTS hub_consumer_groups (
        hub TEXT NOT NULL,
        name TEXT NOT NULL COLLATE NOCASE,
        created TEXT NOT NULL,
        PRIMARY KEY (hub, name)
    )""",
)

_EVENT_COLUMNS = """p.partition AS partition, p.seq AS pseq, m.seq AS offset, m.device_id AS device_id,
    m.enqueued_time AS enqueued_time, m.system_properties AS system_properties,
    m.application_properties AS application_properties, m.body AS body, m.source AS source"""


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_LAST_SEQ = "(SELECT MAX(seq) FROM hub_event_positions WHERE hub = ? AND partition = ?)"
_KEYS_PER_STATEMENT = 256  # result columns per statement (SQLite allows 2,000)


def _next_sequence_numbers(
    conn: sqlite3.Connection, keys: Sequence[tuple[str, int]]
) -> dict[tuple[str, int], int]:
    """The next sequence number of each (hub, partition) in ``keys``, read with one statement (a scalar
    subquery per partition, each one lookup at the end of the primary key) instead of one per partition:
    a group commit of telemetry touches several."""
    following: dict[tuple[str, int], int] = {}
    for start in range(0, len(keys), _KEYS_PER_STATEMENT):
        chunk = keys[start : start + _KEYS_PER_STATEMENT]
        sql = "SELECT " + ", ".join([_LAST_SEQ] * len(chunk))
        row = conn.execute(sql, [value for key in chunk for value in key]).fetchone()
        following.update(
            (key, 0 if last is None else last + 1) for key, last in zip(chunk, tuple(row), strict=True)
        )
    return following


class PartitionCountChanged(ValueError):
    """The settings ask for another partition count than the one a hub's endpoint was created with."""


def _event(row: sqlite3.Row) -> Event:
    return Event(
        partition=row["partition"],
        sequence_number=row["pseq"],
        offset=row["offset"],
        enqueued_time=parse_enqueued(row["enqueued_time"]),
        device_id=row["device_id"],
        system_properties=json.loads(row["system_properties"]),
        application_properties=json.loads(row["application_properties"]),
        body=bytes(row["body"]),
        source=row["source"],
    )


def _threshold(position: Position) -> str:
    """The enqueue-time text from which events qualify (event times are compared in milliseconds)."""
    millis = position.value if position.inclusive else position.value + 1
    return azure_time(_EPOCH + timedelta(milliseconds=millis))


class EventHubStore:
    def __init__(self, db: Database, partitions: Mapping[str, int], now: datetime) -> None:
        """``partitions``: the partition count of every hub; each hub's endpoint is created with it on
        first use, after which it may not change (:class:`PartitionCountChanged`)."""
        self._db = db
        self._new_positions = (
            db.query_one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'hub_event_positions'")
            is None
        )
        db.register_schema(*SCHEMA)
        with db.transaction() as conn:
            for hub, count in partitions.items():
                row = conn.execute(
                    "SELECT partition_count FROM hub_event_hubs WHERE hub = ?", (hub,)
                ).fetchone()
                if row is None:
                    conn.execute(
                        "INSERT INTO hub_event_hubs (hub, partition_count, created) VALUES (?, ?, ?)",
                        (hub, count, azure_time(now)),
                    )
                elif row["partition_count"] != count:
                    raise PartitionCountChanged(
                        f"hub {hub}'s built-in endpoint has {row['partition_count']} partitions (fixed when "
                        f"it was created, as on Azure), not {count}: set hub_partitions accordingly"
                    )
        self.partitions = dict(partitions)
        self.created = {
            row["hub"]: parse_enqueued(row["created"])
            for row in db.query("SELECT hub, created FROM hub_event_hubs")
        }

    # ---------------------------------------------------------------------------------------- writing
    def record(self, conn: sqlite3.Connection, items: Sequence[tuple[int, str, str]]) -> None:
        """Give the messages (their store number, hub, device id) their partition and sequence number;
        runs inside the transaction that stores them."""
        keyed: list[tuple[tuple[str, int], int]] = []
        for message_seq, hub, device_id in items:
            count = self.partitions.get(hub)
            if count is not None:
                keyed.append(((hub, partition_of(device_id, count)), message_seq))
        if not keyed:
            return
        following = _next_sequence_numbers(conn, list(dict.fromkeys(key for key, _ in keyed)))
        rows: list[tuple[str, int, int, int]] = []
        for key, message_seq in keyed:
            seq = following[key]
            rows.append((key[0], key[1], seq, message_seq))
            following[key] = seq + 1
        conn.executemany(
            "INSERT INTO hub_event_positions (hub, partition, seq, message_seq) VALUES (?, ?, ?, ?)", rows
        )

    def index_unpositioned(self) -> int:
        """Positions for the messages stored before the built-in endpoint existed (only when this start
        created its table: afterwards every message the routes send there gets its position as it is
        stored, and one without a position is one no route took); returns how many."""
        if not self._new_positions:
            return 0
        with self._db.transaction() as conn:
            rows = conn.execute("SELECT seq, hub, device_id FROM hub_messages ORDER BY seq").fetchall()
            self.record(conn, [(row["seq"], row["hub"], row["device_id"]) for row in rows])
        self._new_positions = False
        return len(rows)

    def prune(self, before: datetime) -> int:
        """Delete the messages enqueued before ``before`` (out of retention) and their positions."""
        cutoff = azure_time(before)
        with self._db.transaction() as conn:
            conn.execute(
                """DELETE FROM hub_event_positions WHERE message_seq IN
                   (SELECT seq FROM hub_messages WHERE enqueued_time < ?)""",
                (cutoff,),
            )
            return conn.execute("DELETE FROM hub_messages WHERE enqueued_time < ?", (cutoff,)).rowcount

    # ---------------------------------------------------------------------------------------- reading
    def read(
        self, hub: str, partition: int, from_seq: int, limit: int, retained_since: datetime
    ) -> list[Event]:
        """Up to ``limit`` events of the partition from sequence number ``from_seq`` on, oldest first."""
        rows = self._db.query(
            f"""SELECT {_EVENT_COLUMNS} FROM hub_event_positions p
                JOIN hub_messages m ON m.seq = p.message_seq
                WHERE p.hub = ? AND p.partition = ? AND p.seq >= ? AND m.enqueued_time >= ?
                ORDER BY p.seq LIMIT ?""",  # noqa: S608 - fixed fragments
            (hub, partition, from_seq, azure_time(retained_since), limit),
        )
        return [_event(row) for row in rows]

    def start_of(self, hub: str, partition: int, position: Position, retained_since: datetime) -> int:
        """The sequence number of the first event at or after ``position`` (the next one to be enqueued
        when there is none)."""
        info = self.partition_info(hub, partition, retained_since)
        following = info.last_sequence_number + 1
        if position.latest:
            return following
        found: int | None
        if position.field == "sequence":
            found = position.value if position.inclusive else position.value + 1
        elif position.field == "offset":
            operator = ">=" if position.inclusive else ">"
            row = self._db.query_one(
                f"""SELECT MIN(seq) AS seq FROM hub_event_positions
                    WHERE hub = ? AND partition = ? AND message_seq {operator} ?""",  # noqa: S608 - fixed
                (hub, partition, position.value),
            )
            found = row["seq"] if row is not None else None
        else:
            row = self._db.query_one(
                """SELECT MIN(p.seq) AS seq FROM hub_event_positions p
                   JOIN hub_messages m ON m.seq = p.message_seq
                   WHERE p.hub = ? AND p.partition = ? AND m.enqueued_time >= ?""",
                (hub, partition, _threshold(position)),
            )
            found = row["seq"] if row is not None else None
        if found is None:
            return following
        return min(max(found, info.begin_sequence_number), following)

    def partition_info(self, hub: str, partition: int, retained_since: datetime) -> PartitionInfo:
        last = self._db.query_one(
            """SELECT p.seq AS seq, p.message_seq AS offset, m.enqueued_time AS enqueued
               FROM hub_event_positions p JOIN hub_messages m ON m.seq = p.message_seq
               WHERE p.hub = ? AND p.partition = ? ORDER BY p.seq DESC LIMIT 1""",
            (hub, partition),
        )
        first = self._db.query_one(
            """SELECT MIN(p.seq) AS seq FROM hub_event_positions p
               JOIN hub_messages m ON m.seq = p.message_seq
               WHERE p.hub = ? AND p.partition = ? AND m.enqueued_time >= ?""",
            (hub, partition, azure_time(retained_since)),
        )
        if last is None:
            return PartitionInfo(partition, 0, -1, -1, None, True)
        begin = first["seq"] if first is not None and first["seq"] is not None else last["seq"] + 1
        return PartitionInfo(
            partition,
            begin,
            last["seq"],
            last["offset"],
            parse_enqueued(last["enqueued"]),
            begin > last["seq"],
        )

    # -------------------------------------------------------------------------------- consumer groups
    def consumer_groups(self, hub: str) -> list[tuple[str, datetime]]:
        """The hub's consumer groups with their creation time, ``$Default`` first."""
        rows = self._db.query(
            "SELECT name, created FROM hub_consumer_groups WHERE hub = ? ORDER BY created, name", (hub,)
        )
        return [(DEFAULT_CONSUMER_GROUP, self.created[hub])] + [
            (row["name"], parse_enqueued(row["created"])) for row in rows
        ]

    def consumer_group(self, hub: str, name: str) -> tuple[str, datetime] | None:
        if name.lower() == DEFAULT_CONSUMER_GROUP.lower():
            return DEFAULT_CONSUMER_GROUP, self.created[hub]
        row = self._db.query_one(
            "SELECT name, created FROM hub_consumer_groups WHERE hub = ? AND name = ?", (hub, name)
        )
        return (row["name"], parse_enqueued(row["created"])) if row is not None else None

    def add_consumer_group(
        self, hub: str, name: str, now: datetime, limit: int
    ) -> tuple[str, datetime] | None:
        """Create it unless it exists; None when the hub already has ``limit`` groups."""
        with self._db.transaction() as conn:
            existing = self.consumer_group(hub, name)
            if existing is not None:
                return existing
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM hub_consumer_groups WHERE hub = ?", (hub,)
            ).fetchone()
            if count + 1 >= limit:
                return None
            conn.execute(
                "INSERT INTO hub_consumer_groups (hub, name, created) VALUES (?, ?, ?)",
                (hub, name, azure_time(now)),
            )
        return name, now

    def delete_consumer_group(self, hub: str, name: str) -> bool:
        with self._db.transaction() as conn:
            return (
                conn.execute(
                    "DELETE FROM hub_consumer_groups WHERE hub = ? AND name = ?", (hub, name)
                ).rowcount
                > 0
            )
