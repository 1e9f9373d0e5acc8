"""kill -9 of a real factory_svc process in the middle of a renewal, right after the DPS enrollment got the
new certificate as its secondary and before the step was recorded (DEVPROV_CRASH_AT=
renewal.after_dps_secondary): the restarted process completes the recorded intent at start-up, the device's
retry with the same request answers the certificate DPS holds (no second one), and ``factory-svc expiring``
shows the renewal pending."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import sys
import uuid

import aiohttp
import pytest
from cryptography.hazmat.primitives import hashes
from enrollment.provisioning_env import dps_enrollment, mint
from renewal_env import EstClient, ServerTls, as_device, csr_for, new_key, renewal_env
from support.emulator import free_port
from support.factory_process import FactoryProcess
from support.waiting import until

from dbstore import DatabaseUrl
from devprov.v1 import factory_service_pb2 as fpb
from factory_svc.ledger import Ledger
from factory_svc.renewal.model import RenewalState

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240), pytest.mark.slow]


async def _renewal_state(tmp_path, device_id: str) -> RenewalState | None:
    ledger = await Ledger.open(DatabaseUrl.sqlite(tmp_path / "factory"))
    try:
        renewals = await ledger.renewals.open_renewals(device_id)
        return renewals[-1].state if renewals else None
    finally:
        await ledger.close()


async def _enrolled(factory: FactoryProcess, folder):
    async with factory.stub() as stub:
        device = await mint(stub, str(uuid.uuid4()), folder)
        await stub.Enroll(fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem))
    return device


async def test_a_renewal_killed_after_the_dps_write_is_completed_at_start_up(
    tmp_path, module_emulator
) -> None:
    tls = ServerTls.create(tmp_path / "tls")
    port = free_port("127.0.0.1")
    factory = FactoryProcess(renewal_env(tmp_path, module_emulator, tls, port), tmp_path / "factory.log")
    url = f"https://127.0.0.1:{port}"
    try:
        await factory.start(crash_at="renewal.after_dps_secondary")
        device = await _enrolled(factory, tmp_path / "devices")
        client = EstClient(url, tls, device.cert_path, device.key_path)
        key = new_key()
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            await client.renew(csr_for(device.device_id, key))
        assert await factory.killed() == -signal.SIGKILL
        # what the crash left: DPS holds the new certificate as secondary, the ledger's step not marked
        slots = (await dps_enrollment(module_emulator, device.device_id))["attestation"]["x509"][
            "clientCertificates"
        ]
        in_dps = slots["secondary"]["info"]["sha256Thumbprint"]
        assert await _renewal_state(tmp_path, device.device_id) is RenewalState.ISSUED

        await factory.start()  # no crash point: the worker completes the open intent at start-up

        async def completed() -> bool:
            return await _renewal_state(tmp_path, device.device_id) is RenewalState.SECONDARY

        await until(completed, lambda: f"the renewal completed after the restart:\n{factory.log_tail()}")

        answer = await client.renew(csr_for(device.device_id, key))  # the device's retry
        leaf = next(c for c in answer.certificates if c.subject.rfc4514_string() == f"CN={device.device_id}")
        assert leaf.fingerprint(hashes.SHA256()).hex().upper() == in_dps
        async with factory.stub() as stub:
            listed = await stub.ListCertificates(fpb.ListCertificatesRequest(device_id=device.device_id))
        assert len(listed.certificates) == 2  # one renewal, one new certificate

        env = {**factory.env, "PYTHONPATH": os.pathsep.join(sys.path)}
        listing = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "factory_svc.cli", "expiring", "--within", "800d", "--json",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(listing.communicate(), 60)
        assert listing.returncode == 0, err
        rows = [row for row in json.loads(out) if row["device_id"] == device.device_id]
        new_serial = f"{leaf.serial_number:X}"
        assert [(r["renewal"], r["new_serial_number"].lstrip("0")) for r in rows] == [("pending", new_serial)]
    finally:
        await factory.stop()


async def _delete_enrollment(emulator, device_id: str) -> None:
    from azure.iot.deviceprovisioning.aio import DeviceProvisioningClient

    async with DeviceProvisioningClient.from_connection_string(
        emulator.dps_connection_string, connection_verify=str(emulator.ca_path)
    ) as client:
        await client.enrollment.delete(id=device_id)


async def _until(tmp_path, device_id: str, state: RenewalState | None, factory: FactoryProcess) -> None:
    for _ in range(600):
        if await _renewal_state(tmp_path, device_id) is state:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the renewal did not reach {state}:\n{factory.log_tail()}")


@pytest.mark.parametrize("gone", [False, True], ids=["resumed", "enrollment-gone"])
async def test_a_renewal_killed_after_the_ledger_write_is_resumed_or_answers_not_enrolled(
    tmp_path, module_emulator, gone: bool
) -> None:
    """kill -9 after the ledger held the new certificate, before DPS: the restart writes the secondary and
    the retry answers that certificate; if the enrollment disappeared meanwhile, DEVICE_NOT_ENROLLED."""
    tls = ServerTls.create(tmp_path / "tls")
    port = free_port("127.0.0.1")
    factory = FactoryProcess(renewal_env(tmp_path, module_emulator, tls, port), tmp_path / "factory.log")
    try:
        await factory.start(crash_at="renewal.after_ledger")
        device = await _enrolled(factory, tmp_path / "devices")
        client = EstClient(f"https://127.0.0.1:{port}", tls, device.cert_path, device.key_path)
        key = new_key()
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            await client.renew(csr_for(device.device_id, key))
        assert await factory.killed() == -signal.SIGKILL
        slots = (await dps_enrollment(module_emulator, device.device_id))["attestation"]["x509"][
            "clientCertificates"
        ]
        assert set(slots) == {"primary"}  # DPS not written yet
        assert await _renewal_state(tmp_path, device.device_id) is RenewalState.ISSUED
        if gone:
            await _delete_enrollment(module_emulator, device.device_id)

        await factory.start()
        if not gone:
            await _until(tmp_path, device.device_id, RenewalState.SECONDARY, factory)
        answer = await client.renew(csr_for(device.device_id, key))
        if gone:
            assert (answer.status, answer.reason) == (403, "DEVICE_NOT_ENROLLED")
            return
        leaf = next(c for c in answer.certificates if c.subject.rfc4514_string() == f"CN={device.device_id}")
        slots = (await dps_enrollment(module_emulator, device.device_id))["attestation"]["x509"][
            "clientCertificates"
        ]
        assert (
            slots["secondary"]["info"]["sha256Thumbprint"] == leaf.fingerprint(hashes.SHA256()).hex().upper()
        )
    finally:
        await factory.stop()


async def test_a_promotion_killed_after_the_dps_write_is_completed_at_start_up(
    tmp_path, module_emulator
) -> None:
    """kill -9 after DPS made the new certificate the primary, before the ledger followed: the restart
    completes it (the old certificate superseded), and the old one can no longer renew."""
    tls = ServerTls.create(tmp_path / "tls")
    port = free_port("127.0.0.1")
    url = f"https://127.0.0.1:{port}"
    factory = FactoryProcess(renewal_env(tmp_path, module_emulator, tls, port), tmp_path / "factory.log")
    try:
        await factory.start(crash_at="renewal.after_dps_primary")
        device = await _enrolled(factory, tmp_path / "devices")
        client = EstClient(url, tls, device.cert_path, device.key_path)
        key = new_key()
        answer = await client.renew(csr_for(device.device_id, key))
        renewed = as_device(device, key, answer.certificates, tmp_path / "renewed")
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            await EstClient(url, tls, renewed.cert_path, renewed.key_path).cacerts()  # the promotion signal
        assert await factory.killed() == -signal.SIGKILL
        slots = (await dps_enrollment(module_emulator, device.device_id))["attestation"]["x509"][
            "clientCertificates"
        ]
        assert set(slots) == {"primary"}  # DPS promoted
        assert await _renewal_state(tmp_path, device.device_id) is RenewalState.PROMOTE

        await factory.start()
        await _until(tmp_path, device.device_id, None, factory)  # done: no open renewal left
        refused = await client.renew(csr_for(device.device_id, new_key()))
        assert (refused.status, refused.reason) == (403, "CERTIFICATE_SUPERSEDED")
    finally:
        await factory.stop()
