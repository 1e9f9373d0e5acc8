"""Group mode's test stack: factory_svc and activation_svc settings in group mode (one device registry, the
allocation webhook on a fixed loopback port, one function key), the operator's command as a process, the
webhook called directly, the emulator's count of DPS service writes, the allocation audit."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import ssl
import sys
import uuid
from pathlib import Path

import aiohttp
from enrollment.provisioning_env import OemTls, activation_env, factory_env, mint
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

    async def post(self, body: object, key: str = KEY) -> tuple[int, str]:
        """A direct call to the webhook, as anyone who can reach it."""
        context = ssl.create_default_context(cafile=str(self.tls.ca_file))
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
            session.post(f"{self.webhook}?code={key}", json=body) as response,
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


def emulator_args(tls: OemTls) -> list[str]:
    """The emulator for group mode: immediate answers, the webhook's CA trusted, /metrics on."""
    return [
        "--assignment-delay", "immediate",
        "--allocation-webhook-timeout", "5",
        "--allocation-webhook-ca", str(tls.ca_file),
        "--metrics-listen", "127.0.0.1:0",
    ]
