"""Whole-shipment activation: 1,000 devices activated from one shipment CSV by `activation-svc
activate-batch` (its own process, mTLS, the OEM's template typing every row's fields) through activation_svc
into a real emulator process.

Before the timed part (not timed): the devices are enrolled (disabled) through factory_svc's EnrollBatch, so
each has its real activation code (scrypt hash) and enrollment, as at an OEM receiving a shipment; a warm-up
shipment of 100 goes through the same service first (connections, thread pools, lazy imports: a running
service).  The timed part is the command from start to exit: it asks for the template, reads the CSV,
activates every row (8 in flight) and writes the result file.  Per activation the service checks the
template and Azure's twin rules, verifies the code (scrypt), records the intent with its audit row, writes
the enrollment (one etag-guarded DPS update), closes the intent and stores the answer for the request id.
CPU per activation is given per process: the command, activation_svc (with factory_svc idle beside it in
this process), the emulator.  activation_svc runs on uvloop, as `activation-svc serve` does.
Run alone: ``python -m bench activate``.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TITLE = "Activate: a shipment of 1,000 devices activated from one CSV (activate-batch) into the emulator"

DEVICES = 1000
WARMUP = 100
CONCURRENCY = 32
GOAL = 150.0

# From a profile, not from this run: where activation_svc's CPU goes (re-profile when the path changes).
CPU_PROFILE = (
    "Where activation_svc's Python CPU goes (profiled in-process with per-thread CPU clocks over 500 "
    "activations from a CSV, 32 in flight, 2026-12-07, machine shared): the two DPS calls per activation "
    "(read the enrollment, write it etag-guarded) through azure-iot-deviceprovisioning's request pipeline "
    "(azure-core policies, URL quoting, aiohttp, TLS) ~52 %, the SQLite writes of the intent, its audit "
    "row and the request id's answer ~7 %, the template check (jsonschema) ~6 %, Azure's twin rules ~4 %; "
    "the rest gRPC, protobuf and the event loop (the activation code's scrypt check, N = 2^8 in libsodium, "
    "is not among the larger items)."
)

_TESTS = Path(__file__).resolve().parent.parent / "tests"
for extra in (_TESTS, _TESTS / "enrollment"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))


def RUN(main: Any) -> Any:  # the bench runner's hook (bench/__main__.py)
    """Run the section on the activation service's production event loop."""
    from provkit.grpc_server import run_service

    return run_service(main)


def _cpu(pid: int | None = None) -> float:
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def _batch(env: dict[str, str], shipment: Path) -> tuple[int, str, float]:
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "activation_svc.cli",
        "activate-batch",
        str(shipment),
        "--concurrency",
        str(CONCURRENCY),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    return proc.returncode or 0, err.decode(), time.perf_counter() - started


async def run() -> str:
    from provisioning_env import (
        OemTls,
        activation_client_env,
        activation_env,
        factory_env,
        running_activation,
        running_factory,
    )
    from support.emulator import EmulatorProcess
    from support.shipment import TEMPLATE, enroll_shipment, shipment_csv

    from activation_svc.batch.shipment import read_results

    with tempfile.TemporaryDirectory(prefix="bench-activate-") as tmp:
        root = Path(tmp)
        emu = EmulatorProcess(root / "emulator", hubs=2, extra_args=["--log-level", "WARNING"])
        emu.start()
        try:
            tls = OemTls.create(root / "oem-tls")
            template = root / "acme.schema.json"
            template.write_text(json.dumps(TEMPLATE))
            service = activation_env(
                root, emu, tls, ACTIVATION_TEMPLATES=f"acme={template}", ACTIVATION_LOG_LEVEL="WARNING"
            )
            async with (
                running_factory(factory_env(root, emu, FACTORY_LOG_LEVEL="WARNING")) as (
                    factory_app,
                    factory,
                ),
                running_activation(service, tls) as (app, _),
            ):
                env = activation_client_env(app.grpc_address, tls)
                devices = await enroll_shipment(factory_app, factory, WARMUP + DEVICES)
                warmup, devices = devices[:WARMUP], devices[WARMUP:]
                (root / "warmup.csv").write_text(shipment_csv(warmup))
                code, err, _ = await _batch(env, root / "warmup.csv")
                assert code == 0, err
                shipment = root / "shipment.csv"
                shipment.write_text(shipment_csv(devices, hub=emu.hub_hosts[1]))
                cpu_service, cpu_emulator, cpu_client = _cpu(), _cpu(emu.proc.pid), _children_cpu()
                code, err, elapsed = await _batch(env, shipment)
                cpu_service = _cpu() - cpu_service
                cpu_emulator = _cpu(emu.proc.pid) - cpu_emulator
                cpu_client = _children_cpu() - cpu_client
                assert code == 0, err
                results = read_results((root / "shipment.csv.results.csv").read_text())
                activated = sum(1 for r in results if r["outcome"] == "activated")
                assert activated == DEVICES, err
        finally:
            emu.stop()
    rate = activated / elapsed
    per = 1000 / activated
    total = (cpu_service + cpu_emulator + cpu_client) * per
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    verdict = "met" if rate >= GOAL else "NOT met"
    ceiling = 1000 * cores / total
    lines = [
        f"{DEVICES} devices in one CSV (guid, code, hub and six template fields per row), `activation-svc "
        f"activate-batch --concurrency {CONCURRENCY}` as its own process over mTLS, after a warm-up shipment "
        f"of {WARMUP}; {cores} CPUs shared by the command, activation_svc (with factory_svc idle) and the "
        "emulator.",
        "",
        "| activated | seconds (command start to exit) | activations/s | CPU ms per activation: command "
        "| activation_svc | emulator | all |",
        "|---|---|---|---|---|---|---|",
        f"| {activated} | {elapsed:.2f} | **{rate:.0f}** | {cpu_client * per:.2f} | "
        f"{cpu_service * per:.2f} | {cpu_emulator * per:.2f} | {total:.2f} |",
        "",
        f"CPU bound: at {total:.2f} ms of CPU per activation in all, {cores} fully used cores allow at most "
        f"~{ceiling:.0f} activations/s; the measured rate is {rate / ceiling:.0%} of that "
        f"(1-minute load average after the run: {load:.2f}).",
        "",
        CPU_PROFILE,
        "",
        f"Goal >= {GOAL:.0f} activations/s: **{verdict}**.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(RUN(run()))
