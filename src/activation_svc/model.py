"""Typed values of the activation domain."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from provkit.context import Caller


class Lifecycle(enum.Enum):
    ENROLLED = "enrolled"
    ACTIVATED = "activated"
    REGISTERED = "registered"
    DEPROVISIONED = "deprovisioned"


class ActivationPath(enum.Enum):
    UNCHANGED = "unchanged"
    ENROLLMENT = "enrollment"
    ENROLLMENT_AND_HUB_TWIN = "enrollment+hub-twin"


class MetadataChange(enum.Enum):
    """What an activation did with the device's metadata (its enrollment's initial twin and hub twin)."""

    KEPT = "kept"  # none was sent: the device keeps its tags and desired properties
    REPLACED = "replaced"  # the metadata sent is the device's now
    CLEARED = "cleared"  # asked for explicitly (clear_metadata): the metadata activations wrote is removed


@dataclass(frozen=True)
class ActivateCommand:
    device_id: str
    activation_code: str
    metadata_json: str
    hub: str = ""  # empty: the default hub
    request_id: str = ""
    caller: Caller = field(default_factory=Caller.internal)  # who asks (from the client certificate)
    expected_etag: str = ""  # the enrollment etag this change is meant for ("": the one read first)
    clear_metadata: bool = False  # remove the device's metadata (an empty metadata_json keeps it)


@dataclass(frozen=True)
class ActivateResult:
    device_id: str
    hub: str
    path: ActivationPath
    lifecycle: Lifecycle
    enrollment_etag: str
    registered_hub: str = ""
    replayed: bool = False
    owner: str = ""
    metadata_change: MetadataChange = MetadataChange.REPLACED


@dataclass(frozen=True)
class DeactivateCommand:
    device_id: str
    activation_code: str
    request_id: str = ""
    caller: Caller = field(default_factory=Caller.internal)  # who asks (from the client certificate)


@dataclass(frozen=True)
class DeactivateResult:
    device_id: str
    changed: bool
    hub_device_disabled: bool
    lifecycle: Lifecycle
    replayed: bool = False


@dataclass(frozen=True)
class DeviceStatus:
    device_id: str
    lifecycle: Lifecycle
    provisioning_status: str
    allocated_hub: str = ""
    registered_hub: str = ""
    hub_device_status: str = ""
    hub_connection_state: str = ""
    last_activity: datetime | None = None
    activated_at: datetime | None = None
    deactivated_at: datetime | None = None
    owner: str = ""
    enrollment_etag: str = ""
