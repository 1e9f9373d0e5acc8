"""Whole-shipment activation: 1,000 devices activated from one shipment CSV by `activation-svc
activate-batch` (its own process, mTLS, the OEM's template typing every row's fields) through activation_svc
into a real emulator process.

Before the timed part (not timed): the devices are enrolled (disabled) through factory_svc's EnrollBatch, so
each has its real activation code (the factory's default record: HMAC-SHA-256) and enrollment, as at an OEM
receiving a shipment; a warm-up shipment of 100 goes through the same service first (connections, thread
pools, lazy imports: a running service).  The timed part is the command from start to exit: it asks for the
template, reads the CSV, activates every row (``CONCURRENCY`` in flight) and writes the result file.  Per
activation the service checks the template and Azure's twin rules, verifies the code (HMAC-SHA-256), records
the intent with its audit row, writes the enrollment (one etag-guarded DPS update), closes the intent and
stores the answer for the request id.
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

import host  # isort: skip - bench/'s own (on the path: the runner puts it there)

TITLE = "Activate: a shipment of 1,000 devices activated from one CSV (activate-batch) into the emulator"

DEVICES = 1000
WARMUP = 100
CONCURRENCY = 32
GOAL = 150.0

# From a profile, not from this run: where activation_svc's CPU goes (re-profile when the path changes).
CPU_PROFILE = (
    "Where activation_svc's Python CPU goes (py-spy, sampling the thread that holds the GIL, over this "
    "bench's 1,000 activations, 2026-12-07, machine shared): the two DPS calls per activation (read the "
    "enrollment, write it etag-guarded) ~44 % (aiohttp and TLS ~16 %, azure-core's policies around the "
    "transport ~7 %, the rest the SDK's request building and the JSON mapping), the SQLite writes "
    "(hand-offs to the store's thread and its commits) ~5 %, the template check (jsonschema) ~4 %; the "
    "rest gRPC, protobuf, Azure's twin rules and the event loop."
)

# The change of 2026-12-07 (issue 28), measured by alternating runs of this bench in the same hour.
CHANGES = (
    "Changes of 2026-12-07: the audit database's writes of concurrent activations share commits "
    "(dbstore.grouped) and the marks of the last steps go with the intent's close (5 synchronous "
    "commits per activation before, 3 shared ones now: the intent, its close, the answer); the DPS "
    "adapter's request pipeline without the SDK policies that did nothing here (a second JSON parse of "
    "every body, an HTTP tracing span nobody records, a second user-agent and the network trace log); "
    "activate-batch no longer imports the portal's settings. Alternating runs (before, after, before, "
    "after; 1-minute load average 3.9 to 7.2 on 2 shared cores): CPU ms per activation in all 10.23 and "
    "11.21 before, 7.97 and 7.00 after (activation_svc 6.69 and 7.55 before, 5.14 and 4.65 after; the "
    "command 1.67 and 1.57 before, 1.14 and 0.96 after; the emulator 1.87 and 2.09 before, 1.69 and "
    "1.39 after); 73 and 51 activations/s before, 99 and 135 after. Grouping the enrollment writes into "
    "DPS bulk operations (as the renewals do) was left out: a bulk answer carries no etags, and an "
    "activation answers the enrollment's new etag, so each device would need a read after the bulk "
    "write: more calls, not fewer."
)

_TESTS = Path(__file__).resolve().parent.parent / "tests"
for extra in (_TESTS, _TESTS / "enrollment"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))


def RUN(main: Any) -> Any:  # the bench runner's hook (bench/__main__.py)
    """Run the section on the activation service's production event loop."""
    from provkit.grpc_server import run_service

    return run_service(main)


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
                cpu_service, cpu_emulator = host.cpu_seconds(), host.cpu_seconds(emu.proc.pid)
                cpu_client = _children_cpu()
                code, err, elapsed = await _batch(env, shipment)
                cpu_service = host.cpu_seconds() - cpu_service
                cpu_emulator = host.cpu_seconds(emu.proc.pid) - cpu_emulator
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
    cores = host.cores()
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
        CHANGES,
        "",
        f"Goal >= {GOAL:.0f} activations/s: **{verdict}**.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(RUN(run()))
