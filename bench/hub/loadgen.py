"""The hub benchmark's load generator: simulated devices, each its own TLS connection with a client
certificate, publishing device-to-cloud telemetry with QoS 1.  Runs as a process of its own, so it does
not share the benchmark's interpreter; prints its results as JSON lines.

    python bench/hub/loadgen.py ingest --host H --hub H --ca CA --cert C --key K --devices 50 ...
    python bench/hub/loadgen.py scale  --host H ... --index 0 --stride 2 --total 10000 ...

Each device is a bare asyncio protocol (no stream objects, one process holds thousands of them); its
packets are encoded and decoded by the emulator's MQTT codec, the TLS context is the tests' one."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import uvloop

from azure_iot_emulator.mqtt import packets as p
from azure_iot_emulator.mqtt.codec import StreamDecoder, encode

_TESTS = Path(__file__).resolve().parents[2] / "tests"
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

from support.mqtt_client import client_context  # noqa: E402 - needs the tests folder on the path

MQTT_PORT = 8883
PAYLOAD = json.dumps({"temperature": 21.5, "humidity": 40, "status": "ok", "seq": 0}).encode()
TOPIC = "devices/{}/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8"
USERNAME = "{}/{}/?api-version=2019-10-01"


class PublishTemplate:
    """A device's QoS 1 telemetry PUBLISH, encoded once; only the packet id changes per message."""

    def __init__(self, topic: str, payload: bytes) -> None:
        encoded = encode(p.Publish(topic, payload, 1, 1))
        at = len(encoded) - len(payload) - 2
        self._head, self._tail = encoded[:at], encoded[at + 2 :]

    def packet(self, packet_id: int) -> bytes:
        return self._head + packet_id.to_bytes(2, "big") + self._tail


class Stats:
    """What all devices of one generator process saw."""

    def __init__(self) -> None:
        self.sent = 0
        self.acked = 0
        self.lost = 0
        self.latencies: list[float] = []
        self.timeline: list[tuple[float, float]] = []  # (sent at, latency)
        self.last_ack = 0.0


class LoadDevice(asyncio.Protocol):
    """One simulated device.  ``on_ack`` runs after each PUBACK (the ingest run refills its window)."""

    def __init__(
        self,
        device_id: str,
        hub: str,
        stats: Stats,
        keepalive: int,
        on_ack: Callable[[LoadDevice], None] | None = None,
    ) -> None:
        self.device_id = device_id
        self.hub = hub
        self.stats = stats
        self.keepalive = keepalive
        self.on_ack = on_ack
        self.transport: asyncio.Transport | None = None
        self.decoder = StreamDecoder()
        self.connack: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.pending: dict[int, float] = {}
        self.next_id = 1
        self.template = PublishTemplate(TOPIC.format(device_id), PAYLOAD)
        self.closed = False
        self.idle: asyncio.Future[None] | None = None  # set by the ingest run: resolved when drained

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's: a Transport by behaviour)
        connect = p.Connect(self.device_id, False, self.keepalive, USERNAME.format(self.hub, self.device_id))
        self.transport.write(encode(connect))

    def data_received(self, data: bytes) -> None:
        for packet in self.decoder.feed(data):
            if isinstance(packet, p.PubAck):
                sent = self.pending.pop(packet.packet_id, None)
                if sent is None:
                    continue
                now = time.monotonic()
                stats = self.stats
                stats.acked += 1
                stats.latencies.append(now - sent)
                stats.timeline.append((sent, now - sent))
                stats.last_ack = now
                if self.on_ack is not None:
                    self.on_ack(self)
            elif isinstance(packet, p.ConnAck) and not self.connack.done():
                self.connack.set_result(packet.return_code)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.stats.lost += 1
        self.closed = True
        if not self.connack.done():
            self.connack.set_exception(ConnectionError(f"closed before CONNACK: {exc}"))
        if self.idle is not None and not self.idle.done():
            self.idle.set_exception(ConnectionError(f"{self.device_id}: connection lost"))

    def publish(self) -> None:
        if self.closed or self.transport is None:
            return
        packet_id = self.next_id
        self.next_id = packet_id % 65535 + 1
        self.pending[packet_id] = time.monotonic()
        self.stats.sent += 1
        self.transport.write(self.template.packet(packet_id))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.write(encode(p.Disconnect()))
            self.transport.close()


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def _connect(
    device: LoadDevice, args: argparse.Namespace, context: ssl.SSLContext, source: str | None = None
) -> None:
    """TLS (``context``: the device's certificate), CONNECT, and wait for CONNACK 0."""
    loop = asyncio.get_running_loop()
    await loop.create_connection(
        lambda: device,
        args.host,
        MQTT_PORT,
        ssl=context,
        server_hostname=args.host,
        local_addr=(source, 0) if source else None,
        ssl_handshake_timeout=60,
    )
    rc = await asyncio.wait_for(device.connack, 60)
    if rc != 0:
        device.close()
        raise ConnectionError(f"CONNACK {rc}")


