"""Where a connected device's memory goes in the emulator, by hand (not a ``make bench`` section):

    .venv/bin/python bench/hub/connection_memory.py [--devices 2000] [--trace 12] [--census]

Runs the emulator in this process (its ``Emulator``, on uvloop as ``serve`` runs it; no ``gc.freeze``),
has the hub benchmark's load generator (another process) connect ``--devices`` devices with one shared
self-signed certificate, and prints what the emulator holds more per connected device than before the
connects: glibc's heap in use (``mallinfo2``: OpenSSL, libuv, Python's larger blocks; not Python's small
objects, which live in pymalloc's mmapped arenas) and resident memory; with ``--census`` the objects the
collector tracks, by type (count and ``sys.getsizeof``); with ``--trace N`` Python's allocations
(``tracemalloc``, N frames) grouped by line.  The heap less the traced part is, near enough, OpenSSL's
state (with ``--trace`` the heap also holds tracemalloc's own records: read the heap without it).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import uvloop

from azure_iot_emulator.app import Emulator
from azure_iot_emulator.config import EmulatorConfig
from azure_iot_emulator.hub.registry import DeviceSpec, HubRegistry
from azure_iot_emulator.store import Database

HERE = Path(__file__).resolve().parent
for folder in (HERE.parent, HERE.parents[1] / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from conftest import free_loopback_address  # noqa: E402 - needs the tests folder on the path
from support.emulator import free_port  # noqa: E402

from hub import fleet, loadgen  # noqa: E402 - needs the bench folder on the path
from hub.servers import device_identity  # noqa: E402

PREFIX = "mem-"


def heap_in_use() -> int:
    """glibc's heap in use, mmapped blocks included."""
    info = fleet.mallinfo()
    return int(info.uordblks) + int(info.hblkhd)


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def census() -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Objects the collector tracks: count and bytes (``sys.getsizeof``) by type."""
    counts: collections.Counter[str] = collections.Counter()
    sizes: collections.Counter[str] = collections.Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        name = f"{kind.__module__}.{kind.__qualname__}" if isinstance(kind.__module__, str) else repr(kind)
        counts[name] += 1
        sizes[name] += sys.getsizeof(obj)
    return counts, sizes


async def measure(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="connection-memory-"))
    device = device_identity(work)
    hub, dps = free_loopback_address(), free_loopback_address()
    data = work / "data"
    data.mkdir()
    db = Database(data / "emulator.db")
    try:
        registry = HubRegistry(db, [hub], lambda: datetime.now(UTC))
        with db.transaction():
            for g in range(args.devices):
                spec = DeviceSpec(device_id=f"{PREFIX}{g:05d}", primary_thumbprint=device.sha1)
                registry.create_device(hub, spec)
    finally:
        db.close()
    config = EmulatorConfig(data_dir=data, dps_host=dps, hub_hosts=(hub,), https_port=free_port(hub))
    emulator = Emulator(config)
    await emulator.start()
    assert emulator.pki is not None
    loop = asyncio.get_running_loop()
    generator = subprocess.Popen(
        loadgen.command(
            "scale", host=hub, hub=hub, ca=str(emulator.pki.ca_path), cert=str(device.cert_path),
            key=str(device.key_path), prefix=PREFIX, total=args.devices, period=5.0, seconds=1, grace=1,
        ),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert generator.stdin is not None and generator.stdout is not None
    try:
        if args.trace:
            tracemalloc.start(args.trace)
        gc.collect()
        objects_before = census() if args.census else None
        heap_before, rss_before = heap_in_use(), rss_kib()
        traced_before = tracemalloc.take_snapshot() if args.trace else None
        head = json.loads(await loop.run_in_executor(None, generator.stdout.readline))
        await asyncio.sleep(1.0)
        gc.collect()
        heap_after, rss_after = heap_in_use(), rss_kib()
        n = head["connected"]
        if n == 0:
            raise RuntimeError(f"no device connected: {head['failures']}")
        print(f"{n} devices connected ({head['failed']} failed); per connected device:")
        heap_kib, rss = (heap_after - heap_before) / n / 1024, (rss_after - rss_before) / n
        print(f"  heap in use {heap_kib:.2f} KiB, resident {rss:.2f} KiB")
        if objects_before is not None:
            counts, sizes = census()
            print("  objects the collector tracks (count, bytes by sys.getsizeof):")
            rows = sorted(sizes, key=lambda k: objects_before[1][k] - sizes[k])
            total = 0
            for name in rows[:25]:
                grown = sizes[name] - objects_before[1][name]
                if grown <= 0:
                    break
                total += grown
                print(f"    {(counts[name] - objects_before[0][name]) / n:5.2f} {grown / n:7.1f} B  {name}")
            print(f"    total {total / n:.0f} B")
        if traced_before is not None:
            skip = [tracemalloc.Filter(False, tracemalloc.__file__)]
            after = tracemalloc.take_snapshot().filter_traces(skip)
            stats = after.compare_to(traced_before.filter_traces(skip), "lineno")
            traced = sum(s.size_diff for s in stats) / n / 1024
            print(f"  Python's allocations (tracemalloc): {traced:.2f} KiB, by line:")
            for stat in stats[: args.top]:
                if stat.size_diff / n < 16:
                    break
                each, blocks = stat.size_diff / n, stat.count_diff / n
                print(f"    {each:7.1f} B {blocks:5.2f} blocks  {stat.traceback[0]}")
    finally:
        generator.stdin.write(f"go {time.time()}\n")  # the generator's window (1 s), then its close
        generator.stdin.flush()
        await loop.run_in_executor(None, generator.stdout.readline)
        generator.stdin.write("close\n")
        generator.stdin.flush()
        generator.wait(60)
        await emulator.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--trace", type=int, default=0, help="tracemalloc with this many frames")
    parser.add_argument("--census", action="store_true")
    parser.add_argument("--top", type=int, default=30)
    loadgen.raise_nofile()
    uvloop.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
