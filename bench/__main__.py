"""Benchmark runner: ``python -m bench [NAME ...]`` (``make bench`` runs them all).

Each ``bench/bench_<name>.py`` exposes ``TITLE`` and ``async def run() -> str`` (a markdown section body);
``RUN`` (optional, default ``asyncio.run``) is what runs it: a section whose servers run in this process
names the event loop their service runs on in production.  ``SEPARATE = True`` keeps a long benchmark
out of the default set: it runs only when named (its own make target).
The runner rewrites BENCHMARKS.md: a header describing this machine, then one section per benchmark between
``<!-- bench:<name>:start -->`` and ``<!-- bench:<name>:end -->``.  Sections of benchmarks not run this
time are kept as they were (each says when it was measured).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import platform
import re
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
OUTPUT = HERE.parent / "BENCHMARKS.md"
SECTION = re.compile(
    r"<!-- bench:(?P<name>[\w-]+):start -->\n(?P<body>.*?)<!-- bench:(?P=name):end -->", re.S
)


def available() -> dict[str, Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}


def load(name: str, path: Path) -> ModuleType:
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    if spec is None or spec.loader is None:
        raise ImportError(path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _first(path: str, prefix: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine() -> str:
    mem = _first("/proc/meminfo", "MemTotal")
    mem_text = f"{int(mem.split()[0]) / 1024 / 1024:.1f} GiB" if mem != "unknown" else mem
    cpu = _first("/proc/cpuinfo", "model name")
    if cpu == "unknown":
        cpu = platform.processor() or platform.machine()
    from host import cores  # bench/ is on the path (load)

    available_cores = cores()
    return "\n".join(
        [
            f"- CPU: {cpu}",
            f"- Cores available: {available_cores}",
            f"- Memory: {mem_text}",
            f"- Python: {platform.python_implementation()} {platform.python_version()}",
            f"- OS: {platform.platform()}",
            f"- Date of this run: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        ]
    )


def render(sections: dict[str, str]) -> str:
    parts = [
        "# Benchmarks",
        "",
        "Produced by `make bench` (`python -m bench [name ...]` runs some). Numbers depend on the machine;",
        "each section says when it was measured. Machine of the latest run:",
        "",
        machine(),
        "",
    ]
    for name in sorted(sections):
        parts += [
            f"<!-- bench:{name}:start -->",
            sections[name].rstrip("\n"),
            f"<!-- bench:{name}:end -->",
            "",
        ]
    return "\n".join(parts)


def _separate(path: Path) -> bool:
    """Whether the benchmark says ``SEPARATE = True`` (read from its source: loading it costs imports)."""
    return re.search(r"^SEPARATE = True", path.read_text(), re.M) is not None


def main(argv: list[str] | None = None) -> int:
    benches = available()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all): {', '.join(benches)}")
    args = parser.parse_args(argv)
    wanted = [n.removeprefix("bench_") for n in args.names] or [
        n for n in benches if not _separate(benches[n])
    ]
    unknown = [n for n in wanted if n not in benches]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(benches)}")
    existing = OUTPUT.read_text() if OUTPUT.exists() else ""
    sections = {m["name"]: m["body"] for m in SECTION.finditer(existing)}
    failed = 0
    for name in wanted:
        started = time.monotonic()
        print(f"== bench {name}", file=sys.stderr, flush=True)
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        try:
            module = load(name, benches[name])
            body = getattr(module, "RUN", asyncio.run)(module.run())
            title = getattr(module, "TITLE", name)
            sections[name] = f"## {title}\n\n_Measured {stamp}._\n\n{body.strip()}\n"
        except Exception:
            failed += 1
            traceback.print_exc()
            sections[name] = (
                f"## {name}\n\n_Run {stamp} FAILED:_\n\n```\n{traceback.format_exc(limit=5)}```\n"
            )
        print(f"== bench {name}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        OUTPUT.write_text(render(sections))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
