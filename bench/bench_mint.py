"""MintCertificate benchmark: CSR mode, ECDSA P-256, concurrent clients over gRPC on loopback, side by side
with the raw in-process cryptography rate for the same work.

Raw: one Python thread runs the service's own certificate functions (``check_csr``: parse, key check,
signature verify, CN check; ``leaf_builder`` + the issuing CA's signature; PEM and both thumbprints) — no
service around them, no ledger.  gRPC: the factory server (insecure loopback, development CA, SQLite ledger
committed before every answer) runs in this process; the clients run in a separate process (so they do not
share the server's interpreter), with a fixed number of calls in flight, prebuilt CSRs.  Rates are
certificates per second.  Goal: gRPC >= 50 % of raw.

Besides the rates it reports CPU time per certificate (``resource.getrusage``): the raw loop's, the server
process's (all its threads, over the whole client run) and the load client's; and two reference servers on
the same stack: one whose handler does only the raw work (no ledger, no idempotency, no service layer) and
one whose handler does nothing (the gRPC plumbing alone).  Goal: MintCertificate's server CPU per
certificate at most 3x the raw loop's.  The servers here run on the event loop ``factory-svc serve`` runs
on (uvloop, ``provkit.grpc_server.run_service``); the load clients on asyncio's own.

Lots part: a production lot of ``LOT_SIZE`` prebuilt CSRs streamed through MintCertificates (one stream,
chunks committed before they are answered) from the same kind of separate client process, against the
same raw rate; then the same lot with the issuing key in SoftHSM2 (the ``pkcs11`` backend), beside the raw
rate with that signer.  Goal: the file-signer lot >= 50 % of raw.  The SoftHSM2 rows say why they are
missing when SoftHSM2 is not installed (``make softhsm``).

Run alone: `python bench/bench_mint.py` (or through `make bench`).  Bounded to about 90 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import host  # isort: skip - bench/'s own (on the path: the runner puts it there)

TITLE = "Factory: MintCertificate (CSR, P-256) over gRPC vs raw in-process signing"

CSR_POOL = 256
RAW_SECONDS = 2.5
GRPC_SECONDS = 4.0
WARMUP_SECONDS = 1.0
CHANNELS = 4
IN_FLIGHT = 32
LOT_SIZE = 10_000
BENCH_IDENTITY = "urn:devprov:factory:bench"  # who the insecure benchmark server takes its callers for
ROOT = Path(__file__).resolve().parent.parent
CPU_GOAL = 3.0  # MintCertificate server CPU per certificate, in multiples of the raw work's


def RUN(main: Any) -> Any:  # the bench runner's hook (bench/__main__.py)
    """Run the section on the factory service's production event loop."""
    from provkit.grpc_server import run_service

    return run_service(main)


def _csr_pool(count: int) -> list[tuple[str, str]]:
    """(device id, CSR PEM) pairs; the ids are fresh GUIDs, as the factory's default id policy wants."""
    import uuid

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    pool = []
    for _ in range(count):
        device_id = str(uuid.uuid4())
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .sign(key, hashes.SHA256())
        )
        pool.append((device_id, csr.public_bytes(serialization.Encoding.PEM).decode()))
    return pool


