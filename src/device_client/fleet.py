"""A simulated fleet: many devices, each the real :class:`DeviceRuntime`, across worker processes.

Why worker processes.  azure-iot-device (2.14) runs the pipeline work of *every* client in a process on
one process-wide thread: ``pipeline_thread._get_named_executor("pipeline")`` is a module-level
``ThreadPoolExecutor(max_workers=1)``, and the MQTT stage's connect runs there
(``@runs_on_pipeline_thread``) calling paho's blocking ``connect()`` -- TCP connect plus TLS handshake
-- so connects of different clients queue behind each other.  Measured: 20 clients calling
``connect()`` at once against a loopback listener that accepts TCP and never answers the TLS handshake
produced 1 TCP connection in 12 s (5 clients: still 1 in 45 s); the other clients never reached the
socket.  One slow or stalled handshake stalls every device of the process, which is what a 200-device
fleet in one process showed (30 s connect timeouts piling up).  So a fleet is spread over worker
processes (one pipeline thread each), sized to the machine, and every device retries with jittered
capped exponential back-off (:mod:`device_client.backoff`) and a spread first attempt.  Waits DPS asks
for (``retry-after`` on ``202 assigning`` and on ``429``) are honoured by the SDK itself within one
registration attempt (``_process_retry_status_code`` and the polling timer); the runtime's per-attempt
deadline bounds an attempt, and a timed-out attempt is retried, never a reason to stop.

    runner = FleetRunner(guids, state_root, overrides, workers=2, log_dir=...)
    await runner.start()        # spawn the workers; each builds its runtimes and says "ready"
    runner.go()                 # every worker boots its devices now
    ... runner.counts() / runner.records ...
    await runner.stop()         # SIGTERM each worker's process group, SIGKILL after the grace period
    runner.report()

A worker that dies is reported (its devices become ``LOST``) and its process group is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from device_client.runtime import DeviceState, RuntimeSnapshot
from litestore import private_directory
from provkit.signals import exit_with_parent

READY_TIMEOUT_S = 180.0
DEVICES_PER_WORKER = 50  # measured: 500 devices in one worker stall (see BENCHMARKS.md, fleet)
LOST = "LOST"


def default_workers(devices: int, per_worker: int = DEVICES_PER_WORKER) -> int:
    """At least one worker per CPU and at most ``per_worker`` devices in each (every device brings an SDK
    client with its own paho thread and a telemetry-buffer thread, and all of a worker's clients share one
    SDK pipeline thread), never more workers than devices."""
    return max(1, min(devices, max(os.cpu_count() or 1, math.ceil(devices / per_worker))))


@dataclass
class DeviceRecord:
    guid: str
    worker: int
    state: str = "IDLE"
    backing_off: bool = False
    sent: int = 0
    registered_s: float | None = None  # since the fleet booted
    first_ack_s: float | None = None
    first_delay_s: float = 0.0
    error: str | None = None
    assigned_hub: str | None = None
    last_message: dict[str, Any] | None = None
    reached: list[str] = field(default_factory=list)  # states, in the order first reached
    certificate_serial: str | None = None  # of the identity in use
    certificate_not_after: datetime | None = None
    renewal_state: str | None = None
    renewals: int = 0  # certificates renewed and promoted during this run

    @property
    def snapshot(self) -> RuntimeSnapshot:
        """The device as its own runtime would describe it (a lost worker's devices look FAILED)."""
        state = DeviceState.FAILED if self.state == LOST else DeviceState(self.state)
        return RuntimeSnapshot(
            guid=self.guid,
            state=state,
            assigned_hub=self.assigned_hub,
            telemetry_sent=self.sent,
            last_message=self.last_message,
            last_error=self.error,
            backing_off=self.backing_off,
            certificate_serial=self.certificate_serial,
            certificate_not_after=self.certificate_not_after,
            renewal_state=self.renewal_state,
            renewals=self.renewals,
        )


@dataclass
class _Worker:
    index: int
    guids: list[str]
    proc: asyncio.subprocess.Process | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    finished: bool = False  # sent its final line
    exit_code: int | None = None
    reader: asyncio.Task[None] | None = None


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def spread(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None}
    return {
        "p50": round(statistics.median(values), 3),
        "p95": round(_pct(values, 0.95), 3),
        "max": round(max(values), 3),
    }


class FleetRunner:
    def __init__(
        self,
        guids: Sequence[str],
        state_root: Path,
        overrides: Mapping[str, Any],
        *,
        workers: int,
        log_dir: Path,
        grace_s: float = 20.0,
    ) -> None:
        self.state_root = state_root
        self.log_dir = log_dir
        self.grace_s = grace_s
        self._overrides = dict(overrides)
        count = max(1, min(workers, len(guids)))
        self.workers = [_Worker(i, list(guids[i::count])) for i in range(count)]
        self.records = {g: DeviceRecord(g, w.index) for w in self.workers for g in w.guids}
        self.booted_at: float | None = None
        self.lost: list[str] = []  # what happened to workers that died
        self.changed = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        private_directory(self.log_dir)
        for worker in self.workers:
            job = self.log_dir / f"worker-{worker.index}.json"
            job.write_text(
                json.dumps(
                    {
                        "state_root": str(self.state_root),
                        "guids": worker.guids,
                        "overrides": self._overrides,
                        "log_path": str(self.log_dir / f"worker-{worker.index}.log"),
                        "grace_s": self.grace_s,
                    }
                )
            )
            with (self.log_dir / f"worker-{worker.index}.stderr").open("ab") as err:
                worker.proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "device_client.fleet_worker",
                    str(job),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=err,
                    start_new_session=True,  # its own process group: stopped as a whole, never by a tty
                    preexec_fn=exit_with_parent if sys.platform.startswith("linux") else None,
                    limit=1 << 24,
                )
            worker.reader = asyncio.create_task(self._read(worker))
        waits = [asyncio.ensure_future(w.ready.wait()) for w in self.workers]
        _done, pending = await asyncio.wait(waits, timeout=READY_TIMEOUT_S)
        for task in pending:
            task.cancel()
        if pending or self.lost:
            raise RuntimeError("not every fleet worker started: " + "; ".join(self.lost or ["timed out"]))

    def go(self) -> None:
        """Boot every device of every worker now."""
        self.booted_at = time.time()
        for worker in self.workers:
            self._tell(worker, b"go\n")

    async def stop(self) -> None:
        """Stop every worker (graceful first) and wait until no process of the fleet is left."""
        for worker in self.workers:
            self._signal(worker, signal.SIGTERM)
        alive = [w.reader for w in self.workers if w.reader is not None]
        if alive:
            _done, pending = await asyncio.wait(alive, timeout=self.grace_s + 5.0)
            for worker in self.workers:
                if worker.reader in pending:
                    self._signal(worker, signal.SIGKILL)
            if pending:
                await asyncio.wait(pending, timeout=10.0)

    async def kill_worker(self, index: int) -> None:
        """SIGKILL one worker (what a crash looks like); the runner reports it as lost."""
        worker = self.workers[index]
        if worker.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.kill()
        if worker.reader is not None:
            await asyncio.wait({worker.reader}, timeout=30.0)

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc is not None]

    # -- worker I/O -------------------------------------------------------------------------------------
    def _tell(self, worker: _Worker, data: bytes) -> None:
        if worker.proc is not None and worker.proc.stdin is not None and worker.exit_code is None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                worker.proc.stdin.write(data)

    def _signal(self, worker: _Worker, sig: signal.Signals) -> None:
        if worker.proc is None or worker.exit_code is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(worker.proc.pid, sig)

    async def _read(self, worker: _Worker) -> None:
        assert worker.proc is not None and worker.proc.stdout is not None
        try:
            while line := await worker.proc.stdout.readline():
                with contextlib.suppress(ValueError):
                    self._take(worker, json.loads(line))
        finally:
            worker.exit_code = await worker.proc.wait()
            # Whatever the worker left in its group (it has no children of its own today) goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(worker.proc.pid, signal.SIGKILL)
            if not worker.finished:
                how = (
                    f"signal {signal.Signals(-worker.exit_code).name}"
                    if worker.exit_code < 0
                    else f"exit code {worker.exit_code}"
                )
                self.lost.append(f"worker {worker.index} (pid {worker.proc.pid}) died: {how}")
                for guid in worker.guids:
                    record = self.records[guid]
                    record.state, record.backing_off = LOST, False
                    record.error = record.error or f"worker {worker.index} died ({how})"
                worker.ready.set()
            self.changed.set()

    def _take(self, worker: _Worker, message: dict[str, Any]) -> None:
        kind = message.get("kind")
        if kind == "ready":
            worker.ready.set()
            return
        for guid, row in message.get("devices", {}).items():
            record = self.records.get(guid)
            if record is None:
                continue
            record.state = row["state"]
            record.backing_off = bool(row["backing_off"])
            record.sent = int(row["sent"])
            record.first_delay_s = float(row.get("first_delay_s") or 0.0)
            record.error = row.get("error")
            record.assigned_hub = row.get("assigned_hub")
            record.last_message = row.get("last_message")
            record.reached = list(row.get("reached") or [])
            record.registered_s = self._since_boot(row.get("registered_at"))
            record.first_ack_s = self._since_boot(row.get("first_ack_at"))
            record.certificate_serial = row.get("certificate_serial")
            not_after = row.get("certificate_not_after")
            record.certificate_not_after = None if not_after is None else datetime.fromisoformat(not_after)
            record.renewal_state = row.get("renewal_state")
            record.renewals = int(row.get("renewals") or 0)
        if kind == "final":
            worker.finished = True
        self.changed.set()

    def _since_boot(self, at: float | None) -> float | None:
        if at is None or self.booted_at is None:
            return None
        return max(0.0, at - self.booted_at)

    # -- what it looks like -------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        records = self.records.values()
        return {
            "devices": len(self.records),
            "registered": sum(r.registered_s is not None for r in records),
            "connected": sum(r.state in ("CONNECTED", "SENDING") for r in records),
            "sending": sum(r.state == "SENDING" for r in records),
            "telemetry_acknowledged": sum(r.first_ack_s is not None for r in records),
            "backing_off": sum(r.backing_off for r in records),
            "failed": sum(r.state in ("FAILED", LOST) for r in records),
        }

    def all_acknowledged(self) -> bool:
        return all(r.first_ack_s is not None for r in self.records.values())

    def report(self) -> dict[str, Any]:
        records = list(self.records.values())
        registered = [r.registered_s for r in records if r.registered_s is not None]
        acked = [r.first_ack_s for r in records if r.first_ack_s is not None]
        counts = self.counts()
        return {
            "ok": bool(records) and counts["telemetry_acknowledged"] == len(records) and not self.lost,
            "workers": len(self.workers),
            "counts": counts,
            "registered_s": spread(registered),
            "first_telemetry_s": spread(acked),
            "lost_workers": list(self.lost),
            "failed": [
                {"guid": r.guid, "state": r.state, "error": r.error}
                for r in records
                if r.state in ("FAILED", LOST) or r.first_ack_s is None
            ],
        }
