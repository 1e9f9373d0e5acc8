"""The built-in endpoint benchmark's consumer: azure-eventhub's aio client reading every partition of the
hub, as a process of its own, plus a probe device that sends timestamped telemetry over MQTT so the
end-to-end latency (device publish -> consumer callback, one clock) can be measured under load.

    python bench/hub/reader.py --eventhub CONNSTR --ca CA --host H --hub H --cert C --key K

Protocol on stdin/stdout (JSON lines out): ``{"ready": ...}`` once every partition is read and the first
probe came back; on ``go`` the window starts; on ``drain <N>`` the probe stops and the reader waits until
it has N events from other devices (at most ``--drain-timeout`` s), then prints its result line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import sys
import time
from pathlib import Path

from azure.eventhub.aio import EventHubConsumerClient

_HERE = Path(__file__).resolve().parent
for _folder in (_HERE.parent, _HERE.parents[1] / "tests"):  # bench/ (hub.loadgen), tests/ (support)
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from support.mqtt_client import client_context  # noqa: E402 - needs the tests folder on the path

from hub.loadgen import TOPIC, LoadDevice, PublishTemplate, Stats, _connect  # noqa: E402

PROBE_ID = "probe-00000"
IDLE_PROBES = 40


class Counts:
    def __init__(self) -> None:
        self.events = 0  # from the load devices
        self.at: list[float] = []  # their arrival times
        self.latencies: list[float] = []  # probe: publish -> callback
        self.probes = 0


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    counts = Counts()
    changed = asyncio.Event()
    client = EventHubConsumerClient.from_connection_string(
        args.eventhub, consumer_group="$Default", connection_verify=args.ca
    )
    ends = {}
    for partition in await client.get_partition_ids():
        ends[partition] = (await client.get_partition_properties(partition))["last_enqueued_sequence_number"]

    async def on_batch(context, events) -> None:
        now = time.time()
        for event in events:
            device = event.system_properties.get(b"iothub-connection-device-id", b"").decode()
            if device == PROBE_ID:
                body = json.loads(b"".join(event.body))
                counts.latencies.append(now - body["t"])
                counts.probes += 1
            else:
                counts.events += 1
                counts.at.append(now)
        changed.set()

    receiving = asyncio.create_task(
        client.receive_batch(on_event_batch=on_batch, max_batch_size=300, starting_position=ends)
    )
    context: ssl.SSLContext = client_context(Path(args.ca).read_text(), args.cert, args.key)
    probe = LoadDevice(PROBE_ID, args.hub, Stats(), 600)
    await _connect(probe, args, context)

    def send_probe(i: int) -> None:
        body = json.dumps({"probe": i, "t": time.time()}).encode()
        probe.template = PublishTemplate(TOPIC.format(PROBE_ID), body)
        probe.publish()

    send_probe(0)
    while counts.probes == 0:  # the path works end to end before the window starts
        changed.clear()
        await asyncio.wait_for(changed.wait(), 60)
    counts.latencies.clear()
    for i in range(1, IDLE_PROBES + 1):  # the latency without load, for comparison
        send_probe(i)
        await asyncio.sleep(1 / args.probe_rate)
    while counts.probes < IDLE_PROBES + 1:
        changed.clear()
        await asyncio.wait_for(changed.wait(), 60)
    idle = sorted(counts.latencies)
    counts.latencies.clear()
    print(json.dumps({"ready": True}), flush=True)

    async def line() -> str:
        return (await loop.run_in_executor(None, sys.stdin.readline)).strip()

    assert await line() == "go"
    go = time.time()
    counts.events, counts.at = 0, []
    stop_probe = asyncio.Event()

    async def probing() -> None:
        i = 1
        while not stop_probe.is_set():
            send_probe(i)
            i += 1
            await asyncio.sleep(1 / args.probe_rate)

    prober = asyncio.create_task(probing())
    command = await line()
    end = time.time()
    expected = int(command.split()[1])
    stop_probe.set()
    await prober
    deadline = loop.time() + args.drain_timeout
    while counts.events < expected and loop.time() < deadline:
        changed.clear()
        try:
            await asyncio.wait_for(changed.wait(), max(0.01, deadline - loop.time()))
        except TimeoutError:
            break
    done = max(counts.at, default=end)
    in_window = sum(1 for t in counts.at if t <= end)
    latencies = sorted(counts.latencies)

    def pct(q: float, values: list[float] = latencies) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else 0.0

    print(
        json.dumps(
            {
                "received": counts.events,
                "expected": expected,
                "window_seconds": end - go,
                "read_in_window": in_window,
                "rate_in_window": in_window / (end - go),
                "rate_overall": counts.events / max(done - go, 1e-9),
                "drain_seconds": max(0.0, done - end),
                "probes": len(latencies),
                "latency_p50_ms": pct(0.50),
                "latency_p99_ms": pct(0.99),
                "latency_max_ms": latencies[-1] * 1000 if latencies else 0.0,
                "idle_latency_p50_ms": pct(0.50, idle),
                "idle_latency_p99_ms": pct(0.99, idle),
            }
        ),
        flush=True,
    )
    probe.close()
    await client.close()
    receiving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await receiving


def command(**options: object) -> list[str]:
    args = [sys.executable, str(Path(__file__).resolve())]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="built-in endpoint benchmark consumer")
    parser.add_argument("--eventhub", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--hub", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--probe-rate", type=float, default=20.0)
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    asyncio.run(main(parser.parse_args()))
