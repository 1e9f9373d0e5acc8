"""The factory's CRL: built from the ledger's revoked certificates, signed by the issuing CA, published as
files and over HTTP, regenerated on every revocation and on a schedule.

Files (``crl.dir``, default ``<data_dir>/crl``): ``issuing-ca.crl`` (DER, what relying parties fetch) and
``issuing-ca.crl.pem``, both replaced atomically (not when the directory holds a CRL with a higher number
already: replicas sharing a directory).  HTTP (when ``crl.http_port`` is set):
``GET /crl/issuing-ca.crl`` (``application/pkix-crl``) and ``GET /crl/issuing-ca.crl.pem``.  A CRL is
public, but the directory needs no reader but this process, which serves it: created 0700 like every state
directory (``litestore.private_directory``); a directory that exists already keeps its mode (one shared with
a web server on purpose), and the files are 0644 for that case.

Each CRL carries thisUpdate = now, nextUpdate = now + ``crl.validity_hours``, a CRL number that only grows
(at least the milliseconds since the epoch and the last file's number + 1, and above every number handed
out before: the ledger's ``crl_state`` keeps it, shared by every replica on one PostgreSQL database), the
issuer's key identifier, and one entry per revoked certificate that has not expired, with its revocation
time and RFC 5280 reason (none for "unspecified").  A new one is published every ``crl.refresh_hours`` even
without revocations, so relying parties never see a CRL past its nextUpdate while the factory runs.

Replicas: each revocation increments the ledger's CRL generation.  Every ``crl.check_seconds`` (and, at
most once a second, when the CRL is asked for over HTTP) a replica compares it with the generation its
own CRL was built from and publishes a new one when they differ, so a revocation made at another replica
is in this one's CRL within seconds.

``crl.url`` (``FACTORY_CRL_URL``): where relying parties fetch the CRL (normally this service's HTTP
address, or a load balancer or CDN in front of it); when set, every certificate the factory issues carries
it in a CRL Distribution Points extension (RFC 5280 4.2.1.13).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from factory_svc.ca.issuing import IssuingCA
from factory_svc.mint.model import IssuedCertificate
from factory_svc.revocation.model import RevocationReason
from factory_svc.revocation.store import CrlContent
from litestore import private_directory
from provkit.clock import Clock

log = logging.getLogger("factory_svc.revocation.crl")

DER_NAME, PEM_NAME = "issuing-ca.crl", "issuing-ca.crl.pem"
_REQUEST_CHECK_INTERVAL = 1.0  # seconds: at most one generation check a second from HTTP requests

_REASON_FLAGS: dict[RevocationReason, x509.ReasonFlags | None] = {
    RevocationReason.UNSPECIFIED: None,
    RevocationReason.KEY_COMPROMISE: x509.ReasonFlags.key_compromise,
    RevocationReason.CA_COMPROMISE: x509.ReasonFlags.ca_compromise,
    RevocationReason.AFFILIATION_CHANGED: x509.ReasonFlags.affiliation_changed,
    RevocationReason.SUPERSEDED: x509.ReasonFlags.superseded,
    RevocationReason.CESSATION_OF_OPERATION: x509.ReasonFlags.cessation_of_operation,
    RevocationReason.CERTIFICATE_HOLD: x509.ReasonFlags.certificate_hold,
    RevocationReason.PRIVILEGE_WITHDRAWN: x509.ReasonFlags.privilege_withdrawn,
    RevocationReason.AA_COMPROMISE: x509.ReasonFlags.aa_compromise,
}


@dataclass(frozen=True)
class CrlSettings:
    directory: Path | None = None  # None: <data_dir>/crl
    validity: timedelta = timedelta(days=7)
    refresh: timedelta = timedelta(days=1)
    http_host: str = "127.0.0.1"
    http_port: int | None = None  # None: files only
    check: timedelta = timedelta(seconds=5)  # how often a replica looks for revocations made elsewhere
    url: str = ""  # the CRL's public URL, put in every issued certificate (empty: none)


def distribution_points(url: str) -> x509.CRLDistributionPoints | None:
    """The CRL Distribution Points extension naming ``url`` (one full name, no reasons, CRL issuer = the
    certificate's issuer), or None without a URL."""
    if not url:
        return None
    point = x509.DistributionPoint(
        full_name=[x509.UniformResourceIdentifier(url)], relative_name=None, reasons=None, crl_issuer=None
    )
    return x509.CRLDistributionPoints([point])


@dataclass(frozen=True)
class PublishedCrl:
    crl: x509.CertificateRevocationList
    number: int
    der: bytes
    pem: bytes


class RevokedSource(Protocol):
    async def next_crl(self, now: datetime, at_least: int) -> CrlContent: ...

    async def crl_generation(self) -> int: ...


def build_crl(
    ca: IssuingCA, revoked: list[IssuedCertificate], now: datetime, validity: timedelta, number: int
) -> x509.CertificateRevocationList:
    ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .last_update(now)
        .next_update(now + validity)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
    for cert in revoked:
        assert cert.revocation is not None
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(int(cert.serial_number, 16))
            .revocation_date(cert.revocation.time)
        )
        flag = _REASON_FLAGS[cert.revocation.reason]
        if flag is not None:
            entry = entry.add_extension(x509.CRLReason(flag), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return ca.sign_crl(builder)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o644)  # a CRL is public
    os.replace(tmp, path)


