"""Provisioning many devices at the factory: each device's key and CSR made here and its certificate minted
(``MintCertificate``, a few at a time), then the certificates enrolled with one ``EnrollBatch`` per batch.

The identity is stored before it is enrolled (as ``provision`` does), and every device's metadata records
its enrollment, so a second run over the same GUIDs only enrolls what is still pending.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from cryptography.hazmat.primitives.serialization import Encoding

from device_client.factory_client import GrpcFactory
from device_client.identity import load_chain
from device_client.provisioning import ProvisionRequest, provision_with, record_enrollment
from device_client.settings import Settings
from device_client.state import StateDir

ENROLL_BATCH_MAX = 1000  # EnrollBatch's limit
MINT_CONCURRENCY = 8

Progress = Callable[[str, int], None]  # (phase "minted" | "enrolled", devices done in that phase)


@dataclass(frozen=True)
class Provisioned:
    guid: str
    activation_code: str | None  # None when the enrollment was found unchanged or refused
    error: str | None = None


async def provision_batches(
    guids: Sequence[str],
    settings: Settings,
    *,
    batch_size: int = 100,
    progress: Progress | None = None,
    validity: timedelta | None = None,  # None: the factory's default
) -> list[Provisioned]:
    if not 1 <= batch_size <= ENROLL_BATCH_MAX:
        raise ValueError(f"batch size must be 1..{ENROLL_BATCH_MAX}")
    tell = progress or (lambda _phase, _n: None)
    gate = asyncio.Semaphore(MINT_CONCURRENCY)
    minted = 0
    results: list[Provisioned] = []
    async with GrpcFactory(settings.factory) as factory:

        async def mint(guid: str) -> None:
            nonlocal minted
            async with gate:
                if not StateDir(settings.state_root, guid).has_identity():
                    await provision_with(
                        factory, ProvisionRequest(guid, enroll=False, validity=validity), settings
                    )
            minted += 1
            tell("minted", minted)

        for start in range(0, len(guids), batch_size):
            batch = list(guids[start : start + batch_size])
            await asyncio.gather(*(mint(g) for g in batch))
            leaves = []
            for guid in batch:
                chain = StateDir(settings.state_root, guid).chain_path.read_bytes()
                leaves.append((guid, load_chain(chain, source=guid)[0].public_bytes(Encoding.PEM)))
            outcomes = await factory.enroll_batch(leaves, str(uuid.uuid4()))
            for guid, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, str):
                    results.append(Provisioned(guid, None, outcome))
                    continue
                record_enrollment(StateDir(settings.state_root, guid), outcome)
                results.append(Provisioned(guid, outcome.activation_code))
            tell("enrolled", len(results))
    return results
