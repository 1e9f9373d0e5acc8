"""The device renews its own certificate (issue 27): when, with what request, and what it accepts back.

Pure functions over certificates and keys; the EST conversation is ``device_client.est_client``, the files
``device_client.state`` (``pending/``, ``previous/``, ``renewal.json``), the change-over itself (the side
task, DPS re-registration, promotion) ``device_client.changeover``, run by ``device_client.runtime`` (a new
hub session between two messages).

When (:func:`due_at`): once ``fraction`` of the certificate's lifetime has elapsed or ``days_before`` days
are left, whichever comes first (defaults 2/3 and 30 days, as step-ca and Azure's guidance do).  A running
device looks at boot, then every ``check_interval_s`` (jittered +-10 %, :func:`next_check_in`) and also
at the moment the certificate becomes due, so a certificate shorter-lived than the interval renews in time.
A certificate that lives no longer than ``days_before`` days would be due from birth by the second rule: for
it the fraction alone decides (short-lived test and demo certificates renew at 2/3 of their minutes).

What (:func:`renewal_request`): a new key of the same kind as the current one (same curve, same RSA size)
and a PKCS#10 with exactly the current certificate's subject and subjectAltName (RFC 7030 4.2.2).

What is accepted (:func:`accept_issued`): a chain whose leaf holds the new key, has the same subject, is
valid now, and is signed by the issuing CA the device already trusts (its own chain's issuer), so a
listener that is not the device's factory cannot hand it an identity.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from device_client.identity import IdentityInfo, PrivateKey, serial_hex_of
from device_client.state import RenewalRecord

# The states of a renewal (RenewalRecord.state).
REQUESTED = "requested"
RECEIVED = "received"
REGISTERED = "registered"
PROMOTED = "promoted"
CONFIRMED = "confirmed"
REFUSED = "refused"
FAILED = "failed"


def due_at(not_before: datetime, not_after: datetime, *, fraction: float, days_before: float) -> datetime:
    """The moment the certificate valid ``not_before`` .. ``not_after`` is due for renewal."""
    by_fraction = not_before + (not_after - not_before) * fraction
    by_remaining = not_after - timedelta(days=days_before)
    if by_remaining <= not_before:  # a lifetime shorter than days_before: the fraction alone decides
        return by_fraction
    return min(by_fraction, by_remaining)


def is_due(info: IdentityInfo, now: datetime, *, fraction: float, days_before: float) -> bool:
    return now >= due_at(info.not_before, info.not_after, fraction=fraction, days_before=days_before)


def next_check_in(
    interval_s: float,
    *,
    now: datetime,
    due: datetime,
    jitter: float = 0.1,
    rng: random.Random | None = None,
) -> float:
    """Seconds until the next look: the jittered interval, or sooner when the certificate falls due."""
    spread = (rng or random).uniform(-jitter, jitter)
    interval = interval_s * (1.0 + spread)
    until_due = (due - now).total_seconds()
    return max(0.0, min(interval, until_due)) if until_due > 0 else 0.0


def new_key_like(current: PrivateKey) -> PrivateKey:
    """A fresh key of the current key's kind (same curve, same RSA size)."""
    if isinstance(current, ec.EllipticCurvePrivateKey):
        return ec.generate_private_key(current.curve)
    return rsa.generate_private_key(public_exponent=65537, key_size=current.key_size)


def _signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def renewal_request(current: x509.Certificate, key: PrivateKey) -> x509.CertificateSigningRequest:
    """A PKCS#10 for ``key`` with the current certificate's subject and subjectAltName (RFC 7030 4.2.2)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(current.subject)
    try:
        san = current.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        pass
    else:
        builder = builder.add_extension(san.value, critical=san.critical)
    return builder.sign(key, _signature_hash(key))


class IssuedRejected(ValueError):
    """What the listener answered is not a certificate this device can use (the message says why)."""


def _public_der(cert_or_key: x509.Certificate | PrivateKey) -> bytes:
    public = cert_or_key.public_key()
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def accept_issued(
    issued: list[x509.Certificate],
    *,
    key: PrivateKey,
    current_chain: list[x509.Certificate],
    now: datetime,
) -> list[x509.Certificate]:
    """The chain to store (leaf first, then the current chain's CAs) for the certificates the listener
    answered; raises :class:`IssuedRejected` when they are not a certificate for ``key`` from our CA."""
    want = _public_der(key)
    leaves = [cert for cert in issued if _public_der(cert) == want]
    if not leaves:
        raise IssuedRejected("no certificate in the answer holds the new key")
    leaf = leaves[0]
    current = current_chain[0]
    if leaf.subject != current.subject:
        raise IssuedRejected(
            f"the new certificate is for {leaf.subject.rfc4514_string()}, "
            f"not {current.subject.rfc4514_string()}"
        )
    if not leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc:
        raise IssuedRejected(
            f"the new certificate is not valid now ({leaf.not_valid_before_utc.isoformat()} .. "
            f"{leaf.not_valid_after_utc.isoformat()})"
        )
    cas = list(current_chain[1:])
    issuer = next((ca for ca in cas if ca.subject == leaf.issuer), None)
    if issuer is None:
        raise IssuedRejected(
            f"the new certificate's issuer {leaf.issuer.rfc4514_string()} is not the device's CA"
        )
    try:
        leaf.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise IssuedRejected(f"the new certificate is not signed by the device's CA ({exc})") from exc
    return [leaf, *cas]


def chain_pem(chain: list[x509.Certificate]) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in chain)


@dataclass(frozen=True)
class CertificateReport:
    """The twin's reported ``certificate`` property, as Azure's guidance has devices report it."""

    info: IdentityInfo
    renewal: RenewalRecord | None

    def to_twin(self) -> dict[str, Any]:
        renewal = (
            {"state": self.renewal.state, "reason": self.renewal.reason, "at": self.renewal.at.isoformat()}
            if self.renewal
            else None
        )
        return {
            "certificate": {
                "serial": self.info.serial_hex,
                "notBefore": self.info.not_before.isoformat(),
                "notAfter": self.info.not_after.isoformat(),
                "renewal": renewal,
            }
        }


def serial_of(cert: x509.Certificate) -> str:
    return serial_hex_of(cert.serial_number)
