"""Each device's durable cloud-to-device queue (SQLite table ``hub_c2d``) and its delivery over MQTT.

A message joins its device's queue in one transaction that also checks the device exists and the queue
has room (so a refusal writes nothing).  It is sent, oldest first, to the device's
``devices/{id}/messages/devicebound/#`` subscription at once when the device is connected and
subscribed, otherwise when it connects or subscribes; QoS 1, at least once.  It leaves the queue when

- the device's PUBACK for it arrives (the row is deleted then, not when it is sent);
- it expires (never sent after that);
- it was sent ``max_delivery_count`` times without a PUBACK (dropped before the next attempt, as Azure
  dead-letters it);
- the service purges the queue, or the device is deleted (its rows go with it: a foreign key).

What a kill -9 leaves: a message acknowledged to its sender is committed (``synchronous=FULL``); a sent
but unacknowledged one is still queued and goes out again on the device's next connection; a PUBACK
whose delete did not commit means one more delivery (at least once, never lost).  The delivery count is
raised in a commit before each send, so a crash can cost a count, never a delivery beyond the limit.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from azure_iot_emulator.hub import c2d, topics
from azure_iot_emulator.hub.c2d import C2dLimits, C2dMessage, C2dRefused
from azure_iot_emulator.hub.timefmt import azure_time
from azure_iot_emulator.store import Database

log = logging.getLogger(__name__)

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS hub_c2d (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        hub TEXT NOT NULL,
        device_id TEXT NOT NULL,
        enqueued_time TEXT NOT NULL,
        expires_us INTEGER NOT NULL,
        delivery_count INTEGER NOT NULL DEFAULT 0,
        message_id TEXT,
        correlation_id TEXT,
        user_id TEXT,
        expiry_us INTEGER,
        ack TEXT,
        properties TEXT NOT NULL,
        content_type TEXT,
        content_encoding TEXT,
        body BLOB NOT NULL,
        FOREIGN KEY (hub, device_id) REFERENCES hub_devices (hub, device_id) ON DELETE CASCADE
    )""",
    "CREATE INDEX IF NOT EXISTS hub_c2d_device ON hub_c2d (hub, device_id, seq)",
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _us(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


def _moment(us: int) -> datetime:
    return _EPOCH + us * _MICROSECOND


@dataclass(frozen=True)
class QueuedC2d:
    seq: int
    message: C2dMessage
    expires: datetime
    delivery_count: int


def _from_row(row: sqlite3.Row) -> QueuedC2d:
    message = C2dMessage(
        body=bytes(row["body"]),
        message_id=row["message_id"],
        correlation_id=row["correlation_id"],
        user_id=row["user_id"],
        expiry=None if row["expiry_us"] is None else _moment(row["expiry_us"]),
        ack=row["ack"],
        properties=dict(json.loads(row["properties"])),
        content_type=row["content_type"],
        content_encoding=row["content_encoding"],
    )
    return QueuedC2d(row["seq"], message, _moment(row["expires_us"]), row["delivery_count"])


class C2dStore:
    """The ``hub_c2d`` table.  Rows whose expiry passed are invisible to every read and count."""

    def __init__(self, db: Database) -> None:
        self._db = db
        db.register_schema(*SCHEMA)

    def enqueue(
        self, hub: str, device_id: str, message: C2dMessage, *, now: datetime, expires: datetime
    ) -> int:
        """Queue ``message`` (checked already) for ``device_id``: one transaction that refuses an unknown
        device or a full queue before writing.  Returns its sequence number."""
        now_us = _us(now)
        with self._db.transaction() as conn:
            known = conn.execute(
                "SELECT 1 FROM hub_devices WHERE hub = ? AND device_id = ?", (hub, device_id)
            ).fetchone()
            if known is None:
                raise c2d.device_not_found(device_id)
            depth = conn.execute(
                "SELECT COUNT(*) FROM hub_c2d WHERE hub = ? AND device_id = ? AND expires_us > ?",
                (hub, device_id, now_us),
            ).fetchone()[0]
            if depth >= c2d.MAX_QUEUE_DEPTH:
                raise c2d.queue_full(device_id)
            cursor = conn.execute(
                """INSERT INTO hub_c2d (hub, device_id, enqueued_time, expires_us, message_id,
                   correlation_id, user_id, expiry_us, ack, properties, content_type, content_encoding,
                   body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    hub,
                    device_id,
                    azure_time(now),
                    _us(expires),
                    message.message_id,
                    message.correlation_id,
                    message.user_id,
                    None if message.expiry is None else _us(message.expiry),
                    message.ack,
                    json.dumps(list(message.properties.items())),
                    message.content_type,
                    message.content_encoding,
                    message.body,
                ),
            )
            self._sweep(conn, hub, device_id, now_us)
        seq = cursor.lastrowid
        assert seq is not None
        return seq

    @staticmethod
    def _sweep(conn: sqlite3.Connection, hub: str, device_id: str, now_us: int) -> None:
        conn.execute(
            "DELETE FROM hub_c2d WHERE hub = ? AND device_id = ? AND expires_us <= ?",
            (hub, device_id, now_us),
        )

    def live(self, hub: str, device_id: str, now: datetime) -> list[QueuedC2d]:
        """The device's queue, oldest first."""
        rows = self._db.query(
            "SELECT * FROM hub_c2d WHERE hub = ? AND device_id = ? AND expires_us > ? ORDER BY seq",
            (hub, device_id, _us(now)),
        )
        return [_from_row(row) for row in rows]

    def count_deliveries(
        self, hub: str, device_id: str, sending: Sequence[int], dropping: Sequence[int], now: datetime
    ) -> None:
        """Before sending: one more delivery for each of ``sending``; ``dropping`` (delivered too often)
        and the device's expired messages leave the queue."""
        with self._db.transaction() as conn:
            conn.executemany(
                "UPDATE hub_c2d SET delivery_count = delivery_count + 1 WHERE seq = ?",
                [(seq,) for seq in sending],
            )
            conn.executemany("DELETE FROM hub_c2d WHERE seq = ?", [(s,) for s in dropping])
            self._sweep(conn, hub, device_id, _us(now))

    def complete(self, seq: int) -> None:
        """The device acknowledged the message (gone already after a purge or a device delete: nothing)."""
        with self._db.transaction() as conn:
            conn.execute("DELETE FROM hub_c2d WHERE seq = ?", (seq,))

    def purge(self, hub: str, device_id: str, now: datetime) -> int:
        """Empty the device's queue; returns how many live messages it held."""
        with self._db.transaction() as conn:
            count: int = conn.execute(
                "SELECT COUNT(*) FROM hub_c2d WHERE hub = ? AND device_id = ? AND expires_us > ?",
                (hub, device_id, _us(now)),
            ).fetchone()[0]
            conn.execute("DELETE FROM hub_c2d WHERE hub = ? AND device_id = ?", (hub, device_id))
        return count

    def depths(self, hub: str, now: datetime) -> dict[str, int]:
        """How many live messages each device of ``hub`` has queued (devices with none are absent)."""
        rows = self._db.query(
            "SELECT device_id, COUNT(*) AS n FROM hub_c2d WHERE hub = ? AND expires_us > ?"
            " GROUP BY device_id",
            (hub, _us(now)),
        )
        return {row["device_id"]: row["n"] for row in rows}


class C2dChannel(Protocol):
    """A device's live MQTT connection, as delivery needs it (the core's ``Link``)."""

    def is_subscribed(self, topic: str) -> bool: ...

    def publish_acked(self, topic: str, payload: bytes, on_ack: Callable[[], None]) -> None: ...


class C2dQueue:
    """Queueing with Azure's rules and delivery to connected devices.  Synchronous: every step is a
    local commit, and a device's sends all leave in one event-loop turn, so they stay in order."""

    def __init__(self, store: C2dStore, clock: Callable[[], datetime], limits: C2dLimits) -> None:
        self.store = store
        self.limits = limits.validated()
        self._clock = clock
        # per device: the connection the messages went out on, and which (by seq) await its PUBACK
        self._sent: dict[tuple[str, str], tuple[C2dChannel, set[int]]] = {}

    def send(self, hub: str, device_id: str, message: C2dMessage, channel: C2dChannel | None) -> None:
        """Queue durably (or raise :class:`C2dRefused`, having written nothing), then deliver at once
        when ``channel`` (the device's connection) is subscribed."""
        c2d.check(device_id, message)
        now = self._clock()
        expires = c2d.expires_at(message, now, self.limits)
        try:
            self.store.enqueue(hub, device_id, message, now=now, expires=expires)
        except sqlite3.Error as exc:
            log.exception("C2D message for %s/%s not queued", hub, device_id)
            raise C2dRefused(c2d.INTERNAL_ERROR, f"the message was not queued: {exc}") from exc
        if channel is not None:
            self.deliver(hub, device_id, channel)

    def deliver(self, hub: str, device_id: str, channel: C2dChannel) -> None:
        """Send ``channel`` every queued message of the device it has not been sent on it yet, oldest
        first (nothing unless it subscribed to its devicebound topic).  Never raises: what is not sent
        stays queued for the next connection."""
        try:
            self._deliver(hub, device_id, channel)
        except Exception:
            log.exception("C2D delivery to %s/%s failed; the messages stay queued", hub, device_id)

    def _deliver(self, hub: str, device_id: str, channel: C2dChannel) -> None:
        if not channel.is_subscribed(topics.c2d_topic(device_id, ())):
            return
        key = (hub, device_id)
        entry = self._sent.get(key)
        if entry is None or entry[0] is not channel:
            entry = self._sent[key] = (channel, set())
        sent = entry[1]
        now = self._clock()
        waiting = [queued for queued in self.store.live(hub, device_id, now) if queued.seq not in sent]
        if not waiting:
            return
        limit = self.limits.max_delivery_count
        sending = [queued for queued in waiting if queued.delivery_count < limit]
        dropping = [queued.seq for queued in waiting if queued.delivery_count >= limit]
        if dropping:
            log.info(
                "C2D: %d message(s) for %s/%s delivered %d times unacknowledged: dropped",
                len(dropping), hub, device_id, limit,
            )
        self.store.count_deliveries(hub, device_id, [queued.seq for queued in sending], dropping, now)
        for queued in sending:
            topic = topics.c2d_topic(device_id, c2d.wire_properties(device_id, queued.message))
            sent.add(queued.seq)
            on_ack = functools.partial(self._acked, sent, queued.seq)
            try:
                channel.publish_acked(topic, queued.message.body, on_ack)
            except ConnectionError:
                return  # gone: the rest waits for the next connection

    def _acked(self, sent: set[int], seq: int) -> None:
        sent.discard(seq)
        try:
            self.store.complete(seq)
        except sqlite3.Error:
            log.exception("C2D message %d acknowledged but not removed; it will be delivered again", seq)

    def forget(self, hub: str, device_id: str, channel: C2dChannel) -> None:
        """``channel`` closed: what it was sent and did not acknowledge goes out on the next one."""
        entry = self._sent.get((hub, device_id))
        if entry is not None and entry[0] is channel:
            del self._sent[(hub, device_id)]

    def purge(self, hub: str, device_id: str) -> int:
        return self.store.purge(hub, device_id, self._clock())

    def depths(self, hub: str) -> dict[str, int]:
        return self.store.depths(hub, self._clock())
