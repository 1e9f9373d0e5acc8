"""What the hub benchmark measures.  ``FULL`` is what ``make bench`` runs and BENCHMARKS.md reports;
``QUICK`` checks that everything still works in well under a minute (its figures mean little)."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Settings:
    ingest_devices: int = 50
    ingest_window: int = 8  # messages in flight per device
    ingest_seconds: float = 6.0
    ingest_rounds: int = 2  # per server, interleaved (emulator, Mosquitto, emulator, Mosquitto)
    scale_devices: int = 10_000  # the goal: this many connected devices ...
    scale_period: float = 5.0  # ... each sending one message every 5 s
    scale_seconds: float = 60.0
    scale_grace: float = 5.0  # after the last send, how long the generators wait for outstanding PUBACKs
    scale_processes: int = 2
    scale_sources: tuple[str, ...] = tuple(f"127.0.9.{i}" for i in range(1, 9))  # client source addresses
    with_mosquitto: bool = True
    with_scale: bool = True

    @property
    def is_full(self) -> bool:
        return self == FULL


FULL = Settings()
QUICK = replace(
    FULL, ingest_devices=10, ingest_seconds=2.0, ingest_rounds=1, scale_devices=200, scale_seconds=10.0
)
SCALE_GOAL_DEVICES = FULL.scale_devices
MEMORY_GOAL_KIB = 1024 * 1024
CPU_RATIO_GOAL = 3.0  # the emulator's CPU per message against Mosquitto's, same run, 10,000 devices
PER_DEVICE_GOAL_KIB = 20.0
