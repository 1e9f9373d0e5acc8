"""Is the device's certificate revoked?  Asked when DPS refuses its registration (issue 25 item 6).

A revoked device's enrollment is disabled by the factory, so DPS answers it exactly as it answers a device
that is not activated yet.  The certificate itself says where to look: the factory names its CRL in a CRL
Distribution Points extension (``FACTORY_CRL_URL``, served over HTTP by factory_svc, see its ``crl``
module).  :func:`check_revocation` fetches the CRL each ``http://`` / ``https://`` URL names (in order,
the first usable one counts), verifies it, and looks the certificate's serial number up:

- the CRL must be signed by the certificate's issuer as the device's own chain holds it (the issuing CA
  that signed the certificate: checked too), and name that issuer;
- only such a verified CRL ever says REVOKED (with the entry's revocation date and RFC 5280 reason) or
  NOT_REVOKED;
- no URL, a URL that cannot be fetched (unreachable, an HTTP error, too large, too slow), a body that is no
  CRL, a CRL of another issuer or with a bad signature: UNKNOWN, with why.  The caller keeps waiting then,
  as before; an unverified or unreachable CRL never makes a device give up.

A stale CRL (past its nextUpdate) still counts: a revocation it lists does not expire.

The CRL is fetched through a :class:`CrlFetcher` (one method); :class:`HttpCrlFetcher` is aiohttp, with
a deadline and a size bound, HTTPS verified against the system's roots.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol

import aiohttp
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from device_client.identity import serial_hex_of
from device_client.state import Revoked

log = logging.getLogger(__name__)

MAX_CRL_BYTES = 4 * 1024 * 1024
_SCHEMES = ("http://", "https://")


class RevocationStatus(StrEnum):
    REVOKED = "revoked"
    NOT_REVOKED = "not_revoked"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class RevocationCheck:
    status: RevocationStatus
    detail: str  # why UNKNOWN; which CRL said so otherwise
    revoked: Revoked | None = None  # REVOKED: what the CRL entry says


class CrlUnavailable(Exception):
    """The CRL could not be fetched, or is no CRL this device can trust."""


class CrlFetcher(Protocol):
    async def fetch(self, url: str) -> bytes:
        """The body at ``url``; raises :class:`CrlUnavailable`."""
        ...


class HttpCrlFetcher:
    def __init__(self, timeout_s: float, max_bytes: int = MAX_CRL_BYTES) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_bytes = max_bytes

    async def fetch(self, url: str) -> bytes:
        try:
            async with (
                aiohttp.ClientSession(timeout=self._timeout) as session,
                session.get(url, allow_redirects=False) as reply,
            ):
                if reply.status != 200:
                    raise CrlUnavailable(f"{url} answered HTTP {reply.status}")
                if (reply.content_length or 0) > self._max_bytes:
                    raise CrlUnavailable(f"{url}: the CRL is larger than {self._max_bytes} bytes")
                body = await reply.content.read(self._max_bytes + 1)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise CrlUnavailable(f"{url} cannot be fetched: {exc or type(exc).__name__}") from exc
        if len(body) > self._max_bytes:
            raise CrlUnavailable(f"{url}: the CRL is larger than {self._max_bytes} bytes")
        return body


def crl_urls(certificate: x509.Certificate) -> list[str]:
    """The HTTP(S) URLs of the certificate's CRL Distribution Points, in order."""
    try:
        points = certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return []
    urls = []
    for point in points:
        for name in point.full_name or ():
            if isinstance(name, x509.UniformResourceIdentifier) and name.value.lower().startswith(_SCHEMES):
                urls.append(name.value)
    return urls


def issuer_of(leaf: x509.Certificate, chain: Sequence[x509.Certificate]) -> x509.Certificate | None:
    """The certificate in the device's chain that signed ``leaf`` (None: not there)."""
    for candidate in chain:
        if candidate is leaf or candidate.subject != leaf.issuer:
            continue
        try:
            leaf.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return candidate
    return None


def verified_crl(data: bytes, issuer: x509.Certificate) -> x509.CertificateRevocationList:
    """The CRL in ``data`` (DER or PEM) if ``issuer`` signed it; raises :class:`CrlUnavailable`."""
    try:
        crl = (
            x509.load_pem_x509_crl(data)
            if data.lstrip().startswith(b"-----BEGIN")
            else x509.load_der_x509_crl(data)
        )
    except ValueError as exc:
        raise CrlUnavailable(f"not a CRL: {exc}") from exc
    if crl.issuer != issuer.subject:
        raise CrlUnavailable(f"the CRL is issued by {crl.issuer.rfc4514_string()}, not the device's issuer")
    key = issuer.public_key()
    if not isinstance(
        key,
        rsa.RSAPublicKey
        | ec.EllipticCurvePublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey
        | dsa.DSAPublicKey,
    ):
        raise CrlUnavailable("the issuer's key cannot verify a CRL")
    try:
        valid = crl.is_signature_valid(key)
    except (ValueError, TypeError) as exc:
        raise CrlUnavailable(f"the CRL's signature cannot be checked: {exc}") from exc
    if not valid:
        raise CrlUnavailable("the CRL's signature is not the device's issuer's")
    return crl


def _reason(entry: x509.RevokedCertificate) -> str | None:
    try:
        flag = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return None
    return flag.name.replace("_", "-")  # key-compromise, as `factory-svc revoke --reason` spells it


async def check_revocation(
    chain: Sequence[x509.Certificate], fetcher: CrlFetcher, now: datetime
) -> RevocationCheck:
    """What the CRL the device's certificate (``chain[0]``) names says of it."""
    leaf = chain[0]
    serial = serial_hex_of(leaf.serial_number)
    urls = crl_urls(leaf)
    if not urls:
        return RevocationCheck(RevocationStatus.UNKNOWN, "the certificate names no HTTP(S) CRL")
    issuer = issuer_of(leaf, chain)
    if issuer is None:
        return RevocationCheck(RevocationStatus.UNKNOWN, "the device's chain lacks its certificate's issuer")
    problems = []
    for url in urls:
        try:
            crl = verified_crl(await fetcher.fetch(url), issuer)
        except CrlUnavailable as exc:
            problems.append(str(exc))
            continue
        number = _crl_number(crl)
        entry = crl.get_revoked_certificate_by_serial_number(leaf.serial_number)
        if entry is None:
            return RevocationCheck(RevocationStatus.NOT_REVOKED, f"not listed in the CRL at {url}")
        revoked = Revoked(
            serial=serial,
            revoked_at=entry.revocation_date_utc,
            reason=_reason(entry),
            crl_url=url,
            crl_number=number,
            checked_at=now,
        )
        return RevocationCheck(RevocationStatus.REVOKED, f"listed in the CRL at {url}", revoked)
    return RevocationCheck(RevocationStatus.UNKNOWN, "; ".join(problems))


def _crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


async def check_with_deadline(
    chain: Sequence[x509.Certificate], fetcher: CrlFetcher, now: datetime, timeout_s: float
) -> RevocationCheck:
    """:func:`check_revocation` under one overall deadline (past it: UNKNOWN)."""
    try:
        return await asyncio.wait_for(check_revocation(chain, fetcher, now), timeout_s)
    except TimeoutError:
        return RevocationCheck(RevocationStatus.UNKNOWN, f"the CRL check took longer than {timeout_s:g} s")
