"""The factory as `provision` sees it: the port (mint a certificate, enroll it) and the values it answers.
``provisioning`` drives it; ``factory_client.GrpcFactory`` implements it over gRPC.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from device_client.identity import KeyType


class EnrollDelivery(enum.Enum):
    LIVE = "live"  # in DPS now
    QUEUED = "queued"  # the factory's outbox delivers it later


@dataclass(frozen=True)
class MintedCertificate:
    certificate_chain_pem: bytes  # leaf first
    private_key_pem: bytes | None  # only with server-side key generation


@dataclass(frozen=True)
class EnrollOutcome:
    delivery: EnrollDelivery
    unchanged: bool  # enrolled earlier with this certificate (no new activation code)
    activation_code: str | None

    @property
    def status(self) -> str:
        """The label kept in the state directory's metadata: "live", "queued", "live (unchanged)"..."""
        return f"{self.delivery.value} (unchanged)" if self.unchanged else self.delivery.value


ENROLLED_STATES = frozenset(
    EnrollOutcome(delivery, unchanged, None).status
    for delivery in EnrollDelivery
    for unchanged in (False, True)
)


class FactoryPort(Protocol):
    async def mint_with_csr(
        self, guid: str, csr_pem: bytes, request_id: str, *, validity: timedelta | None = None
    ) -> MintedCertificate: ...

    async def mint_with_server_key(
        self, guid: str, key_type: KeyType, request_id: str, *, validity: timedelta | None = None
    ) -> MintedCertificate: ...

    async def enroll(
        self, guid: str, certificate_pem: bytes, request_id: str, *, replace: bool
    ) -> EnrollOutcome: ...
