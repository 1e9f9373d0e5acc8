"""Renewal: EST ``simplereenroll`` renewals per second through factory_svc's renewal listener (mTLS on
loopback, one TLS connection per renewal as a device makes it; the new certificate written to the emulator's
DPS as the enrollment's secondary before the answer), against unary MintCertificate (CSR mode, plaintext gRPC
on loopback) on the same factory, the same machine and the same concurrency.  CPU per item: this process
(factory_svc and its clients share it) and the emulator's (DPS reads and writes).  The CSRs are made before
the clock starts; the goal (issue 27): at least as many renewals as MintCertificate calls per second.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

_TESTS = Path(__file__).resolve().parent.parent / "tests"  # support.emulator: the emulator as a process
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

TITLE = "Renewal: EST simplereenroll through the listener vs unary MintCertificate"
CONCURRENCY = 8
SECONDS = 4.0
DEVICES = 24


def RUN(main: Any) -> Any:  # the bench runner's hook (bench/__main__.py)
    from provkit.grpc_server import run_service

    return run_service(main)


def _cpu(pid: int) -> tuple[float, float]:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        other = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        other = float("nan")
    return usage.ru_utime + usage.ru_stime, other


async def _timed(pid: int, one: Any) -> dict[str, float]:
    done = 0
    stop = time.perf_counter() + SECONDS
    cpu0, emu0 = _cpu(pid)
    started = time.perf_counter()

    async def worker(index: int) -> None:
        nonlocal done
        n = index
        while time.perf_counter() < stop:
            await one(n)
            n += CONCURRENCY
            done += 1

    await asyncio.gather(*(worker(i) for i in range(CONCURRENCY)))
    elapsed = time.perf_counter() - started
    cpu1, emu1 = _cpu(pid)
    return {
        "rate": done / elapsed,
        "count": done,
        "cpu_ms": 1000 * (cpu1 - cpu0) / max(done, 1),
        "emulator_ms": 1000 * (emu1 - emu0) / max(done, 1),
    }


def _row(name: str, r: dict[str, float]) -> str:
    return f"| {name} | {r['rate']:.0f} | {r['cpu_ms']:.2f} ms | {r['emulator_ms']:.2f} ms |"


async def run() -> str:
    import aiohttp
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509 import CertificateSigningRequestBuilder, Name, NameAttribute
    from cryptography.x509.oid import NameOID
    from support.emulator import EmulatorProcess

    from devprov.v1 import factory_service_pb2 as pb
    from devprov.v1 import factory_service_pb2_grpc as pb_grpc
    from factory_svc.app import FactoryApp
    from factory_svc.settings import load_settings
    from provkit.channels import ChannelSecurity, create_channel
    from provkit.devpki import DevTlsAuthority, write_private_file
    from provkit.est import CSR_TYPE, SIMPLEREENROLL_PATH, encode_csr

    def csr(device_id: str) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        request = (
            CertificateSigningRequestBuilder()
            .subject_name(Name([NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .sign(key, hashes.SHA256())
        )
        return encode_csr(request), request.public_bytes(serialization.Encoding.PEM)

    with tempfile.TemporaryDirectory(prefix="bench-renewal-") as tmp:
        root = Path(tmp)
        emu = EmulatorProcess(root / "emulator", hubs=1, extra_args=["--log-level", "WARNING"])
        emu.start()
        try:
            tls = DevTlsAuthority.create()
            (root / "ca.pem").write_bytes(tls.ca_pem)
            tls.server_certificate(["127.0.0.1"]).write(root / "server.pem", root / "server.key")
            env = {
                "FACTORY_DATA_DIR": str(root / "factory"),
                "FACTORY_SERVER_INSECURE": "true",
                "FACTORY_SERVER_INSECURE_IDENTITY": "urn:devprov:factory:bench",
                "FACTORY_SERVER_PORT": "0",
                "FACTORY_CLOUD_EMULATOR_CONNECTION_FILE": str(Path(emu.data_dir) / "connection.json"),
                "FACTORY_ENROLL_CODE_HASH_LOG2_N": "8",
                "FACTORY_RENEWAL_LISTEN": "127.0.0.1:0",
                "FACTORY_RENEWAL_TLS_CERT_FILE": str(root / "server.pem"),
                "FACTORY_RENEWAL_TLS_KEY_FILE": str(root / "server.key"),
                "FACTORY_RENEWAL_MAX_PER_DAY": "100000",
            }
            app = await FactoryApp.open(load_settings(env=env))
            server = await app.start()
            assert app.renewal_http is not None
            url = app.renewal_http.url + SIMPLEREENROLL_PATH
            try:
                async with create_channel(server.address, ChannelSecurity(insecure=True)) as channel:
                    stub = pb_grpc.FactoryServiceStub(channel)
                    contexts: list[ssl.SSLContext] = []
                    ids: list[str] = []
                    for _ in range(DEVICES):
                        device_id = str(uuid.uuid4())
                        reply = await stub.MintCertificate(
                            pb.MintCertificateRequest(
                                device_id=device_id, server_key_generation=pb.ServerKeyGeneration()
                            )
                        )
                        await stub.Enroll(
                            pb.EnrollRequest(
                                device_id=device_id, certificate_pem=reply.certificate.certificate_chain_pem
                            )
                        )
                        cert, key = root / f"{device_id}.pem", root / f"{device_id}.key"
                        cert.write_text(reply.certificate.certificate_chain_pem)
                        write_private_file(key, reply.private_key_pem.encode())
                        context = ssl.create_default_context(cafile=str(root / "ca.pem"))
                        context.load_cert_chain(cert, key)
                        contexts.append(context)
                        ids.append(device_id)
                    pool = [(i % DEVICES, *csr(ids[i % DEVICES])) for i in range(4000)]

                    async def renew(n: int) -> None:
                        device, body, _pem = pool[n % len(pool)]
                        async with (
                            aiohttp.ClientSession() as session,
                            session.post(
                                url, data=body, headers={"Content-Type": CSR_TYPE}, ssl=contexts[device]
                            ) as r,
                        ):
                            await r.read()
                            assert r.status == 200, await r.text()

                    async def mint(n: int) -> None:
                        device, _body, pem = pool[n % len(pool)]
                        await stub.MintCertificate(
                            pb.MintCertificateRequest(device_id=ids[device], csr_pem=pem)
                        )

                    await _timed(emu.proc.pid, mint)  # warm-up of both paths' caches
                    minted = await _timed(emu.proc.pid, mint)
                    renewed = await _timed(emu.proc.pid, renew)
            finally:
                await server.stop(0)
                await app.close()
        finally:
            emu.stop()
    ratio = renewed["rate"] / minted["rate"] if minted["rate"] else float("nan")
    verdict = "met" if ratio >= 1 else "NOT met"
    return "\n".join(
        [
            f"{CONCURRENCY} concurrent clients, {SECONDS:.0f} s each, {DEVICES} enrolled devices; client and "
            "factory_svc in this process (its CPU column is both), the emulator in its own.",
            "",
            "| path | per second | CPU here / item | emulator CPU / item |",
            "|---|---|---|---|",
            _row("MintCertificate (unary, CSR, plaintext gRPC)", minted),
            _row("EST simplereenroll (mTLS, one connection each, DPS secondary written)", renewed),
            "",
            f"Renewals / MintCertificate: {ratio:.0%} (goal >= 100 %: {verdict}).",
        ]
    )
