"""Group mode's device registry (``provkit.registry``) answers each write with the record that write left,
as DPS answers a PUT: never with a record another write committed just after it."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from dbstore import DatabaseUrl
from provkit.cloud import Enrollment, ProvisioningStatus, X509Attestation
from provkit.registry import DeviceRegistry

PEM = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n"


async def test_two_concurrent_updates_are_each_answered_with_their_own_record_and_etag(
    tmp_path: Path,
) -> None:
    registry = await DeviceRegistry.open(DatabaseUrl.sqlite(tmp_path))
    try:
        first = await registry.create(
            Enrollment("dev-1", X509Attestation(PEM), ProvisioningStatus.DISABLED, device_id="dev-1")
        )
        enable = replace(first, provisioning_status=ProvisioningStatus.ENABLED)  # guarded by first's etag
        rewrite = replace(first, etag="*")  # unguarded: it lands whatever the record holds
        enabled, rewritten = await asyncio.gather(registry.update(enable), registry.update(rewrite))
        now = await registry.get("dev-1")
    finally:
        await registry.close()
    assert enabled.provisioning_status is ProvisioningStatus.ENABLED  # what this write wrote
    assert rewritten.provisioning_status is ProvisioningStatus.DISABLED
    assert len({first.etag, enabled.etag, rewritten.etag}) == 3  # each write its own etag
    assert now is not None and now.etag == rewritten.etag  # the later write holds the record
