"""The device client's error tree.

Every expected failure is a :class:`DeviceClientError` with a stable ``reason`` (UPPER_SNAKE_CASE), a
message a person can act on, and the process exit code the CLI uses.  Anything else is a bug and is
reported with a traceback.  The client's own reasons are ``Reason`` (each with its meaning;
docs/error-reasons.md's table is rendered from it); a refusal passed on from the factory keeps the
factory's reason (or the gRPC status name), a bad device id argument provkit's ``DEVICE_ID_*``, a
certificate that is expired, not yet valid, revoked or for another device provkit's ``CERTIFICATE_*``
(the factory gives the same ones).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import auto
from typing import ClassVar

from provkit.errors import ReasonEnum

# Exit codes of `device-client` (documented in the CLI help).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_STATE = 3  # missing / corrupted state directory, state in use
EXIT_IDENTITY = 4  # key does not match certificate, certificate expired or not yet valid
EXIT_FACTORY = 5  # factory unreachable or refused the request
EXIT_EXISTS = 6  # an identity exists already (use --force)
EXIT_CLOUD = 7  # DPS / hub unreachable or refused, and we were told not to wait longer
EXIT_SETTINGS = 8  # invalid configuration
EXIT_REVOKED = 9  # the certificate is revoked (a verified CRL lists it): re-provision the device
EXIT_INTERRUPTED = 130


class Reason(ReasonEnum):
    DEVICE_CLIENT_ERROR = auto(), "a failure with no more specific reason"
    SETTINGS_UNREADABLE = auto(), "a settings file cannot be read"
    SETTINGS_INVALID = auto(), "a setting has a value the client cannot use (the message names it)"
    SETTINGS_UNKNOWN_KEY = auto(), "a settings file or flag names a setting the client does not have"
    ID_SCOPE_MISSING = auto(), "no DPS ID scope configured"
    TRUSTED_CA_UNREADABLE = auto(), "the trusted CA file cannot be read"
    TRUSTED_CA_INVALID = auto(), "the trusted CA file holds no PEM certificate"
    INSECURE_NOT_LOOPBACK = auto(), "factory_tls=insecure with a factory that is not on loopback"
    STATE_DIR_MISSING = auto(), "the device has no state directory (provision it first)"
    STATE_INCOMPLETE = auto(), "the state directory lacks its key or certificate"
    STATE_CORRUPTED = auto(), "a file of the state directory is unreadable or describes another device"
    STATE_IN_USE = auto(), "another process is using this device's state directory"
    KEY_PERMISSIONS = auto(), "the device key file is readable by others than its owner"
    BUFFER_CORRUPTED = auto(), "the telemetry buffer is not a usable SQLite database"
    BUFFER_SCHEMA_UNKNOWN = auto(), "the telemetry buffer was written by a newer client"
    IDENTITY_EXISTS = auto(), "the device has an identity already (use --force to replace it)"
    KEY_CORRUPTED = auto(), "the device key is not a readable unencrypted PEM private key"
    KEY_UNSUPPORTED = auto(), "the device key's algorithm is not supported"
    CERTIFICATE_CORRUPTED = auto(), "the device certificate chain is not readable PEM"
    KEY_CERTIFICATE_MISMATCH = auto(), "the device key does not belong to its certificate"
    FACTORY_TLS_FILE_UNREADABLE = auto(), "a TLS file for the factory connection cannot be read"
    FACTORY_UNAVAILABLE = auto(), "the factory cannot be reached or did not answer in time"
    NO_KEY = auto(), "the factory returned no private key for a server-generated key"
    NO_DEVICES = auto(), "simulate found no device state directories"
    CLOUD_UNAVAILABLE = auto(), "DPS or the hub stayed unusable past --give-up-after"


@dataclass
class DeviceClientError(Exception):
    message: str
    reason: str = Reason.DEVICE_CLIENT_ERROR
    metadata: Mapping[str, str] = field(default_factory=dict)
    hints: tuple[str, ...] = ()  # what to do next, one line each (the CLI prints them under the error)
    exit_code: ClassVar[int] = EXIT_FAILURE

    def __post_init__(self) -> None:
        self.reason = str(self.reason)  # a Reason member as its wire string
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class UsageError(DeviceClientError):
    """A bad argument (e.g. a malformed device id)."""

    exit_code = EXIT_USAGE


class DeviceSettingsError(DeviceClientError):
    exit_code = EXIT_SETTINGS


class StateError(DeviceClientError):
    """The per-device state directory is missing, incomplete, corrupted or in use."""

    exit_code = EXIT_STATE


class IdentityError(DeviceClientError):
    """The stored identity cannot be used (key/certificate mismatch, expired certificate, wrong CN)."""

    exit_code = EXIT_IDENTITY


class IdentityExistsError(DeviceClientError):
    exit_code = EXIT_EXISTS


class FactoryError(DeviceClientError):
    """The factory service is unreachable or refused the request."""

    exit_code = EXIT_FACTORY


class CertificateRevokedError(DeviceClientError):
    """The device's certificate is revoked: it can never come online with it."""

    exit_code = EXIT_REVOKED


class CloudGaveUpError(DeviceClientError):
    """DPS or the hub could not be used within the limits we were given."""

    exit_code = EXIT_CLOUD
