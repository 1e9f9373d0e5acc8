"""Typed values of the enrollment domain."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from provkit.activation_code import CodeHash
from provkit.context import Caller
from provkit.errors import ErrorKind


class EnrollOutcome(enum.Enum):
    CREATED = "created"
    UNCHANGED = "unchanged"
    REPLACED = "replaced"
    QUEUED = "queued"


class Delivery(enum.Enum):
    LIVE = "live"
    QUEUED = "queued"


class EnrollmentState(enum.Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    LIVE = "live"
    NOT_FOUND = "not_found"
    REVOKED = "revoked"  # the certificate enrolled or queued was revoked


@dataclass(frozen=True)
class EnrollRequest:
    device_id: str
    certificate_pem: str
    replace: bool = False
    request_id: str = ""
    owner: str = ""  # the OEM that bought the device ("": the first to activate it claims it)
    replace_reason: str = ""  # required to replace the enrollment of an activated or registered device
    caller: Caller = field(default_factory=Caller.internal)  # who asks (from the client certificate)


@dataclass(frozen=True)
class EnrollResult:
    device_id: str
    outcome: EnrollOutcome
    delivery: Delivery
    activation_code: str | None  # the code while it is retained (see enrollment.retained), else None
    sha1_thumbprint: str
    sha256_thumbprint: str
    replayed: bool = False
    code_id: str = ""  # the public id of the code (its hash's salt); '' when no code came with it


@dataclass(frozen=True)
class RotateResult:
    device_id: str
    activation_code: str | None  # None only on a replay after the code was acknowledged or purged
    code_id: str
    replayed: bool = False


@dataclass(frozen=True)
class AcknowledgeResult:
    acknowledged: int  # retained codes forgotten
    replayed: bool = False


@dataclass(frozen=True)
class ItemError:
    kind: ErrorKind
    reason: str
    message: str


@dataclass(frozen=True)
class BatchItemResult:
    index: int
    device_id: str
    result: EnrollResult | None
    error: ItemError | None


@dataclass(frozen=True)
class BatchResult:
    items: tuple[BatchItemResult, ...]
    replayed: bool = False

    @property
    def queued(self) -> int:
        return sum(1 for i in self.items if i.result and i.result.delivery is Delivery.QUEUED)

    @property
    def failed(self) -> int:
        return sum(1 for i in self.items if i.error is not None)

    @property
    def enrolled(self) -> int:
        return sum(1 for i in self.items if i.result and i.result.delivery is Delivery.LIVE)


@dataclass(frozen=True)
class EnrollmentStatus:
    device_id: str
    state: EnrollmentState
    queued_at: datetime | None = None
    delivered_at: datetime | None = None
    attempts: int = 0
    failure_reason: str = ""
    failure_message: str = ""
    provisioning_status: str = ""
    sha256_thumbprint: str = ""
    owner: str = ""
    # where the device stands in the cloud (read with the enrollment; the hub's registry when reachable)
    registration_status: str = ""
    assigned_hub: str = ""
    registration_updated: datetime | None = None
    last_activity: datetime | None = None
    connection_state: str = ""


@dataclass(frozen=True)
class TransferCommand:
    device_id: str
    owner: str
    reason: str
    request_id: str = ""
    caller: Caller = field(default_factory=Caller.internal)


@dataclass(frozen=True)
class TransferResult:
    device_id: str
    owner: str
    previous_owner: str
    changed: bool
    replayed: bool = False


@dataclass(frozen=True)
class EnrollPolicy:
    min_remaining_validity: timedelta = timedelta(days=30)
    code_hash: CodeHash = CodeHash.HMAC_SHA256  # provkit.activation_code.DEFAULT_HASH
    code_hash_log2_n: int = 8  # scrypt's cost, when chosen: provkit.activation_code.DEFAULT_LOG2_N
    max_batch: int = 1000
    bulk_concurrency: int = 8
    delivery_backoff_initial: float = 0.5
    delivery_backoff_max: float = 30.0
    code_retention: timedelta = timedelta(days=7)  # unacknowledged codes are kept (encrypted) this long
