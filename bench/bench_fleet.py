"""Fleet benchmark: 1,000 simulated devices boot at once against the emulator (a herd after a power cut).

Each device is the real DeviceRuntime with Microsoft's device SDK, in worker processes sized to the
machine (:class:`device_client.fleet.FleetRunner`); identities come from the tests' small CA and are
enrolled (enabled) through azure-iot-deviceprovisioning's bulk operation before the clock starts.  The
clock starts when every worker boots its devices and stops, per device, when the hub acknowledged its
first telemetry message.  Run twice: the emulator's defaults (202 + polling), then with ``--azure-quotas``
(DPS 1,000 registrations/min, 5 polls per 10 s per device), counting the 429s in the emulator's log.
CPU is the workers' user+system time (RUSAGE_CHILDREN) per simulated device-second.

Run alone: `python -m bench.bench_fleet` (or `python -m bench fleet`).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from device_client.fleet import FleetRunner, default_workers

TITLE = "Fleet: 1,000 simulated devices booting at once (registration + first telemetry acknowledged)"
DEVICES = 1000
DEADLINE_S = 600.0

_TESTS = Path(__file__).resolve().parent.parent / "tests"


def _imports() -> tuple[Any, ...]:
    if str(_TESTS) not in sys.path:
        sys.path.insert(0, str(_TESTS))
    from support.certs import TestCa
    from support.emulator import EmulatorProcess
    from support.fleet import enrolled_fleet, fleet_overrides

    return TestCa, EmulatorProcess, enrolled_fleet, fleet_overrides


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds the given (running) processes have used so far (Linux /proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


async def _one(root: Path, quotas: bool) -> dict[str, Any]:
    test_ca, emulator_cls, enrolled_fleet, fleet_overrides = _imports()
    extra = ["--log-level", "INFO"] + (["--azure-quotas"] if quotas else [])
    emulator = emulator_cls(root / "emulator", hubs=2, extra_args=extra)
    await asyncio.to_thread(emulator.start)
    try:
        guids = await enrolled_fleet(test_ca(), emulator, root / "devices", DEVICES)
        runner = FleetRunner(
            guids,
            root / "devices",
            fleet_overrides(emulator, first_attempt_window_s=5.0),
            workers=default_workers(DEVICES),
            log_dir=root / "logs",
        )
        await runner.start()
        pids = runner.worker_pids()
        emu_pid = [emulator.proc.pid]
        cpu0, emu0, started = _cpu_s(pids), _cpu_s(emu_pid), time.monotonic()
        runner.go()
        try:
            while not runner.all_acknowledged() and time.monotonic() - started < DEADLINE_S:
                if runner.lost:
                    break
                await asyncio.sleep(0.5)
            elapsed = time.monotonic() - started
            cpu, emu_cpu = _cpu_s(pids) - cpu0, _cpu_s(emu_pid) - emu0
            report = runner.report()
        finally:
            await runner.stop()
    finally:
        await asyncio.to_thread(emulator.stop)
    registers = [line for line in emulator.log_text().splitlines() if "DPS register" in line]
    report["elapsed_s"] = elapsed
    report["cpu_per_device_s"] = cpu / (DEVICES * elapsed)
    report["cpu_s"], report["emulator_cpu_s"] = cpu, emu_cpu
    report["throttled"] = sum(1 for line in registers if ": 429 " in line)
    report["registers"] = len(registers)
    return report


def _row(name: str, r: dict[str, Any]) -> str:
    c, t, g = r["counts"], r["first_telemetry_s"], r["registered_s"]
    return (
        f"| {name} | {r['workers']} | {c['registered']}/{c['devices']} | {g['p50']} / {g['p95']} s "
        f"| {c['telemetry_acknowledged']} | {r['elapsed_s']:.1f} s "
        f"| {t['p50']} s | {t['p95']} s | {t['max']} s "
        f"| {r['registers']} / {r['throttled']} | {r['cpu_per_device_s'] * 1000:.2f} ms "
        f"| {r['cpu_s']:.0f} s / {r['emulator_cpu_s']:.0f} s |"
    )


async def run() -> str:
    rows = []
    for name, quotas in (("emulator defaults (202 + polling)", False), ("--azure-quotas", True)):
        with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
            rows.append(_row(name, await _one(Path(tmp), quotas)))
    return "\n".join(
        [
            f"{DEVICES} devices (DeviceRuntime + azure-iot-device) booted at once in worker processes, first",
            "attempt spread over 5 s; times per device from the boot signal to the first telemetry message",
            "acknowledged by the hub (p50 / p95 / max), and to the DPS assignment.  `register / 429` counts",
            "DPS register requests and those answered 429 (emulator log).  CPU: the workers' user+system",
            "seconds from the boot signal to the last first message, per simulated device-second; the",
            "last column: CPU seconds of all workers and of the emulator over that time.",
            "Measured on a machine loaded by other work at the same time (2 cores shared).",
            "",
            "| run | workers | registered | registered p50 / p95 | first telemetry | total | p50 | p95 | max "
            "| register / 429 | CPU per device-s | CPU workers / emulator |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )


if __name__ == "__main__":
    print(asyncio.run(run()))
