"""The factory's CRL: built from the ledger's revoked certificates, signed by the issuing CA, published as
files and over HTTP, regenerated on every revocation and on a schedule.

Files (``crl.dir``, default ``<data_dir>/crl``): ``issuing-ca.crl`` (DER, what relying parties fetch) and
``issuing-ca.crl.pem``, both replaced atomically.  HTTP (when ``crl.http_port`` is set):
``GET /crl/issuing-ca.crl`` (``application/pkix-crl``) and ``GET /crl/issuing-ca.crl.pem``.

Each CRL carries thisUpdate = now, nextUpdate = now + ``crl.validity_hours``, a CRL number that only grows
(milliseconds since the epoch, at least the last file's number + 1), the issuer's key identifier, and one
entry per revoked certificate that has not expired, with its revocation time and RFC 5280 reason (none for
"unspecified").  A new one is published every ``crl.refresh_hours`` even without revocations, so relying
parties never see a CRL past its nextUpdate while the factory runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from factory_svc.ca import IssuingCA
from factory_svc.model import IssuedCertificate, RevocationReason

log = logging.getLogger("factory_svc.crl")

DER_NAME, PEM_NAME = "issuing-ca.crl", "issuing-ca.crl.pem"

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


@dataclass(frozen=True)
class PublishedCrl:
    crl: x509.CertificateRevocationList
    number: int
    der: bytes
    pem: bytes


class RevokedSource(Protocol):
    async def revoked(self, now: datetime) -> list[IssuedCertificate]: ...


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
        clock: Callable[[], datetime],
    ) -> None:
        self._ca = ca
        self._source = source
        self.directory = directory
        self._settings = settings
        self._clock = clock
        self._lock = asyncio.Lock()
        self._last_number = 0
        self.current: PublishedCrl | None = None
        self._task: asyncio.Task[None] | None = None

    async def publish(self) -> PublishedCrl:
        """Build, sign and publish a CRL of everything revoked now (one at a time)."""
        async with self._lock:
            now = self._clock()
            revoked = await self._source.revoked(now)
            if self._last_number == 0:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._last_number = await asyncio.to_thread(_number_on_disk, self.directory)
            number = max(self._last_number + 1, int(now.timestamp() * 1000))
            crl = build_crl(self._ca, revoked, now.replace(microsecond=0), self._settings.validity, number)
            published = PublishedCrl(
                crl,
                number,
                crl.public_bytes(serialization.Encoding.DER),
                crl.public_bytes(serialization.Encoding.PEM),
            )
            await asyncio.to_thread(_write_atomically, self.directory / DER_NAME, published.der)
            await asyncio.to_thread(_write_atomically, self.directory / PEM_NAME, published.pem)
            self._last_number, self.current = number, published
            log.info("CRL published", extra={"crl_number": number, "revoked": len(revoked)})
            return published

    def start(self) -> None:
        """Publish again every ``refresh`` (the first one is ``publish()``'s, awaited by the caller)."""
        self._task = asyncio.create_task(self._refresh(), name="crl-refresh")

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self._settings.refresh.total_seconds())
            try:
                await self.publish()
            except Exception:  # the next round tries again; the last CRL stays valid until its nextUpdate
                log.exception("CRL refresh failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class CrlHttp:
    """The CRL over plain HTTP (CRLs are signed; RFC 5280 distribution points are usually http)."""

    def __init__(self, publisher: CrlPublisher, host: str, port: int) -> None:
        self._publisher = publisher
        self._host, self._port = host, port
        self._runner: web.AppRunner | None = None
        self.port = 0

    def _answer(self, pem: bool) -> web.Response:
        current = self._publisher.current
        if current is None:
            return web.Response(status=503, text="no CRL published yet\n")
        if pem:
            return web.Response(body=current.pem, content_type="application/x-pem-file")
        return web.Response(body=current.der, content_type="application/pkix-crl")

    async def _der(self, _request: web.Request) -> web.Response:
        return self._answer(pem=False)

    async def _pem(self, _request: web.Request) -> web.Response:
        return self._answer(pem=True)

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
