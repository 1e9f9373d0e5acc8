"""IoT Hub emulator: instructions per telemetry message, counted by valgrind's callgrind (repeatable on a
busy machine, where CPU seconds move by +-15 % between runs).

The emulator runs as ``iot-emulator serve`` under ``valgrind --tool=callgrind`` with counting off; a load
generator of its own process (``hub/loadgen.py count``) connects ``devices`` devices (TLS, client
certificate), then the counters are zeroed and switched on (``callgrind_control``) for three windows,
each dumped on its own:

- idle: ``idle_seconds`` with the devices connected and silent: instructions per second of the steady
  state (timers, tickers, the collector);
- single: ``single_messages`` QoS 1 PUBLISHes one at a time (the next once the PUBACK is in), so each is
  a group commit of its own: the same count every run, the figure to compare two versions by;
- messages: ``messages`` QoS 1 PUBLISHes, in rounds of ``round_size`` devices one message each (the round
  back to back, the next once its PUBACKs are in: about the 10,000-device run's shape, one message per
  connection per read, a few connections per group commit; how they fall into commits varies a little
  between runs, hence the commits per message beside it).

Instructions per message = (window - idle rate x its length) / messages.  The per-part rows are
callgrind's inclusive counts of C functions at the edges (TLS in and out, SQLite's statements) and how
often the system calls ran (read, write, the WAL's pwrite, each commit's fdatasync: their kernel side is
not counted), per message; Python's own functions show as the interpreter's frames, so pair a change
with ``--profile FILE`` (cProfile, the same workload) for names.  The dumps are kept when ``--keep DIR``
is given (``callgrind_annotate DIR/callgrind.out.*``).

    python bench/bench_hub_instructions.py [--messages 20000] [--devices 100] [--pause-log] [--keep DIR]
    python -m bench hub_instructions      (rewrites its section of BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hub import measure, servers

SEPARATE = True  # minutes under valgrind: run when named
TITLE = "IoT Hub emulator: instructions per telemetry message (callgrind)"

# C functions whose inclusive count is a part of the path (callgrind's name: what it is); the system
# calls' own cost is the kernel's, which callgrind does not see: they are counted, not weighed.
PARTS = {
    "SSL_read_ex": "TLS in (SSL_read)",
    "SSL_write_ex": "TLS out (SSL_write)",
    "_pysqlite_query_execute": "SQLite statements (execute, executemany)",
    "fdatasync": "commits (fdatasync)",
    "read": "read() system calls",
    "write": "write() system calls",
    "pwrite": "pwrite() system calls (SQLite's WAL)",
}
COMMIT = "fdatasync"
SQLITE = "_pysqlite_query_execute"


@dataclass(frozen=True)
class Options:
    devices: int = 100
    round_size: int = 8
    messages: int = 20_000
    single_messages: int = 2_000  # first, one at a time: each its own commit, the same count every run
    idle_seconds: float = 20.0
    pause_log: bool = False
    keep: Path | None = None
    profile: Path | None = None  # instead of callgrind: cProfile's statistics of the whole run, here


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=600)


def _dump_file(directory: Path, label: str) -> Path:
    """The dump whose description is ``label`` (callgrind numbers them in order)."""
    for path in sorted(directory.glob("callgrind.out.*")):
        with path.open(errors="replace") as f:
            head = f.read(4096)
        if re.search(rf"^desc: Trigger: .*\b{re.escape(label)}$", head, re.M):
            return path
    raise RuntimeError(f"no callgrind dump labelled {label} in {directory}")


def read_dump(path: Path) -> tuple[int, dict[str, int], dict[str, int]]:
    """Total instructions of a dump, the inclusive instructions of each function in :data:`PARTS`, and how
    often each was called (summed over its callers; self-recursion counted once per outer call)."""
    text = path.read_text(errors="replace")
    total_match = re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M)
    total = int(total_match.group(1)) if total_match else 0
    names: dict[str, str] = {}
    inclusive: dict[str, int] = defaultdict(int)
    calls: dict[str, int] = defaultdict(int)
    fn = ""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(("fn=", "cfn=")):
            key, _, rest = line.partition("=")
            m = re.match(r"\((\d+)\)(?: (.*))?", rest)
            name = rest
            if m:
                if m.group(2):
                    names[m.group(1)] = m.group(2)
                name = names.get(m.group(1), rest)
            if key == "fn":
                fn = name
            else:
                counted = name in PARTS and name != fn and i + 2 < len(lines)
                if counted and lines[i + 1].startswith("calls="):
                    calls[name] += int(lines[i + 1].split()[0].removeprefix("calls="))
                    cost = lines[i + 2].split()
                    if len(cost) >= 2:
                        inclusive[name] += int(cost[1])
    return total, dict(inclusive), dict(calls)


def count(options: Options) -> dict[str, Any]:
    os.environ.setdefault("PYTHONHASHSEED", "0")  # the same dict layouts run to run
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise RuntimeError("valgrind (with callgrind_control) is not installed")
    with tempfile.TemporaryDirectory(prefix="bench-hub-instr-") as tmp:
        directory = Path(tmp)
        dumps = directory / "callgrind"
        dumps.mkdir()
        device = servers.device_identity(directory / "device")
        ids = [f"instr-{i:05d}" for i in range(options.devices)]
        wrapper = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-instr=no",
            f"--callgrind-out-file={dumps}/callgrind.out", "--vgdb=yes", sys.executable,
        ]  # fmt: skip
        if options.profile is not None:  # names for the counts: the same workload under cProfile
            wrapper = [sys.executable, "-m", "cProfile", "-o", str(options.profile)]
        pause_log = directory / "pauses.jsonl" if options.pause_log else None
        emulator, target = servers.start_emulator(
            directory, device, ids, pause_log=pause_log, wrapper=wrapper, start_timeout=600
        )
        try:
            assert emulator.proc is not None
            pid = emulator.proc.pid
            generator = measure._generator(
                target, "count", prefix="instr-", devices=options.devices, window=options.round_size
            )
            assert generator.stdin is not None

            def line() -> dict[str, Any]:
                return measure._read_json_line(generator)

            def control(*args: str) -> None:
                if options.profile is None:  # (cProfile: the whole run, no windows)
                    _control(pid, *args)

            line()  # connected
            time.sleep(2.0)  # the connects' aftermath (the settle freeze, the first sweeps)

            control("--instr=on")
            control("--zero")
            time.sleep(options.idle_seconds)
            control("--dump=idle")
            control("--instr=off")

            def window(label: str, messages: int, round_size: int) -> dict[str, Any]:
                assert generator.stdin is not None
                control("--instr=on")
                control("--zero")
                generator.stdin.write(f"send {messages} {round_size}\n")
                generator.stdin.flush()
                sent = line()
                control(f"--dump={label}")
                control("--instr=off")
                return sent

            single = window("single", options.single_messages, 1)
            sent = window("messages", options.messages, options.round_size)
            generator.stdin.write("quit\n")
            generator.stdin.flush()
            generator.wait(60)
        finally:
            emulator.stop(timeout=120)
        if options.profile is not None:
            return {"profile": str(options.profile), "messages": sent["acked"], "seconds": sent["seconds"]}
        if options.keep is not None:
            options.keep.mkdir(parents=True, exist_ok=True)
            for path in dumps.glob("callgrind.out*"):
                shutil.copy(path, options.keep / path.name)
        idle_total, _, _ = read_dump(_dump_file(dumps, "idle"))
        total, parts, calls = read_dump(_dump_file(dumps, "messages"))
        single_total, single_parts, _ = read_dump(_dump_file(dumps, "single"))
    idle_rate = idle_total / options.idle_seconds
    messages = int(sent["acked"])
    per_message = (total - idle_rate * float(sent["seconds"])) / messages
    single_messages = int(single["acked"])
    return {
        "single_messages": single_messages,
        "single_per_message": (single_total - idle_rate * float(single["seconds"])) / single_messages,
        "single_sqlite": single_parts.get(SQLITE, 0) / single_messages,
        "devices": options.devices,
        "round_size": options.round_size,
        "messages": messages,
        "pause_log": options.pause_log,
        "seconds": sent["seconds"],
        "idle_per_second": idle_rate,
        "total": total,
        "per_message": per_message,
        "parts": {name: parts.get(name, 0) / messages for name in PARTS},
        "calls": {name: calls.get(name, 0) / messages for name in PARTS},
    }


def render(result: dict[str, Any]) -> str:
    parts, calls = result["parts"], result["calls"]
    commits = calls[COMMIT]
    rows = [
        f"| {PARTS[name]} | {parts[name]:,.0f} | {calls[name]:.3f} |" for name in PARTS if calls[name]
    ]
    sqlite_per_commit = parts[SQLITE] / commits if commits else 0.0
    return "\n".join(
        [
            f"{result['messages']:,} messages from {result['devices']} connected devices in rounds of "
            f"{result['round_size']} (one message per device per round), the emulator under callgrind"
            + (" with its pause log on" if result["pause_log"] else "")
            + f" ({result['seconds']:.0f} s there).",
            "",
            f"- **Instructions per message: {result['per_message']:,.0f}** (the window's "
            f"{result['total']:,} less the idle rate over its length), of which SQLite "
            f"{parts[SQLITE]:,.0f} and the rest {result['per_message'] - parts[SQLITE]:,.0f}",
            f"- Group commits per message: {commits:.3f} (how arrivals fall into commits varies between "
            f"runs: compare SQLite per commit, {sqlite_per_commit:,.0f}, and the rest per message)",
            f"- One message at a time ({result['single_messages']:,} messages, each its own group commit: "
            f"the figure to compare between versions, it does not depend on timing): "
            f"**{result['single_per_message']:,.0f}** per message, of which SQLite "
            f"{result['single_sqlite']:,.0f}",
            f"- Idle with {result['devices']} devices connected: {result['idle_per_second']:,.0f} "
            "instructions per second",
            "",
            "| part (inclusive, per message) | instructions | calls per message |",
            "|---|---:|---:|",
            *rows,
        ]
    )


def _run_sync(options: Options = Options()) -> str:
    return render(count(options))


async def run() -> str:
    import asyncio

    return await asyncio.to_thread(_run_sync)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=Options.messages)
    parser.add_argument("--single-messages", type=int, default=Options.single_messages)
    parser.add_argument("--devices", type=int, default=Options.devices)
    parser.add_argument("--round-size", type=int, default=Options.round_size)
    parser.add_argument("--idle-seconds", type=float, default=Options.idle_seconds)
    parser.add_argument("--pause-log", action="store_true", help="the emulator with --pause-log")
    parser.add_argument("--keep", type=Path, help="copy the callgrind dumps here")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--profile", type=Path, help="cProfile instead: statistics file")
    args = parser.parse_args(argv)
    options = Options(
        devices=args.devices, round_size=args.round_size, messages=args.messages,
        single_messages=args.single_messages, idle_seconds=args.idle_seconds, pause_log=args.pause_log,
        keep=args.keep, profile=args.profile,
    )  # fmt: skip
    result = count(options)
    print(json.dumps(result, indent=1) if args.json or args.profile else render(result))


if __name__ == "__main__":
    main()