def _context(args: argparse.Namespace) -> ssl.SSLContext:
    return client_context(Path(args.ca).read_text(), args.cert, args.key)


def _contexts(args: argparse.Namespace) -> Callable[[str], ssl.SSLContext]:
    """The TLS context of each device: with ``--identities DIR`` its own certificate and key from
    ``DIR/{device id}.pem`` (made when it connects), else the one shared ``--cert``/``--key``."""
    if not args.identities:
        shared = _context(args)
        return lambda _: shared
    directory, ca_pem = Path(args.identities), Path(args.ca).read_text()
    return lambda device_id: client_context(ca_pem, str(directory / f"{device_id}.pem"))


# ---------------------------------------------------------------------------------------------- ingest
async def ingest(args: argparse.Namespace) -> None:
    """Every device keeps ``window`` messages in flight until ``seconds`` have passed, then waits for
    its last PUBACKs; one JSON line: acknowledged messages per second over the whole span."""
    loop = asyncio.get_running_loop()
    context = _context(args)
    stats = Stats()
    deadline = float("inf")

    def refill(device: LoadDevice) -> None:
        if loop.time() < deadline:
            device.publish()
        elif not device.pending and device.idle is not None and not device.idle.done():
            device.idle.set_result(None)

    devices = [LoadDevice(f"{args.prefix}{i:05d}", args.hub, stats, 600, refill) for i in range(args.devices)]
    semaphore = asyncio.Semaphore(50)

    async def connect(device: LoadDevice) -> None:
        async with semaphore:
            await _connect(device, args, context)

    started = time.perf_counter()
    await asyncio.gather(*(connect(d) for d in devices))
    connect_seconds = time.perf_counter() - started
    begin = loop.time()
    deadline = begin + args.seconds
    for device in devices:
        device.idle = loop.create_future()
        for _ in range(args.window):
            device.publish()
    await asyncio.gather(*(d.idle for d in devices if d.idle is not None))
    elapsed = loop.time() - begin
    print(
        json.dumps(
            {
                "connected": len(devices),
                "connect_seconds": connect_seconds,
                "acked": stats.acked,
                "seconds": elapsed,
                "rate": stats.acked / elapsed,
            }
        ),
        flush=True,
    )
    for device in devices:
        device.close()
    await asyncio.sleep(0.2)


# ----------------------------------------------------------------------------------------------- scale
def _timeline(samples: list[tuple[float, float]], origin: float) -> list[list[float]]:
    """Per second of send time since ``origin``: [messages, worst ack latency in ms]."""
    buckets: dict[int, list[float]] = {}
    for sent, latency in samples:
        bucket = buckets.setdefault(int(sent - origin), [0, 0.0])
        bucket[0] += 1
        bucket[1] = max(bucket[1], round(latency * 1000, 1))
    return [buckets.get(i, [0, 0.0]) for i in range(max(buckets, default=-1) + 1)]


