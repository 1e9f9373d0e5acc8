"""Group mode's device registry (provkit.registry) on both backends: the records round-trip as DPS holds
them, every write is etag-guarded (one winner of two writers on one etag, also from two processes'
registries on one database: the factory's and activation_svc's), a registration never changes the etag,
bulk writes report per item; on PostgreSQL the table exists only after `migrate`, and a database that
cannot be reached is ``CloudUnavailable`` (never a wrong record), and the registry recovers with it."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace

import pytest
from support.certs import TestCa
from support.pgcluster import database_away
from support.waiting import until

from dbstore import DatabaseUrl
from dbstore.postgres import SchemaBehind
from provkit.cloud import (
    CloudAlreadyExists,
    CloudEtagMismatch,
    CloudNotFound,
    CloudUnavailable,
    Enrollment,
    ProvisioningStatus,
    X509Attestation,
)
from provkit.registry import DeviceRegistry

DISABLED = ProvisioningStatus.DISABLED


@pytest.fixture(scope="module")
def pem(tmp_path_factory) -> str:
    return TestCa().issue(tmp_path_factory.mktemp("certs"), "registry-device").pem


def record(device_id: str, pem: str, **changes) -> Enrollment:
    """A record as Enroll writes it: disabled, the certificate in the primary slot."""
    enrollment = Enrollment(device_id, X509Attestation(pem), DISABLED, device_id=device_id)
    return replace(enrollment, **changes)


def enabled(enrollment: Enrollment) -> Enrollment:
    return replace(enrollment, provisioning_status=ProvisioningStatus.ENABLED)


async def test_records_round_trip_and_every_write_is_etag_guarded(database_url, pem):
    factory = await DeviceRegistry.open(database_url, migrate=True)
    activation = await DeviceRegistry.open(database_url)  # the other service, the same database
    try:
        created = await factory.create(record("dev-1", pem, code_hash={"h": 1}))
        assert created.etag and not created.enabled and created.code_hash == {"h": 1}
        assert created.attestation.certificate_pem.strip() == pem.strip()
        with pytest.raises(CloudAlreadyExists):
            await activation.create(record("DEV-1", pem))  # registration ids ignore case, as on DPS

        seen = await activation.get("dev-1")
        assert seen is not None and seen.etag == created.etag
        activated = await activation.update(enabled(seen))
        assert activated.etag != created.etag and (await factory.get("dev-1")).enabled
        with pytest.raises(CloudEtagMismatch):  # the factory's read is stale now
            await factory.update(replace(created, code_hash={"h": 2}))
        with pytest.raises(CloudNotFound):
            await factory.update(record("dev-none", pem, etag="*"))

        await activation.record_assignment("dev-1", "hub-a.example")
        assigned = await factory.get("dev-1")
        assert assigned.etag == activated.etag  # a registration never makes an activation lose its race
        assert assigned.registration_state is not None
        assert assigned.registration_state.assigned_hub == "hub-a.example"
    finally:
        await factory.close()
        await activation.close()


async def test_assignments_of_devices_booting_together_share_commits(database_url, pem):
    """The allocation webhook's write: each assignment durable when its call returns, concurrent ones in
    shared commits (one fsync on SQLite), one that finds no record changing nothing of the others."""
    registry = await DeviceRegistry.open(database_url, migrate=True)
    try:
        ids = [f"dev-boot-{n}" for n in range(12)]
        assert await registry.bulk_create([record(i, pem) for i in ids]) == []
        commits = registry.assignment_commits
        assert commits is not None  # both backends group them
        await asyncio.gather(*(registry.record_assignment(i, "hub-a.example") for i in [*ids, "dev-none"]))
        assert 1 <= (registry.assignment_commits or 0) - commits < len(ids)
        for device_id in ids:
            state = (await registry.get(device_id)).registration_state
            assert state is not None and state.assigned_hub == "hub-a.example"
        assert await registry.get("dev-none") is None
    finally:
        await registry.close()


async def test_of_two_writers_on_one_etag_exactly_one_wins(database_url, pem):
    registries = [await DeviceRegistry.open(database_url, migrate=True) for _ in range(2)]
    try:
        base = await registries[0].create(record("dev-race", pem))
        updates = [r.update(replace(base, code_hash={"h": n})) for n, r in enumerate(registries * 4)]
        results = await asyncio.gather(*updates, return_exceptions=True)
        won = [r for r in results if isinstance(r, Enrollment)]
        assert len(won) == 1 and all(isinstance(r, CloudEtagMismatch) for r in results if r not in won)
        assert (await registries[1].get("dev-race")).code_hash == won[0].code_hash
    finally:
        for registry in registries:
            await registry.close()


async def test_bulk_writes_report_each_item_and_write_the_rest(database_url, pem):
    registry = await DeviceRegistry.open(database_url, migrate=True)
    try:
        await registry.create(record("bulk-0", pem))
        errors = await registry.bulk_create([record(f"bulk-{n}", pem) for n in range(3)])
        assert [(e.registration_id, type(e.error)) for e in errors] == [("bulk-0", CloudAlreadyExists)]
        assert await registry.count() == 3
        fresh = await registry.get("bulk-1")
        stale = replace(await registry.get("bulk-2"), etag='"stale"')
        errors = await registry.bulk_update([enabled(fresh), enabled(stale)])
        assert [(e.registration_id, type(e.error)) for e in errors] == [("bulk-2", CloudEtagMismatch)]
        assert (await registry.get("bulk-1")).enabled and not (await registry.get("bulk-2")).enabled
    finally:
        await registry.close()


async def test_on_postgresql_the_table_comes_with_migrate(postgres_url):
    url = DatabaseUrl.parse(postgres_url)
    with pytest.raises(SchemaBehind):
        await DeviceRegistry.open(url)
    await (await DeviceRegistry.open(url, migrate=True)).close()
    await (await DeviceRegistry.open(url)).close()


@pytest.mark.slow
async def test_a_database_that_cannot_be_reached_is_unavailable_and_the_registry_recovers(
    pg_cluster, postgres_url, pem
):
    registry = await DeviceRegistry.open(DatabaseUrl.parse(postgres_url), migrate=True)
    try:
        await registry.create(record("dev-away", pem))
        with database_away(pg_cluster, postgres_url):
            with pytest.raises(CloudUnavailable):  # its open connection was ended
                await registry.get("dev-away")
            with pytest.raises(CloudUnavailable, match="PoolTimeout"):  # no new one within registry.WAIT
                await registry.get("dev-away")
            with pytest.raises(CloudUnavailable):
                await registry.record_assignment("dev-away", "hub-a.example")

        async def readable() -> Enrollment | None:
            with contextlib.suppress(CloudUnavailable):  # until the pool's next attempt to connect
                return await registry.get("dev-away")
            return None

        found = await until(readable, "the registry reads again once its database is back", timeout=60)
        assert found.registration_state is None  # the assignment refused meanwhile was not written
    finally:
        await registry.close()
