"""The emulator's own Prometheus metrics (it imports nothing from the suite), served at ``/metrics`` when
``metrics_listen`` is set (``--metrics-listen HOST:PORT``; off by default).

| metric                                         | labels            |
|------------------------------------------------|-------------------|
| ``iot_emulator_connected_devices``             | hub (MQTT links open now) |
| ``iot_emulator_dps_registrations_total``       | result (assigned, disabled, failed, refused, throttled) |
| ``iot_emulator_dps_service_writes_total``      | kind (enrollments, enrollmentGroups, registrations) |
| ``iot_emulator_telemetry_messages_total``      | hub               |
| ``iot_emulator_telemetry_bytes_total``         | hub (message bodies) |
| ``iot_emulator_telemetry_commit_seconds``      | - (histogram: one SQLite transaction of telemetry) |
| ``iot_emulator_sqlite_bytes``                  | - (database file plus its WAL) |
| ``iot_emulator_queued_output_bytes``           | - (written for peers, not yet taken by their sockets) |
| ``iot_emulator_stalled_peers``                 | - (peers not reading their output: not read from) |
| ``iot_emulator_stalled_peers_dropped_total``   | - (peers dropped for not reading, ``mqtt/tls.py``) |

Messages and bytes per second are ``rate(...)`` of the two totals.  Never a device id as a label.

``iot_emulator_dps_service_writes_total``: records the DPS service REST API created, replaced or deleted
(a bulk call counts each record it wrote): what a provisioning flow costs in DPS writes.

API: ``EmulatorMetrics()``: ``.registration(result)``, ``.service_writes(kind, count)``,
``.telemetry(hub_counts, seconds)`` (one committed batch: ``{hub: (messages, bytes)}``),
``.watch(connected, sqlite_files)``, ``.watch_output(queued, stalled, dropped)`` (read at scrape time);
``async .serve(listen) -> str`` (the URL), ``async .stop()``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class _Gauges(Collector):
    """Read at scrape time, on the event loop (the scrape handler runs there)."""

    def __init__(
        self, connected: Callable[[], Mapping[str, int]], sqlite_files: Callable[[], Sequence[Path]]
    ) -> None:
        self._connected = connected
        self._files = sqlite_files

    def collect(self) -> Iterator[Metric]:
        devices = GaugeMetricFamily(
            "iot_emulator_connected_devices", "Devices connected over MQTT, per hub.", labels=["hub"]
        )
        for hub, count in sorted(self._connected().items()):
            devices.add_metric([hub], count)
        yield devices
        size = sum(path.stat().st_size for path in self._files() if path.exists())
        yield GaugeMetricFamily("iot_emulator_sqlite_bytes", "Size of the SQLite database and its WAL.", size)


class _Output(Collector):
    """The TLS listeners' back-pressure (``mqtt/tls.OutputGuard``), read at scrape time on the loop."""

    def __init__(
        self, queued: Callable[[], int], stalled: Callable[[], int], dropped: Callable[[], int]
    ) -> None:
        self._queued = queued
        self._stalled = stalled
        self._dropped = dropped

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "iot_emulator_queued_output_bytes",
            "Bytes written for peers (MQTT, AMQP, HTTPS) that their sockets have not taken yet.",
            self._queued(),
        )
        yield GaugeMetricFamily(
            "iot_emulator_stalled_peers",
            "Peers not reading what they are sent (above the high-water mark): not read from now.",
            self._stalled(),
        )
        yield CounterMetricFamily(
            "iot_emulator_stalled_peers_dropped",
            "Peers dropped for not reading what they were sent (stall timeout or byte bound).",
            self._dropped(),
        )


class EmulatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._registrations = Counter(
            "iot_emulator_dps_registrations", "DPS registrations answered, by result.", ["result"], registry=r
        )
        self._writes = Counter(
            "iot_emulator_dps_service_writes",
            "Records written (created, replaced, deleted) through the DPS service REST API, by kind.",
            ["kind"],
            registry=r,
        )
        self._messages = Counter(
            "iot_emulator_telemetry_messages", "Device-to-cloud messages stored, per hub.", ["hub"],
            registry=r,
        )
        self._bytes = Counter(
            "iot_emulator_telemetry_bytes", "Bytes of device-to-cloud message bodies, per hub.", ["hub"],
            registry=r,
        )
        self._commit = Histogram(
            "iot_emulator_telemetry_commit_seconds",
            "Time of one SQLite transaction storing a batch of telemetry.",
            buckets=_COMMIT_BUCKETS,
            registry=r,
        )
        self._runner: web.AppRunner | None = None

    def registration(self, result: str) -> None:
        self._registrations.labels(result).inc()

    def service_writes(self, kind: str, count: int) -> None:
        self._writes.labels(kind).inc(count)

    def telemetry(self, hub_counts: Mapping[str, tuple[int, int]], seconds: float) -> None:
        for hub, (messages, size) in hub_counts.items():
            self._messages.labels(hub).inc(messages)
            self._bytes.labels(hub).inc(size)
        self._commit.observe(seconds)

    def watch(
        self, connected: Callable[[], Mapping[str, int]], sqlite_files: Callable[[], Sequence[Path]]
    ) -> None:
        self.registry.register(_Gauges(connected, sqlite_files))

    def watch_output(
        self, queued: Callable[[], int], stalled: Callable[[], int], dropped: Callable[[], int]
    ) -> None:
        self.registry.register(_Output(queued, stalled, dropped))

    async def serve(self, listen: str) -> str:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        registry = self.registry

        async def scrape(request: web.Request) -> web.Response:
            return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", scrape)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, int(port)), family=family)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{sock.getsockname()[1]}/metrics"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
