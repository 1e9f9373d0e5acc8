"""Shared test helpers for the enrollment and activation tests: real factory_svc / activation_svc gRPC
servers on loopback (built from their settings, as `serve` builds them), pointed at a real emulator
process through its connection.json; Microsoft's SDKs for the device and for checking the cloud."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from azure.iot.device import X509
from azure.iot.device.aio import IoTHubDeviceClient, ProvisioningDeviceClient
from azure.iot.device.exceptions import ClientError, CredentialError
from support.cli_process import wait_serving
from support.dps_device import register_once
from support.emulator import EmulatorProcess, free_port
from support.parties import FACTORY_URI, party

from activation_svc.app import ActivationApp
from activation_svc.settings import load_settings as load_activation_settings
from devprov.v1 import activation_service_pb2 as apb
from devprov.v1 import activation_service_pb2_grpc as apb_grpc
from devprov.v1 import factory_service_pb2 as fpb
from devprov.v1 import factory_service_pb2_grpc as fpb_grpc
from factory_svc.app import FactoryApp
from factory_svc.settings import load_settings as load_factory_settings
from provkit.channels import ChannelSecurity, create_channel
from provkit.context import Role
from provkit.devpki import DevTlsAuthority, write_private_file
from provkit.grpc_errors import RpcErrorDetails, error_details
from provkit.observe import Observability

SDK_TIMEOUT = 30.0  # some SDK failures make calls hang forever


def connection_file(emulator) -> Path:
    return Path(emulator.data_dir) / "connection.json"


def factory_env(tmp_path: Path, emulator, **extra: str) -> dict[str, str]:
    return {
        "FACTORY_DATA_DIR": str(tmp_path / "factory"),
        "FACTORY_SERVER_INSECURE": "true",
        "FACTORY_SERVER_INSECURE_IDENTITY": FACTORY_URI,
        "FACTORY_SERVER_PORT": "0",
        "FACTORY_CLOUD_EMULATOR_CONNECTION_FILE": str(connection_file(emulator)),
        "FACTORY_CLOUD_RETRY_TOTAL": "1",
        "FACTORY_ENROLL_DELIVERY_BACKOFF_MAX": "0.5",
        "FACTORY_ENROLL_CODE_HASH_LOG2_N": "8",
        **extra,
    }


def stopped_emulator(tmp_path) -> tuple[EmulatorProcess, dict[str, str]]:
    """An emulator that ran once (its keys and CA persist) and is now down, and the factory settings that
    point at a saved copy of its connection facts (the emulator removes connection.json when it stops)."""
    emulator = EmulatorProcess(tmp_path / "emulator", hubs=1).start()
    saved = tmp_path / "cloud-connection.json"
    saved.write_text(connection_file(emulator).read_text())
    emulator.stop()
    return emulator, {**factory_env(tmp_path, emulator), "FACTORY_CLOUD_EMULATOR_CONNECTION_FILE": str(saved)}


@contextlib.asynccontextmanager
async def running_factory(
    env: Mapping[str, str], observe: Observability | None = None
) -> AsyncIterator[tuple[FactoryApp, fpb_grpc.FactoryServiceStub]]:
    """factory_svc as `serve` builds it (enrollment on, pointed at the emulator), on a free loopback port.
    ``app.grpc_address`` is where it listens."""
    settings = load_factory_settings(env=dict(env))
    app = await FactoryApp.open(settings, observe=observe)
    assert app.enrollment is not None, "enrollment must be configured"
    server = await app.start()
    app.grpc_address = server.address  # type: ignore[attr-defined]
    try:
        async with create_channel(server.address, ChannelSecurity(insecure=True)) as channel:
            yield app, fpb_grpc.FactoryServiceStub(channel)
    finally:
        await server.stop(0)
        await app.close()


@dataclass(frozen=True)
class OemTls:
    """A TLS CA for activation_svc: its server certificate, an OEM client certificate
    (``urn:devprov:oem:acme``) and the portal's (``urn:devprov:portal:acme``), for mTLS."""

    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_cn: str
    authority: DevTlsAuthority

    @property
    def portal_cert(self) -> Path:
        return self.ca_file.parent / "portal.pem"

    @property
    def portal_key(self) -> Path:
        return self.ca_file.parent / "portal.key"

    @classmethod
    def create(cls, folder: Path, client_cn: str = "oem-backoffice") -> OemTls:
        authority = DevTlsAuthority.create()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ca.pem").write_bytes(authority.ca_pem)
        authority.server_certificate(["127.0.0.1", "localhost"]).write(
            folder / "server.pem", folder / "server.key"
        )
        party(authority, Role.OEM, "acme", client_cn).write(folder / "client.pem", folder / "client.key")
        party(authority, Role.PORTAL, "acme", "portal").write(folder / "portal.pem", folder / "portal.key")
        return cls(
            folder / "ca.pem",
            folder / "server.pem",
            folder / "server.key",
            folder / "client.pem",
            folder / "client.key",
            client_cn,
            authority,
        )

    def client_security(self) -> ChannelSecurity:
        return ChannelSecurity.from_files(self.ca_file, self.client_cert, self.client_key)