def _number_on_disk(directory: Path) -> int:
    try:
        crl = x509.load_der_x509_crl((directory / DER_NAME).read_bytes())
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except (OSError, ValueError, x509.ExtensionNotFound):
        return 0


class CrlPublisher:
    def __init__(
        self,
        ca: IssuingCA,
        source: RevokedSource,
        directory: Path,
        settings: CrlSettings,
        clock: Clock,
    ) -> None:
        self._ca = ca
        self._source = source
        self.directory = directory
        self._settings = settings
        self._clock = clock
        self._lock = asyncio.Lock()
        self._last_number = 0
        self._generation = -1  # the ledger's CRL generation the current CRL reflects
        self._checked_at = float("-inf")  # monotonic time of the last generation check
        self.current: PublishedCrl | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def publish(self) -> PublishedCrl:
        """Build, sign and publish a CRL of everything revoked now (one at a time)."""
        async with self._lock:
            now = self._clock()
            if self._last_number == 0:
                private_directory(self.directory)
                self._last_number = await asyncio.to_thread(_number_on_disk, self.directory)
            at_least = max(self._last_number + 1, int(now.timestamp() * 1000))
            content = await self._source.next_crl(now, at_least)
            number, revoked = content.number, content.revoked
            crl = await asyncio.to_thread(  # off the loop: a long list, or a token's signature, takes time
                build_crl, self._ca, revoked, now.replace(microsecond=0), self._settings.validity, number
            )
            published = PublishedCrl(
                crl,
                number,
                crl.public_bytes(serialization.Encoding.DER),
                crl.public_bytes(serialization.Encoding.PEM),
            )
            await asyncio.to_thread(self._write_files, published)
            self._last_number, self.current = number, published
            self._generation = max(self._generation, content.generation)
            log.info("CRL published", extra={"crl_number": number, "revoked": len(revoked)})
            return published

    def _write_files(self, published: PublishedCrl) -> None:
        """The files, unless a newer CRL is there already (replicas sharing one directory)."""
        if _number_on_disk(self.directory) >= published.number:
            return
        _write_atomically(self.directory / DER_NAME, published.der)
        _write_atomically(self.directory / PEM_NAME, published.pem)

    async def publish_if_stale(self, min_interval: float = 0.0) -> bool:
        """Publish when a revocation (here or at another replica) changed the ledger since the current CRL
        was built; the check (one small read) is skipped when the last one is under ``min_interval``
        seconds old.  True when a new CRL was published."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._checked_at < min_interval:
            return False
        self._checked_at = loop.time()
        if await self._source.crl_generation() == self._generation:
            return False
        await self.publish()
        return True

    def start(self) -> None:
        """Publish again every ``refresh``, and whenever the generation check finds the CRL stale (the first
        one is ``publish()``'s, awaited by the caller)."""
        self._tasks = [
            asyncio.create_task(self._every(self._settings.refresh, self.publish), name="crl-refresh"),
            asyncio.create_task(self._every(self._settings.check, self.publish_if_stale), name="crl-check"),
        ]

    @staticmethod
    async def _every(period: timedelta, work: Callable[[], Awaitable[object]]) -> None:
        while True:
            await asyncio.sleep(period.total_seconds())
            try:
                await work()
            except Exception:  # the next round tries again; the last CRL stays valid until its nextUpdate
                log.exception("CRL publication failed")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []


class CrlHttp:
    """The CRL over plain HTTP (CRLs are signed; RFC 5280 distribution points are usually http)."""

    def __init__(self, publisher: CrlPublisher, host: str, port: int) -> None:
        self._publisher = publisher
        self._host, self._port = host, port
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _answer(self, pem: bool) -> web.Response:
        try:
            await self._publisher.publish_if_stale(_REQUEST_CHECK_INTERVAL)
        except Exception:  # the database is away: the CRL in hand is still valid until its nextUpdate
            log.exception("CRL generation check failed")
        current = self._publisher.current
        if current is None:
            return web.Response(status=503, text="no CRL published yet\n")
        if pem:
            return web.Response(body=current.pem, content_type="application/x-pem-file")
        return web.Response(body=current.der, content_type="application/pkix-crl")

    async def _der(self, _request: web.Request) -> web.Response:
        return await self._answer(pem=False)

    async def _pem(self, _request: web.Request) -> web.Response:
        return await self._answer(pem=True)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(f"/crl/{DER_NAME}", self._der)
        app.router.add_get(f"/crl/{PEM_NAME}", self._pem)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server  # the bound port when 0 was asked for
        sockets = getattr(server, "sockets", None) or ()
        self.port = sockets[0].getsockname()[1] if sockets else self._port

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}/crl/{DER_NAME}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