# ---------------------------------------------------------------------------------------------- raw rate
def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _raw_worker(ca_dir: Path | Any) -> Callable[[str, bytes], tuple[str, str, str, str]]:
    """The certificate work of one MintCertificate (CSR mode), with the service's own functions; the
    development CA in ``ca_dir``, or an opened issuing CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from factory_svc.ca.issuing import open_dev_ca
    from factory_svc.mint.csr import check_csr
    from factory_svc.mint.service import BACKDATE, MintPolicy, leaf_builder, thumbprints
    from provkit.clock import now_utc

    ca = open_dev_ca(ca_dir, now_utc) if isinstance(ca_dir, Path) else ca_dir
    ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    sign = ca.sign_now
    validity = MintPolicy().default_validity

    def issue(device_id: str, pem: bytes) -> tuple[str, str, str, str]:
        checked = check_csr(pem, device_id)
        now = now_utc()
        leaf = sign(leaf_builder(device_id, checked.public_key, now - BACKDATE, now + validity, aki))
        sha1, sha256 = thumbprints(leaf)
        return f"{leaf.serial_number:X}", leaf.public_bytes(serialization.Encoding.PEM).decode(), sha1, sha256

    return issue


def _raw_rate(ca_dir: Path | Any, pool: list[tuple[str, str]], seconds: float) -> dict:
    issue = _raw_worker(ca_dir)
    encoded = [(device_id, pem.encode()) for device_id, pem in pool]
    done, cpu, started = 0, _cpu_seconds(), time.perf_counter()
    while time.perf_counter() - started < seconds:
        device_id, pem = encoded[done % len(encoded)]
        issue(device_id, pem)
        done += 1
    elapsed, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    return {"rate": done / elapsed, "cpu_ms": cpu / done * 1000}


# -------------------------------------------------------------------------------------------- load client
async def _client(args: argparse.Namespace) -> None:
    from devprov.v1 import factory_service_pb2 as pb
    from devprov.v1 import factory_service_pb2_grpc as pb_grpc
    from provkit.channels import ChannelSecurity, create_channel

    pool = _csr_pool(args.pool)
    channels = [create_channel(args.target, ChannelSecurity(insecure=True)) for _ in range(args.channels)]
    stubs = [pb_grpc.FactoryServiceStub(c) for c in channels]
    counter = {"done": 0, "errors": 0, "seq": 0, "all": 0}
    measuring = {"on": False}
    stop_at = time.perf_counter() + args.warmup + args.seconds

    async def worker(index: int) -> None:
        stub = stubs[index % len(stubs)]
        while time.perf_counter() < stop_at:
            counter["seq"] += 1
            device_id, csr = pool[counter["seq"] % len(pool)]
            request = pb.MintCertificateRequest(device_id=device_id, csr_pem=csr)
            if args.request_ids:
                request.request_id = f"bench-{os.getpid()}-{counter['seq']}"
            try:
                await stub.MintCertificate(request, timeout=30)
            except Exception:
                counter["errors"] += 1
                continue
            counter["all"] += 1
            if measuring["on"]:
                counter["done"] += 1

    cpu = _cpu_seconds()
    tasks = [asyncio.create_task(worker(i)) for i in range(args.in_flight)]
    await asyncio.sleep(args.warmup)
    measuring["on"], started = True, time.perf_counter()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    cpu = _cpu_seconds() - cpu
    for channel in channels:
        await channel.close()
    result = {k: counter[k] for k in ("done", "errors", "all")}
    print(
        json.dumps(
            {
                "rate": counter["done"] / elapsed,
                "client_cpu_ms": cpu / max(1, counter["all"]) * 1000,
                **result,
            }
        )
    )


async def _lot_client(args: argparse.Namespace) -> None:
    """One production lot of ``args.lot`` CSRs (built before the clock starts) through MintCertificates."""
    from devprov.v1 import factory_service_pb2 as pb
    from devprov.v1 import factory_service_pb2_grpc as pb_grpc
    from provkit.channels import ChannelSecurity, create_channel

    lot_id = f"bench-lot-{os.getpid()}-{time.time_ns()}"
    pool = _csr_pool(args.lot)
    header = pb.LotHeader(lot_id=lot_id, key_source=pb.KEY_SOURCE_CSR, item_count=len(pool))
    items = [pb.LotItem(index=i, device_id=device_id, csr_pem=csr) for i, (device_id, csr) in enumerate(pool)]
    messages = [pb.MintCertificatesRequest(header=header)] + [
        pb.MintCertificatesRequest(items=pb.LotItems(items=items[start : start + 64]))
        for start in range(0, len(items), 64)
    ]  # as `factory-svc lot` sends them: the device id (it read the CSR) and 64 items a message
    summary_seen = asyncio.Event()

    async def requests() -> AsyncIterator[object]:
        for message in messages:
            yield message
        await summary_seen.wait()
        yield pb.MintCertificatesRequest(ack=pb.LotAck())

    done = failed = 0
    async with create_channel(args.target, ChannelSecurity(insecure=True)) as channel:
        stub = pb_grpc.FactoryServiceStub(channel)
        cpu, started = _cpu_seconds(), time.perf_counter()
        async for response in stub.MintCertificates(requests(), timeout=600):
            if response.WhichOneof("part") == "summary":
                summary_seen.set()
            else:
                for result in response.results.results:
                    failed += result.HasField("error")
                    done += not result.HasField("error")
        elapsed, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    rate, client_cpu_ms = done / elapsed, cpu / max(1, done) * 1000
    result = {"rate": rate, "client_cpu_ms": client_cpu_ms, "done": done, "errors": failed, "all": done}
    print(json.dumps(result))


async def _reference_rate(ca_dir: Path | None) -> dict:
    """A server on the same stack whose MintCertificate does only the raw work (``ca_dir`` given) and
    answers with its result, or does nothing at all (``ca_dir`` None: the gRPC plumbing alone)."""
    from devprov.v1 import factory_service_pb2 as pb
    from devprov.v1 import factory_service_pb2_grpc as pb_grpc
    from provkit.grpc_server import ServerSettings, binding, start_server

    issue = _raw_worker(ca_dir) if ca_dir is not None else None

    class Reference(pb_grpc.FactoryServiceServicer):
        async def MintCertificate(self, request: object, context: object) -> object:
            if issue is None:
                return pb.MintCertificateResponse()
            serial, pem, sha1, sha256 = issue(request.device_id, request.csr_pem.encode())  # type: ignore[attr-defined]
            return pb.MintCertificateResponse(
                certificate=pb.IssuedCertificate(
                    serial_number=serial, certificate_pem=pem, sha1_thumbprint=sha1, sha256_thumbprint=sha256
                )
            )

    service = binding(
        Reference(),
        pb_grpc.add_FactoryServiceServicer_to_server,
        pb.DESCRIPTOR.services_by_name["FactoryService"],
    )
    server = await start_server(ServerSettings(insecure=True, insecure_identity=BENCH_IDENTITY), [service])
    try:
        return await _grpc_rate(f"127.0.0.1:{server.port}", request_ids=False)
    finally:
        await server.stop(0)


async def _grpc_rate(target: str, request_ids: bool, lot: int = 0) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "generated"), str(ROOT / "src")])}
    command = [
        sys.executable, __file__, "--client", "--target", target, "--seconds", str(GRPC_SECONDS),
        "--warmup", str(WARMUP_SECONDS), "--channels", str(CHANNELS), "--in-flight", str(IN_FLIGHT),
        "--pool", str(CSR_POOL),
    ]  # fmt: skip
    if request_ids:
        command.append("--request-ids")
    if lot:
        command += ["--lot", str(lot)]
    cpu = _cpu_seconds()
    proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE, env=env)
    out, _ = await asyncio.wait_for(proc.communicate(), 600)
    cpu = _cpu_seconds() - cpu  # this process = the server, all threads, over the client's whole run
    if proc.returncode != 0:
        raise RuntimeError(f"load client failed ({proc.returncode})")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["server_cpu_ms"] = cpu / max(1, result["all"]) * 1000
    return result


def _mean(runs: list[dict]) -> dict:
    """Rates averaged over the runs; CPU per certificate over all their certificates."""
    total = sum(r["all"] for r in runs)
    return {
        "rate": sum(r["rate"] for r in runs) / len(runs),
        "rates": [r["rate"] for r in runs],
        "errors": sum(r["errors"] for r in runs),
        "all": total,
        "server_cpu_ms": sum(r["server_cpu_ms"] * r["all"] for r in runs) / max(1, total),
        "client_cpu_ms": sum(r["client_cpu_ms"] * r["all"] for r in runs) / max(1, total),
    }


async def run() -> str:
    from factory_svc.app import FactoryApp
    from factory_svc.errors import ERROR_DOMAIN
    from factory_svc.mint.service import MintPolicy
    from factory_svc.settings import CaSettings, FactorySettings
    from provkit.grpc_server import ServerSettings

    started = time.monotonic()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-mint-") as tmp:
        data = Path(tmp)
        server_settings = ServerSettings(
            insecure=True, error_domain=ERROR_DOMAIN, insecure_identity=BENCH_IDENTITY
        )
        settings = FactorySettings(server_settings, data, CaSettings(), MintPolicy())
        app = await FactoryApp.open(settings)
        pool = _csr_pool(CSR_POOL)
        raw_before = _raw_rate(data / "ca", pool, RAW_SECONDS)
        server = await app.start()
        try:
            runs: dict[bool, list[dict]] = {False: [], True: []}
            for request_ids in (False, True, True, False):  # A B B A: neither row gains from going second
                runs[request_ids].append(await _grpc_rate(f"127.0.0.1:{server.port}", request_ids))
            plain, with_ids = _mean(runs[False]), _mean(runs[True])
            lot_file = await _grpc_rate(f"127.0.0.1:{server.port}", False, lot=LOT_SIZE)
        finally:
            await server.stop(1)
            issued = len(await app.ledger.certificates.page(None, 10**7, None))
            await app.close()
        raw_after = _raw_rate(data / "ca", pool, RAW_SECONDS)
        raw_work_only = await _reference_rate(data / "ca")
    plumbing = await _reference_rate(None)
    with tempfile.TemporaryDirectory(prefix="bench-mint-hsm-") as tmp:
        hsm = await _softhsm_part(Path(tmp))
    raw = (raw_before["rate"] + raw_after["rate"]) / 2
    raw_cpu = (raw_before["cpu_ms"] + raw_after["cpu_ms"]) / 2
    elapsed = time.monotonic() - started
    ratio = plain["rate"] / raw
    errors = plain["errors"] + with_ids["errors"] + raw_work_only["errors"] + plumbing["errors"]
    cores = host.cores()
    rows = (
        ("gRPC MintCertificate, no request_id", plain),
        ("gRPC MintCertificate, with request_id", with_ids),
        ("reference: gRPC handler doing only the raw work (no ledger, no service layer)", raw_work_only),
        ("reference: gRPC plumbing alone (handler does no work)", plumbing),
    )
    out = [
        "CSR mode, ECDSA P-256 device keys, development issuing CA (ECDSA P-256). "
        f"{IN_FLIGHT} calls in flight over {CHANNELS} channels from a separate client process (prebuilt "
        f"CSRs); {GRPC_SECONDS:.0f} s measured after {WARMUP_SECONDS:.0f} s warm-up per run; the two "
        "MintCertificate rows are the mean of two runs each, in the order A B B A. Every MintCertificate "
        "certificate is committed to the SQLite ledger (WAL, synchronous=FULL, group commit: while calls "
        "come together a group gathers for up to 5 ms) before the answer. The raw row runs the service's "
        "own functions (CSR parse + key check + signature verify + CN check, leaf build + CA signature, "
        "PEM + SHA-1/SHA-256 thumbprints) in one thread. The gRPC servers run in the benchmark's process "
        "on uvloop, as `factory-svc serve` does.",
        "",
        "| path | certificates/s | vs raw | server CPU ms/cert | client CPU ms/cert |",
        "|---|---:|---:|---:|---:|",
        f"| raw in-process cryptography (1 thread) | {raw:,.0f} | 100 % | {raw_cpu:.2f} | |",
        f"| (raw measured before / after the gRPC runs: {raw_before['rate']:,.0f} / "
        f"{raw_after['rate']:,.0f}) | | | | |",
    ]
    for label, result in rows:
        if "rates" in result:
            label += f" (runs: {' / '.join(f'{r:,.0f}' for r in result['rates'])})"
        out.append(
            f"| {label} | {result['rate']:,.0f} | {result['rate'] / raw:.0%} "
            f"| {result['server_cpu_ms']:.2f} | {result['client_cpu_ms']:.2f} |"
        )
    per_cert = plain["server_cpu_ms"] + plain["client_cpu_ms"]
    reference = raw_work_only["rate"] / raw
    if reference < 0.5:
        verdict = (
            f"Even the reference server doing nothing but the raw work behind the same gRPC stack reaches "
            f"only {reference:.0%} of raw, so on this machine no saving inside MintCertificate can meet the "
            f"goal; MintCertificate reaches {plain['rate'] / raw_work_only['rate']:.0%} of that reference."
        )
    else:
        verdict = (
            f"The reference server that does nothing but the raw work reaches {reference:.0%} of raw; "
            f"MintCertificate reaches {plain['rate'] / raw_work_only['rate']:.0%} of that reference."
        )
    cpu_ratio = plain["server_cpu_ms"] / raw_cpu
    out += [
        "",
        f"Goal gRPC >= 50 % of raw: {'met' if ratio >= 0.5 else 'NOT met'} ({ratio:.0%}). Errors: {errors}. "
        f"Certificates in the ledger after the run: {issued:,}. Bench run time {elapsed:.0f} s.",
        "",
        f"Goal MintCertificate server CPU per certificate <= {CPU_GOAL:.0f}x the raw work: "
        f"{'met' if cpu_ratio <= CPU_GOAL else 'NOT met'} ({cpu_ratio:.1f}x without request_id, "
        f"{with_ids['server_cpu_ms'] / raw_cpu:.1f}x with one; the reference server doing only the raw work: "
        f"{raw_work_only['server_cpu_ms'] / raw_cpu:.1f}x).",
        "",
        verdict,
        "",
        "CPU time per certificate (user + system, from getrusage; the server column is the whole server "
        "process, all its threads, over the client's run including warm-up): the raw work costs "
        f"{raw_cpu:.2f} ms, the MintCertificate server {plain['server_cpu_ms']:.2f} ms "
        f"(raw work = {raw_cpu / plain['server_cpu_ms']:.0%} of it) and the load client "
        f"{plain['client_cpu_ms']:.2f} ms. A server doing only the raw work behind the same gRPC stack needs "
        f"{raw_work_only['server_cpu_ms']:.2f} ms and reaches {raw_work_only['rate'] / raw:.0%} of raw; "
        f"the plumbing alone needs {plumbing['server_cpu_ms']:.2f} ms per call. CPU-normalised (raw CPU / "
        f"server CPU per certificate) MintCertificate is at {raw_cpu / plain['server_cpu_ms']:.0%}; "
        f"with server and client together needing {per_cert:.2f} ms per certificate, {cores} CPUs allow at "
        f"most {cores * 1000 / per_cert:,.0f} certificates/s even if both processes used them perfectly.",
        "",
        f"Machine load: 1-minute load average {load_before:.2f} before the run, "
        f"{os.getloadavg()[0]:.2f} after ({cores} CPUs). The gRPC rows need the server and the client "
        "process running at the same time; on this machine they share the CPUs with each other (and with "
        "anything else running), while the raw row uses one thread alone. pyca/cryptography holds the GIL "
        "while it verifies and signs, so one server process signs on one core at a time.",
    ]
    out += ["", *_lot_lines(raw, raw_cpu, lot_file, hsm)]
    return "\n".join(out)


def _lot_lines(raw: float, raw_cpu: float, lot: dict, hsm: dict | str) -> list[str]:
    ratio = lot["rate"] / raw
    lines = [
        f"**Lots.** One production lot of {LOT_SIZE:,} prebuilt CSRs (distinct device ids) streamed through "
        "MintCertificates from a separate client process: the service checks and signs each chunk of 64 "
        "items and commits it to the ledger (with the lot's bookkeeping) before it answers them.",
        "",
        "| path | certificates/s | vs raw (same signer) | server CPU ms/cert | client CPU ms/cert |",
        "|---|---:|---:|---:|---:|",
        f"| raw in-process, file signer (as above) | {raw:,.0f} | 100 % | {raw_cpu:.2f} | |",
        f"| lot over gRPC, file signer | {lot['rate']:,.0f} | {ratio:.0%} | {lot['server_cpu_ms']:.2f} "
        f"| {lot['client_cpu_ms']:.2f} |",
    ]
    if isinstance(hsm, str):
        lines.append(f"| SoftHSM2 rows not measured: {hsm} | | | | |")
    else:
        hsm_raw, hsm_lot = hsm["raw"], hsm["lot"]
        lines += [
            f"| raw in-process, SoftHSM2 signer (pkcs11) | {hsm_raw['rate']:,.0f} | 100 % | "
            f"{hsm_raw['cpu_ms']:.2f} | |",
            f"| lot over gRPC, SoftHSM2 signer (pkcs11) | {hsm_lot['rate']:,.0f} | "
            f"{hsm_lot['rate'] / hsm_raw['rate']:.0%} | {hsm_lot['server_cpu_ms']:.2f} | "
            f"{hsm_lot['client_cpu_ms']:.2f} |",
        ]
    lines += [
        "",
        f"Goal lot >= 50 % of raw (file signer): {'met' if ratio >= 0.5 else 'NOT met'} ({ratio:.0%}). "
        f"Lot item errors: {lot['errors']}.",
    ]
    return lines


async def _softhsm_part(folder: Path) -> dict | str:
    """The raw rate and a lot's rate with the issuing key in a SoftHSM2 token (``ca init`` under a fresh
    development root); the reason instead when SoftHSM2 cannot be used here."""
    import shutil
    import subprocess

    from factory_svc.app import FactoryApp, open_ca
    from factory_svc.ca.issuing import ROOT_CERT, ROOT_KEY, open_dev_ca
    from factory_svc.ca.pkcs11_signer import DEBIAN_SOFTHSM2
    from factory_svc.settings import load_settings
    from provkit.clock import now_utc

    if not DEBIAN_SOFTHSM2.exists() or shutil.which("softhsm2-util") is None:
        return "SoftHSM2 is not installed (`make softhsm`)"
    if os.environ.get("SOFTHSM2_CONF"):
        return "SOFTHSM2_CONF is set already; the bench makes its own token in a fresh process only"
    (folder / "tokens").mkdir()
    conf = folder / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {folder / 'tokens'}\nobjectstore.backend = file\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin", "1234",
             "--so-pin", "4321"],
            check=True, capture_output=True,
        )  # fmt: skip
        open_dev_ca(folder / "root", now_utc)
        env = {
            "FACTORY_DATA_DIR": str(folder / "data"),
            "FACTORY_SERVER_INSECURE": "true",
            "FACTORY_SERVER_PORT": "0",
            "FACTORY_SERVER_INSECURE_IDENTITY": BENCH_IDENTITY,
            "FACTORY_ENROLL_ENABLED": "false",
            "FACTORY_CA_BACKEND": "pkcs11",
            "FACTORY_CA_CHAIN_FILE": str(folder / "chain.pem"),
            "FACTORY_CA_PKCS11_TOKEN": "bench",
            "FACTORY_CA_PKCS11_PIN": "1234",
        }
        path = os.pathsep.join([str(ROOT / "generated"), str(ROOT / "src")])
        subprocess.run(
            [sys.executable, "-m", "factory_svc", "ca", "init", "--parent-chain",
             str(folder / "root" / ROOT_CERT), "--parent-key", str(folder / "root" / ROOT_KEY)],
            check=True, capture_output=True, env={**os.environ, **env, "PYTHONPATH": path},
        )  # fmt: skip
        settings = load_settings(env=env)
        ca = open_ca(settings, now_utc)
        try:
            raw = _raw_rate(ca, _csr_pool(CSR_POOL), RAW_SECONDS)
        finally:
            ca.close()
        app = await FactoryApp.open(settings)
        try:
            server = await app.start()
            try:
                lot = await _grpc_rate(f"127.0.0.1:{server.port}", False, lot=LOT_SIZE)
            finally:
                await server.stop(1)
        finally:
            await app.close()
    except (subprocess.CalledProcessError, OSError, RuntimeError) as exc:
        return f"SoftHSM2 setup failed: {exc}"
    return {"raw": raw, "lot": lot}


def _main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--client", action="store_true")
    parser.add_argument("--target")
    parser.add_argument("--seconds", type=float, default=GRPC_SECONDS)
    parser.add_argument("--warmup", type=float, default=WARMUP_SECONDS)
    parser.add_argument("--channels", type=int, default=CHANNELS)
    parser.add_argument("--in-flight", type=int, default=IN_FLIGHT)
    parser.add_argument("--pool", type=int, default=CSR_POOL)
    parser.add_argument("--request-ids", action="store_true")
    parser.add_argument("--lot", type=int, default=0, help="client: send one lot of this many CSRs")
    args = parser.parse_args()
    if args.client and args.lot:
        asyncio.run(_lot_client(args))
    elif args.client:
        asyncio.run(_client(args))
    else:
        print(RUN(run()))


if __name__ == "__main__":
    _main()
