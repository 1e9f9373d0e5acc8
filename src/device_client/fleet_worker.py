"""One worker process of a simulated fleet: ``python -m device_client.fleet_worker JOB.json``.

It hosts its share of the fleet's devices, each a :class:`DeviceRuntime` (the code of a real device) with
its own state directory, in one event loop.  It talks to the supervisor (:mod:`device_client.fleet`) in
JSON lines: ``ready`` once the SDK is loaded and the runtimes built, then, after the supervisor's ``go``
line on stdin (every worker boots its devices at the same moment), ``status`` lines with the devices that
changed, and a ``final`` line after a stop.  It stops on SIGTERM / SIGINT, when stdin closes (the
supervisor is gone), and, on Linux, when its parent dies (PR_SET_PDEATHSIG, set by the supervisor).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_client.dps import cancel_leftover_timers
from device_client.runtime import DeviceRuntime, DeviceState, RuntimeSnapshot
from device_client.settings import load_settings

STATUS_EVERY_S = 0.5


@dataclass
class _Device:
    runtime: DeviceRuntime
    registered_at: float | None = None  # wall clock (time.time()), comparable across workers
    first_ack_at: float | None = None
    error: str | None = None
    dirty: bool = True
    reached: list[str] = field(default_factory=list)

    def seen(self, snap: RuntimeSnapshot) -> None:
        now = time.time()
        if snap.assigned_hub is not None and DeviceState.REGISTERED.value not in self.reached:
            # A device with a hub has registered, whether or not a snapshot caught it in that state (with
            # DPS answering at once, it goes on to connect before the next snapshot is taken).
            self.reached.append(DeviceState.REGISTERED.value)
        if snap.state.value not in self.reached:
            self.reached.append(snap.state.value)
        if self.registered_at is None and snap.assigned_hub is not None:
            self.registered_at = now
        if self.first_ack_at is None and snap.telemetry_sent > 0:
            self.first_ack_at = now
        self.dirty = True

    def row(self) -> dict[str, Any]:
        snap = self.runtime.snapshot
        return {
            "state": snap.state.value,
            "backing_off": snap.backing_off,
            "sent": snap.telemetry_sent,
            "registered_at": self.registered_at,
            "first_ack_at": self.first_ack_at,
            "first_delay_s": round(self.runtime.first_delay_s, 3),
            "assigned_hub": snap.assigned_hub,
            "last_message": snap.last_message,
            "reached": self.reached,
            "error": self.error or snap.last_error,
            "certificate_serial": snap.certificate_serial,
            "certificate_not_after": (
                None if snap.certificate_not_after is None else snap.certificate_not_after.isoformat()
            ),
            "renewal_state": snap.renewal_state,
            "renewals": snap.renewals,
        }


def _emit(kind: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"kind": kind, **fields}) + "\n")
    sys.stdout.flush()


def _changes(devices: dict[str, _Device], everything: bool = False) -> dict[str, Any]:
    out = {}
    for guid, device in devices.items():
        if device.dirty or everything:
            device.dirty = False
            out[guid] = device.row()
    return out


async def _run_device(device: _Device) -> None:
    try:
        await device.runtime.run()
    except Exception as exc:  # the runtime already reports FAILED; keep the reason
        device.error = f"{type(exc).__name__}: {exc}"
        device.dirty = True


async def run_worker(job: dict[str, Any]) -> None:
    root = Path(job["state_root"])
    devices: dict[str, _Device] = {}
    for guid in job["guids"]:
        settings = load_settings(
            env={},
            device_settings=root / guid / "settings.toml",
            overrides={**job["overrides"], "state_root": str(root)},
        )
        device = _Device(DeviceRuntime(guid, settings))
        device.runtime.add_listener(device.seen)
        devices[guid] = device
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def watch_stdin() -> None:  # "go" starts the devices; EOF (supervisor gone) stops them
        line = sys.stdin.readline()
        if line.strip() == "go":
            loop.call_soon_threadsafe(go.set)
            sys.stdin.readline()
        loop.call_soon_threadsafe(stop.set)

    go = asyncio.Event()
    threading.Thread(target=watch_stdin, name="supervisor-stdin", daemon=True).start()
    _emit("ready", devices=len(devices))
    await asyncio.wait(
        [asyncio.ensure_future(go.wait()), asyncio.ensure_future(stop.wait())],
        return_when=asyncio.FIRST_COMPLETED,
    )
    tasks = [asyncio.create_task(_run_device(d)) for d in devices.values()] if go.is_set() else []
    while not stop.is_set() and not all(t.done() for t in tasks):
        _emit("status", devices=_changes(devices))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), STATUS_EVERY_S)
    for device in devices.values():
        device.runtime.stop()
    if tasks:
        await asyncio.wait(tasks, timeout=float(job.get("grace_s", 20.0)))
    _emit("final", devices=_changes(devices, everything=True))


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    logging.basicConfig(
        filename=job["log_path"],
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(run_worker(job))
    finally:
        cancel_leftover_timers()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
