"""DPS emulator benchmark: service REST enrollment throughput (single PUTs and bulk calls of 10) with
Microsoft's azure-iot-deviceprovisioning aio client, and X.509 device registrations per second over
MQTT/TLS with many concurrent lightweight devices (a small asyncio MQTT client: TLS handshake with the
device certificate, CONNECT, SUBSCRIBE, register, answer, DISCONNECT).

Against a real emulator process on loopback.  Bounded: fixed work sizes plus a time cap per phase.
Run alone: ``python -m bench dps``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

TITLE = "DPS emulator: enrollment REST throughput and X.509 registrations per second"

SINGLE_ENROLLMENTS = 300
BULK_CALLS = 60  # x 10 enrollments
REGISTRATIONS = 400
REST_CONCURRENCY = 16
DEVICE_CONCURRENCY = 64
PHASE_CAP_S = 60.0

_TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))


def _enrollment(reg_id: str, pem: str) -> dict:
    return {
        "registrationId": reg_id,
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": pem}}}},
    }


async def _bounded(jobs, concurrency: int) -> tuple[list[float], float, int]:
    """Run coroutine factories with a concurrency limit and a time cap; (latencies, elapsed, done)."""
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    start = time.perf_counter()
    deadline = start + PHASE_CAP_S

    async def one(job) -> None:
        async with sem:
            if time.perf_counter() > deadline:
                return
            t0 = time.perf_counter()
            await job()
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(one(j) for j in jobs))
    return latencies, time.perf_counter() - start, len(latencies)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _row(name: str, unit_count: int, latencies: list[float], elapsed: float, unit: str) -> str:
    rate = unit_count / elapsed if elapsed else 0.0
    return (
        f"| {name} | {unit_count} {unit} | {elapsed:.2f} s | **{rate:,.0f} {unit}/s** "
        f"| {statistics.median(latencies) * 1000:.1f} ms | {_pct(latencies, 0.95) * 1000:.1f} ms |"
    )


async def _register(emu, device, ctx_factory) -> None:
    from support.mqtt_client import MqttTestClient

    from azure_iot_emulator.mqtt import packets as p

    ctx = ctx_factory(emu.ca_pem, str(device.cert_path), str(device.key_path))
    reg_id = device.registration_id
    client, ack = await MqttTestClient.connect(
        emu.dps_host,
        ctx,
        client_id=reg_id,
        username=f"{emu.id_scope}/registrations/{reg_id}/api-version=2019-03-31&ClientVersion=bench",
    )
    try:
        if ack.return_code != 0:
            raise RuntimeError(f"CONNACK {ack.return_code}")
        await client.subscribe("$dps/registrations/res/#")
        rid = uuid.uuid4().hex
        body = json.dumps({"payload": None, "registrationId": reg_id}).encode()
        client.send(
            p.Publish(f"$dps/registrations/PUT/iotdps-register/?$rid={rid}", body, 1, client.packet_id())
        )
        response = await client.next_publish(30)
        if (
            not response.topic.startswith("$dps/registrations/res/200/")
            or b'"assigned"' not in response.payload
        ):
            raise RuntimeError(f"registration failed: {response.topic} {response.payload[:200]!r}")
        client.send(p.Disconnect())
    finally:
        await client.close()


async def _raw_puts(emu, pem: str):
    """The same PUTs from a lean client (aiohttp, one SAS token), to separate server cost from the
    SDK's own per-request cost."""
    import ssl

    import aiohttp

    from azure_iot_emulator.sas import generate_sas

    host = emu.dps_connection_string.split("HostName=", 1)[1].split(";", 1)[0]
    key = emu.dps_connection_string.split("SharedAccessKey=", 1)[1]
    token = generate_sas(host, key, policy="provisioningserviceowner", expiry=int(time.time()) + 3600)
    ctx = ssl.create_default_context(cafile=str(emu.ca_path))
    async with aiohttp.ClientSession(headers={"Authorization": token}) as session:

        def put(reg_id: str):
            async def call() -> None:
                url = f"https://{host}/enrollments/{reg_id}?api-version=2021-10-01"
                async with session.put(url, json=_enrollment(reg_id, pem), ssl=ctx) as response:
                    if response.status != 200:
                        raise RuntimeError(f"PUT {reg_id}: {response.status}")
                    await response.read()

            return call

        return await _bounded([put(f"raw-{n:05d}") for n in range(SINGLE_ENROLLMENTS)], REST_CONCURRENCY)


