"""IoT Hub built-in endpoint benchmark: events read through the Event Hub-compatible endpoint (AMQP 5671,
azure-eventhub) while devices send, against the hub's ingest rate measured in the same run, and the
end-to-end latency device -> consumer.

- The emulator runs as a process on a fresh loopback address (the hub benchmark's harness).
- A consumer process (``hub/reader.py``) reads every partition with azure-eventhub's aio
  ``receive_batch``, as a back end would, and runs a probe device that publishes a timestamped message 20
  times a second over MQTT: its latency is publish -> the consumer's callback, one process, one clock.
- The hub benchmark's load generator (``hub/loadgen.py``) drives the ingest: N devices, QoS 1, a window
  of messages in flight each, for the window's seconds; its acknowledged rate is the hub's ingest rate.
- The goal: the consumer keeps up (reads in the window at the ingest rate, and has every acknowledged
  message shortly after the load stops).

Run alone: ``python bench/bench_eventhub.py [--quick]`` (prints the section; BENCHMARKS.md is left alone).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from hub import measure, reader, servers
from hub.loadgen import PAYLOAD, raise_nofile
from hub.settings import Settings

TITLE = "IoT Hub built-in endpoint: events read while devices send; latency device -> consumer"

FULL = Settings(ingest_devices=50, ingest_window=8, ingest_seconds=15.0, ingest_rounds=2, with_scale=False)
QUICK = dataclasses.replace(FULL, ingest_devices=10, ingest_seconds=3.0, ingest_rounds=1)


async def run(settings: Settings = FULL) -> str:
    return await asyncio.to_thread(_run_sync, settings)


def _round(target: servers.Target, eventhub: str, settings: Settings) -> dict[str, Any]:
    """One window: the consumer ready, the load generator's ingest, the consumer's drain and result."""
    consumer = subprocess.Popen(
        reader.command(eventhub=eventhub, ca=target.ca, host=target.host, hub=target.hub, cert=target.cert,
                       key=target.key),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert consumer.stdin is not None
    try:
        measure._read_json_line(consumer)  # ready
        consumer.stdin.write("go\n")
        consumer.stdin.flush()
        ingest = measure.ingest(target, settings)
        consumer.stdin.write(f"drain {ingest['acked']}\n")
        consumer.stdin.flush()
        read = measure._read_json_line(consumer)
        consumer.wait(30)
    finally:
        if consumer.poll() is None:
            consumer.kill()
    return {"ingest": ingest, "read": read}


def _run_sync(settings: Settings) -> str:
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="bench-eventhub-") as tmp, ExitStack() as stop:
        directory = Path(tmp)
        device = servers.device_identity(directory / "device")
        ids = [f"{measure.INGEST_PREFIX}{i:05d}" for i in range(settings.ingest_devices)] + [reader.PROBE_ID]
        emulator, target = servers.start_emulator(directory, device, ids)
        stop.callback(emulator.stop)
        eventhub = emulator.eventhub_connection_string(target.hub)
        rounds = [_round(target, eventhub, settings) for _ in range(settings.ingest_rounds)]
    return _render(rounds, settings, load_before, time.monotonic() - started)


def _render(rounds: list[dict[str, Any]], settings: Settings, load: float, elapsed: float) -> str:
    lines: list[str] = []
    if settings != FULL:
        lines += [f"Not the benchmark's configuration (a quick check): {settings}.", ""]
    lines += [
        f"Load: {settings.ingest_devices} devices over MQTT/TLS (client certificates), QoS 1, "
        f"{settings.ingest_window} messages in flight each, {len(PAYLOAD)}-byte JSON body, "
        f"{settings.ingest_seconds:.0f} s per round; one consumer (azure-eventhub aio `receive_batch`, "
        "every partition of the hub's 4, its own process) and a probe device sending 20 timestamped "
        "messages/s; emulator, load generator and consumer share the same 2 cores.",
        "",
        "| round | hub ingest (acked msgs/s) | read (events/s) | read / acked | read all after the load "
        "stopped (s) | latency under load p50 / p99 / max (ms, probes) | latency idle p50 / p99 (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, result in enumerate(rounds, 1):
        ingest, read = result["ingest"], result["read"]
        # The consumer's rate over the span the devices published, plus the time it took to catch up.
        rate = read["received"] / (ingest["seconds"] + read["drain_seconds"])
        lines.append(
            f"| {i} | {ingest['rate']:,.0f} | {rate:,.0f} | {read['received']:,} / {read['expected']:,} | "
            f"{read['drain_seconds']:.2f} | {read['latency_p50_ms']:.0f} / {read['latency_p99_ms']:.0f} / "
            f"{read['latency_max_ms']:.0f} ({read['probes']}) | {read['idle_latency_p50_ms']:.0f} / "
            f"{read['idle_latency_p99_ms']:.0f} |"
        )
    kept_up = all(r["read"]["received"] >= r["read"]["expected"] for r in rounds)
    slowest = max(r["read"]["drain_seconds"] for r in rounds)
    lines += [
        "",
        "Goal: the consumer keeps up with the hub's ingest: "
        + ("met, every acknowledged message was read" if kept_up else "NOT met: messages were missing")
        + f" (the slowest catch-up after the load stopped: {slowest:.2f} s).",
        f"Machine load average (1 min) before the run: {load:.2f} on {os.cpu_count()} CPUs (shared machine).",
        f"Bench run time {elapsed:.0f} s.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="few devices for a few seconds")
    args = parser.parse_args(argv)
    print(asyncio.run(run(QUICK if args.quick else FULL)))


if __name__ == "__main__":
    main()
