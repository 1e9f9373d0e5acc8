"""The factory's domain errors.  Each has a stable reason; the gRPC layer maps the kind to a status code.

Reasons (``ErrorInfo.reason``; domain ``factory.devprov``): ``Reason`` below holds what only the factory
raises, each member with its meaning; what every service raises (device and request ids, DPS and the hub
unreachable or refusing, records changed concurrently, a certificate expired or revoked) is
``provkit.errors.Reason``.  The table of reasons in docs/error-reasons.md is rendered from both
(``Reason.markdown()``).

``CaConfigError``: the configured (or stored) CA cannot be used; a ``ConfigurationError`` (the CLI answers
it with ``error: ...`` and exit 2).
"""

from __future__ import annotations

from enum import auto

from provkit.errors import (
    AlreadyExists,
    ConfigurationError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ReasonEnum,
    invalid_field,
)

ERROR_DOMAIN = "factory.devprov"

__all__ = [
    "ERROR_DOMAIN",
    "AlreadyExists",
    "CaConfigError",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "Reason",
    "invalid_field",
]


class Reason(ReasonEnum):
    # minting (MintCertificate, the items of a lot)
    KEY_SOURCE_MISSING = auto(), "neither a CSR nor server-side key generation was asked for"
    CSR_MALFORMED = auto(), "the CSR is not a readable PEM PKCS#10 request (or is too large)"
    CSR_SIGNATURE_INVALID = auto(), "the CSR's signature does not verify"
    CSR_SUBJECT_MISMATCH = auto(), "the CSR's subject CN is not the device id"
    KEY_ALGORITHM_UNSUPPORTED = auto(), "the key is neither ECDSA nor RSA"
    KEY_CURVE_UNSUPPORTED = auto(), "the elliptic curve is not P-256 or P-384"
    KEY_TOO_WEAK = auto(), "the RSA key has fewer than 2048 bits"
    KEY_TYPE_UNSUPPORTED = auto(), "the factory cannot generate keys of this type"
    VALIDITY_INVALID = auto(), "the requested validity is shorter than the minimum"
    VALIDITY_EXCEEDS_ISSUER = auto(), "the requested validity ends after the issuing CA's"
    ISSUER_EXPIRED = auto(), "the issuing CA is not valid now: the factory cannot issue certificates"
    # the certificate ledger (GetCertificate, ListCertificates, RevokeCertificate)
    SERIAL_NUMBER_INVALID = auto(), "the serial number is not 1-40 hex digits"
    CERTIFICATE_NOT_FOUND = (
        auto(),
        "no certificate of this serial, or no unexpired one of the device, from this factory",
    )
    PAGE_SIZE_INVALID = auto(), "page_size is negative"
    PAGE_TOKEN_INVALID = auto(), "the page token is not one this listing gave"
    # enrollment (Enroll, EnrollBatch, RotateActivationCode, AcknowledgeActivationCodes, TransferOwnership)
    ENROLLMENT_NOT_CONFIGURED = auto(), "this factory has no DPS configured"
    CERTIFICATE_MISSING = auto(), "no certificate was given"
    CERTIFICATE_MALFORMED = auto(), "certificate_pem is not a PEM certificate"
    CERTIFICATE_IS_CA = auto(), "a CA certificate cannot be a device identity"
    CERTIFICATE_EKU_MISSING = auto(), "the certificate lacks the extended key usage clientAuth"
    CERTIFICATE_VALIDITY_TOO_SHORT = auto(), "the certificate expires sooner than enrollment requires"
    CERTIFICATE_UNTRUSTED = auto(), "the certificate does not verify to this factory's issuing CA"
    BATCH_EMPTY = auto(), "the batch has no items"
    BATCH_TOO_LARGE = auto(), "the batch has more items than one call takes"
    DUPLICATE_IN_BATCH = auto(), "the device id appears earlier in the same batch"
    DEVICE_IDS_EMPTY = auto(), "no device ids were given"
    DEVICE_IDS_TOO_MANY = auto(), "more device ids than one call takes"
    ENROLLMENT_EXISTS = auto(), "the device is enrolled with another certificate: set replace to rework it"
    ENROLLMENT_NOT_FOUND = auto(), "the device has no enrollment in DPS"
    ENROLLMENT_PENDING = auto(), "the device's enrollment still waits in the outbox: try after delivery"
    OWNER_INVALID = auto(), "the OEM id is not 1-63 characters of a-z, 0-9 and '-'"
    OWNER_MISSING = auto(), "no OEM was named as the new owner"
    OWNER_CHANGE_NEEDS_TRANSFER = auto(), "the device has another owner: change it with TransferOwnership"
    DEVICE_ALREADY_ACTIVATED = auto(), "the device was activated or registered: it stays with its owner"
    REASON_INVALID = auto(), "the reason is not one line of printable characters (or is too long)"
    REASON_MISSING = auto(), "no reason was given for the change of owner"
    REPLACE_REASON_REQUIRED = (
        auto(),
        "replacing the enrollment of an activated or registered device needs a reason",
    )
    # group mode's enrollment group (factory-svc enrollment-group)
    ENROLLMENT_GROUP_CONFLICT = (
        auto(),
        "a concurrent run wrote the enrollment group first, with other settings: check, then run again",
    )
    # revocation (RevokeCertificate)
    REVOCATION_NOT_CONFIGURED = auto(), "this factory cannot revoke certificates"
    REVOCATION_TARGET_MISSING = auto(), "neither a device id nor a serial number was given"
    REVOCATION_REASON_INVALID = auto(), "the revocation reason is not one this factory knows"
    # production lots (MintCertificates)
    LOT_HEADER_MISSING = auto(), "the lot's first message is not its header"
    LOT_ID_MISSING = auto(), "the lot has no lot_id (it is resumed by it)"
    LOT_SIZE_INVALID = auto(), "the lot's item count is outside the range a lot may have"
    LOT_KEY_SOURCE_INVALID = auto(), "the lot names no key source, or derived ids without server-side keys"
    LOT_ITEM_EXPECTED = auto(), "the lot's header is followed by something other than its items"
    LOT_BATCH_INVALID = auto(), "a message holds more items than a batch takes, or than the lot has left"
    LOT_INDEX_INVALID = auto(), "the item's index is outside the lot"
    LOT_ITEM_CHANGED = auto(), "a resumed lot's item names another device than the first attempt did"
    DUPLICATE_IN_LOT = auto(), "the device id is another item of the same lot"
    LOT_INCOMPLETE = auto(), "the stream ended before every item of the lot was sent"
    LOT_IN_PROGRESS = auto(), "another attempt of the lot is committing its items: resume it again later"
    # renewal (the EST listener: simplereenroll)
    CERTIFICATE_SUPERSEDED = auto(), "a newer certificate replaced this one and is in use: renew with it"
    CSR_INVALID = auto(), "the EST request body is not a PKCS#10 certificate request"
    KEY_REUSED = auto(), "the renewal request carries the current certificate's own key: make a new one"
    RENEWAL_RATE_LIMITED = auto(), "the device renewed too often in 24 hours: retry after the delay given"
    DEVICE_NOT_ENROLLED = auto(), "the device has no DPS enrollment (any more) to renew"
    RENEWAL_REPLACED = auto(), "a later renewal (or a revocation) ended the one retried: renew with a new key"


class CaConfigError(ConfigurationError, RuntimeError):
    """The configured (or stored) CA cannot be used; reported at start-up."""
