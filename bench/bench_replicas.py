"""MintCertificate throughput of factory_svc on SQLite (one process) beside PostgreSQL with one and with two
replicas, in one run, with the CPU per certificate of each process.

Each configuration runs the real ``factory-svc serve`` processes (insecure loopback, development CA shared
by the replicas through one data directory) and one load client process per replica (bench_mint's client:
prebuilt P-256 CSRs, calls in flight over several channels, request ids on, so every certificate is a
ledger row and a request-id row).  PostgreSQL is a throwaway local cluster (``devprov_demo.pgcluster``,
Debian's server, fsync off: this measures the services, not the disk).  CPU per certificate: user +
system time of each process (``/proc/<pid>/stat``; PostgreSQL: its postmaster and backends) over the
measured run, divided by the certificates of that run.

Run alone: `python bench/bench_replicas.py` (or `python -m bench replicas`).  About 60 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TITLE = "Factory: MintCertificate on SQLite vs PostgreSQL with 1 and 2 replicas"

ROOT = Path(__file__).resolve().parent.parent
SECONDS = 6.0
WARMUP = 1.5
IN_FLIGHT = 32  # per replica
CHANNELS = 4
IDENTITY = "urn:devprov:factory:bench"
TICKS = os.sysconf("SC_CLK_TCK")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "generated"), str(ROOT / "src")])}


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def _cluster_cpu(data_dir: Path | None) -> float:
    """CPU seconds of a PostgreSQL cluster so far: its postmaster and the processes it runs now (the
    pooled connections' backends live through a whole run)."""
    if data_dir is None:
        return 0.0
    postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    total = 0.0
    for pid in [postmaster, *map(int, children)]:
        try:
            total += _cpu(pid)
        except OSError:  # ended meanwhile
            continue
    return total


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"factory-svc exited with {proc.returncode}")
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError("factory-svc did not listen")


def _client_command(port: int) -> list[str]:
    return [
        sys.executable, str(ROOT / "bench" / "bench_mint.py"), "--client", "--target", f"127.0.0.1:{port}",
        "--seconds", str(SECONDS), "--warmup", str(WARMUP), "--channels", str(CHANNELS),
        "--in-flight", str(IN_FLIGHT), "--request-ids",
    ]  # fmt: skip


async def _configuration(
    data: Path, database_url: str, replicas: int, cluster_dir: Path | None = None
) -> dict[str, object]:
    env = {
        **_env(),
        "FACTORY_DATA_DIR": str(data),
        "FACTORY_SERVER_INSECURE": "true",
        "FACTORY_SERVER_INSECURE_IDENTITY": IDENTITY,
        "FACTORY_ENROLL_ENABLED": "false",
        "FACTORY_DEVICE_IDS": "registration-id",  # the load client names its devices bench-00001 ...
        "FACTORY_LOG_LEVEL": "WARNING",
    }
    if database_url:
        env["FACTORY_DATABASE_URL"] = database_url
        migrate = [sys.executable, "-m", "factory_svc", "migrate"]
        subprocess.run(migrate, env=env, check=True, capture_output=True)
    servers: list[tuple[subprocess.Popen[bytes], int]] = []
    try:
        for _ in range(replicas):  # one after the other: the first makes the development CA
            port = _free_port()
            proc = subprocess.Popen(
                [sys.executable, "-m", "factory_svc", "serve"],
                env={**env, "FACTORY_SERVER_PORT": str(port)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            servers.append((proc, port))
            await _wait_listening(port, proc)
        clients = [
            await asyncio.create_subprocess_exec(
                *_client_command(port), stdout=asyncio.subprocess.PIPE, env=_env()
            )
            for _proc, port in servers
        ]
        before = [_cpu(proc.pid) for proc, _port in servers]
        database_before = _cluster_cpu(cluster_dir)
        outputs = await asyncio.gather(*(c.communicate() for c in clients))
        server_cpu = [_cpu(proc.pid) - cpu for (proc, _port), cpu in zip(servers, before, strict=True)]
        database_cpu = _cluster_cpu(cluster_dir) - database_before
    finally:
        for proc, _port in servers:
            proc.terminate()
            proc.wait(30)
    results = [json.loads(out.decode().strip().splitlines()[-1]) for out, _err in outputs]
    total = sum(r["all"] for r in results)
    return {
        "rate": sum(r["rate"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "server_cpu_ms": [cpu / max(1, r["all"]) * 1000 for cpu, r in zip(server_cpu, results, strict=True)],
        "client_cpu_ms": sum(r["client_cpu_ms"] * r["all"] for r in results) / max(1, total),
        "database_cpu_ms": database_cpu / max(1, total) * 1000,
    }


async def run() -> str:
    from devprov_demo import pgcluster

    why = pgcluster.unavailable()
    if why is not None:
        return f"Not measured: {why}."
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    rows: list[tuple[str, dict[str, object]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp, pgcluster.running_cluster() as cluster:
        rows.append(("SQLite, 1 process", await _configuration(Path(tmp) / "sqlite", "", 1)))
        for replicas in (1, 2):
            url = cluster.create_database(f"bench_{replicas}")
            label = f"PostgreSQL, {replicas} replica{'s' if replicas > 1 else ''}"
            result = await _configuration(Path(tmp) / f"pg{replicas}", url, replicas, cluster.directory)
            rows.append((label, result))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    out = [
        f"Real `factory-svc serve` processes; one load client process per replica ({IN_FLIGHT} calls in "
        f"flight over {CHANNELS} channels, P-256 CSRs, request ids on); {SECONDS:.0f} s measured after "
        f"{WARMUP:.1f} s warm-up. PostgreSQL: a local throwaway cluster (Debian's server, fsync off).",
        "",
        "| configuration | certificates/s | server CPU ms/cert (per replica) | PostgreSQL CPU ms/cert "
        "| client CPU ms/cert | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows:
        server = " / ".join(f"{ms:.2f}" for ms in r["server_cpu_ms"])  # type: ignore[attr-defined]
        database = f"{r['database_cpu_ms']:.2f}" if label.startswith("PostgreSQL") else "-"
        out.append(
            f"| {label} | {r['rate']:,.0f} | {server} | {database} "
            f"| {r['client_cpu_ms']:.2f} | {r['errors']} |"
        )
    out += [
        "",
        f"Machine: {cores} CPUs shared by every process above (servers, clients, PostgreSQL); 1-minute load "
        f"average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after. Bench run time "
        f"{time.monotonic() - started:.0f} s. With all processes on the same CPUs a second replica adds "
        "throughput only where CPUs are idle; on separate machines each replica brings its own. On SQLite "
        "the ledger groups concurrent records into one transaction (one commit for many certificates); on "
        "PostgreSQL each certificate is its own transaction (the database's primary keys decide between "
        "replicas), which is most of the extra server CPU per certificate. Enroll is not measured here "
        "(it needs DPS: see the enroll benchmark for SQLite).",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    print(asyncio.run(run()))
