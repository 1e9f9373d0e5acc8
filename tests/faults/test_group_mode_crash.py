"""Group mode's activation killed with SIGKILL right after its one write (the device registry's record,
crash point ``activate.after_dps``), before it answered or closed its intent: a restarted activation_svc
finishes the intent, and the device, booting after it, gets the activation's hub and twin: nothing
accepted is lost.  Real processes: activation-svc serve (group mode, its webhook), the emulator, the
operator's command; factory_svc in process; Microsoft's azure-iot-device for the device.

Its allocation webhook killed between its two commits (``allocate.assigned``: the registry's assignment
written, the audit row not) or after both (``allocate.recorded``), before the answer: DPS fails that
registration, and the device's next one, answered by the restarted service, lands on the activation's hub;
the audit's ``ok`` rows are the allocations that got that far, and a retry onto the hub the registry
already holds writes the audit row only."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from activation.group_env import META, Stack, emulator_args
from azure.iot.device.exceptions import ClientError
from conftest import running_emulator
from enrollment.provisioning_env import OemTls, activate_request, hub_twin, register, running_factory
from test_activation_intents import activation_process, audit_rows, open_intents

pytestmark = [pytest.mark.faults, pytest.mark.slow]


@asynccontextmanager
async def enrolled_in_group_mode(tmp_path: Path) -> AsyncIterator[tuple[Any, Stack, OemTls, Any, str]]:
    """A group-mode emulator and stack, one device enrolled by factory_svc (not activated) and its code."""
    tls = OemTls.create(tmp_path / "tls")
    with running_emulator(tmp_path / "emulator", emulator_args(tls)) as emulator:
        stack = Stack(tmp_path, emulator, tls)
        async with running_factory(stack.factory_env()) as (_app, factory):
            device, code = await stack.enrolled(factory)
        yield emulator, stack, tls, device, code


async def test_killed_after_the_registry_write_the_device_still_comes_online_on_the_activations_hub(
    tmp_path,
):
    async with enrolled_in_group_mode(tmp_path) as (emulator, stack, tls, device, code):
        env, chosen, log = stack.activation_env(), emulator.hub_hosts[1], tmp_path / "activation.log"
        async with activation_process(env, tls, log, crash_at="activate.after_dps") as (proc, stub):
            await stack.apply_group()
            with pytest.raises(grpc.aio.AioRpcError) as killed:
                await stub.Activate(
                    activate_request(device.device_id, code, json.dumps(META), chosen, "r-1"), timeout=30
                )
            assert killed.value.code() is grpc.StatusCode.UNAVAILABLE
            assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGKILL
        assert [r[1:3] for r in audit_rows(stack.activation_dir, device.device_id)] == [("r-1", "pending")]
        assert len(open_intents(stack.activation_dir)) == 1

        async with activation_process(env, tls, log) as (_proc, stub):
            assert open_intents(stack.activation_dir) == []  # finished at start-up
            result = await register(emulator, device)
            assert result.status == "assigned" and result.registration_state.assigned_hub == chosen
            twin = await hub_twin(emulator, chosen, device.device_id)
            assert twin.tags == META["tags"]
            retry = await stub.Activate(
                activate_request(device.device_id, code, json.dumps(META), chosen, "r-1")
            )
            assert retry.hub == chosen
        rows = audit_rows(stack.activation_dir, device.device_id)
        assert ("r-1", "ok") in [r[1:3] for r in rows] and ("", "ok") in [r[1:3] for r in rows]


def assignment(data_dir: Path, device_id: str) -> tuple[str | None, int | None]:
    """The hub the device registry records for the device, and when it was recorded."""
    with sqlite3.connect(data_dir / "registry.sqlite3") as db:
        row = db.execute(
            "SELECT assigned_hub, assigned_us FROM registry WHERE registration_id = ?", (device_id.lower(),)
        ).fetchone()
    return (row[0], row[1]) if row else (None, None)


@pytest.mark.parametrize("point", ["allocate.assigned", "allocate.recorded"])
async def test_webhook_killed_before_its_answer_the_next_registration_lands_on_the_activations_hub(
    tmp_path, point
):
    async with enrolled_in_group_mode(tmp_path) as (emulator, stack, tls, device, code):
        env, chosen, log = stack.activation_env(), emulator.hub_hosts[1], tmp_path / "activation.log"
        async with activation_process(env, tls, log, crash_at=point) as (proc, stub):
            await stack.apply_group()
            reply = await stub.Activate(activate_request(device.device_id, code, json.dumps(META), chosen))
            assert reply.hub == chosen
            with pytest.raises(ClientError):  # the webhook's connection dropped: DPS fails the registration
                await register(emulator, device)
            assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGKILL
        hub, assigned_at = assignment(stack.activation_dir, device.device_id)
        assert hub == chosen  # the registry's commit came first in both cases
        audited = 0 if point == "allocate.assigned" else 1
        assert stack.audit(device.device_id) == [("ok", f"hub={chosen}")] * audited

        async with activation_process(env, tls, log):
            result = await register(emulator, device)
            assert result.status == "assigned" and result.registration_state.assigned_hub == chosen
            twin = await hub_twin(emulator, chosen, device.device_id)
            assert twin.tags == META["tags"]
        assert stack.audit(device.device_id) == [("ok", f"hub={chosen}")] * (audited + 1)
        assert assignment(stack.activation_dir, device.device_id) == (chosen, assigned_at)  # not rewritten
