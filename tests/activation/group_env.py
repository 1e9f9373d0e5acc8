"""Group mode's test stack: factory_svc and activation_svc settings in group mode (one device registry, the
allocation webhook on a fixed loopback port, one function key), both services running with the group
written (``running_stack``), the operator's command as a process, the webhook called directly, the
emulator's count of DPS service writes, the allocation audit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import ssl
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from enrollment.provisioning_env import (
    OemTls,
    activation_env,
    factory_env,
    mint,
    running_activation,
    running_factory,
)
from support.emulator import free_port
from support.metrics import scrape

from devprov.v1 import factory_service_pb2 as fpb

KEY = "group-mode-function-key-0123456789"
META = {"tags": {"customer": "acme", "line": {"hall": 3}}, "properties": {"desired": {"interval_s": 5}}}
WRITES = "iot_emulator_dps_service_writes_total"


class Stack:
    def __init__(self, root: Path, emulator, tls: OemTls) -> None:
        self.root, self.emulator, self.tls = root, emulator, tls
        self.activation_dir = root / "activation"
        self.webhook_port = free_port("127.0.0.1")
        self.webhook = f"https://127.0.0.1:{self.webhook_port}/api/allocate"

    def factory_env(self) -> dict[str, str]:
        return factory_env(
            self.root,
            self.emulator,
            FACTORY_MODE="group",
            FACTORY_REGISTRY_DATABASE_URL=f"sqlite:///{self.activation_dir}",
            FACTORY_GROUP_FUNCTION_KEY=KEY,
        )

    def activation_env(self) -> dict[str, str]:
        return activation_env(
            self.root,
            self.emulator,
            self.tls,
            ACTIVATION_MODE="group",
            ACTIVATION_ALLOCATION_LISTEN=f"127.0.0.1:{self.webhook_port}",
            ACTIVATION_ALLOCATION_FUNCTION_KEY=KEY,
        )

    async def apply_group(self, *extra: str) -> dict:
        """The operator's command, as its own process."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "factory_svc.cli",
            "enrollment-group",
            "--webhook-url",
            self.webhook,
            "--json",
            *extra,
            env={**os.environ, **self.factory_env()},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        return json.loads(out)

    def audit(self, device_id: str) -> list[tuple[str, str]]:
        with sqlite3.connect(self.activation_dir / "audit.sqlite3") as db:
            return db.execute(
                "SELECT outcome, detail FROM audit WHERE action = 'allocate' AND device_id = ? ORDER BY id",
                (device_id,),
            ).fetchall()

    async def dps_writes(self) -> float:
        return (await scrape(self.emulator.connection["metrics_url"])).total(WRITES)

    async def post(
        self, body: object, key: str = KEY, content_type: str | None = "application/json"
    ) -> tuple[int, str]:
        """A direct call to the webhook, as anyone who can reach it: ``body`` as JSON, or bytes as they are
        (``content_type`` None: no Content-Type header at all)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": content_type} if content_type else {}
        context = ssl.create_default_context(cafile=str(self.tls.ca_file))
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
            session.post(
                f"{self.webhook}?code={key}", data=data, headers=headers, skip_auto_headers=["Content-Type"]
            ) as response,
        ):
            return response.status, await response.text()

    async def enrolled(self, factory=None) -> tuple:
        """A device minted and enrolled by the factory (nothing written to DPS), and its activation code."""
        factory = factory or self.factory
        device = await mint(factory, str(uuid.uuid4()), self.root / "devices")
        reply = await factory.Enroll(
            fpb.EnrollRequest(device_id=device.device_id, certificate_pem=device.chain_pem)
        )
        assert reply.outcome == fpb.ENROLL_OUTCOME_CREATED and reply.activation_code
        return device, reply.activation_code


@contextlib.asynccontextmanager
async def running_stack(root: Path, emulator, tls: OemTls, **activation_extra: str) -> AsyncIterator[Stack]:
    """activation_svc (its webhook, ``activation_extra`` added to its settings) and factory_svc in group mode
    on ``emulator``, the enrollment group written by the operator's command (``stack.group``, its answer):
    ``stack.factory`` and ``stack.activation`` are their gRPC stubs, ``stack.factory_app`` and
    ``stack.activation_app`` the apps."""
    stack = Stack(root, emulator, tls)
    activation_settings = {**stack.activation_env(), **activation_extra}
    async with (
        running_activation(activation_settings, tls) as (activation_app, activation),
        running_factory(stack.factory_env()) as (factory_app, factory),
    ):
        stack.factory, stack.activation = factory, activation
        stack.activation_app, stack.factory_app = activation_app, factory_app
        stack.group = await stack.apply_group()
        assert stack.group["outcome"] in ("created", "unchanged")
        yield stack


def emulator_args(tls: OemTls, assignment_delay: str = "immediate") -> list[str]:
    """The emulator for group mode: immediate answers (or Azure's ``202 assigning`` for
    ``assignment_delay`` seconds), the webhook's CA trusted, /metrics on."""
    return [
        "--assignment-delay", assignment_delay,
        "--allocation-webhook-timeout", "5",
        "--allocation-webhook-ca", str(tls.ca_file),
        "--metrics-listen", "127.0.0.1:0",
    ]


async def dps_group(emulator, group_id: str) -> dict:
    """The enrollment group as Python's azure-iot-deviceprovisioning reads it from the emulator's DPS."""
    from azure.iot.deviceprovisioning.aio import DeviceProvisioningClient

    async with DeviceProvisioningClient.from_connection_string(
        emulator.dps_connection_string, connection_verify=str(emulator.ca_path)
    ) as client:
        return await client.enrollment_group.get(id=group_id)


def runtime_context(device_id: str, subject: str, sha256: str, stack: Stack) -> dict:
    """An AllocationRequest as DPS sends it for an X.509 device of the group."""
    return {
        "enrollmentGroup": {"enrollmentGroupId": "devprov-factory"},
        "deviceRuntimeContext": {
            "registrationId": device_id,
            "x509": {"certificateInfo": {"subjectName": subject, "sha256Thumbprint": sha256}},
        },
        "linkedHubs": list(stack.emulator.hub_hosts),
    }


def sha256_of(device) -> str:
    """The SHA-256 thumbprint of a device's leaf certificate, as DPS reports it."""
    leaf = x509.load_pem_x509_certificates(device.chain_pem.encode())[0]
    return leaf.fingerprint(hashes.SHA256()).hex().upper()
