"""Group mode beside individual mode: N devices minted, enrolled and activated, then booting (DPS
registration) at once, in each mode, against one emulator process.

Each mode gets its own factory_svc and activation_svc (in this process, as the tests start them; group mode
with its allocation webhook over TLS and the device registry in SQLite); the enrollment group is written
once by the operator's command.  The devices register with a lean MQTT client (``bench_dps``: TLS with the
device's chain, CONNECT, register, answer, DISCONNECT; Microsoft's device SDK costs a thread pool per
device), ``CONCURRENCY`` at a time.  Measured: registrations per second, the webhook's answer time inside
activation_svc (``http_handled`` of ``/api/allocate``, p50/p99), the durable commits its allocations took
(the device registry's assignments and the audit rows, each grouped across concurrent allocations) and the
emulator's count of DPS service writes per device (``iot_emulator_dps_service_writes_total``) over mint,
enroll, activate and boot.

``BENCH_GROUP_DEVICES`` sets N (default 1,000).  Run alone: ``python -m bench group``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TITLE = "Group mode beside individual mode: devices booting after activation"

DEVICES = int(os.environ.get("BENCH_GROUP_DEVICES", "1000"))
CONCURRENCY = 64  # devices registering at once
CALLS = 16  # concurrent Enroll / Activate calls

_TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))


@dataclass(frozen=True)
class Booting:
    """A device as ``bench_dps._register`` takes it."""

    registration_id: str
    cert_path: Path
    key_path: Path


@dataclass
class Result:
    mode: str
    devices: int
    boot_seconds: float
    boot_latencies: list[float]
    webhook: list[float]
    writes: float
    commits: tuple[int, int] | None = None  # group mode, during the boot: the registry's, the audit's


class WebhookTimes:
    """activation_svc's metrics: only the allocation webhook's answers are kept (``http_handled``)."""

    def __init__(self) -> None:
        from provkit.metrics import NO_METRICS

        self._rest = NO_METRICS
        self.seconds: list[float] = []

    def http_handled(self, route: str, status: int, seconds: float) -> None:
        if route == "/api/allocate" and status == 200:
            self.seconds.append(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rest, name)


async def _bounded(jobs: list[Callable[[], Awaitable[None]]], concurrency: int) -> list[float]:
    """Run the jobs ``concurrency`` at a time; each one's seconds."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(job: Callable[[], Awaitable[None]]) -> None:
        async with gate:
            started = time.perf_counter()
            await job()
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(one(job) for job in jobs))
    return latencies


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@contextlib.asynccontextmanager
async def _services(factory_env: dict[str, str], activation_env: dict[str, str], tls: Any) -> AsyncIterator:
    from enrollment.provisioning_env import running_activation, running_factory

    from provkit.observe import Observability

    times = WebhookTimes()
    async with (
        running_factory(factory_env) as (_, factory),
        running_activation(activation_env, tls, Observability(metrics=times)) as (app, activation),
    ):
        yield factory, activation, app, times


async def _mode(
    name: str, root: Path, emulator: Any, factory_env: dict, activation_env: dict, tls: Any, before=None
) -> Result:
    """One mode's N devices: minted, enrolled, activated, then booting at once."""
    from activation.group_env import META, WRITES
    from bench_dps import _register
    from enrollment.provisioning_env import activate_request, mint
    from support.metrics import scrape
    from support.mqtt_client import client_context

    from devprov.v1 import factory_service_pb2 as fpb

    async def dps_writes() -> float:
        return (await scrape(emulator.connection["metrics_url"])).total(WRITES)

    async with _services(factory_env, activation_env, tls) as (factory, activation, app, times):
        if before is not None:
            await before()
        writes = await dps_writes()
        devices: list[Any] = []
        codes: dict[str, str] = {}

        async def minted() -> None:
            devices.append(await mint(factory, str(uuid.uuid4()), root / name / "devices"))

        await _bounded([minted] * DEVICES, CALLS)

        def enroll(device: Any) -> Callable[[], Awaitable[None]]:
            async def call() -> None:
                reply = await factory.Enroll(
                    fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem)
                )
                codes[device.device_id] = reply.activation_code

            return call

        await _bounded([enroll(d) for d in devices], CALLS)
        hub = emulator.hub_hosts[1]

        def activate(device: Any) -> Callable[[], Awaitable[None]]:
            async def call() -> None:
                request = activate_request(device.device_id, codes[device.device_id], json.dumps(META), hub)
                await activation.Activate(request)

            return call

        await _bounded([activate(d) for d in devices], CALLS)
        booting = [Booting(d.device_id, d.cert_path, d.key_path) for d in devices]
        commits_before = _commits(app)
        started = time.perf_counter()
        latencies = await _bounded(
            [lambda d=d: _register(emulator, d, client_context) for d in booting], CONCURRENCY
        )
        elapsed = time.perf_counter() - started
        commits_after = _commits(app)
        commits = (
            (commits_after[0] - commits_before[0], commits_after[1] - commits_before[1])
            if commits_before and commits_after
            else None
        )
        writes_per_mode = await dps_writes() - writes
        return Result(name, len(devices), elapsed, latencies, times.seconds, writes_per_mode, commits)


