"""The device client's error tree.

Every expected failure is a :class:`DeviceClientError` with a stable ``reason`` (UPPER_SNAKE_CASE), a
message a person can act on, and the process exit code the CLI uses.  Anything else is a bug and is
reported with a traceback.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

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


@dataclass
class DeviceClientError(Exception):
    message: str
    reason: str = "DEVICE_CLIENT_ERROR"
    metadata: Mapping[str, str] = field(default_factory=dict)
    exit_code: ClassVar[int] = EXIT_FAILURE

    def __post_init__(self) -> None:
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
