"""Group mode's one DPS write: the X.509 enrollment group over the factory's CA, with the custom allocation
webhook (activation_svc's, or a forwarder in front of it) and the linked hubs.

``wanted_group(settings, chain)`` builds the record: signing certificate = the issuing CA (default) or the
root (``group.signing_certificate = root``: devices then send the issuing CA in their chain, as the
factory's chains do); webhook URL = ``group.webhook_url`` with the function key appended as ``code``
(Azure Functions' form; the key is a secret: settings or its file, never a command-line argument, never
printed); hubs = ``group.hubs``, default every hub of the cloud settings.

``apply_group(port, wanted)`` makes DPS hold it: created when absent, left alone when DPS already holds the
same (signing certificate by thumbprint, webhook URL, API version, hubs, enabled, custom allocation), else
replaced guarded by the etag it read.  The same code path against the emulator and real Azure: only the
cloud settings differ.

Two runs at once (two operators, two deployment jobs): a create carries no etag, and DPS, Azure's as the
emulator's, answers 409 to a create of a group that exists, 412 to an update whose etag is stale.  The run
that lost reads the group again: DPS holds its settings (the other run wanted the same: ``unchanged``), or
only the etag moved (the update is tried again on it, at most three times, then
ENROLLMENT_CONCURRENTLY_MODIFIED), or another run's settings are there: ``GroupConflict``, nothing of this
run written and nothing of the other's replaced (never ``created`` or ``updated`` over settings this run
did not see; running the command again replaces them knowingly).

Settings (prefix FACTORY; the command's flags win):

| key                          | environment                          | default |
|------------------------------|--------------------------------------|---------|
| group.id                     | FACTORY_GROUP_ID                     | devprov-factory |
| group.webhook_url            | FACTORY_GROUP_WEBHOOK_URL            | - (required) |
| group.function_key           | FACTORY_GROUP_FUNCTION_KEY (or _FILE) | - (required) |
| group.hubs                   | FACTORY_GROUP_HUBS (comma separated) | every configured hub |
| group.signing_certificate    | FACTORY_GROUP_SIGNING_CERTIFICATE    | issuing (or root) |
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from typing import Protocol
from urllib.parse import quote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from provkit.cloud import (
    CloudAlreadyExists,
    CloudEtagMismatch,
    CloudSettings,
    EnrollmentGroup,
    slot_sha256,
)
from provkit.errors import Aborted
from provkit.errors import Reason as SharedReason
from provkit.settings import Secret, SettingsError, SettingsSource

DEFAULT_GROUP_ID = "devprov-factory"
API_VERSION = "2021-10-01"
_ATTEMPTS = 3


class Signing(enum.Enum):
    ISSUING = "issuing"
    ROOT = "root"


class GroupOutcome(enum.Enum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class GroupSettings:
    group_id: str
    webhook_url: str  # without the key
    function_key: Secret
    hubs: tuple[str, ...]
    signing: Signing = Signing.ISSUING


class GroupPort(Protocol):
    async def get_group(self, group_id: str) -> EnrollmentGroup | None: ...

    async def put_group(self, group: EnrollmentGroup) -> EnrollmentGroup: ...


def load_group_settings(
    source: SettingsSource, cloud: CloudSettings, *, flags: dict[str, object] | None = None
) -> GroupSettings:
    given = flags or {}

    def value(key: str) -> str:
        flag = given.get(key)
        return str(flag).strip() if flag else (source.text(key) or "").strip()

    url = value("group.webhook_url")
    if not url:
        raise SettingsError(
            "the enrollment group needs the allocation webhook's URL: --webhook-url or "
            f"{source.env_name('group.webhook_url')}"
        )
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.netloc or parts.username or parts.password:
        raise SettingsError(f"the webhook URL must be an https URL without user credentials, got {url!r}")
    if "code=" in parts.query:
        raise SettingsError(
            "the webhook URL must not carry the key: it comes from "
            f"{source.env_name('group.function_key')} (or _FILE)"
        )
    key = source.secret("group.function_key")
    if key is None or not key.reveal().strip():
        raise SettingsError(
            f"set {source.env_name('group.function_key')} (or _FILE): the key DPS sends the "
            "webhook, the one activation_svc's ACTIVATION_ALLOCATION_FUNCTION_KEY holds"
        )
    hubs_flag = given.get("group.hubs")
    hubs = (
        tuple(hubs_flag)
        if isinstance(hubs_flag, list | tuple) and hubs_flag
        else (source.text_list("group.hubs") or cloud.hub_names)
    )
    if not hubs:
        raise SettingsError(f"no hub to link: --hub or {source.env_name('group.hubs')}")
    signing_text = value("group.signing_certificate") or Signing.ISSUING.value
    try:
        signing = Signing(signing_text.lower())
    except ValueError:
        raise SettingsError(f"the signing certificate is issuing or root, got {signing_text!r}") from None
    return GroupSettings(
        value("group.id") or DEFAULT_GROUP_ID, url, Secret(key.reveal().strip()), tuple(hubs), signing
    )


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def keyed_url(url: str, key: Secret) -> str:
    return f"{url}{'&' if '?' in url else '?'}code={quote(key.reveal(), safe='')}"


def wanted_group(settings: GroupSettings, chain: Sequence[x509.Certificate]) -> EnrollmentGroup:
    """``chain``: the factory's CA chain, issuing CA first, root last."""
    signing = chain[-1] if settings.signing is Signing.ROOT else chain[0]
    return EnrollmentGroup(
        group_id=settings.group_id,
        signing_certificate_pem=_pem(signing),
        webhook_url=keyed_url(settings.webhook_url, settings.function_key),
        iot_hubs=settings.hubs,
        api_version=API_VERSION,
    )