def activation_env(tmp_path: Path, emulator, tls: OemTls, **extra: str) -> dict[str, str]:
    return {
        "ACTIVATION_DATA_DIR": str(tmp_path / "activation"),
        "ACTIVATION_SERVER_PORT": "0",
        "ACTIVATION_SERVER_TLS_CERT_FILE": str(tls.server_cert),
        "ACTIVATION_SERVER_TLS_KEY_FILE": str(tls.server_key),
        "ACTIVATION_SERVER_CLIENT_CA_FILE": str(tls.ca_file),
        "ACTIVATION_CLOUD_EMULATOR_CONNECTION_FILE": str(connection_file(emulator)),
        **extra,
    }


@contextlib.asynccontextmanager
async def running_activation(
    env: Mapping[str, str], tls: OemTls, observe: Observability | None = None
) -> AsyncIterator[tuple[ActivationApp, apb_grpc.ActivationServiceStub]]:
    """activation_svc as `serve` builds it (mTLS); ``app.grpc_address`` is where it listens."""
    app = await ActivationApp.open(load_activation_settings(env=dict(env)), observe=observe)
    server = await app.start()
    app.grpc_address = server.address  # type: ignore[attr-defined]
    try:
        async with create_channel(f"127.0.0.1:{server.port}", tls.client_security()) as channel:
            yield app, apb_grpc.ActivationServiceStub(channel)
    finally:
        await server.stop(0)
        await app.close()


def activation_client_env(target: str, tls: OemTls) -> dict[str, str]:
    """The environment with which the `activation-svc` client commands reach ``target`` as the OEM."""
    return {
        **os.environ,
        "ACTIVATION_CLIENT_TARGET": target,
        "ACTIVATION_CLIENT_CA_FILE": str(tls.ca_file),
        "ACTIVATION_CLIENT_CERT_FILE": str(tls.client_cert),
        "ACTIVATION_CLIENT_KEY_FILE": str(tls.client_key),
    }


@contextlib.asynccontextmanager
async def activation_serve_process(tmp_path: Path, emulator, tls: OemTls) -> AsyncIterator[dict[str, str]]:
    """`activation-svc serve` as its own process (mTLS, a free loopback port, its log in
    ``tmp_path/activation.log``); yields the environment with which the `activation-svc` client commands
    reach it.  SIGTERM stops it on leaving, and must end it with exit code 0."""
    port = free_port("127.0.0.1")
    target = f"127.0.0.1:{port}"
    env = {**os.environ, **activation_env(tmp_path, emulator, tls, ACTIVATION_SERVER_PORT=str(port))}
    with (tmp_path / "activation.log").open("wb") as log:
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "activation_svc.cli", "serve", env=env, stdout=log, stderr=log
        )
        try:
            await wait_serving(target, tls.client_security(), "activation-svc serve")
            yield activation_client_env(target, tls)
        finally:
            server.send_signal(signal.SIGTERM)
            stopped = await asyncio.wait_for(server.wait(), 30)
    assert stopped == 0, "activation-svc serve did not stop cleanly on SIGTERM"


@dataclass(frozen=True)
class DeviceFiles:
    device_id: str
    chain_pem: str
    cert_path: Path
    key_path: Path
    sha1: str


async def mint(stub: fpb_grpc.FactoryServiceStub, device_id: str, folder: Path) -> DeviceFiles:
    reply = await stub.MintCertificate(
        fpb.MintCertificateRequest(device_id=device_id, server_key_generation=fpb.ServerKeyGeneration())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path = folder / f"{device_id}.chain.pem"
    cert_path.write_text(reply.certificate.certificate_chain_pem)
    key_path = folder / f"{device_id}.key.pem"
    write_private_file(key_path, reply.private_key_pem.encode())
    return DeviceFiles(
        device_id,
        reply.certificate.certificate_chain_pem,
        cert_path,
        key_path,
        reply.certificate.sha1_thumbprint,
    )


async def enrolled(
    factory: fpb_grpc.FactoryServiceStub, folder: Path, device_id: str | None = None
) -> tuple[DeviceFiles, str]:
    """A device factory_svc minted (server-side key) into ``folder/devices`` and enrolled (disabled), and
    its activation code."""
    device = await mint(factory, device_id or str(uuid.uuid4()), folder / "devices")
    reply = await factory.Enroll(
        fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem)
    )
    assert reply.outcome == fpb.ENROLL_OUTCOME_CREATED and reply.activation_code
    return device, reply.activation_code


