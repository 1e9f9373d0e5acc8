"""Who a client certificate speaks for: the one SAN URI scheme of the suite's party identities.

Scheme
------
A party's client certificate carries exactly one subjectAltName URI of the form::

    urn:devprov:<role>:<tenant>

``role`` is one of ``factory``, ``oem``, ``portal``, ``operator`` (``provkit.context.Role``; ``internal`` is
never accepted from a certificate).  ``tenant`` names the party within its role: the factory site for
``factory`` (e.g. ``urn:devprov:factory:plant-1``), the OEM's id for ``oem`` (``urn:devprov:oem:acme``),
the OEM a portal acts for for ``portal`` (``urn:devprov:portal:acme``), the operator's team for
``operator`` (``urn:devprov:operator:ops``).  A tenant is 1-63 characters of ``a-z``, ``0-9`` and ``-``
(not at either end).  The subject CN is free text for people and is not used for decisions.

A verified certificate with no such URI, with two of them, or with a malformed one has no recognised
identity: the server refuses the call (UNAUTHENTICATED, ``CALLER_IDENTITY_UNRECOGNISED``).

API
---
``identity_uri(role, tenant) -> str``             builds the URI (validates both parts).
``parse_identity_uri(uri) -> (Role, tenant)``     raises ``UnrecognisedIdentity``.
``caller_from_certificate(pem, peer="") -> Caller``   the caller a PEM client certificate names;
                                                  raises ``UnrecognisedIdentity`` (message says why).
``is_tenant(value) -> bool``                      whether ``value`` is a well-formed tenant (e.g. an OEM id).
"""

from __future__ import annotations

import functools
import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from provkit.context import Caller, CallerIdentity, Role

PREFIX = "urn:devprov:"
PARTY_ROLES = (Role.FACTORY, Role.OEM, Role.PORTAL, Role.OPERATOR)
_TENANT = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


class UnrecognisedIdentity(ValueError):
    """The certificate names no party of this suite (or names it ambiguously)."""


def _role(value: str) -> Role:
    for role in PARTY_ROLES:
        if role.value == value:
            return role
    raise UnrecognisedIdentity(f"unknown role {value!r} (known: {', '.join(r.value for r in PARTY_ROLES)})")


def is_tenant(value: str) -> bool:
    return bool(_TENANT.match(value))


def _tenant(value: str) -> str:
    if not is_tenant(value):
        raise UnrecognisedIdentity(
            f"tenant {value!r} must be 1-63 characters of a-z, 0-9 and '-' (not at either end)"
        )
    return value


def identity_uri(role: Role | str, tenant: str) -> str:
    return f"{PREFIX}{_role(str(role)).value}:{_tenant(tenant)}"


def parse_identity_uri(uri: str) -> tuple[Role, str]:
    if not uri.startswith(PREFIX):
        raise UnrecognisedIdentity(f"{uri!r} is not a {PREFIX}<role>:<tenant> URI")
    parts = uri[len(PREFIX) :].split(":")
    if len(parts) != 2:
        raise UnrecognisedIdentity(f"{uri!r} is not of the form {PREFIX}<role>:<tenant>")
    return _role(parts[0]), _tenant(parts[1])


@functools.lru_cache(maxsize=1024)
def _parse_pem(pem: bytes) -> tuple[Role, str, str | None, str] | str:
    """(role, tenant, CN, SHA-256) or the reason there is no identity (cached: one parse per certificate)."""
    cert = x509.load_pem_x509_certificate(pem)
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    cn = str(names[0].value) if names else None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(PREFIX)]
    except x509.ExtensionNotFound:
        uris = []
    if not uris:
        return f"the client certificate carries no {PREFIX}<role>:<tenant> URI"
    if len(uris) > 1:
        return f"the client certificate carries {len(uris)} {PREFIX} URIs; exactly one is allowed"
    try:
        role, tenant = parse_identity_uri(uris[0])
    except UnrecognisedIdentity as exc:
        return str(exc)
    return role, tenant, cn, cert.fingerprint(hashes.SHA256()).hex().upper()


def certificate_identity(pem: bytes, peer: str = "") -> CallerIdentity:
    """The transport facts of a certificate, whether or not it names a party (for logs and audits)."""
    cert = x509.load_pem_x509_certificate(pem)
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    cn = str(names[0].value) if names else None
    return CallerIdentity("mtls", cn, cert.fingerprint(hashes.SHA256()).hex().upper(), peer)


def caller_from_certificate(pem: bytes, peer: str = "") -> Caller:
    parsed = _parse_pem(pem)
    if isinstance(parsed, str):
        raise UnrecognisedIdentity(parsed)
    role, tenant, cn, thumbprint = parsed
    return Caller(role, tenant, CallerIdentity("mtls", cn, thumbprint, peer))
