"""Helpers of the renewal tests: factory_svc with its EST listener (real TLS on loopback, pointed at a real
emulator), a device minted and enrolled, and an EST client of our own (aiohttp over mTLS)."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from enrollment.provisioning_env import DeviceFiles, factory_env
from support.emulator import free_port

from devprov.v1 import factory_service_pb2_grpc as fpb_grpc
from factory_svc.app import FactoryApp
from factory_svc.settings import load_settings
from provkit.channels import ChannelSecurity, create_channel
from provkit.clock import now_utc
from provkit.devpki import DevTlsAuthority, write_private_file
from provkit.est import CACERTS_PATH, CSR_TYPE, SIMPLEREENROLL_PATH, decode_certs_only, encode_csr

CRL_URL = "http://127.0.0.1:8080/crl/issuing-ca.crl"


@dataclass(frozen=True)
class ServerTls:
    """The listener's TLS server certificate (127.0.0.1) and the CA a client trusts for it."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def create(cls, folder: Path) -> ServerTls:
        authority = DevTlsAuthority.create()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ca.pem").write_bytes(authority.ca_pem)
        authority.server_certificate(["127.0.0.1", "localhost"]).write(
            folder / "server.pem", folder / "server.key"
        )
        return cls(folder / "ca.pem", folder / "server.pem", folder / "server.key")


def renewal_env(tmp_path: Path, emulator, tls: ServerTls, port: int = 0, **extra: str) -> dict[str, str]:
    return factory_env(
        tmp_path,
        emulator,
        FACTORY_RENEWAL_LISTEN=f"127.0.0.1:{port}",
        FACTORY_RENEWAL_TLS_CERT_FILE=str(tls.cert_file),
        FACTORY_RENEWAL_TLS_KEY_FILE=str(tls.key_file),
        FACTORY_CRL_URL=CRL_URL,
        **extra,
    )


class MovableClock:
    """The factory's clock: real time plus an offset a test moves (expiry without waiting)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return now_utc() + self.offset


@dataclass
class Factory:
    app: FactoryApp
    stub: fpb_grpc.FactoryServiceStub

    @property
    def est_url(self) -> str:
        assert self.app.renewal_http is not None
        return self.app.renewal_http.url


@contextlib.asynccontextmanager
async def running_factory(
    env: Mapping[str, str], clock: Callable[[], datetime] = now_utc
) -> AsyncIterator[Factory]:
    """factory_svc as `serve` builds it, with the renewal listener, on free loopback ports."""
    app = await FactoryApp.open(load_settings(env=dict(env)), clock=clock)
    server = await app.start()
    try:
        async with create_channel(server.address, ChannelSecurity(insecure=True)) as channel:
            yield Factory(app, fpb_grpc.FactoryServiceStub(channel))
    finally:
        await server.stop(0)
        await app.close()


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def csr_for(device_id: str, key) -> x509.CertificateSigningRequest:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())


@dataclass(frozen=True)
class EstAnswer:
    status: int
    reason: str
    retry_after: str | None
    body: bytes

    @property
    def certificates(self) -> list[x509.Certificate]:
        assert self.status == 200, self.body
        return decode_certs_only(self.body)


class EstClient:
    """Our EST client: TLS to the listener (trusting ``tls.ca_file``), authenticated by ``cert``/``key``
    files (none: no client certificate)."""

    def __init__(self, url: str, tls: ServerTls, cert: Path | None = None, key: Path | None = None) -> None:
        self.url = url
        self.context = ssl.create_default_context(cafile=str(tls.ca_file))
        if cert is not None and key is not None:
            self.context.load_cert_chain(cert, key)

    async def _call(self, method: str, path: str, body: bytes | None = None) -> EstAnswer:
        headers = {"Content-Type": CSR_TYPE} if body is not None else {}
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                method, self.url + path, data=body, headers=headers, ssl=self.context
            ) as response,
        ):
            return EstAnswer(
                response.status,
                response.headers.get("X-Devprov-Reason", ""),
                response.headers.get("Retry-After"),
                await response.read(),
            )

    async def renew(self, csr: x509.CertificateSigningRequest) -> EstAnswer:
        return await self._call("POST", SIMPLEREENROLL_PATH, encode_csr(csr))

    async def post(self, body: bytes) -> EstAnswer:
        return await self._call("POST", SIMPLEREENROLL_PATH, body)

    async def cacerts(self) -> EstAnswer:
        return await self._call("GET", CACERTS_PATH)


def as_device(device: DeviceFiles, key, certificates: list[x509.Certificate], folder: Path) -> DeviceFiles:
    """The device's files holding the renewed certificate (chain) and its key."""
    folder.mkdir(parents=True, exist_ok=True)
    # leaf first (a certs-only PKCS#7 keeps its certificates in DER SET order)
    certificates = sorted(
        certificates, key=lambda c: c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    )
    chain = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certificates)
    cert_path = folder / f"{device.device_id}.renewed.pem"
    cert_path.write_text(chain)
    key_path = folder / f"{device.device_id}.renewed.key"
    write_private_file(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    sha1 = certificates[0].fingerprint(hashes.SHA1()).hex().upper()
    return DeviceFiles(device.device_id, chain, cert_path, key_path, sha1)


__all__ = ["free_port"]
