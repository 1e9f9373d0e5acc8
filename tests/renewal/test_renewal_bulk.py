"""The renewals' enrollment writes grouped into DPS bulk operations (``factory_svc.renewal.bulk``), against
the emulator through the factory's own DPS adapter: concurrent writes go out together (at most 10 a call,
one record per enrollment a call), each caller gets its own record's outcome (a stale etag fails only its
write), and concurrent renewals through the listener each find their certificate in the secondary slot."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import replace as dc_replace

from enrollment.provisioning_env import dps_enrollment, mint
from renewal_env import EstClient, ServerTls, csr_for, new_key, renewal_env, running_factory
from test_renewal_est import _leaf, _sha256, _slots

from devprov.v1 import factory_service_pb2 as fpb
from factory_svc.renewal.bulk import MAX_BULK, GroupedWrites
from provkit.cloud import BulkItemError, CloudEtagMismatch, Enrollment, EnrollmentPort


class Recorded:
    """The factory's DPS adapter, with the size of each bulk update it carried recorded."""

    def __init__(self, dps: EnrollmentPort) -> None:
        self._dps = dps
        self.calls: list[list[str]] = []

    async def get(self, registration_id: str) -> Enrollment | None:
        return await self._dps.get(registration_id)

    async def create(self, enrollment: Enrollment) -> Enrollment:
        return await self._dps.create(enrollment)

    async def update(self, enrollment: Enrollment) -> Enrollment:
        return await self._dps.update(enrollment)

    async def bulk_create(self, enrollments: Sequence[Enrollment]) -> list[BulkItemError]:
        return await self._dps.bulk_create(enrollments)

    async def bulk_update(self, enrollments: Sequence[Enrollment]) -> list[BulkItemError]:
        self.calls.append([e.registration_id for e in enrollments])
        return await self._dps.bulk_update(enrollments)


async def _enrolled(factory, folder, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        device = await mint(factory.stub, str(uuid.uuid4()), folder)
        await factory.stub.Enroll(
            fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem)
        )
        ids.append(device.device_id)
    return ids


async def test_concurrent_writes_go_out_grouped_and_each_gets_its_own_outcome(
    tmp_path, module_emulator
) -> None:
    tls = ServerTls.create(tmp_path / "tls")
    async with running_factory(renewal_env(tmp_path, module_emulator, tls)) as factory:
        ids = await _enrolled(factory, tmp_path / "devices", MAX_BULK + 3)
        dps = Recorded(factory.app.enrollment.dps)
        read = [await dps.get(i) for i in ids]
        assert all(e is not None for e in read)
        stale = read[1]
        assert stale is not None
        await dps.update(dc_replace(stale, device_id="changed-meanwhile"))  # its etag is now stale
        writes = GroupedWrites(dps)
        changed = [dc_replace(e, device_id="written") for e in read if e is not None]
        changed.append(changed[0])  # the same enrollment twice: never in one call (same etag)
        outcomes = await asyncio.gather(*(writes.update(e) for e in changed), return_exceptions=True)
        await writes.close()
    assert [type(o) for o in outcomes] == [
        CloudEtagMismatch if i in (1, len(changed) - 1) else type(None) for i in range(len(changed))
    ]
    assert all(len(call) <= MAX_BULK and len(set(call)) == len(call) for call in dps.calls)
    assert len(dps.calls) < len(changed)  # grouped
    assert sorted(i for call in dps.calls for i in call) == sorted(e.registration_id for e in changed)
    after = {i: await dps_enrollment(module_emulator, i) for i in ids}
    assert after[ids[1]]["deviceId"] == "changed-meanwhile"  # never overwritten blindly
    assert all(after[i]["deviceId"] == "written" for i in ids if i != ids[1])


async def test_concurrent_renewals_each_find_their_certificate_in_the_secondary_slot(
    tmp_path, module_emulator
) -> None:
    count = MAX_BULK + 2
    tls = ServerTls.create(tmp_path / "tls")
    async with running_factory(renewal_env(tmp_path, module_emulator, tls)) as factory:
        folder = tmp_path / "devices"
        devices = [await mint(factory.stub, str(uuid.uuid4()), folder) for _ in range(count)]
        for device in devices:
            await factory.stub.Enroll(
                fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem)
            )
        answers = await asyncio.gather(
            *(
                EstClient(factory.est_url, tls, d.cert_path, d.key_path).renew(
                    csr_for(d.device_id, new_key())
                )
                for d in devices
            )
        )
    for device, answer in zip(devices, answers, strict=True):
        slots = _slots(await dps_enrollment(module_emulator, device.device_id))
        assert slots["secondary"]["info"]["sha256Thumbprint"] == _sha256(_leaf(answer.certificates))