def without_key(url: str) -> str:
    """A webhook URL as it may be shown: without its query (the function key)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


class GroupConflict(Exception):
    """Another run wrote the group with other settings between this run's read and its write."""

    def __init__(self, held: EnrollmentGroup) -> None:
        super().__init__(
            f"another run wrote the enrollment group {held.group_id} meanwhile, with other settings: DPS "
            f"holds hubs {', '.join(held.iot_hubs) or '-'}, signing certificate {_signing_sha256(held)}, "
            f"webhook {without_key(held.webhook_url)}; nothing of this run was written. Check which "
            "settings are meant, then run the command again to replace them"
        )
        self.held = held


def _signing_sha256(group: EnrollmentGroup) -> str:
    return (group.signing_sha256 or slot_sha256(group.signing_certificate_pem) or "").upper()


def _settings(group: EnrollmentGroup) -> tuple[object, ...]:
    """What the command sets in a group, comparable (hubs ignore case and order)."""
    return (
        _signing_sha256(group),
        group.webhook_url,
        group.api_version,
        sorted(h.lower() for h in group.iot_hubs),
    )


def _policy(group: EnrollmentGroup) -> object:
    return group.unmodelled.document.get("allocationPolicy")


def _holds(current: EnrollmentGroup, wanted: EnrollmentGroup) -> bool:
    return _settings(current) == _settings(wanted) and current.enabled and _policy(current) == "custom"


def _same_group(a: EnrollmentGroup, b: EnrollmentGroup) -> bool:
    """The same settings, whatever the etag says."""
    return _settings(a) == _settings(b) and a.enabled == b.enabled and _policy(a) == _policy(b)


async def apply_group(port: GroupPort, wanted: EnrollmentGroup) -> tuple[GroupOutcome, EnrollmentGroup]:
    seen: EnrollmentGroup | None = None  # what this run's last write was based on (None: no group)
    lost = False  # that write lost a race (409: created meanwhile, 412: changed meanwhile)
    for _ in range(_ATTEMPTS):
        current = await port.get_group(wanted.group_id)
        if current is not None and _holds(current, wanted):
            return GroupOutcome.UNCHANGED, current
        if lost and current is not None and (seen is None or not _same_group(current, seen)):
            raise GroupConflict(current)
        seen = current
        try:
            if current is None:
                return GroupOutcome.CREATED, await port.put_group(wanted)
            replacement = dc_replace(wanted, etag=current.etag or "*", unmodelled=current.unmodelled)
            return GroupOutcome.UPDATED, await port.put_group(replacement)
        except (CloudAlreadyExists, CloudEtagMismatch):
            lost = True
    raise Aborted(
        SharedReason.ENROLLMENT_CONCURRENTLY_MODIFIED,
        f"the enrollment group {wanted.group_id} kept changing meanwhile; run the command again",
    )