async def run() -> str:
    from azure.iot.deviceprovisioning.aio import DeviceProvisioningClient
    from support.certs import TestCa
    from support.emulator import EmulatorProcess
    from support.mqtt_client import client_context

    with tempfile.TemporaryDirectory(prefix="bench-dps-") as tmp:
        root = Path(tmp)
        # immediate: measures the registration work itself, not the 202 + poll round trips
        emu = EmulatorProcess(
            root / "emulator", hubs=2,
            extra_args=["--log-level", "WARNING", "--assignment-delay", "immediate"],
        )
        await asyncio.to_thread(emu.start)
        try:
            ca = TestCa()
            one_cert = ca.issue(root / "certs", "rest").pem
            async with DeviceProvisioningClient.from_connection_string(
                emu.dps_connection_string, connection_verify=str(emu.ca_path)
            ) as dps:
                single_ids = [f"single-{n:05d}" for n in range(SINGLE_ENROLLMENTS)]

                def put(reg_id: str):
                    return lambda: dps.enrollment.create_or_update(
                        id=reg_id, enrollment=_enrollment(reg_id, one_cert)
                    )

                single = await _bounded([put(i) for i in single_ids], REST_CONCURRENCY)

                def bulk(n: int):
                    batch = [_enrollment(f"bulk-{n:04d}-{k}", one_cert) for k in range(10)]

                    async def call() -> None:
                        result = await dps.enrollment.run_bulk_operation(
                            bulk_operation={"mode": "create", "enrollments": batch}
                        )
                        if not result["isSuccessful"]:
                            raise RuntimeError(result["errors"][:1])

                    return call

                bulk_result = await _bounded([bulk(n) for n in range(BULK_CALLS)], REST_CONCURRENCY)
                raw = await _raw_puts(emu, one_cert)

                devices = [ca.issue(root / "devices", f"reg-{n:05d}") for n in range(REGISTRATIONS)]
                for start in range(0, len(devices), 10):
                    chunk = devices[start : start + 10]
                    await dps.enrollment.run_bulk_operation(
                        bulk_operation={
                            "mode": "create",
                            "enrollments": [_enrollment(d.registration_id, d.pem) for d in chunk],
                        }
                    )
            regs = await _bounded(
                [lambda d=d: _register(emu, d, client_context) for d in devices], DEVICE_CONCURRENCY
            )
        finally:
            await asyncio.to_thread(emu.stop)

    lines = [
        "Real emulator subprocess on loopback (TLS everywhere, SQLite in WAL mode, one process, one core "
        "busy); clients in the benchmark process.",
        "",
        "| operation | work | time | rate | p50 latency | p95 latency |",
        "|---|---|---|---|---|---|",
        _row(
            f"enrollment PUT (SDK, {REST_CONCURRENCY} concurrent)",
            single[2],
            single[0],
            single[1],
            "enrollments",
        ),
        _row(
            f"enrollment PUT (plain aiohttp client, {REST_CONCURRENCY} concurrent)",
            raw[2],
            raw[0],
            raw[1],
            "enrollments",
        ),
        _row(
            f"bulk create of 10 (SDK, {REST_CONCURRENCY} concurrent)",
            bulk_result[2] * 10,
            bulk_result[0],
            bulk_result[1],
            "enrollments",
        ),
        _row(
            f"X.509 registration over MQTT/TLS ({DEVICE_CONCURRENCY} concurrent devices)",
            regs[2],
            regs[0],
            regs[1],
            "registrations",
        ),
        "",
        "Each registration is a full device session: TLS handshake presenting the device certificate, "
        "CONNECT, SUBSCRIBE, register (attestation, allocation, hub identity + registration state in one "
        "SQLite transaction), answer, DISCONNECT.  Azure's own limits for comparison: 1,000 service "
        "operations/min and 1,000 device registrations/min per DPS unit.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(asyncio.run(run()))
