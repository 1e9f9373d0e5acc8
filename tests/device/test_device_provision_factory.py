"""`provision` against a real factory_svc gRPC server on loopback (insecure and mutual TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from support.parties import FACTORY_URI, party

from device_client.errors import FactoryError, IdentityExistsError, StateError
from device_client.identity import KeyType
from device_client.provisioning import ProvisionRequest, provision
from device_client.settings import load_settings
from device_client.state import StateDir
from devprov.v1 import factory_service_pb2 as pb
from devprov.v1 import factory_service_pb2_grpc as pb_grpc
from factory_svc.app import FactoryApp
from factory_svc.errors import ERROR_DOMAIN
from factory_svc.mint.service import MintPolicy
from factory_svc.settings import CaSettings, FactorySettings
from provkit.channels import ChannelSecurity, create_channel
from provkit.context import Role
from provkit.devpki import DevTlsAuthority
from provkit.grpc_server import ClientAuth, ServerSettings, ServerTLS

GUID = "5f0c7a2e-1b3d-4e5f-8a9b-0c1d2e3f4a5b"


@contextlib.asynccontextmanager
async def factory(data_dir: Path, server: ServerSettings | None = None) -> AsyncIterator[str]:
    settings = FactorySettings(
        server=server
        or ServerSettings(insecure=True, error_domain=ERROR_DOMAIN, insecure_identity=FACTORY_URI),
        data_dir=data_dir,
        ca=CaSettings(),
        mint=MintPolicy(),
    )
    app = await FactoryApp.open(settings)
    try:
        running = await app.start()
        try:
            yield f"127.0.0.1:{running.port}"
        finally:
            await running.stop(0)
    finally:
        await app.close()


def device_settings(root: Path, address: str, **more):
    return load_settings(env={}, overrides={"state_root": str(root), "factory_address": address, **more})


async def ledger_for(address: str, guid: str) -> list:
    async with create_channel(address, ChannelSecurity(insecure=True)) as channel:
        resp = await pb_grpc.FactoryServiceStub(channel).ListCertificates(
            pb.ListCertificatesRequest(device_id=guid)
        )
    return list(resp.certificates)


async def test_csr_mode_stores_a_verified_identity(tmp_path):
    async with factory(tmp_path / "factory") as address:
        settings = device_settings(
            tmp_path / "devices", address, id_scope="0ne00000001", global_endpoint="dps.test"
        )
        result = await provision(ProvisionRequest(GUID, enroll=False), settings)
        issued = await ledger_for(address, GUID)
    state = StateDir(tmp_path / "devices", GUID)
    assert result.enrollment == "skipped" and result.activation_code is None
    assert os.stat(state.key_path).st_mode & 0o777 == 0o600
    ident = state.load_identity()
    assert ident.info.chain_length == 3  # leaf, issuing CA, root
    assert ident.info.key_type == "ec-secp256r1"
    assert ident.metadata["key_origin"] == "device"
    assert [c.serial_number for c in issued] == [ident.info.serial_hex]
    assert issued[0].key_source == pb.KEY_SOURCE_CSR  # the key never left the device
    assert issued[0].sha1_thumbprint == ident.info.thumbprint_sha1
    # The field configuration known at the factory is recorded for the device.
    assert 'id_scope = "0ne00000001"' in state.settings_path.read_text()


async def test_refuses_to_overwrite_unless_forced(tmp_path):
    async with factory(tmp_path / "factory") as address:
        settings = device_settings(tmp_path / "devices", address)
        first = await provision(ProvisionRequest(GUID, enroll=False), settings)
        state = StateDir(tmp_path / "devices", GUID)
        chain_before = state.chain_path.read_bytes()
        with pytest.raises(IdentityExistsError) as err:
            await provision(ProvisionRequest(GUID, enroll=False), settings)
        assert err.value.reason == "IDENTITY_EXISTS"
        assert state.chain_path.read_bytes() == chain_before
        assert len(await ledger_for(address, GUID)) == 1  # refused before calling the factory
        second = await provision(ProvisionRequest(GUID, enroll=False, force=True), settings)
        assert second.identity.serial_hex != first.identity.serial_hex
        assert state.load_identity().info.serial_hex == second.identity.serial_hex


async def test_server_side_key_generation(tmp_path):
    async with factory(tmp_path / "factory") as address:
        settings = device_settings(tmp_path / "devices", address)
        result = await provision(
            ProvisionRequest(GUID, key_type=KeyType.EC_P384, server_keygen=True, enroll=False), settings
        )
        issued = await ledger_for(address, GUID)
    ident = StateDir(tmp_path / "devices", GUID).load_identity()  # key matches the certificate
    assert ident.info.key_type == "ec-secp384r1" == result.identity.key_type
    assert ident.metadata["key_origin"] == "factory"
    assert issued[0].key_source == pb.KEY_SOURCE_SERVER_GENERATED


async def test_mutual_tls(tmp_path):
    pki = DevTlsAuthority.create()
    files = tmp_path / "tls"
    files.mkdir()
    (files / "ca.pem").write_bytes(pki.ca_pem)
    pki.server_certificate(["127.0.0.1", "localhost"]).write(files / "server.pem", files / "server.key")
    party(pki, Role.FACTORY, "plant-1", "test-bench-7").write(files / "client.pem", files / "client.key")
    server = ServerSettings(
        tls=ServerTLS(files / "server.pem", files / "server.key", files / "ca.pem", ClientAuth.REQUIRE),
        error_domain=ERROR_DOMAIN,
    )
    async with factory(tmp_path / "factory", server) as address:
        tls = {"factory_ca_file": str(files / "ca.pem")}
        without_cert = device_settings(tmp_path / "a", address, factory_tls="tls", **tls)
        with pytest.raises(FactoryError):
            await provision(ProvisionRequest(GUID, enroll=False), without_cert)
        assert not StateDir(tmp_path / "a", GUID).has_identity()
        mtls = device_settings(
            tmp_path / "b",
            address,
            factory_tls="mtls",
            factory_client_cert_file=str(files / "client.pem"),
            factory_client_key_file=str(files / "client.key"),
            **tls,
        )
        await provision(ProvisionRequest(GUID, enroll=False), mtls)
    leaf = x509.load_pem_x509_certificates(StateDir(tmp_path / "b", GUID).chain_path.read_bytes())[0]
    assert leaf.subject.rfc4514_string() == f"CN={GUID}"


@pytest.mark.slow
async def test_cli_provision_and_unreachable_factory(tmp_path):
    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "device_client",
            "--state-root",
            str(tmp_path / "devices"),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, out.decode(), err.decode()

    async with factory(tmp_path / "factory") as address:
        code, out, err = await cli("provision", GUID, "--factory", address, "--no-enroll")
        assert code == 0, err
        assert "serial" in out and "valid until" in out
        code, _, err = await cli("provision", GUID, "--factory", address, "--no-enroll")
        assert code == 6 and "IDENTITY_EXISTS" in err
    # The factory is gone now: a clear message and exit 5, no traceback.
    code, _, err = await cli("provision", str(uuid.uuid4()), "--factory", address, "--no-enroll")
    assert code == 5
    assert "FACTORY_UNAVAILABLE" in err and "Traceback" not in err
    assert not StateDir(tmp_path / "devices", "other-device").has_identity()


async def test_force_waits_for_no_running_device_and_drops_the_old_certificates_renewal(tmp_path):
    """A device whose `run` holds its lock keeps its key and chain: ``--force`` is refused with
    STATE_IN_USE before the factory is asked.  Once it is stopped, ``--force`` replaces the identity and
    drops what the old certificate's renewal left (a pending one would otherwise be promoted)."""
    async with factory(tmp_path / "factory") as address:
        settings = device_settings(tmp_path / "devices", address)
        first = await provision(ProvisionRequest(GUID, enroll=False), settings)
        state = StateDir(tmp_path / "devices", GUID)
        chain_before = state.chain_path.read_bytes()
        with state.locked(), pytest.raises(StateError) as err:  # the lock: what a live `run` holds
            await provision(ProvisionRequest(GUID, enroll=False, force=True), settings)
        assert err.value.reason == "STATE_IN_USE"
        assert state.chain_path.read_bytes() == chain_before
        assert len(await ledger_for(address, GUID)) == 1
        key_pem = state.key_path.read_bytes()
        state.write_pending(key_pem=key_pem, chain_pem=chain_before, metadata={"guid": GUID})
        second = await provision(ProvisionRequest(GUID, enroll=False, force=True), settings)
    assert second.identity.serial_hex != first.identity.serial_hex
    assert not state.has_pending() and not state.has_previous()
    assert state.read_renewal() is None
