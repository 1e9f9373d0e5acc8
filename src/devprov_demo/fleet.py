"""The three parties, played against a running stack with the suite's own clients.

1. The factory's test bench provisions each device (``device_client.provisioning``: key made on the device,
   CSR signed by factory_svc over mTLS, enrollment created disabled) and prints its label.
2. The OEM's back office activates each device through activation_svc (mTLS) with its metadata and a hub.
3. In the field, each device boots (``device_client.runtime.DeviceRuntime``): DPS, its hub, telemetry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

from activation_svc.metadata import sample_metadata
from device_client.factory_client import GrpcFactory
from device_client.provisioning import ProvisionRequest, provision_with
from device_client.runtime import DeviceRuntime, DeviceState, RuntimeSnapshot
from device_client.settings import Settings, load_settings
from devprov.v1 import activation_service_pb2 as apb
from devprov.v1 import activation_service_pb2_grpc as apb_grpc
from devprov_demo.stack import Stack
from provkit.channels import ChannelSecurity, create_channel


@dataclass(frozen=True)
class Label:
    """What the factory prints on the board: the hardware GUID and the one-time activation code."""

    guid: str
    activation_code: str


def device_settings(stack: Stack, **overrides: Any) -> Settings:
    """The factory bench's view of the device client settings (as `source env.sh` would give)."""
    env = stack.client_environment()
    values: dict[str, Any] = {
        key.removeprefix("DEVICE_CLIENT_").lower(): value
        for key, value in env.items()
        if key.startswith("DEVICE_CLIENT_")
    }
    values.update(overrides)
    return load_settings(env={}, overrides=values)


async def provision_fleet(stack: Stack, count: int) -> list[Label]:
    settings = device_settings(stack)
    async with GrpcFactory(settings.factory) as factory:

        async def one() -> Label:
            guid = str(uuid.uuid4())
            result = await provision_with(factory, ProvisionRequest(guid), settings)
            if result.enrollment != "live" or not result.activation_code:
                raise RuntimeError(f"{guid}: enrollment {result.enrollment}, expected live")
            return Label(guid, result.activation_code)

        return list(await asyncio.gather(*(one() for _ in range(count))))


def _oem_security(stack: Stack) -> ChannelSecurity:
    return ChannelSecurity.from_files(stack.tls.ca, stack.tls.cert("oem"), stack.tls.key("oem"))


async def activate_fleet(stack: Stack, labels: list[Label], interval_s: float) -> dict[str, str]:
    """Activate every device, alternating over the linked hubs; returns guid -> chosen hub."""
    hubs = stack.emulator.hub_hosts
    chosen: dict[str, str] = {}
    async with create_channel(stack.config.activation_address, _oem_security(stack)) as channel:
        oem = apb_grpc.ActivationServiceStub(channel)
        for index, label in enumerate(labels):
            reply = await oem.Activate(
                apb.ActivateRequest(
                    device_id=label.guid,
                    activation_code=label.activation_code,
                    metadata_json=json.dumps(sample_metadata(index, interval_s)),
                    hub=hubs[index % len(hubs)],
                    request_id=str(uuid.uuid4()),
                ),
                timeout=60,
            )
            chosen[label.guid] = reply.hub
    return chosen


@dataclass
class DeviceTrack:
    """One device in the field as the demo watches it."""

    label: Label
    runtime: DeviceRuntime
    reached: list[DeviceState] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def record(self, snapshot: RuntimeSnapshot) -> None:
        if snapshot.state not in self.reached:
            self.reached.append(snapshot.state)

    @property
    def guid(self) -> str:
        return self.label.guid

    @property
    def snapshot(self) -> RuntimeSnapshot:
        return self.runtime.snapshot

    @property
    def error(self) -> str | None:
        if self.task is not None and self.task.done() and not self.task.cancelled():
            exc = self.task.exception()
            if exc is not None:
                return f"{type(exc).__name__}: {exc}"
        return self.snapshot.last_error


class Fleet:
    """The devices' runtimes, in this process (one asyncio task each)."""

    def __init__(self, stack: Stack, labels: list[Label]) -> None:
        self.tracks: list[DeviceTrack] = []
        for label in labels:
            settings = load_settings(
                env={},
                device_settings=stack.device_root / label.guid / "settings.toml",
                overrides={
                    "state_root": str(stack.device_root),
                    "backoff_initial_s": 0.5,
                    "backoff_max_s": 5.0,
                },
            )
            track = DeviceTrack(label, DeviceRuntime(label.guid, settings))
            track.runtime.add_listener(track.record)
            track.record(track.runtime.snapshot)
            self.tracks.append(track)
        self.started_at: datetime | None = None

    def start(self) -> None:
        self.started_at = datetime.now(UTC)
        for track in self.tracks:
            track.task = asyncio.create_task(track.runtime.run(), name=f"device {track.label.guid}")

    async def stop(self, grace_s: float = 30.0) -> None:
        for track in self.tracks:
            track.runtime.stop()
        tasks = [t.task for t in self.tracks if t.task is not None]
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=grace_s)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class DeviceSummary(TypedDict):
    guid: str
    chosen_hub: str | None
    assigned_hub: str | None
    states_reached: list[str]
    final_state: str
    telemetry_acknowledged: int
    hub_received: int
    error: str | None


class FleetSummary(TypedDict):
    ok: bool
    devices: list[DeviceSummary]


def summary(fleet: Fleet, received: dict[str, int], chosen_hubs: dict[str, str]) -> FleetSummary:
    """What happened to each device; ``ok`` when every device registered and its hub got telemetry."""
    devices: list[DeviceSummary] = []
    for track in fleet.tracks:
        snap = track.snapshot
        devices.append(
            {
                "guid": track.label.guid,
                "chosen_hub": chosen_hubs.get(track.label.guid),
                "assigned_hub": snap.assigned_hub,
                "states_reached": [s.value for s in track.reached],
                "final_state": snap.state.value,
                "telemetry_acknowledged": snap.telemetry_sent,
                "hub_received": received.get(track.label.guid, 0),
                "error": track.error,
            }
        )
    ok = bool(devices) and all(
        DeviceState.REGISTERED.value in d["states_reached"] and d["hub_received"] > 0 for d in devices
    )
    return {"ok": ok, "devices": devices}


def write_json(path: Path, data: Mapping[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
