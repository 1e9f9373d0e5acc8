"""The three parties, played against a running stack with the suite's own clients.

1. The factory's test bench provisions each device (``device_client.provisioning``: key made on the device,
   CSR signed by factory_svc over mTLS, enrollment created disabled) and prints its label.
2. The OEM's back office activates each device through activation_svc (mTLS) with its metadata and a hub.
3. In the field, each device boots (``device_client.runtime.DeviceRuntime``): DPS, its hub, telemetry --
   in worker processes (``device_client.fleet``: the SDK queues every client's connect of a process on one
   thread, so a big fleet in one process stalls).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypedDict

from activation_svc.metadata import sample_metadata
from device_client.batch import provision_batches
from device_client.fleet import DeviceRecord, FleetRunner, default_workers
from device_client.runtime import DeviceState, RuntimeSnapshot
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
        _setting_key(key.removeprefix("DEVICE_CLIENT_").lower()): value
        for key, value in env.items()
        if key.startswith("DEVICE_CLIENT_")
    }
    values.update(overrides)
    return load_settings(env={}, overrides=values)


def _setting_key(name: str) -> str:
    """``renewal_est_url`` (from DEVICE_CLIENT_RENEWAL_EST_URL) is the key ``renewal.est_url``."""
    table, _, rest = name.partition("_")
    return f"{table}.{rest}" if table == "renewal" else name


@dataclass(frozen=True)
class ShortCertificates:
    """The renewal demo (``--cert-minutes``): each device's certificate is valid ``minutes`` (the factory
    backdates it 5 minutes against clock skew, so it lives minutes + 5), renewed once ``fraction`` of that
    lifetime has elapsed, looked at every ``check_interval_s``."""

    minutes: int
    fraction: float = 0.667
    check_interval_s: float = 5.0

    def device_settings(self) -> dict[str, Any]:
        return {"renewal.fraction": self.fraction, "renewal.check_interval_s": self.check_interval_s}


async def provision_fleet(stack: Stack, count: int, short: ShortCertificates | None = None) -> list[Label]:
    """Mint each device's certificate (key made on the device) and enroll them with EnrollBatch; each
    device's settings.toml names the factory's EST listener (and with ``short``, the renewal's timing)."""
    settings = device_settings(stack, **(short.device_settings() if short else {}))
    validity = None if short is None else timedelta(minutes=short.minutes)
    guids = [str(uuid.uuid4()) for _ in range(count)]
    results = await provision_batches(guids, settings, validity=validity)
    labels = []
    for result in results:
        if result.error or not result.activation_code:
            raise RuntimeError(f"{result.guid}: enrollment {result.error or 'without a code'}")
        labels.append(Label(result.guid, result.activation_code))
    return labels


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
    """One device in the field as the demo watches it (its runtime runs in a fleet worker process)."""

    label: Label
    record: DeviceRecord

    @property
    def guid(self) -> str:
        return self.label.guid

    @property
    def snapshot(self) -> RuntimeSnapshot:
        return self.record.snapshot

    @property
    def reached(self) -> list[DeviceState]:
        return [DeviceState(s) for s in self.record.reached]

    @property
    def error(self) -> str | None:
        return self.record.error


class Fleet:
    """The devices' runtimes, in worker processes (``device_client.fleet``, as ``device-client simulate``)."""

    def __init__(self, stack: Stack, labels: list[Label]) -> None:
        guids = [label.guid for label in labels]
        self.runner = FleetRunner(
            guids,
            stack.device_root,
            # on top of each device's own settings.toml (written at the factory)
            {"backoff_initial_s": 0.5, "backoff_max_s": 5.0, "first_attempt_window_s": 2.0},
            workers=default_workers(len(guids)),
            log_dir=stack.logs / "fleet",
        )
        self.tracks = [DeviceTrack(label, self.runner.records[label.guid]) for label in labels]
        self.started_at: datetime | None = None

    async def start(self) -> None:
        await self.runner.start()
        self.started_at = datetime.now(UTC)
        self.runner.go()

    async def stop(self) -> None:
        await self.runner.stop()


class DeviceSummary(TypedDict):
    guid: str
    chosen_hub: str | None
    assigned_hub: str | None
    states_reached: list[str]
    final_state: str
    telemetry_acknowledged: int
    hub_received: int
    telemetry_gaps: int  # sequence numbers the hub never got below the highest it got
    renewals: int  # certificates renewed and promoted during the run
    certificate_serial: str | None
    error: str | None


class FleetSummary(TypedDict):
    ok: bool
    renewals: int
    expect_renewal: bool
    devices: list[DeviceSummary]


def summary(
    fleet: Fleet,
    received: dict[str, int],
    chosen_hubs: dict[str, str],
    gaps: Mapping[str, int] | None = None,
    *,
    expect_renewal: bool = False,
) -> FleetSummary:
    """What happened to each device; ``ok`` when every device registered and its hub got telemetry (and
    with ``expect_renewal``, when each renewed its certificate with no gap in the telemetry)."""
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
                "telemetry_gaps": (gaps or {}).get(track.label.guid, 0),
                "renewals": snap.renewals,
                "certificate_serial": snap.certificate_serial,
                "error": track.error,
            }
        )
    ok = bool(devices) and all(
        DeviceState.REGISTERED.value in d["states_reached"] and d["hub_received"] > 0 for d in devices
    )
    if expect_renewal:
        ok = ok and all(d["renewals"] > 0 and d["telemetry_gaps"] == 0 for d in devices)
    renewals = sum(d["renewals"] for d in devices)
    return {"ok": ok, "renewals": renewals, "expect_renewal": expect_renewal, "devices": devices}


def write_json(path: Path, data: Mapping[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
