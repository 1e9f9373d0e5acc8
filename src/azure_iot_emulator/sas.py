"""Shared access signatures, verified exactly as Azure computes them (pure; the clock is a parameter).

``SharedAccessSignature sr=<enc>&sig=<enc>&se=<unix>[&skn=<policy>]`` (field order varies).  The
signature is ``base64(HMAC-SHA256(base64decode(key), sr_as_sent + "\\n" + se))`` where ``sr`` is taken
*as it appears in the token* (still URL-encoded): the SDKs encode the resource differently, so the
audience is never compared with a fixed string.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

PREFIX = "SharedAccessSignature "
# Unix seconds in ASCII digits (str.isdigit also takes "²", which int() refuses), short enough for int()
# and for a float and a SQLite integer on the way.
_EXPIRY = re.compile(r"[0-9]{1,18}")


class SasError(Exception):
    """A token that does not authorise the request; ``reason`` is stable (MISSING, MALFORMED, EXPIRED,
    WRONG_POLICY, WRONG_AUDIENCE, BAD_SIGNATURE)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SasToken:
    resource_as_sent: str
    signature: str
    expiry: int
    policy: str | None

    @property
    def resource(self) -> str:
        return urllib.parse.unquote(self.resource_as_sent)


def parse_sas(header: str | None) -> SasToken:
    if not header:
        raise SasError("MISSING", "no SharedAccessSignature")
    if not header.startswith(PREFIX):
        raise SasError("MALFORMED", "authorization is not a SharedAccessSignature")
    fields: dict[str, str] = {}
    for part in header[len(PREFIX) :].strip().split("&"):
        key, sep, value = part.partition("=")
        if not sep or not key or key in fields:
            raise SasError("MALFORMED", "malformed SharedAccessSignature field")
        fields[key] = value
    try:
        resource, signature, expiry_text = fields["sr"], fields["sig"], fields["se"]
    except KeyError as exc:
        raise SasError("MALFORMED", f"SharedAccessSignature lacks {exc.args[0]}") from exc
    if _EXPIRY.fullmatch(expiry_text) is None:
        raise SasError("MALFORMED", "SharedAccessSignature se is not an integer of at most 18 digits")
    skn = fields.get("skn")
    return SasToken(
        resource,
        urllib.parse.unquote(signature),
        int(expiry_text),
        urllib.parse.unquote(skn) if skn is not None else None,
    )


def signature_for(resource_as_sent: str, expiry: int, key_b64: str, *, key_as_text: bool = False) -> str:
    """IoT Hub and DPS sign with the decoded key; Service Bus and Event Hubs (and so a hub's Event
    Hub-compatible endpoint) with the key's text as it is written (``key_as_text``)."""
    key = key_b64.encode("utf-8") if key_as_text else base64.b64decode(key_b64)
    digest = hmac.new(key, f"{resource_as_sent}\n{expiry}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def normalised_resource(resource: str) -> str:
    """A resource URI as tokens are scoped: without its scheme, lower case, no trailing ``/``."""
    text = resource.strip().lower()
    for scheme in ("https://", "http://", "amqps://", "amqp://", "wss://", "sb://"):
        if text.startswith(scheme):
            text = text[len(scheme) :]
            break
    return text.rstrip("/")


def resource_allows(token_resource: str, requested: str) -> bool:
    """Azure's scoping: the token's resource URI (scheme-less, lower case) must be the requested resource
    or a prefix of it that ends at a ``/`` segment boundary (``hub/devices`` covers ``hub/devices/x``,
    not ``hub/devicesx``)."""
    granted, wanted = normalised_resource(token_resource), normalised_resource(requested)
    return bool(granted) and (wanted == granted or wanted.startswith(granted + "/"))


def request_resources(names: Sequence[str], port: int | None, path: str) -> list[str]:
    """What a REST request names, once per name of the host it reached (with and without its port)."""
    out: list[str] = []
    for name in names:
        if port:
            out.append(f"{name}:{port}{path}")
        out.append(f"{name}{path}")
    return out


def verify_sas(
    header: str | None,
    *,
    key_b64: str,
    policy: str | None,
    now: datetime,
    resources: Sequence[str] | None = None,
    key_as_text: bool = False,
) -> SasToken:
    """Parse and verify; ``policy`` (when given) must equal the token's ``skn``; ``resources`` (when given)
    are the names of what is requested (one per name the host is known by), and the token's ``sr`` must
    allow one of them (:func:`resource_allows`)."""
    token = parse_sas(header)
    if token.expiry < now.timestamp():
        raise SasError("EXPIRED", "SharedAccessSignature expired")
    if policy is not None and (token.policy or "").lower() != policy.lower():
        raise SasError("WRONG_POLICY", "SharedAccessSignature is not for the expected policy")
    if resources is not None and not any(resource_allows(token.resource, r) for r in resources):
        raise SasError("WRONG_AUDIENCE", "SharedAccessSignature is for another resource (sr)")
    try:
        expected = signature_for(token.resource_as_sent, token.expiry, key_b64, key_as_text=key_as_text)
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - keys are generated by us
        raise SasError("BAD_SIGNATURE", "cannot verify signature") from exc
    if not hmac.compare_digest(expected.encode("ascii"), token.signature.encode("utf-8", "replace")):
        raise SasError("BAD_SIGNATURE", "SharedAccessSignature signature does not match")
    return token


def generate_sas(resource: str, key_b64: str, *, policy: str | None, expiry: int) -> str:
    """A token the way azure-iot-hub builds one (``sr = quote_plus(resource)``)."""
    sr = urllib.parse.quote_plus(resource)
    sig = urllib.parse.quote_plus(signature_for(sr, expiry, key_b64))
    token = f"{PREFIX}sr={sr}&sig={sig}&se={expiry}"
    if policy:
        token += f"&skn={policy}"
    return token
