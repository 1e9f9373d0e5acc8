"""MintCertificate benchmark: CSR mode, ECDSA P-256, concurrent clients over gRPC on loopback, side by side
with the raw in-process cryptography rate for the same work.

Raw: one Python thread parses and verifies the CSR, builds the leaf (the same extensions), signs it with the
issuing CA key, serialises it and computes its thumbprints — no service, no ledger.  gRPC: the factory
server (insecure loopback, development CA, SQLite ledger committed before every answer) runs in this
process; the clients run in a separate process (so they do not share the server's interpreter), with a
fixed number of calls in flight.  Rates are certificates per second.  Goal: gRPC >= 50 % of raw.

Run alone: `python bench/bench_mint.py` (or through `make bench`).  Bounded to about 30 s.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

TITLE = "Factory: MintCertificate (CSR, P-256) over gRPC vs raw in-process signing"

CSR_POOL = 256
RAW_SECONDS = 2.5
GRPC_SECONDS = 6.0
WARMUP_SECONDS = 1.0
CHANNELS = 4
IN_FLIGHT = 32
ROOT = Path(__file__).resolve().parent.parent


def _csr_pool(count: int) -> list[tuple[str, str]]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    pool = []
    for i in range(count):
        device_id = f"bench-{i:05d}"
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .sign(key, hashes.SHA256())
        )
        pool.append((device_id, csr.public_bytes(serialization.Encoding.PEM).decode()))
    return pool


# ---------------------------------------------------------------------------------------------- raw rate
def _raw_rate(ca_dir: Path, pool: list[tuple[str, str]], seconds: float) -> float:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    issuing = x509.load_pem_x509_certificate((ca_dir / "issuing-ca.pem").read_bytes())
    key = serialization.load_pem_private_key((ca_dir / "issuing-ca.key").read_bytes(), password=None)
    ski = issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        device_id, pem = pool[done % len(pool)]
        csr = x509.load_pem_x509_csr(pem.encode())
        if not csr.is_signature_valid:
            raise RuntimeError("bad CSR in the pool")
        public_key = csr.public_key()
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(issuing.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(aki, critical=False)
            .sign(key, hashes.SHA256())
        )
        cert.public_bytes(serialization.Encoding.PEM)
        der = cert.public_bytes(serialization.Encoding.DER)
        hashlib.sha1(der, usedforsecurity=False).hexdigest()
        hashlib.sha256(der).hexdigest()
        done += 1
    return done / (time.perf_counter() - started)


# -------------------------------------------------------------------------------------------- load client
async def _client(args: argparse.Namespace) -> None:
    from devprov.v1 import factory_service_pb2 as pb
    from devprov.v1 import factory_service_pb2_grpc as pb_grpc
    from provkit.channels import ChannelSecurity, create_channel

    pool = _csr_pool(args.pool)
    channels = [create_channel(args.target, ChannelSecurity(insecure=True)) for _ in range(args.channels)]
    stubs = [pb_grpc.FactoryServiceStub(c) for c in channels]
    counter = {"done": 0, "errors": 0, "seq": 0}
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
            if measuring["on"]:
                counter["done"] += 1

    tasks = [asyncio.create_task(worker(i)) for i in range(args.in_flight)]
    await asyncio.sleep(args.warmup)
    measuring["on"], started = True, time.perf_counter()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    for channel in channels:
        await channel.close()
    print(
        json.dumps({"rate": counter["done"] / elapsed, "done": counter["done"], "errors": counter["errors"]})
    )


async def _plumbing_rate() -> dict:
    """MintCertificate answered with an empty response: the cost of the gRPC plumbing alone."""
    from devprov.v1 import factory_service_pb2 as pb
    from devprov.v1 import factory_service_pb2_grpc as pb_grpc
    from provkit.grpc_server import ServerSettings, binding, start_server

    class NoWork(pb_grpc.FactoryServiceServicer):
        async def MintCertificate(self, request: object, context: object) -> object:
            return pb.MintCertificateResponse()

    service = binding(
        NoWork(),
        pb_grpc.add_FactoryServiceServicer_to_server,
        pb.DESCRIPTOR.services_by_name["FactoryService"],
    )
    server = await start_server(ServerSettings(insecure=True), [service])
    try:
        return await _grpc_rate(f"127.0.0.1:{server.port}", request_ids=False)
    finally:
        await server.stop(0)


async def _grpc_rate(target: str, request_ids: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "generated"), str(ROOT / "src")])}
    command = [
        sys.executable, __file__, "--client", "--target", target, "--seconds", str(GRPC_SECONDS),
        "--warmup", str(WARMUP_SECONDS), "--channels", str(CHANNELS), "--in-flight", str(IN_FLIGHT),
        "--pool", str(CSR_POOL),
    ]  # fmt: skip
    if request_ids:
        command.append("--request-ids")
    proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE, env=env)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    if proc.returncode != 0:
        raise RuntimeError(f"load client failed ({proc.returncode})")
    return json.loads(out.decode().strip().splitlines()[-1])


async def run() -> str:
    from factory_svc.app import FactoryApp
    from factory_svc.errors import ERROR_DOMAIN
    from factory_svc.minting import MintPolicy
    from factory_svc.settings import CaSettings, FactorySettings
    from provkit.grpc_server import ServerSettings

    started = time.monotonic()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-mint-") as tmp:
        data = Path(tmp)
        settings = FactorySettings(
            ServerSettings(insecure=True, error_domain=ERROR_DOMAIN), data, CaSettings(), MintPolicy()
        )
        app = await FactoryApp.open(settings)
        pool = _csr_pool(CSR_POOL)
        raw_before = _raw_rate(data / "ca", pool, RAW_SECONDS)
        server = await app.start()
        try:
            plain = await _grpc_rate(f"127.0.0.1:{server.port}", request_ids=False)
            with_ids = await _grpc_rate(f"127.0.0.1:{server.port}", request_ids=True)
        finally:
            await server.stop(1)
            issued = len(await app.ledger.list(None, 10**7, None))
            await app.close()
        raw_after = _raw_rate(data / "ca", pool, RAW_SECONDS)
    plumbing = await _plumbing_rate()
    raw = (raw_before + raw_after) / 2
    elapsed = time.monotonic() - started
    ratio = plain["rate"] / raw
    errors = plain["errors"] + with_ids["errors"]
    ceiling = 1 / (1 / raw + 1 / plumbing["rate"])
    out = [
        "CSR mode, ECDSA P-256 device keys, development issuing CA (ECDSA P-256). "
        f"{IN_FLIGHT} calls in flight over {CHANNELS} channels from a separate client process; "
        f"{GRPC_SECONDS:.0f} s measured after {WARMUP_SECONDS:.0f} s warm-up. Every gRPC certificate is "
        "committed to the SQLite ledger (WAL, synchronous=FULL, group commit) before the answer.",
        "",
        "| path | certificates/s | vs raw |",
        "|---|---:|---:|",
        "| raw in-process cryptography (1 thread: CSR verify + build + sign + thumbprints) "
        f"| {raw:,.0f} | 100 % |",
        f"| (raw measured before / after the gRPC runs: {raw_before:,.0f} / {raw_after:,.0f}) | | |",
    ]
    for label, result in (
        ("gRPC MintCertificate, no request_id", plain),
        ("gRPC MintCertificate, with request_id", with_ids),
        ("gRPC plumbing alone (same server stack, handler does no work)", plumbing),
    ):
        out.append(f"| {label} | {result['rate']:,.0f} | {result['rate'] / raw:.0%} |")
    out += [
        "",
        "Ceiling if the service added nothing to the raw work and the plumbing: "
        f"1/(1/raw + 1/plumbing) = {ceiling:,.0f}/s ({ceiling / raw:.0%} of raw); MintCertificate reaches "
        f"{plain['rate'] / ceiling:.0%} of that ceiling.",
        "",
        f"Goal gRPC >= 50 % of raw: {'met' if ratio >= 0.5 else 'NOT met'} ({ratio:.0%}). Errors: {errors}. "
        f"Certificates in the ledger after the run: {issued:,}. Bench run time {elapsed:.0f} s.",
        "",
        f"Machine load: 1-minute load average {load_before:.2f} before the run, "
        f"{os.getloadavg()[0]:.2f} after "
        f"({os.cpu_count()} CPUs). The gRPC rows need the server and the client process running at the same "
        "time; on a machine with two CPUs they share them with each other (and with anything else running), "
        "while the raw row uses one thread alone, so the ratio here understates what a server with its own "
        "cores achieves.",
    ]
    return "\n".join(out)


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
    args = parser.parse_args()
    if args.client:
        asyncio.run(_client(args))
    else:
        print(asyncio.run(run()))


if __name__ == "__main__":
    _main()
