"""`device-client run` and `status` as real processes against the emulator: telemetry flows, SIGTERM stops
cleanly (exit 0, outbox flushed), status reports the cached assignment; a device that is not activated
logs "waiting for activation" and keeps running."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid

import pytest
from conftest import running_emulator
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from device_cloud import enroll, received_telemetry
from support.certs import TestCa
from support.device_process import device_client as _start
from support.metrics import scrape
from support.waiting import exited, until

from device_client.state import StateDir

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def _identity(root, guid: str) -> str:
    key_pem, chain_pem = TestCa().identity(guid)
    StateDir(root, guid).write_identity(
        key_pem=key_pem, chain_pem=chain_pem, metadata={"guid": guid}, force=False
    )
    return x509.load_pem_x509_certificates(chain_pem)[0].public_bytes(Encoding.PEM).decode()


def _env(emulator, root) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICE_CLIENT_")}
    env.update(
        DEVICE_CLIENT_STATE_ROOT=str(root),
        DEVICE_CLIENT_ID_SCOPE=emulator.id_scope,
        DEVICE_CLIENT_GLOBAL_ENDPOINT=emulator.dps_host,
        DEVICE_CLIENT_TRUSTED_CA_FILE=str(emulator.ca_path),
        DEVICE_CLIENT_BACKOFF_INITIAL_S="0.2",
        DEVICE_CLIENT_BACKOFF_MAX_S="1",
        DEVICE_CLIENT_LOG_FORMAT="json",
    )
    return env


async def _stopped_after(
    emulator, tmp_path, messages: int, sig: signal.Signals
) -> tuple[str, dict, int, str]:
    """An activated device's `run`, stopped by ``sig`` once the hub has ``messages`` messages from it:
    (device id, its environment, the exit code, standard error)."""
    guid = str(uuid.uuid4())
    root = tmp_path / "devices"
    await enroll(emulator, guid, _identity(root, guid), enabled=True)
    env = _env(emulator, root)
    proc = await _start(env, "run", guid, "--interval", "0.2")

    async def arrived():
        try:
            return len(await received_telemetry(emulator, guid)) >= messages
        except Exception:  # the hub does not know the device before its registration
            return False

    try:
        await until(arrived, f"{messages} message(s) at the hub", interval=0.2, fail_if=exited(proc))
    finally:
        proc.send_signal(sig)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    return guid, env, proc.returncode, err.decode()


async def test_run_sigterm_and_status(emulator, tmp_path):
    guid, env, returncode, stderr = await _stopped_after(emulator, tmp_path, 3, signal.SIGTERM)
    assert returncode == 0, stderr
    assert "Traceback" not in stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert sum(entry["message"].startswith("connected to hub") for entry in lines) == 1
    acked = [entry for entry in lines if entry["message"].startswith("message ")]
    assert [entry["seq"] for entry in acked[:3]] == [1, 2, 3]
    assert all(" acknowledged by the hub " in entry["message"] for entry in acked)
    assert not any("SENDING" in entry["message"] or "FAILED" in entry["message"] for entry in lines)
    assert any(entry["message"].startswith("stopped:") for entry in lines)

    status = await _start(env, "status", guid, "--json")
    out, err = await asyncio.wait_for(status.communicate(), 60)
    assert status.returncode == 0, err.decode()
    report = json.loads(out)
    assert report["assignment"]["assigned_hub"] == emulator.default_hub
    sent = report["telemetry"]["sent"]
    assert sent >= 3
    assert report["telemetry"]["pending"] + sent == report["telemetry"]["next_seq"] - 1
    seqs = [m["seq"] for m in await received_telemetry(emulator, guid)]
    assert seqs[:3] == [1, 2, 3]


async def _refused_registrations(emulator) -> float:
    """DPS registrations the emulator answered "disabled" (its /metrics)."""
    scraped = await scrape(emulator.connection["metrics_url"])
    return scraped.value("iot_emulator_dps_registrations_total", result="disabled")


async def test_run_before_activation_waits(tmp_path):
    guid = str(uuid.uuid4())
    root = tmp_path / "devices"
    with running_emulator(tmp_path / "emulator", ["--metrics-listen", "127.0.0.1:0"]) as emulator:
        await enroll(emulator, guid, _identity(root, guid), enabled=False)
        proc = await _start(_env(emulator, root), "run", guid)
        collected: list[str] = []

        async def waiting_logged():
            line = await asyncio.wait_for(proc.stderr.readline(), 30)
            collected.append(line.decode())
            return "waiting for activation" in collected[-1]

        async def refused_again() -> bool:
            return await _refused_registrations(emulator) >= refused + 2

        try:
            await until(waiting_logged, "waiting for activation logged", interval=0)
            refused = await _refused_registrations(emulator)
            # two more refused attempts later it is still running
            await until(refused_again, "two more refused registrations", fail_if=exited(proc), interval=0.2)
            assert proc.returncode is None
        finally:
            proc.send_signal(signal.SIGTERM)
            _, rest = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    assert "Traceback" not in "".join(collected) + rest.decode()


async def test_run_ctrl_c_exits_130_like_every_command_and_status_into_a_closed_pipe_is_quiet(
    emulator, tmp_path
):
    """Ctrl-C (SIGINT) is an interruption: 130, as the help says and every other command does (it was 0);
    SIGTERM, a service manager's stop, stays 0 (above).  And `status | head` whose reader is gone: 141, no
    traceback."""
    guid, env, returncode, stderr = await _stopped_after(emulator, tmp_path, 1, signal.SIGINT)
    assert returncode == 130, stderr
    assert "Traceback" not in stderr
    assert any(
        json.loads(line)["message"].startswith("stopped:") for line in stderr.splitlines() if line[:1] == "{"
    )

    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` that has gone already
    try:
        status = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "device_client",
            "status",
            guid,
            env=env,
            stdout=write_end,
            stderr=asyncio.subprocess.PIPE,
        )
    finally:
        os.close(write_end)
    _, err = await asyncio.wait_for(status.communicate(), 60)
    assert (status.returncode, err.decode()) == (141, "")
