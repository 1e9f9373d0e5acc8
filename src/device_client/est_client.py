"""The device's EST client (RFC 7030): ``simplereenroll`` and ``cacerts`` over mutual TLS.

The device authenticates with the certificate it holds (its key and chain files, as the SDK uses them)
and trusts the listener's TLS certificate through the EST trust anchor (``renewal.ca_file``, else the
factory CA: see ``device_client.settings``).  Bodies are ``provkit.est``'s.

A refusal is an :class:`EstRefused` with the listener's stable reason (``X-Devprov-Reason``, else the
``REASON: sentence`` body, else ``HTTP_<status>``), its sentence and any ``Retry-After``; 429 and 5xx are
worth retrying soon (``retryable``), the other refusals are final for this certificate until something
changes.  A listener that cannot be reached or answers nonsense is an :class:`EstUnavailable`.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from cryptography import x509

from provkit import est

MAX_ANSWER = 256 * 1024
_REASON = re.compile(r"^([A-Z][A-Z0-9_]+):\s*(.*)$", re.S)


class EstError(Exception):
    def __init__(self, detail: str, retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s


class EstUnavailable(EstError):
    """The listener could not be reached, or answered something that is not EST."""

    reason = "EST_UNAVAILABLE"


class EstRefused(EstError):
    """The listener refused the request, with its reason."""

    def __init__(self, status: int, reason: str, detail: str, retry_after_s: float | None = None) -> None:
        super().__init__(detail, retry_after_s)
        self.status = status
        self.reason = reason

    @property
    def retryable(self) -> bool:
        return self.status == 429 or self.status >= 500

    def __str__(self) -> str:
        return f"{self.reason} (HTTP {self.status}): {self.detail}"


@dataclass(frozen=True)
class EstEndpoint:
    base_url: str  # https://host:port (a trailing /.well-known/est is taken too)
    trusted_ca_pem: str | None  # None: the system's roots
    timeout_s: float

    def url(self, path: str) -> str:
        base = self.base_url.rstrip("/")
        if base.endswith(est.WELL_KNOWN):
            base = base[: -len(est.WELL_KNOWN)]
        return base + path


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare; our back-off applies


def _refusal(status: int, headers: dict[str, str], body: bytes) -> EstRefused:
    text = body[:2000].decode("utf-8", "replace").strip()
    match = _REASON.match(text)
    reason = headers.get("x-devprov-reason") or (match.group(1) if match else f"HTTP_{status}")
    detail = match.group(2).strip() if match else (text or f"the listener answered HTTP {status}")
    return EstRefused(status, reason, detail, _retry_after(headers.get("retry-after")))


class EstClient:
    def __init__(self, endpoint: EstEndpoint, *, chain_path: Path, key_path: Path) -> None:
        self.endpoint = endpoint
        self._chain_path = chain_path
        self._key_path = key_path

    def _tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cadata=self.endpoint.trusted_ca_pem)  # None: system roots
        context.load_cert_chain(str(self._chain_path), str(self._key_path))
        return context

    async def _exchange(self, method: str, path: str, body: bytes | None, content_type: str | None) -> bytes:
        url = self.endpoint.url(path)
        headers = {"Content-Type": content_type} if content_type else {}
        try:
            context = self._tls()
            async with (
                aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self.endpoint.timeout_s)
                ) as session,
                session.request(
                    method, url, data=body, headers=headers, ssl=context, allow_redirects=False
                ) as reply,
            ):
                answer = await reply.content.read(MAX_ANSWER + 1)
                if reply.status != 200:
                    lowered = {k.lower(): v for k, v in reply.headers.items()}
                    raise _refusal(reply.status, lowered, answer)
        except EstRefused:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError, ssl.SSLError, ValueError) as exc:
            raise EstUnavailable(f"{url}: {type(exc).__name__}: {exc}") from exc
        if len(answer) > MAX_ANSWER:
            raise EstUnavailable(f"{url}: the answer is larger than {MAX_ANSWER} bytes")
        return answer

    async def simplereenroll(self, csr: x509.CertificateSigningRequest) -> list[x509.Certificate]:
        """The certificates the listener issued for ``csr`` (raises :class:`EstError`)."""
        answer = await self._exchange("POST", est.SIMPLEREENROLL_PATH, est.encode_csr(csr), est.CSR_TYPE)
        return self._certificates(answer)

    async def cacerts(self) -> list[x509.Certificate]:
        """The CA certificates (with this client's certificate: for a renewed one, the promotion signal)."""
        return self._certificates(await self._exchange("GET", est.CACERTS_PATH, None, None))

    def _certificates(self, answer: bytes) -> list[x509.Certificate]:
        try:
            return est.decode_certs_only(answer)
        except est.EstFormatError as exc:
            raise EstUnavailable(f"the listener's answer is not a certs-only PKCS#7: {exc}") from exc