async def failure(call) -> RpcErrorDetails:
    """The decoded error of an awaitable gRPC call that must fail."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return error_details(exc)
    raise AssertionError("the call succeeded")


async def register(emulator, device: DeviceFiles) -> Any:
    client = ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host=emulator.dps_host,
        registration_id=device.device_id,
        id_scope=emulator.id_scope,
        x509=X509(str(device.cert_path), str(device.key_path)),
        server_verification_cert=emulator.ca_pem,
    )
    return await register_once(client, SDK_TIMEOUT)


@contextlib.asynccontextmanager
async def hub_session(emulator, device: DeviceFiles, hub: str) -> AsyncIterator[IoTHubDeviceClient]:
    """The device connected to ``hub`` with Microsoft's device SDK (no automatic reconnect); disconnected
    and shut down on leaving.  Raises what the SDK raises."""
    client = IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(str(device.cert_path), str(device.key_path)),
        hostname=hub,
        device_id=device.device_id,
        server_verification_cert=emulator.ca_pem,
        connection_retry=False,
    )
    try:
        await asyncio.wait_for(client.connect(), SDK_TIMEOUT)
        yield client
        await asyncio.wait_for(client.disconnect(), SDK_TIMEOUT)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.shutdown(), 5)


async def connect_to_hub(emulator, device: DeviceFiles, hub: str) -> None:
    """Connect (and disconnect) as the device; raises what the SDK raises."""
    async with hub_session(emulator, device, hub):
        pass


async def assert_locked_out(
    emulator, device: DeviceFiles, hub: str, activation: apb_grpc.ActivationServiceStub, code: str, meta: str
) -> None:
    """A revoked device: it can neither register nor connect (Microsoft's device SDK), and the OEM cannot
    enable it again (PERMISSION_DENIED: its activation-code hash went with the revocation)."""
    with pytest.raises(ClientError):
        await register(emulator, device)
    with pytest.raises((CredentialError, ClientError)):
        await connect_to_hub(emulator, device, hub)
    denied = await failure(activation.Activate(activate_request(device.device_id, code, meta)))
    assert denied.code == grpc.StatusCode.PERMISSION_DENIED


def registry(emulator, hub: str):
    from azure.iot.hub import IoTHubRegistryManager

    manager = IoTHubRegistryManager.from_connection_string(emulator.hub_connection_string(hub))
    manager.protocol.config.connection.verify = str(emulator.ca_path)
    return manager


async def hub_twin(emulator, hub: str, device_id: str):
    return await asyncio.wait_for(asyncio.to_thread(lambda: registry(emulator, hub).get_twin(device_id)), 30)


async def set_hub_desired(emulator, hub: str, device_id: str, desired: dict) -> None:
    """What another of the OEM's tools does: patch desired properties of the hub twin (azure-iot-hub)."""
    from azure.iot.hub.models import Twin, TwinProperties

    patch = Twin(properties=TwinProperties(desired=desired))
    await asyncio.wait_for(
        asyncio.to_thread(lambda: registry(emulator, hub).update_twin(device_id, patch, "*")), 30
    )


async def dps_enrollment(emulator, device_id: str) -> dict | None:
    from azure.core.exceptions import ResourceNotFoundError
    from azure.iot.deviceprovisioning.aio import DeviceProvisioningClient

    async with DeviceProvisioningClient.from_connection_string(
        emulator.dps_connection_string, connection_verify=str(emulator.ca_path)
    ) as client:
        try:
            return await client.enrollment.get(id=device_id)
        except ResourceNotFoundError:
            return None


async def dps_enrollment_list(emulator) -> list[dict]:
    """Every individual enrollment DPS holds (its query API, all pages)."""
    from azure.iot.deviceprovisioning.aio import DeviceProvisioningClient

    async with DeviceProvisioningClient.from_connection_string(
        emulator.dps_connection_string, connection_verify=str(emulator.ca_path)
    ) as client:
        pager = await client.enrollment.query(query_specification={"query": "*"})
        return [item async for item in pager]


def activate_request(device_id: str, code: str, metadata: str, hub: str = "", request_id: str = ""):
    return apb.ActivateRequest(
        device_id=device_id, activation_code=code, metadata_json=metadata, hub=hub, request_id=request_id
    )
