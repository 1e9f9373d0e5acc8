"""Safe-by-default plumbing: security headers on every response, a Host check for loopback binds (DNS
rebinding), and CSRF tokens (signed double submit).

CSRF: the browser gets a random nonce in a cookie (HttpOnly, SameSite=Strict, Secure over HTTPS, path /);
every form carries HMAC-SHA256(key, nonce) in a hidden field.  A POST passes only when the field matches the
signature of the cookie it came with.  The key is random per process: a restarted portal asks for a reload.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web

from provkit.grpc_server import is_loopback_host

CSRF_FIELD = "csrf_token"
_NONCE_BYTES = 32

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}
HSTS = "max-age=31536000"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Csrf:
    def __init__(self, https: bool, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)
        self.https = https
        # the __Host- prefix (Secure, path /, no Domain) is only accepted by browsers over HTTPS
        self.cookie_name = "__Host-portal-csrf" if https else "portal-csrf"

    def _sign(self, nonce: str) -> str:
        return _b64(hmac.new(self._key, nonce.encode(), hashlib.sha256).digest())

    def _nonce(self, request: web.Request) -> str | None:
        nonce = request.cookies.get(self.cookie_name)
        if nonce and 16 <= len(nonce) <= 128:
            return nonce
        return None

    def token_for(self, request: web.Request) -> tuple[str, str | None]:
        """The form token for this browser, and a new nonce to set as cookie (None: keep the cookie)."""
        nonce = self._nonce(request)
        fresh = None
        if nonce is None:
            nonce = fresh = _b64(secrets.token_bytes(_NONCE_BYTES))
        return self._sign(nonce), fresh

    def set_cookie(self, response: web.StreamResponse, nonce: str) -> None:
        response.set_cookie(
            self.cookie_name, nonce, path="/", httponly=True, secure=self.https, samesite="Strict"
        )

    def valid(self, request: web.Request, token: object) -> bool:
        nonce = self._nonce(request)
        if nonce is None or not isinstance(token, str) or not token or len(token) > 128:
            return False
        return hmac.compare_digest(self._sign(nonce), token)


def _host_only(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host_header: str | None, bind_host: str, allowed: tuple[str, ...]) -> bool:
    """A loopback-bound portal answers only to loopback names (DNS rebinding); otherwise ``allowed``
    (empty: any host)."""
    if not host_header:
        return False
    host = _host_only(host_header)
    if allowed:
        return host in allowed
    if is_loopback_host(bind_host):
        return is_loopback_host(host)
    return True


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_headers(https: bool) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        response.headers["Server"] = "activation-portal"  # no version banner
        if https:
            response.headers.setdefault("Strict-Transport-Security", HSTS)
        if response.content_type == "text/html":
            response.headers.setdefault("Cache-Control", "no-store")

    return on_prepare
