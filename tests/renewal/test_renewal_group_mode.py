"""Renewal in group mode, with a real device: factory_svc (group mode, its EST listener on) and
activation_svc (group mode, its allocation webhook) in process, the emulator and `device-client run`
(Microsoft's azure-iot-device) as processes.  There is no individual enrollment to hold the renewed
certificate as the secondary: the device registry's record holds both thumbprints during the change-over,
the webhook allocates the device when it re-registers with the new certificate, and after the change-over
the record holds the new certificate alone (the old one is refused) and the ledger marks the old one
superseded.  DPS service writes for the device, counted by the emulator: 0.  And kill -9 of factory_svc
right after each of its registry writes (the crash points of the renewal's steps): the restart completes
the change-over from the registry and the ledger alone."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from activation.group_env import KEY, META, Stack, emulator_args, sha256_of
from azure.iot.device.exceptions import ClientError
from conftest import running_emulator
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from enrollment.provisioning_env import (
    DeviceFiles,
    OemTls,
    activate_request,
    dps_enrollment,
    register,
    registry,
    running_activation,
)
from renewal_env import EstClient, ServerTls, as_device, csr_for, new_key, renewal_env, running_factory
from support.device_process import device_client, device_status
from support.emulator import free_port
from support.factory_process import FactoryProcess
from support.waiting import exited, until
from test_renewal_faults import _enrolled, _until

from activation_svc.allocation.service import enrolled_thumbprints
from dbstore import DatabaseUrl
from device_client.identity import build_csr_pem, generate_key, key_to_pem
from device_client.state import StateDir
from devprov.v1 import factory_service_pb2 as fpb
from factory_svc.mint.issuer import serial_hex
from factory_svc.renewal.model import RenewalState
from provkit.cloud import slot_sha256
from provkit.devpki import write_private_file
from provkit.registry import DeviceRegistry

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def device_env(emulator, root: Path, est_url: str, ca_file: Path, leaf: x509.Certificate) -> dict[str, str]:
    """`device-client run`'s settings: the emulator's DPS, the factory's EST listener, the certificate
    falling due a few seconds after the start (``renewal.fraction`` of its hour)."""
    nb, na = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    fraction = max(0.01, (datetime.now(UTC) + timedelta(seconds=8) - nb) / (na - nb))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVICE_CLIENT_")}
    return {
        **env,
        "DEVICE_CLIENT_STATE_ROOT": str(root),
        "DEVICE_CLIENT_ID_SCOPE": emulator.id_scope,
        "DEVICE_CLIENT_GLOBAL_ENDPOINT": emulator.dps_host,
        "DEVICE_CLIENT_TRUSTED_CA_FILE": str(emulator.ca_path),
        "DEVICE_CLIENT_BACKOFF_INITIAL_S": "0.2",
        "DEVICE_CLIENT_BACKOFF_MAX_S": "1",
        "DEVICE_CLIENT_LOG_FORMAT": "json",
        "DEVICE_CLIENT_RENEWAL_EST_URL": est_url,
        "DEVICE_CLIENT_RENEWAL_CA_FILE": str(ca_file),
        "DEVICE_CLIENT_RENEWAL_CHECK_INTERVAL_S": "5",
        "DEVICE_CLIENT_RENEWAL_FRACTION": f"{fraction:.6f}",
    }


def hub_identity_sha1(emulator, hub: str, guid: str) -> str:
    device = registry(emulator, hub).get_device(guid)
    return str(device.authentication.x509_thumbprint.primary_thumbprint).upper()


async def test_a_renewed_device_re_registers_through_the_webhook_and_its_old_slot_is_dropped(tmp_path):
    tls = OemTls.create(tmp_path / "tls")
    est_tls = ServerTls.create(tmp_path / "est-tls")
    with running_emulator(tmp_path / "emulator", emulator_args(tls)) as emulator:
        stack = Stack(tmp_path, emulator, tls)
        factory_env = {
            **stack.factory_env(),
            "FACTORY_RENEWAL_LISTEN": "127.0.0.1:0",
            "FACTORY_RENEWAL_TLS_CERT_FILE": str(est_tls.cert_file),
            "FACTORY_RENEWAL_TLS_KEY_FILE": str(est_tls.key_file),
            "FACTORY_ENROLL_MIN_REMAINING_VALIDITY_DAYS": "0",  # an hour-long certificate
        }
        chosen = emulator.hub_hosts[1]
        async with (
            running_activation(stack.activation_env(), tls) as (activation_app, activation),
            running_factory(factory_env) as factory,
        ):
            await stack.apply_group()
            writes_before = await stack.dps_writes()

            # minted (MintCertificate's shortest validity, an hour), enrolled and activated: no DPS write
            guid, key = str(uuid.uuid4()), generate_key()
            request = fpb.MintCertificateRequest(device_id=guid, csr_pem=build_csr_pem(key, guid).decode())
            request.validity.FromTimedelta(timedelta(hours=1))
            chain_pem = (await factory.stub.MintCertificate(request)).certificate.certificate_chain_pem
            old = x509.load_pem_x509_certificates(chain_pem.encode())[0]
            code = (
                await factory.stub.Enroll(fpb.EnrollRequest(device_id=guid, certificate_pem=chain_pem))
            ).activation_code
            await activation.Activate(activate_request(guid, code, json.dumps(META), chosen))
            root = tmp_path / "devices"
            StateDir(root, guid).write_identity(
                key_pem=key_to_pem(key), chain_pem=chain_pem.encode(), metadata={"guid": guid}, force=False
            )
            kept = tmp_path / "old"  # the old identity, for a registration after the change-over
            kept.mkdir()
            (kept / "chain.pem").write_text(chain_pem)
            write_private_file(kept / "key.pem", key_to_pem(key))
            old_device = DeviceFiles(guid, chain_pem, kept / "chain.pem", kept / "key.pem", "")

            env = device_env(emulator, root, factory.est_url, est_tls.ca_file, old)
            proc = await device_client(env, "run", guid, "--interval", "1")

            async def confirmed() -> bool:
                last = (await device_status(env, guid))["renewal"]["last"]
                return last is not None and last["state"] == "confirmed"

            try:
                await until(
                    confirmed, "the renewal confirmed", timeout=200, interval=0.5, fail_if=exited(proc)
                )
            finally:
                proc.send_signal(signal.SIGTERM)
                _, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode()[-3000:]
            after = await device_status(env, guid)
            new = x509.load_pem_x509_certificates((root / guid / "device-chain.pem").read_bytes())[0]
            new_serial = after["identity"]["serial"]
            assert new.serial_number != old.serial_number and after["assignment"]["assigned_hub"] == chosen

            # the ledger: the old certificate superseded by the new one, the renewal done (by the device's
            # confirmation, or by the worker if that request's registry write failed)
            async def superseded() -> bool:
                newer = await factory.app.ledger.renewals.superseded_by(serial_hex(old.serial_number))
                assert newer in (None, new_serial)
                return newer == new_serial

            await until(superseded, "the old certificate superseded in the ledger")

            # the registry's record: the new certificate alone, still activated on the OEM's hub
            record = await activation_app.dps.get(guid)
            assert record is not None and record.enabled
            attestation = record.attestation
            new_sha256 = new.fingerprint(hashes.SHA256()).hex().upper()
            assert slot_sha256(attestation.certificate_pem, attestation.sha256_thumbprint) == new_sha256
            assert slot_sha256(attestation.secondary_pem, attestation.secondary_sha256_thumbprint) is None

            # the webhook allocated it at first boot and again with the new certificate (more often when a
            # registration timed out at DPS and the device tried again), never refused it; the hub knows the
            # new certificate; the old one is refused now, the reason audited
            allocations = stack.audit(guid)
            assert len(allocations) >= 2 and set(allocations) == {("ok", f"hub={chosen}")}
            thumbprint = await asyncio.to_thread(hub_identity_sha1, emulator, chosen, guid)
            assert thumbprint == new.fingerprint(hashes.SHA1()).hex().upper()
            with pytest.raises(ClientError):
                await register(emulator, old_device)
            assert stack.audit(guid)[-1] == ("refused", "CERTIFICATE_NOT_ENROLLED")

            assert await stack.dps_writes() == writes_before  # 0 DPS service writes for the device


@pytest.mark.faults
@pytest.mark.parametrize("point", ["renewal.after_dps_secondary", "renewal.after_dps_primary"])
async def test_killed_after_the_registry_write_the_restart_completes_the_renewal(
    tmp_path, module_emulator, point: str
):
    """kill -9 of factory_svc (group mode, a process) right after its write to the device registry: the new
    certificate in the secondary slot before the device was answered, or made the primary before the ledger
    followed.  The restart completes the recorded intent; the registry holds what the webhook must accept:
    both certificates until the change-over, then the new one alone (the old superseded in the ledger)."""
    tls = ServerTls.create(tmp_path / "tls")
    port = free_port("127.0.0.1")
    url = f"https://127.0.0.1:{port}"
    registry_url = DatabaseUrl.sqlite(tmp_path / "registry")
    env = renewal_env(
        tmp_path, module_emulator, tls, port,
        FACTORY_MODE="group", FACTORY_REGISTRY_DATABASE_URL=f"sqlite:///{tmp_path / 'registry'}",
        FACTORY_GROUP_FUNCTION_KEY=KEY,
    )  # fmt: skip
    factory = FactoryProcess(env, tmp_path / "factory.log")

    async def accepted(device_id: str) -> set[str]:
        """The thumbprints the webhook accepts for the device (its registry record's slots)."""
        registry = await DeviceRegistry.open(registry_url)
        try:
            found = await registry.get(device_id)
        finally:
            await registry.close()
        assert found is not None
        return enrolled_thumbprints(found)

    try:
        await factory.start(crash_at=point)
        device = await _enrolled(factory, tmp_path / "devices")
        old = sha256_of(device)
        client, key = EstClient(url, tls, device.cert_path, device.key_path), new_key()
        if point == "renewal.after_dps_secondary":
            with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
                await client.renew(csr_for(device.device_id, key))
        else:
            answer = await client.renew(csr_for(device.device_id, key))
            renewed = as_device(device, key, answer.certificates, tmp_path / "renewed")
            with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
                await EstClient(url, tls, renewed.cert_path, renewed.key_path).cacerts()  # the promotion
        assert await factory.killed() == -signal.SIGKILL
        left = await accepted(device.device_id)
        assert await dps_enrollment(module_emulator, device.device_id) is None  # nothing of it in DPS

        await factory.start()
        if point == "renewal.after_dps_secondary":
            assert len(left) == 2 and old in left  # written before the crash: both certificates
            await _until(tmp_path, device.device_id, RenewalState.SECONDARY, factory)
            answer = await client.renew(csr_for(device.device_id, key))  # the device's retry: the same one
            renewed = as_device(device, key, answer.certificates, tmp_path / "renewed")
            assert await accepted(device.device_id) == left == {old, sha256_of(renewed)}
        else:
            assert left == {sha256_of(renewed)}  # promoted before the crash: the old slot dropped
            await _until(tmp_path, device.device_id, None, factory)  # done: no open renewal left
            refused = await client.renew(csr_for(device.device_id, new_key()))
            assert (refused.status, refused.reason) == (403, "CERTIFICATE_SUPERSEDED")
            assert await accepted(device.device_id) == {sha256_of(renewed)}
    finally:
        await factory.stop()

