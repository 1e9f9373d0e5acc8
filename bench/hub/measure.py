"""One ingest round or one scale run against a server: start the load generators, collect their JSON
lines, and read the server's CPU and memory from /proc around them."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import loadgen
from .servers import Target
from .settings import Settings

SCALE_PREFIX = "dev-"
INGEST_PREFIX = "ingest-"


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident) of a process, in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _generator(target: Target, mode: str, **options: object) -> subprocess.Popen[str]:
    command = loadgen.command(
        mode, host=target.host, hub=target.hub, ca=target.ca, cert=target.cert, key=target.key, **options
    )
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _read_json_line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"load generator exited early (code {proc.poll()})")
    result: dict[str, Any] = json.loads(line)
    return result


def ingest(target: Target, settings: Settings) -> dict[str, Any]:
    """One round: acknowledged messages per second, and the server's CPU share (incl. connects)."""
    cpu_before, started = cpu_seconds(target.pid), time.monotonic()
    proc = _generator(
        target, "ingest", prefix=INGEST_PREFIX, devices=settings.ingest_devices,
        seconds=settings.ingest_seconds, window=settings.ingest_window,
    )  # fmt: skip
    out, _ = proc.communicate(timeout=90 + settings.ingest_seconds)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed against {target.name}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    cpu = cpu_seconds(target.pid) - cpu_before
    result["server_cpu_percent"] = 100 * cpu / (time.monotonic() - started)
    return result


def scale(target: Target, settings: Settings, identities: Path | None = None) -> dict[str, Any]:
    """``scale_devices`` devices connect (spread over the generator processes and source addresses),
    then each publishes every ``scale_period`` s for ``scale_seconds``; the server's resident memory is
    read before, after the connects, every second of the window, and its peak (VmHWM) at the end.
    ``identities``: a directory with each device's own certificate (else all present the target's)."""
    devices = settings.scale_devices
    time.sleep(0.5)
    connects_from = time.time()
    before = status_kib(target.pid)
    cpu_before = cpu_seconds(target.pid)
    procs = [
        _generator(
            target, "scale", prefix=SCALE_PREFIX, index=index, stride=settings.scale_processes,
            total=devices, sources=",".join(settings.scale_sources), period=settings.scale_period,
            seconds=settings.scale_seconds, grace=settings.scale_grace, identities=identities,
        )
        for index in range(settings.scale_processes)
    ]  # fmt: skip
    try:
        with ThreadPoolExecutor(len(procs)) as pool:
            heads = list(pool.map(_read_json_line, procs))
            connected_status = status_kib(target.pid)
            start = time.time() + 1.0
            cpu_start = cpu_seconds(target.pid)
            connect_cpu = cpu_start - cpu_before
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write(f"go {start}\n")
                proc.stdin.flush()
            pending = [pool.submit(_read_json_line, proc) for proc in procs]
            rss_samples = []
            while not all(p.done() for p in pending):
                rss_samples.append(status_kib(target.pid)["VmRSS"])
                time.sleep(1.0)
            cpu_used = cpu_seconds(target.pid) - cpu_start
            wall = time.time() - start
            results = [p.result() for p in pending]
        end_status = status_kib(target.pid)
    finally:
        for proc in procs:
            if proc.poll() is None and proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.write("close\n")
                    proc.stdin.flush()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    latencies = sorted(x for r in results for x in r["latencies_ms"])
    acked = sum(r["acked"] for r in results)
    window = max(r["window_end"] for r in results) - min(r["window_start"] for r in results)

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    return {
        "devices": devices,
        # unix times: the connects began, the window's origin (the generators' ``begin``), its span
        "connects_from": connects_from,
        "go_wall": start,
        "window_from": start + min(r["window_start"] for r in results),
        "window_to": start + max(r["window_end"] for r in results),
        "connected": sum(h["connected"] for h in heads),
        "connect_failed": sum(h["failed"] for h in heads),
        "failures": [f for h in heads for f in h["failures"]][:3],
        "connect_seconds": max(h["connect_seconds"] for h in heads),
        "before_kib": before["VmRSS"],
        "connected_kib": connected_status["VmRSS"],
        "window_max_kib": max([*rss_samples, end_status["VmRSS"]]),
        "hwm_kib": end_status["VmHWM"],
        "sent": sum(r["sent"] for r in results),
        "acked": acked,
        "unacked": sum(r["unacked"] for r in results),
        "lost": sum(r["lost"] for r in results),
        "rate": acked / window if window > 0 else 0.0,
        "window_seconds": window,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": latencies[-1] if latencies else float("nan"),
        "cpu_percent": 100 * cpu_used / wall if wall > 0 else 0.0,
        "cpu_ms_per_message": 1000 * cpu_used / max(1, acked),
        "timeline": [
            [
                sum(r["timeline"][i][0] for r in results if i < len(r["timeline"])),
                max(r["timeline"][i][1] for r in results if i < len(r["timeline"])),
            ]
            for i in range(max(len(r["timeline"]) for r in results))
        ],
        "loadgen_cpu_percent": 100 * sum(r["cpu_seconds"] for r in results) / wall if wall > 0 else 0.0,
        "connect_cpu_ms": 1000 * connect_cpu / max(1, devices),
        "loadgen_connect_cpu_ms": 1000 * sum(h["cpu_seconds"] for h in heads) / max(1, devices),
    }