def _commits(app: Any) -> tuple[int, int] | None:
    """Group mode: the commits activation_svc's registry assignments and audit writes took so far."""
    registry = getattr(app.dps, "assignment_commits", None)
    audit = app.audit.write_commits
    return (registry, audit) if registry is not None and audit is not None else None


async def run() -> str:
    from activation.group_env import Stack, emulator_args
    from enrollment.provisioning_env import OemTls, activation_env, factory_env
    from support.emulator import EmulatorProcess

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-group-") as tmp:
        root = Path(tmp)
        tls = OemTls.create(root / "tls")
        args = [*emulator_args(tls), "--log-level", "WARNING"]
        emulator = EmulatorProcess(root / "emulator", hubs=2, extra_args=args)
        await asyncio.to_thread(emulator.start)
        try:
            individual = await _mode(
                "individual",
                root,
                emulator,
                factory_env(root / "individual", emulator),
                activation_env(root / "individual", emulator, tls),
                tls,
            )
            stack = Stack(root / "group", emulator, tls)
            group = await _mode(
                "group",
                root,
                emulator,
                stack.factory_env(),
                stack.activation_env(),
                tls,
                before=stack.apply_group,  # once, before the devices (not counted per device)
            )
        finally:
            await asyncio.to_thread(emulator.stop)
    load_after = os.getloadavg()
    return _report([individual, group], load_before, load_after)


def _report(results: list[Result], load_before: tuple[float, ...], load_after: tuple[float, ...]) -> str:
    lines = [
        f"{DEVICES} devices per mode (`BENCH_GROUP_DEVICES`), one emulator process (`--assignment-delay "
        "immediate`), factory_svc and activation_svc in the benchmark's process (group mode: the device "
        "registry in SQLite, the webhook over TLS with its function key). Each device is minted, enrolled "
        f"and activated ({CALLS} calls at a time), then all boot: {CONCURRENCY} at a time register over "
        "MQTT/TLS with their certificate chain (a lean MQTT client, as in the DPS section). 2 cores shared "
        "by the emulator, the services and the clients, and with other engineers' work on this machine: "
        f"1-minute load average {load_before[0]:.1f} before the run, {load_after[0]:.1f} after.",
        "",
        "| mode | devices | boot: registrations/s | registration p50 | p99 | webhook p50 | p99 "
        "| commits per allocation: registry + audit | DPS service writes per device |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rate = r.devices / r.boot_seconds if r.boot_seconds else 0.0
        hook = (
            f"{_pct(r.webhook, 0.5) * 1000:.1f} ms | {_pct(r.webhook, 0.99) * 1000:.1f} ms"
            if r.webhook
            else "- | -"
        )
        allocations = len(r.webhook)
        commits = (
            f"{r.commits[0] / allocations:.2f} + {r.commits[1] / allocations:.2f}"
            if r.commits and allocations
            else "-"
        )
        lines.append(
            f"| {r.mode} | {r.devices} | **{rate:,.0f}** | {_pct(r.boot_latencies, 0.5) * 1000:.0f} ms "
            f"| {_pct(r.boot_latencies, 0.99) * 1000:.0f} ms | {hook} | {commits} "
            f"| **{r.writes / r.devices:g}** |"
        )
    group = next(r for r in results if r.mode == "group")
    verdict = "**met**" if group.writes == 0 else f"**missed** ({group.writes:g} writes)"
    lines += [
        "",
        "Registration latency: from the device's TLS handshake to the registration's answer (DPS checks "
        "the enrollment, or in group mode the chain against the group and asks the webhook, then creates "
        "the hub identity). Webhook: activation_svc's own time per answer (the registry read, the "
        "assignment and the audit row written, each durable before the answer), without the TLS hop; "
        "activation_svc shares the benchmark's event loop with factory_svc and the device clients, so "
        "this includes waiting for that loop. Commits per allocation: the synchronous SQLite commits "
        "(one fsync each) of the device registry's assignments and of the audit rows during the boot, "
        "over the allocations answered; they are two databases (the registry is shared with factory_svc), "
        "so an allocation takes a commit in each, and concurrent allocations share them (below 1: "
        "grouped). DPS writes counted over mint, "
        "enroll, activate and boot; individual mode's two per device are Enroll's disabled enrollment "
        "and Activate's enable.",
        "",
        f"Goal: 0 DPS service writes per device in group mode: {verdict}. "
        f"{'Registrations by the webhook: ' + str(len(group.webhook)) + ' of ' + str(group.devices) + '.'}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(asyncio.run(run()))
