"""IoT Hub emulator benchmark: telemetry ingest (QoS 1 over TLS) vs Mosquitto, and 10,000 connected
devices at one message per 5 s.

Load generators (``hub/loadgen.py``, processes of their own so they do not share the server's
interpreter) drive both servers identically.

- Ingest: N simulated devices, each on its own TLS connection with a client certificate, publishing
  `devices/{id}/messages/events/` with QoS 1 and a window of in-flight messages; the rate is acknowledged
  messages per second, in interleaved rounds (emulator, Mosquitto, emulator, Mosquitto).
- Scale: 10,000 devices (TLS, client certificate) connect from two generator processes over eight source
  addresses, then each publishes every 5 s for a minute; measured at 10,000, not extrapolated: the
  server's VmRSS/VmHWM from /proc, the acknowledged rate against the 2,000 msgs/s expected, ack
  latency (per second of the window), CPU of the server and of the generators.

Run alone: `python bench/bench_hub.py` (about four to five minutes; prints the section, BENCHMARKS.md is
left alone); `--quick` checks that everything works in well under a minute; `--ingest-only`,
`--no-mosquitto`, `--devices`, `--seconds`, `--rounds` narrow a run."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from hub import measure, report, servers, stalls
from hub.loadgen import raise_nofile
from hub.settings import FULL, QUICK, Settings

from azure_iot_emulator.process import terminate

TITLE = "IoT Hub emulator: telemetry ingest vs Mosquitto; 10,000 connected devices at 5 s, memory"


async def run(settings: Settings = FULL) -> str:
    return await asyncio.to_thread(_run_sync, settings)


def _run_sync(settings: Settings) -> str:
    """Both servers run side by side; ingest is measured in interleaved rounds (emulator, Mosquitto,
    emulator, Mosquitto) and the best round of each is reported, so background load on the shared
    machine hits both alike; then the scale run, one server at a time."""
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    nofile = raise_nofile()  # the servers are our children and inherit it
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-hub-") as tmp, ExitStack() as stop:
        directory = Path(tmp)
        device = servers.device_identity(directory / "device")
        ids = [f"{measure.INGEST_PREFIX}{i:05d}" for i in range(settings.ingest_devices)]
        if settings.with_scale:
            ids += [f"{measure.SCALE_PREFIX}{i:05d}" for i in range(settings.scale_devices)]
        pause_log = directory / "pauses.jsonl"
        emulator, target = servers.start_emulator(directory, device, ids, pause_log=pause_log)
        stop.callback(emulator.stop)
        targets = [target]
        if settings.with_mosquitto:
            binary, why = servers.find_mosquitto()
            if binary is None:
                notes.append(f"Mosquitto column skipped: {why}.")
            else:
                mosquitto, target = servers.start_mosquitto(binary, directory, device)
                stop.callback(terminate, mosquitto)
                targets.append(target)
        rounds: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        for _ in range(settings.ingest_rounds):
            for target in targets:
                rounds[target.name].append(measure.ingest(target, settings))
        results = {
            name: {"ingest": max(done, key=lambda r: r["rate"]), "rounds": [r["rate"] for r in done]}
            for name, done in rounds.items()
        }
        if settings.with_scale:
            for target in targets:
                results[target.name]["scale"] = measure.scale(target, settings)
            stop.close()  # the servers stop: the emulator has written its whole pause log
            emulator_scale = results["emulator"]["scale"]
            emulator_scale["pauses"] = stalls.summarize(pause_log, emulator_scale)
    notes.append(
        f"Machine load average (1 min) before the run: {load_before:.2f} on {os.cpu_count()} CPUs "
        "(the machine is shared; rates vary between runs, the ratio is taken within one run). "
        f"Open-file limit raised to {nofile} for the servers and the load generators."
    )
    return report.render(results, settings, notes, time.monotonic() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="few devices for a few seconds")
    parser.add_argument("--ingest-only", action="store_true", help="skip the scale run")
    parser.add_argument("--no-mosquitto", action="store_true", help="measure the emulator only")
    parser.add_argument("--devices", type=int, help="ingest devices")
    parser.add_argument("--seconds", type=float, help="ingest seconds per round")
    parser.add_argument("--rounds", type=int, help="ingest rounds per server")
    parser.add_argument("--scale-devices", type=int)
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    changes: dict[str, Any] = {
        "ingest_devices": args.devices,
        "ingest_seconds": args.seconds,
        "ingest_rounds": args.rounds,
        "scale_devices": args.scale_devices,
    }
    settings = dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})
    if args.ingest_only:
        settings = dataclasses.replace(settings, with_scale=False)
    if args.no_mosquitto:
        settings = dataclasses.replace(settings, with_mosquitto=False)
    print(asyncio.run(run(settings)))


if __name__ == "__main__":
    main()
