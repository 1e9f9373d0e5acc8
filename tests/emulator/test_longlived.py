"""Freezing long-lived objects out of the garbage collector's walks (``longlived.py``): when it freezes
(start-up, a batch of connections, the end of a burst), when it gives everything back to the collector
(enough frozen connections closed), and that the MQTT core reports every connection opened and closed.
A recording collector stands in for :mod:`gc`, so the test process's own collector is left alone."""

from __future__ import annotations

import asyncio

from azure_iot_emulator.longlived import LongLivedObjects
from azure_iot_emulator.mqtt import packets as p
from azure_iot_emulator.mqtt.broker import Broker
from azure_iot_emulator.mqtt.codec import encode
from azure_iot_emulator.store import Database


class Collector:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.frozen = asyncio.Event()

    def collect(self) -> int:
        self.calls.append("collect")
        return 0

    def freeze(self) -> None:
        self.calls.append("freeze")
        self.frozen.set()

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")


def freezes(collector: Collector) -> int:
    return collector.calls.count("freeze")


async def test_start_up_is_collected_then_frozen_and_stop_gives_it_back() -> None:
    collector = Collector()
    heap = LongLivedObjects(collector=collector)
    heap.start()
    assert collector.calls == ["collect", "freeze"]
    heap.stop()
    assert collector.calls[-1] == "unfreeze"


async def test_a_batch_of_connections_is_frozen_at_once_and_counted_frozen() -> None:
    collector = Collector()
    heap = LongLivedObjects(batch=3, settle=3600, thaw_min=1, thaw_fraction=0.5, collector=collector)
    heap.start()
    tokens = [heap.opened() for _ in range(3)]
    assert freezes(collector) == 2  # start-up, then the batch (no waiting for the burst to end)
    assert heap.freezes == 2
    # The third one too was frozen (it opened before the freeze): closing 2 of the 3 frozen thaws.
    heap.closed(tokens[2])
    assert "unfreeze" not in collector.calls
    heap.closed(tokens[0])
    assert collector.calls[-1] == "unfreeze" and heap.thaws == 1
    heap.stop()


async def test_a_burst_is_frozen_once_it_settles() -> None:
    collector = Collector()
    heap = LongLivedObjects(batch=1000, settle=0.01, collector=collector)
    heap.start()
    collector.frozen.clear()
    heap.opened()
    heap.opened()
    await asyncio.wait_for(collector.frozen.wait(), 10)
    assert freezes(collector) == 2  # start-up and the burst's end, once for both connections
    heap.stop()


async def test_closing_a_connection_not_frozen_yet_never_thaws() -> None:
    collector = Collector()
    heap = LongLivedObjects(batch=1000, settle=3600, thaw_min=1, collector=collector)
    heap.start()
    for _ in range(5):
        heap.closed(heap.opened())
    assert "unfreeze" not in collector.calls
    heap.stop()


async def test_thawing_waits_for_the_share_and_the_minimum_then_freezes_once_the_churn_settles() -> None:
    collector = Collector()
    heap = LongLivedObjects(batch=10, settle=0.01, thaw_fraction=0.5, thaw_min=2, collector=collector)
    heap.start()
    tokens = [heap.opened() for _ in range(10)]  # one batch: 10 frozen
    for token in tokens[:4]:
        heap.closed(token)
    assert heap.thaws == 0  # 4 of 10 closed
    collector.frozen.clear()
    heap.closed(tokens[4])
    assert heap.thaws == 1 and collector.calls[-1] == "unfreeze"  # 5 of 10: no collection of its own
    heap.closed(tokens[5])  # the churn goes on: nothing frozen, nothing counted
    assert heap.thaws == 1 and not collector.frozen.is_set()
    await asyncio.wait_for(collector.frozen.wait(), 10)  # it settled: the 4 still open are frozen again
    assert collector.calls[-2:] == ["collect", "freeze"] and heap.freezes == 3
    heap.closed(tokens[6])
    assert heap.thaws == 1
    heap.closed(tokens[7])  # 2 of 4, and the minimum of 2
    assert heap.thaws == 2
    heap.stop()


async def test_frozen_connections_that_closed_still_count_after_a_later_freeze() -> None:
    # What a closed frozen connection leaves stays frozen through every later freeze: churn that closes
    # fewer than the share between two freezes (devices reconnecting, anyone opening connections on 8883)
    # must still reach a thaw, not pile up uncollectable cycles for as long as the process runs.
    collector = Collector()
    heap = LongLivedObjects(batch=2, settle=3600, thaw_fraction=0.5, thaw_min=1, collector=collector)
    heap.start()
    for _ in range(4):  # long-lived: frozen, never closed
        heap.opened()
    for _ in range(3):  # each round: two connections, frozen with the rest (6), then closed
        churn = [heap.opened() for _ in range(2)]
        for token in churn:
            heap.closed(token)
    assert heap.thaws == 1  # 3 of 6 frozen ones closed, over two freezes
    heap.stop()


class Sink:
    def __init__(self) -> None:
        self.closed = False

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class Counter:
    def __init__(self) -> None:
        self.open: dict[int, int] = {}
        self.next = 0

    def opened(self) -> int:
        self.next += 1
        self.open[self.next] = self.next
        return self.next

    def closed(self, token: int) -> None:
        del self.open[token]  # a second report of the same connection would raise here


async def test_the_mqtt_core_reports_each_connection_opened_and_closed_once(tmp_path) -> None:
    db = Database(tmp_path / "emulator.db")
    counter = Counter()
    broker = Broker(db, [], counter=counter)
    try:
        first = broker.open_connection(Sink(), peer_certificate=None)
        second = broker.open_connection(Sink(), peer_certificate=None)
        assert sorted(counter.open) == [1, 2]
        first.connection_lost()
        first.connection_lost()
        assert sorted(counter.open) == [2]
        second.data_received(encode(p.Disconnect()))  # before CONNECT: a protocol error, closed by us
        second.connection_lost()
        assert counter.open == {}
        await broker.close()
    finally:
        db.close()
