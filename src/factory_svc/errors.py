"""The factory's domain errors.  Each has a stable reason; the gRPC layer maps the kind to a status code.

Reasons
-------
DEVICE_ID_EMPTY, DEVICE_ID_TOO_LONG, DEVICE_ID_INVALID_CHARACTERS, DEVICE_ID_INVALID_LAST_CHARACTER,
KEY_SOURCE_MISSING, CSR_MALFORMED, CSR_SIGNATURE_INVALID, CSR_SUBJECT_MISMATCH, KEY_TOO_WEAK,
KEY_CURVE_UNSUPPORTED, KEY_ALGORITHM_UNSUPPORTED, KEY_TYPE_UNSUPPORTED, VALIDITY_INVALID,
VALIDITY_EXCEEDS_ISSUER, ISSUER_EXPIRED, REQUEST_ID_INVALID, REQUEST_ID_REUSED, SERIAL_NUMBER_INVALID,
CERTIFICATE_NOT_FOUND, PAGE_SIZE_INVALID, PAGE_TOKEN_INVALID; revocation: REVOCATION_TARGET_MISSING,
REVOCATION_REASON_INVALID, CERTIFICATE_REVOKED (Enroll), DPS_/HUB_UNAVAILABLE, DPS_/HUB_REFUSED.
"""

from __future__ import annotations

from provkit.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, invalid_field

ERROR_DOMAIN = "factory.devprov"

__all__ = [
    "ERROR_DOMAIN",
    "AlreadyExists",
    "CaConfigError",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "invalid_field",
]


class CaConfigError(RuntimeError):
    """The configured (or stored) CA cannot be used; reported at start-up."""
