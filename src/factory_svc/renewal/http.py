"""The EST listener (RFC 7030) beside factory_svc: ``GET /.well-known/est/cacerts`` and ``POST
/.well-known/est/simplereenroll`` over TLS, the device authenticated by the certificate it holds.

TLS: the server certificate of ``renewal.tls_cert_file`` (default: the gRPC server's); the listener asks for
a client certificate and verifies its chain to the device CA (the issuing CA that signs device
certificates, and its root) but not its dates (``X509_V_FLAG_NO_CHECK_TIME``): an expired certificate
reaches the service, which answers CERTIFICATE_EXPIRED or renews it inside the grace window.  A client
certificate from another CA fails the handshake itself (Python's ``ssl`` has no verify callback to let it
through): such a client sees a TLS alert (unknown CA), not an HTTP answer.  A certificate from the device CA
that the ledger does not know, or whose CN is not a device id, is answered 403 CERTIFICATE_UNTRUSTED.

Answers: ``cacerts``: the device CA chain (issuing CA, root), certs-only PKCS#7 base64, to anyone (and, with
the client certificate of an open renewal's new certificate, the promotion signal).  ``simplereenroll``:
200 with the new certificate and its chain (leaf first), certs-only PKCS#7 base64; a refusal has its
HTTP status (the table below), a ``text/plain`` body ``REASON: sentence``, the header ``X-Devprov-Reason``
and, where waiting helps, ``Retry-After`` (seconds).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from cryptography.hazmat.primitives import serialization

from factory_svc.errors import Reason
from factory_svc.renewal.model import RenewalRefused
from factory_svc.renewal.service import RenewalService
from provkit.errors import Reason as SharedReason
from provkit.est import (
    CACERTS_PATH,
    CACERTS_TYPE,
    CERTS_ONLY_TYPE,
    MAX_BODY,
    SIMPLEREENROLL_PATH,
    encode_certs_only,
)
from provkit.metrics import NO_METRICS, HttpMetrics

log = logging.getLogger("factory_svc.renewal.http")

NO_CHECK_TIME = 0x200000  # OpenSSL's X509_V_FLAG_NO_CHECK_TIME: the service checks the dates itself
REASON_HEADER = "X-Devprov-Reason"

STATUS: dict[str, int] = {
    SharedReason.CLIENT_CERTIFICATE_REQUIRED: 401,
    Reason.CERTIFICATE_UNTRUSTED: 403,
    SharedReason.CERTIFICATE_REVOKED: 403,
    SharedReason.CERTIFICATE_EXPIRED: 403,
    Reason.CERTIFICATE_SUPERSEDED: 403,
    Reason.DEVICE_NOT_ENROLLED: 403,
    Reason.CSR_INVALID: 400,
    Reason.CSR_SIGNATURE_INVALID: 400,
    Reason.CSR_SUBJECT_MISMATCH: 400,
    Reason.KEY_TOO_WEAK: 400,
    Reason.KEY_REUSED: 400,
    Reason.RENEWAL_RATE_LIMITED: 429,
    Reason.RENEWAL_REPLACED: 409,
    SharedReason.DPS_UNAVAILABLE: 503,
    Reason.ISSUER_EXPIRED: 503,
}


def server_context(cert_file: Path, key_file: Path, device_ca_pem: str) -> ssl.SSLContext:
    """TLS for the listener: asks for a client certificate, verifies its chain to the device CA, not its
    dates."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    context.load_verify_locations(cadata=device_ca_pem)
    context.verify_mode = ssl.CERT_OPTIONAL
    # The chain ends at the first certificate of the device CA chain it reaches (the issuing CA, trusted
    # as the root is): the issuing CA's own signature by the root is not verified again at every handshake
    # (an ECDSA P-384 verification with the development CA, about 0.9 ms of a 2 ms handshake).  Who may
    # connect does not change: the same certificates are trusted, and the service accepts only certificates
    # issued by the issuing CA and recorded in its ledger.
    context.verify_flags = ssl.VerifyFlags(
        context.verify_flags | NO_CHECK_TIME | ssl.VerifyFlags.VERIFY_X509_PARTIAL_CHAIN
    )
    # No session tickets: a device renews about once a year, so a ticket would never be used, and issuing
    # one (the session, with the client's certificate, encrypted for it) is about a fifth of the
    # handshake's CPU here.  Every connection is a full handshake with the client certificate verified.
    context.num_tickets = 0  # TLS 1.3
    context.options |= ssl.OP_NO_TICKET  # TLS 1.2
    return context


def _peer_der(request: web.Request) -> bytes | None:
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    der: bytes | None = ssl_object.getpeercert(binary_form=True)
    return der


def refusal_response(refused: RenewalRefused) -> web.Response:
    headers = {REASON_HEADER: refused.reason}
    if refused.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(refused.retry_after)))
    return web.Response(
        status=STATUS.get(refused.reason, 400),
        text=f"{refused.reason}: {refused.message}\n",
        content_type="text/plain",
        headers=headers,
    )


def _certs_only(body: bytes, content_type: str) -> web.Response:
    return web.Response(
        body=body, headers={"Content-Type": content_type, "Content-Transfer-Encoding": "base64"}
    )


class RenewalHttp:
    """The listener: an aiohttp application on its own TLS socket."""

    def __init__(
        self,
        service: RenewalService,
        host: str,
        port: int,
        context: ssl.SSLContext,
        metrics: HttpMetrics = NO_METRICS,
    ) -> None:
        self._service = service
        self._host, self._port = host, port
        self._context = context
        self._metrics = metrics
        self._runner: web.AppRunner | None = None
        self._cacerts = encode_certs_only(list(service.ca_chain))
        self.port = 0

    def _timed(
        self, route: str, handler: Callable[[web.Request], Awaitable[web.Response]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def timed(request: web.Request) -> web.Response:
            started = time.perf_counter()
            try:
                response = await handler(request)
            except RenewalRefused as refused:
                response = refusal_response(refused)
            except Exception:
                log.exception("renewal request failed")
                response = web.Response(status=500, text="INTERNAL: the request failed\n")
            self._metrics.http_handled(route, response.status, time.perf_counter() - started)
            return response

        return timed

    async def _cacerts_handler(self, request: web.Request) -> web.Response:
        await self._service.signal(_peer_der(request))
        return _certs_only(self._cacerts, CACERTS_TYPE)

    async def _simplereenroll(self, request: web.Request) -> web.Response:
        body = await request.read()
        renewed = await self._service.renew(_peer_der(request), body)
        return _certs_only(encode_certs_only(list(renewed.chain)), CERTS_ONLY_TYPE)

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY + 1)
        app.router.add_get(CACERTS_PATH, self._timed(CACERTS_PATH, self._cacerts_handler))
        app.router.add_post(SIMPLEREENROLL_PATH, self._timed(SIMPLEREENROLL_PATH, self._simplereenroll))
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, ssl_context=self._context)
        await site.start()
        server = site._server  # the bound port when 0 was asked for
        sockets = getattr(server, "sockets", None) or ()
        self.port = sockets[0].getsockname()[1] if sockets else self._port
        log.info("renewal (EST) listener started", extra={"url": self.url})

    @property
    def url(self) -> str:
        return f"https://{self._host}:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def device_ca_pem(service: RenewalService) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in service.ca_chain)