async def scale(args: argparse.Namespace) -> None:
    """Devices ``index, index + stride, ...`` below ``total`` (so several processes interleave); each
    publishes every ``period`` seconds, device g at phase ``period * g / total``; a JSON line after the
    connects, then on ``go <unix time>`` the window runs and a JSON result line follows."""
    raise_nofile()
    loop = asyncio.get_running_loop()
    context_for = _contexts(args)
    stats = Stats()
    indexes = list(range(args.index, args.total, args.stride))
    sources = args.sources.split(",")
    devices = [LoadDevice(f"{args.prefix}{g:05d}", args.hub, stats, 0) for g in indexes]
    semaphore = asyncio.Semaphore(args.concurrency)
    failures: list[str] = []

    async def connect(position: int, device: LoadDevice) -> None:
        async with semaphore:
            try:
                context = context_for(device.device_id)
                await _connect(device, args, context, sources[position % len(sources)])
            except (OSError, ConnectionError, TimeoutError, ssl.SSLError) as exc:
                failures.append(type(exc).__name__ + ": " + str(exc)[:80])
                device.closed = True

    started = time.monotonic()
    await asyncio.gather(*(connect(i, d) for i, d in enumerate(devices)))
    connect_seconds = time.monotonic() - started
    live = [(g, d) for g, d in zip(indexes, devices, strict=True) if not d.closed]
    print(
        json.dumps(
            {"connected": len(live), "failed": len(failures), "failures": failures[:5],
             "connect_seconds": connect_seconds, "cpu_seconds": time.process_time()}
        ),
        flush=True,
    )  # fmt: skip
    # The connections live for the whole run: move them out of the collector's reach, and collect
    # nothing during the window, so that a full collection over tens of thousands of connections here
    # never shows up as the server's ack latency.
    gc.collect()
    gc.freeze()
    gc.disable()
    command = await loop.run_in_executor(None, sys.stdin.readline)
    cpu_at_go = time.process_time()
    start_wall = float(command.split()[1])
    begin = loop.time() + (start_wall - time.time())
    rounds = max(1, int(args.seconds / args.period))
    stats.lost = 0
    # due times in order: round r, then the devices by their phase (g ascending)
    position, per_round, total_sends = 0, len(live), rounds * len(live)
    while position < total_sends:
        r, k = divmod(position, per_round)
        g, device = live[k]
        due = begin + r * args.period + args.period * g / args.total
        now = loop.time()
        if due > now:
            await asyncio.sleep(max(due - now, 0.005))  # send in small bursts, not one timer per message
            continue
        device.publish()
        position += 1
    send_end = loop.time()
    deadline = send_end + args.grace
    while loop.time() < deadline and any(d.pending for _, d in live):
        await asyncio.sleep(0.05)
    unacked = sum(len(d.pending) for _, d in live)
    first_due = begin + args.period * (live[0][0] if live else 0) / args.total
    last_ack_loop = loop.time() - (time.monotonic() - stats.last_ack) if stats.acked else send_end
    print(
        json.dumps(
            {
                "sent": stats.sent,
                "acked": stats.acked,
                "unacked": unacked,
                "lost": stats.lost,
                "window_start": first_due - begin,
                "window_end": last_ack_loop - begin,
                "send_seconds": send_end - begin,
                "cpu_seconds": time.process_time() - cpu_at_go,
                "latencies_ms": [round(x * 1000, 1) for x in stats.latencies],
                "timeline": _timeline(stats.timeline, time.monotonic() - loop.time() + begin),
            }
        ),
        flush=True,
    )
    await loop.run_in_executor(None, sys.stdin.readline)
    for _, device in live:
        device.close()
    await asyncio.sleep(0.5)


# ----------------------------------------------------------------------------------------------- count
async def count(args: argparse.Namespace) -> None:
    """A fixed workload for counting the server's instructions (``bench_hub_instructions.py``): connect
    ``devices`` (one JSON line), then for each ``send M [R]`` on stdin send exactly M messages in rounds
    of R (default ``window``) devices, one message each, the round's writes back to back and the next
    round once all of its PUBACKs are in (a JSON line when done); ``quit`` (or end of input)
    disconnects them all."""
    loop = asyncio.get_running_loop()
    context = _context(args)
    stats = Stats()
    round_done: asyncio.Future[None] = loop.create_future()
    round_end = 0  # stats.acked once the round is in

    def acked(_: LoadDevice) -> None:
        if stats.acked >= round_end and not round_done.done():
            round_done.set_result(None)

    devices = [LoadDevice(f"{args.prefix}{i:05d}", args.hub, stats, 0, acked) for i in range(args.devices)]
    for device in devices:
        await _connect(device, args, context)
    print(json.dumps({"connected": len(devices)}), flush=True)
    turn = 0
    while (line := await loop.run_in_executor(None, sys.stdin.readline)).startswith("send"):
        words = line.split()  # send M [round size]
        wanted, started, first = int(words[1]), loop.time(), stats.acked
        size = int(words[2]) if len(words) > 2 else args.window
        while stats.acked - first < wanted:
            batch = min(size, wanted - (stats.acked - first), len(devices))
            round_done, round_end = loop.create_future(), stats.acked + batch
            for _ in range(batch):
                devices[turn % len(devices)].publish()
                turn += 1
            await asyncio.wait_for(round_done, 600)
            if stats.lost:
                raise ConnectionError("a device lost its connection")
        print(json.dumps({"acked": stats.acked - first, "seconds": loop.time() - started}), flush=True)
    for device in devices:
        device.close()
    await asyncio.sleep(0.5)


def command(mode: str, **options: object) -> list[str]:
    """The command line that runs this generator in ``mode`` with ``options`` (underscores -> dashes)."""
    args = [sys.executable, str(Path(__file__).resolve()), mode]
    for name, value in options.items():
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="hub benchmark load generator")
    parser.add_argument("mode", choices=("ingest", "scale", "count"))
    parser.add_argument("--host", required=True)
    parser.add_argument("--hub", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--prefix", default="ingest-")
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--total", type=int, default=10_000)
    parser.add_argument("--sources", default="127.0.0.1")
    parser.add_argument("--period", type=float, default=5.0)
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--identities", help="scale: a directory with one {device id}.pem per device")
    args = parser.parse_args(argv)
    # libuv's loop and its TLS: the generators' own cost per message and per handshake stays well below
    # the servers' (each device's traffic crosses TLS twice, once per side, on the same 2 cores).
    uvloop.run({"ingest": ingest, "scale": scale, "count": count}[args.mode](args))


if __name__ == "__main__":
    main()
